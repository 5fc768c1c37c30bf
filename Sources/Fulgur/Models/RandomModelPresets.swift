/// The shapes random models take: each published model's `config.json` in transformers 5
/// spelling (the fields Fulgur and transformers read; per-layer lists are derived from the
/// layer count), and a tiny variant with the same structure for tests.
struct Preset: Sendable {
    enum Family: Sendable {
        case gptOss, qwen3Moe, mimoV2Flash
        /// MiMo-V2.5-Pro's layout: full attention at layer 0 and every 7th layer (10 of 70).
        case mimoV25Pro

        /// Per-layer fields for `n` layers, by the published models' rules.
        func perLayer(_ n: Int) -> [(String, JSONValue)] {
            switch self {
            case .gptOss:
                // Sliding window first, then alternating.
                return [("layer_types", .array((0..<n).map { $0 % 2 == 0 ? "sliding_attention" : "full_attention" }))]
            case .qwen3Moe:
                return []
            case .mimoV2Flash:
                // Full attention at layer 0 and every 6th layer; layer 0 dense, the rest MoE.
                return [("layer_types", .array((0..<n).map { $0 == 0 || ($0 + 1) % 6 == 0 ? "full_attention" : "sliding_attention" })),
                        ("mlp_layer_types", .array((0..<n).map { $0 == 0 ? "dense" : "sparse" }))]
            case .mimoV25Pro:
                return [("layer_types", .array((0..<n).map { $0 % 7 == 0 ? "full_attention" : "sliding_attention" })),
                        ("mlp_layer_types", .array((0..<n).map { $0 == 0 ? "dense" : "sparse" }))]
            }
        }
    }

    let name: String
    let family: Family
    let layers: Int
    /// config.json without `num_hidden_layers` and the per-layer lists.
    let config: JSONObject

    static func named(_ name: String) -> Preset? { all.first { $0.name == name } }

    static let all: [Preset] = [
        Preset(name: "gpt-oss-20b", family: .gptOss, layers: 24,
               config: gptOss(vocab: 201088, hidden: 2880, heads: 64, kvHeads: 8, headDim: 64, experts: 32, topK: 4,
                              intermediate: 2880, window: 128, eos: 200002, pad: 199999)),
        Preset(name: "qwen3-30b-a3b", family: .qwen3Moe, layers: 48,
               config: qwen3Moe(vocab: 151936, hidden: 2048, heads: 32, kvHeads: 4, headDim: 128, experts: 128, topK: 8,
                                moeIntermediate: 768, intermediate: 6144, maxPositions: 40960, bos: 151643, eos: 151645)),
        Preset(name: "mimo-v2-flash", family: .mimoV2Flash, layers: 48,
               config: mimoV2Flash(vocab: 152576, hidden: 4096, heads: 64, kvHeads: 4, headDim: 192, valueHeadDim: 128,
                                   experts: 256, topK: 8, moeIntermediate: 2048, intermediate: 16384, window: 128,
                                   maxPositions: 262144, eos: 151645)),
        // MiMo-V2.5-Pro as issue 8 states it (about 1.02 T parameters): 70 layers, 1 dense + 69 MoE,
        // hidden 6144, 384 experts of 2048, top-8, 128 query and 8 key/value heads (the sliding
        // layers too), 10 full + 60 sliding layers of window 128. Assumed from MiMo-V2-Flash where
        // the issue is silent: q/k head dim 192, v 128, the vocabulary, and a dense layer of 4x hidden.
        Preset(name: "mimo-v2.5-pro", family: .mimoV25Pro, layers: 70,
               config: mimoV2Flash(vocab: 152576, hidden: 6144, heads: 128, kvHeads: 8, headDim: 192, valueHeadDim: 128,
                                   experts: 384, topK: 8, moeIntermediate: 2048, intermediate: 24576, window: 128,
                                   maxPositions: 262144, eos: 151645, swaKVHeads: 8)),
        // Tiny: every structural feature of the real model, dimensions that leave ragged FP8
        // tiles (192 = 128 + 64) and several MXFP4 blocks per row; prompts longer than the window.
        Preset(name: "tiny-gpt-oss", family: .gptOss, layers: 4,
               config: gptOss(vocab: 512, hidden: 192, heads: 4, kvHeads: 2, headDim: 32, experts: 8, topK: 2,
                              intermediate: 96, window: 8, eos: 2, pad: 0)),
        Preset(name: "tiny-qwen3-moe", family: .qwen3Moe, layers: 4,
               config: qwen3Moe(vocab: 512, hidden: 128, heads: 4, kvHeads: 2, headDim: 48, experts: 16, topK: 4,
                                moeIntermediate: 64, intermediate: 256, maxPositions: 4096, bos: 1, eos: 2)),
        Preset(name: "tiny-mimo-v2-flash", family: .mimoV2Flash, layers: 6,
               config: mimoV2Flash(vocab: 512, hidden: 128, heads: 4, kvHeads: 1, headDim: 48, valueHeadDim: 32,
                                   experts: 16, topK: 4, moeIntermediate: 64, intermediate: 256, window: 8,
                                   maxPositions: 4096, eos: 2)),
    ]

