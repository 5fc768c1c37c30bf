/// Xiaomi MiMo-V2-Flash: hybrid attention (full at layer 0 and every 6th layer, sliding window
/// elsewhere), SWA layers with twice the KV heads and a learned sink logit per head, q/k head
/// dim 192 and v head dim 128, partial RoPE with a theta per layer type, values scaled by
/// `attention_value_scale`; layer 0 dense, the rest MoE with sigmoid routing and a correction
/// bias used for selection only.
enum MiMoV2Flash {
    static func spec(_ c: HFConfig) throws -> ModelSpec {
        let n = try c.int("num_hidden_layers")
        let sliding = try DecoderConfig.layerTypes(c, count: n)
            ?? (0..<n).map { !($0 == 0 || ($0 + 1) % 6 == 0) }
        let mlpTypes = try c.strings("mlp_layer_types") ?? (["dense"] + Array(repeating: "sparse", count: n - 1))
        guard mlpTypes.count == n else {
            throw FulgurError(.config, "\(c.path): 'mlp_layer_types' has \(mlpTypes.count) entries, expected \(n)")
        }
        let heads = try c.int("num_attention_heads")
        let headDim = try c.int("head_dim", default: 192), vDim = try c.int("v_head_dim", default: 128)
        let kvHeads = try c.int("num_key_value_heads")
        // Xiaomi's own config spells out the SWA shapes; transformers derives them (2x KV heads).
        let swaKVHeads = try c.int("swa_num_key_value_heads", default: 2 * kvHeads)
        let swaHeads = try c.int("swa_num_attention_heads", default: heads)
        let swaHeadDim = try c.int("swa_head_dim", default: headDim), swaVDim = try c.int("swa_v_head_dim", default: vDim)
        guard swaHeads == heads, swaHeadDim == headDim, swaVDim == vDim else {
            throw FulgurError(.unsupported, "\(c.path): sliding-window layers with other query heads or head dims than full layers are not supported")
        }
        let fullSinks = try c.bool("add_full_attention_sink_bias", default: false)
        let swaSinks = try c.bool("add_swa_attention_sink_bias", default: true)
        let bias = try c.bool("attention_bias", default: false)
        let valueScale = Float(try c.double("attention_value_scale", default: 1))
        let ropeParams = try c.object("rope_parameters")
        func rope(_ type: String, theta: Double) throws -> RoPESpec {
            if let p = try ropeParams?.object(type) {
                return try DecoderConfig.rope(c, params: p, headDim: headDim, defaultPartial: 0.334)
            }
            return .standard(theta: theta, rotaryDim: Int(Double(headDim) * 0.334))
        }
        let fullRoPE = try rope("full_attention", theta: 5_000_000), swaRoPE = try rope("sliding_attention", theta: 10_000)
        let window = try c.int("sliding_window", default: 128)
        let experts = try c.int("n_routed_experts")
        let moe = MoESpec(
            experts: experts, topK: try c.int("num_experts_per_tok"), intermediate: try c.int("moe_intermediate_size"),
            routing: .sigmoidWithBias(normalize: try c.bool("norm_topk_prob", default: true),
                                      scaling: Float(try c.double("routed_scaling_factor", default: 1)),
                                      groups: try c.int("n_group", default: 1), topKGroups: try c.int("topk_group", default: 1)),
            routerBias: false, expertBias: false, activation: .silu, layout: .fusedGateUp)
        guard experts % moe.routing.groupCount == 0 else {
            throw FulgurError(.config, "\(c.path): n_routed_experts (\(experts)) is not a multiple of n_group")
        }
        let layers = try (0..<n).map { i -> LayerSpec in
            let swa = sliding[i]
            let attention = AttentionSpec(
                heads: heads, kvHeads: swa ? swaKVHeads : kvHeads, headDim: headDim, valueHeadDim: vDim,
                window: swa ? window : nil, hasSinks: swa ? swaSinks : fullSinks, qkvBias: bias, outputBias: false, qkNorm: false,
                valueScale: valueScale, softmaxScale: 1 / Float(headDim).squareRoot(), rope: swa ? swaRoPE : fullRoPE,
                qkvChunks: kvHeads)
            switch mlpTypes[i] {
            case "dense":
                return LayerSpec(attention: attention, feedForward: .dense(intermediate: try c.int("intermediate_size"), activation: .silu))
            case "sparse":
                return LayerSpec(attention: attention, feedForward: .moe(moe))
            default:
                throw FulgurError(.config, "\(c.path): mlp layer type '\(mlpTypes[i])' is not supported (dense, sparse)")
            }
        }
        var names = TensorNames.huggingFace()
        names.roles[.sinks] = "self_attn.attention_sink_bias"
        names.roles[.qkv] = "self_attn.qkv_proj.weight"
        return try DecoderConfig.base(c, architecture: "MiMoV2FlashForCausalLM", layers: layers, names: names)
    }
}

extension Routing {
    var groupCount: Int {
        if case .sigmoidWithBias(_, _, let g, _) = self { return max(g, 1) }
        return 1
    }
}
