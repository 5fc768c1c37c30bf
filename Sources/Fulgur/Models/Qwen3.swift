/// Qwen3 dense: Llama with RMSNorm on each query and key head before RoPE.
enum Qwen3 {
    static func spec(_ c: HFConfig) throws -> ModelSpec {
        let n = try c.int("num_hidden_layers")
        let sliding = try slidingLayers(c, count: n)
        let layers = try (0..<n).map { i in
            LayerSpec(attention: try DecoderConfig.attention(c, window: sliding[i] ? c.int("sliding_window") : nil, qkNorm: true),
                      feedForward: .dense(intermediate: try c.int("intermediate_size"), activation: .silu))
        }
        return try DecoderConfig.base(c, architecture: "Qwen3ForCausalLM", layers: layers, names: .huggingFace())
    }

    /// Qwen3 configs carry sliding-window fields that are off unless `use_sliding_window` is set.
    static func slidingLayers(_ c: HFConfig, count: Int) throws -> [Bool] {
        guard try c.bool("use_sliding_window", default: false) else { return Array(repeating: false, count: count) }
        if let types = try DecoderConfig.layerTypes(c, count: count) { return types }
        let maxWindowLayers = try c.int("max_window_layers", default: count)
        return (0..<count).map { $0 >= maxWindowLayers }
    }
}