    /// openai/gpt-oss-20b: sinks, q/k/v/o biases, YaRN (factor 32 over 4096 positions),
    /// clamped SwiGLU experts with biases, softmax over the top-k router logits.
    static func gptOss(vocab: Int, hidden: Int, heads: Int, kvHeads: Int, headDim: Int, experts: Int, topK: Int,
                       intermediate: Int, window: Int, eos: Int, pad: Int) -> JSONObject {
        ["architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
         "vocab_size": .int(vocab), "hidden_size": .int(hidden), "intermediate_size": .int(intermediate),
         "num_attention_heads": .int(heads), "num_key_value_heads": .int(kvHeads), "head_dim": .int(headDim),
         "num_local_experts": .int(experts), "num_experts_per_tok": .int(topK), "experts_per_token": .int(topK),
         "sliding_window": .int(window), "attention_bias": true, "attention_dropout": 0.0,
         "hidden_act": "silu", "swiglu_limit": 7.0, "rms_norm_eps": 1e-5,
         "max_position_embeddings": 131072, "initial_context_length": 4096,
         "rope_parameters": ["rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": false, "original_max_position_embeddings": 4096],
         "router_aux_loss_coef": 0.9, "output_router_logits": false, "initializer_range": 0.02,
         "tie_word_embeddings": false, "use_cache": true,
         "eos_token_id": .int(eos), "pad_token_id": .int(pad), "dtype": "bfloat16"]
    }

    /// Qwen/Qwen3-30B-A3B: q/k RMSNorm, every layer sparse, softmax top-k renormalized.
    static func qwen3Moe(vocab: Int, hidden: Int, heads: Int, kvHeads: Int, headDim: Int, experts: Int, topK: Int,
                         moeIntermediate: Int, intermediate: Int, maxPositions: Int, bos: Int, eos: Int) -> JSONObject {
        ["architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
         "vocab_size": .int(vocab), "hidden_size": .int(hidden), "intermediate_size": .int(intermediate),
         "moe_intermediate_size": .int(moeIntermediate),
         "num_attention_heads": .int(heads), "num_key_value_heads": .int(kvHeads), "head_dim": .int(headDim),
         "num_experts": .int(experts), "num_experts_per_tok": .int(topK), "norm_topk_prob": true,
         "decoder_sparse_step": 1, "mlp_only_layers": [],
         "attention_bias": false, "attention_dropout": 0.0, "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "max_position_embeddings": .int(maxPositions), "rope_parameters": ["rope_type": "default", "rope_theta": 1000000.0],
         "use_sliding_window": false, "sliding_window": nil,
         "router_aux_loss_coef": 0.001, "output_router_logits": false, "initializer_range": 0.02,
         "tie_word_embeddings": false, "use_cache": true,
         "bos_token_id": .int(bos), "eos_token_id": .int(eos), "dtype": "bfloat16"]
    }

    /// XiaomiMiMo/MiMo-V2-Flash in transformers' spelling: q/k head dim 192 and v 128, SWA
    /// layers with twice the KV heads and sinks, partial RoPE (0.334 of the head; theta 5e6
    /// full, 1e4 SWA), values scaled by 0.707, layer 0 dense, sigmoid routing with a
    /// correction bias, renormalized top-8 of 256 experts.
    static func mimoV2Flash(vocab: Int, hidden: Int, heads: Int, kvHeads: Int, headDim: Int, valueHeadDim: Int,
                            experts: Int, topK: Int, moeIntermediate: Int, intermediate: Int, window: Int,
                            maxPositions: Int, eos: Int, swaKVHeads: Int? = nil) -> JSONObject {
        var c: JSONObject = ["architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
         "vocab_size": .int(vocab), "hidden_size": .int(hidden), "intermediate_size": .int(intermediate),
         "moe_intermediate_size": .int(moeIntermediate),
         "num_attention_heads": .int(heads), "num_key_value_heads": .int(kvHeads),
         "head_dim": .int(headDim), "v_head_dim": .int(valueHeadDim),
         "n_routed_experts": .int(experts), "num_experts_per_tok": .int(topK), "norm_topk_prob": true,
         "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0,
         "sliding_window": .int(window), "attention_value_scale": 0.707,
         "attention_bias": false, "attention_dropout": 0.0, "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "max_position_embeddings": .int(maxPositions),
         "rope_parameters": ["full_attention": ["rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.334],
                             "sliding_attention": ["rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.334]],
         "initializer_range": 0.02, "tie_word_embeddings": false, "use_cache": true,
         "eos_token_id": .int(eos), "dtype": "bfloat16"]
        if let swaKVHeads { c["swa_num_key_value_heads"] = .int(swaKVHeads) }
        return c
    }
}
