/// OpenAI gpt-oss: alternating sliding-window (128) and full attention, a sink logit per
/// head, biases on q/k/v/o, router and experts; experts with gate/up columns interleaved and
/// a clamped SwiGLU; top-k of the router logits then softmax over the k; YaRN RoPE.
enum GptOss {
    static func spec(_ c: HFConfig) throws -> ModelSpec {
        let n = try c.int("num_hidden_layers")
        let sliding = try DecoderConfig.layerTypes(c, count: n) ?? (0..<n).map { $0 % 2 == 0 }
        let window = try c.int("sliding_window", default: 128)
        let moe = MoESpec(
            experts: try c.int("num_local_experts"), topK: try c.int("num_experts_per_tok", default: c.int("experts_per_token", default: 4)),
            intermediate: try c.int("intermediate_size"), routing: .topKSoftmax, routerBias: true, expertBias: true,
            activation: .clampedSwiGLU(alpha: 1.702, limit: Float(try c.double("swiglu_limit", default: 7))),
            layout: .gptOss)
        let layers = try (0..<n).map { i -> LayerSpec in
            var attention = try DecoderConfig.attention(c, window: sliding[i] ? window : nil, qkNorm: false)
            attention.hasSinks = true
            return LayerSpec(attention: attention, feedForward: .moe(moe))
        }
        return try DecoderConfig.base(c, architecture: "GptOssForCausalLM", layers: layers,
                                      names: .huggingFace(routerName: "mlp.router"))
    }
}
