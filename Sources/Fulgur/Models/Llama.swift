/// Llama (and SmolLM2, which is a Llama): pre-norm decoder, GQA, RoPE, SwiGLU MLP.
enum Llama {
    static func spec(_ c: HFConfig) throws -> ModelSpec {
        let n = try c.int("num_hidden_layers")
        let attention = try DecoderConfig.attention(c, window: nil, qkNorm: false)
        let layer = LayerSpec(attention: attention,
                              feedForward: .dense(intermediate: try c.int("intermediate_size"), activation: .silu))
        return try DecoderConfig.base(c, architecture: "LlamaForCausalLM", layers: Array(repeating: layer, count: n),
                                      names: .huggingFace())
    }

    /// A GGUF file of architecture `llama`. llama.cpp's converter permutes the rows of Q and K
    /// so that RoPE rotates adjacent pairs; the interleaved RoPE style undoes that exactly.
    static func spec(gguf g: GGUFFile) throws -> ModelSpec {
        func int(_ k: String) throws -> Int {
            guard let v = g.metadata["llama." + k]?.int, v > 0 else {
                throw FulgurError(.config, "\(g.path): metadata 'llama.\(k)' is missing or not a positive integer")
            }
            return v
        }
        let hidden = try int("embedding_length"), heads = try int("attention.head_count")
        let headDim = hidden / heads
        let theta = g.metadata["llama.rope.freq_base"]?.double ?? 10000
        let rotary = g.metadata["llama.rope.dimension_count"]?.int ?? headDim
        let attention = AttentionSpec(
            heads: heads, kvHeads: g.metadata["llama.attention.head_count_kv"]?.int ?? heads,
            headDim: headDim, valueHeadDim: headDim, window: nil, hasSinks: false,
            qkvBias: g.tensorIfPresent("blk.0.attn_q.bias") != nil, outputBias: false, qkNorm: false, valueScale: 1,
            softmaxScale: 1 / Float(headDim).squareRoot(),
            rope: .standard(theta: theta, rotaryDim: rotary, style: .interleaved))
        if let scaling = g.metadata["llama.rope.scaling.type"]?.string, scaling != "none" {
            throw FulgurError(.unsupported, "\(g.path): rope scaling '\(scaling)' is not supported for GGUF llama models")
        }
        let layer = LayerSpec(attention: attention,
                              feedForward: .dense(intermediate: try int("feed_forward_length"), activation: .silu))
        let embedding = try g.tensor("token_embd.weight")
        let vocab = g.metadata["llama.vocab_size"]?.int ?? embedding.shape[0]
        return ModelSpec(
            architecture: "llama (GGUF)", vocabSize: vocab, hiddenSize: hidden,
            rmsNormEps: Float(g.metadata["llama.attention.layer_norm_rms_epsilon"]?.double ?? 1e-5),
            tieWordEmbeddings: g.tensorIfPresent("output.weight") == nil,
            maxPositions: g.metadata["llama.context_length"]?.int ?? 2048,
            layers: Array(repeating: layer, count: try int("block_count")), names: .gguf,
            bosTokenId: g.metadata["tokenizer.ggml.bos_token_id"]?.int,
            eosTokenIds: [g.metadata["tokenizer.ggml.eos_token_id"]?.int].compactMap { $0 })
    }
}
