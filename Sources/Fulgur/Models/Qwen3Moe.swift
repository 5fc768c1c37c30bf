/// Qwen3-MoE: Qwen3 attention; MoE feed-forward with softmax routing over all experts,
/// top-k, optional renormalization; no shared experts.
enum Qwen3Moe {
    static func spec(_ c: HFConfig) throws -> ModelSpec {
        let n = try c.int("num_hidden_layers")
        let sliding = try Qwen3.slidingLayers(c, count: n)
        let dense = Set((c.values["mlp_only_layers"] as? [Int]) ?? [])
        let step = try c.int("decoder_sparse_step", default: 1)
        let moe = MoESpec(
            experts: try c.has("num_experts") ? c.int("num_experts") : c.int("num_local_experts"), topK: try c.int("num_experts_per_tok"),
            intermediate: try c.int("moe_intermediate_size"),
            routing: .softmaxTopK(normalize: try c.bool("norm_topk_prob", default: false)),
            routerBias: false, expertBias: false, activation: .silu, layout: .perExpert)
        let layers = try (0..<n).map { i in
            let isMoE = !dense.contains(i) && step > 0 && (i + 1) % step == 0
            return LayerSpec(
                attention: try DecoderConfig.attention(c, window: sliding[i] ? c.int("sliding_window") : nil, qkNorm: true),
                feedForward: isMoE ? .moe(moe) : .dense(intermediate: try c.int("intermediate_size"), activation: .silu))
        }
        return try DecoderConfig.base(c, architecture: "Qwen3MoeForCausalLM", layers: layers, names: .huggingFace())
    }
}
