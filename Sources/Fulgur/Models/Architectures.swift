import Foundation

/// The architectures Fulgur runs, by Hugging Face `architectures` name.
public enum Architectures {
    static let builders: [String: (HFConfig) throws -> ModelSpec] = [
        "LlamaForCausalLM": Llama.spec,
        "Qwen3ForCausalLM": Qwen3.spec,
        "Qwen3MoeForCausalLM": Qwen3Moe.spec,
        "MiMoV2FlashForCausalLM": MiMoV2Flash.spec,
        "MiMoV2ForCausalLM": MiMoV2Flash.spec,
        "GptOssForCausalLM": GptOss.spec,
    ]

    public static var supported: [String] { builders.keys.sorted() }

    /// The spec of a Hugging Face checkpoint directory (config.json, generation_config.json).
    public static func spec(directory: String) throws -> ModelSpec {
        var spec = try spec(config: HFConfig(path: directory + "/config.json"))
        let genPath = directory + "/generation_config.json"
        if FileManager.default.fileExists(atPath: genPath) {
            let gen = try HFConfig(path: genPath)
            let eos = gen.ids("eos_token_id")
            if !eos.isEmpty { spec.eosTokenIds = eos }
            if let bos = gen.ids("bos_token_id").first { spec.bosTokenId = bos }
        }
        return spec
    }

    /// The spec of a `config.json` (its `quantization_config` included).
    public static func spec(config: HFConfig) throws -> ModelSpec {
        guard let arch = try config.strings("architectures")?.first else {
            throw FulgurError(.config, "\(config.path): field 'architectures' is missing, expected e.g. [\"LlamaForCausalLM\"]")
        }
        guard let build = builders[arch] else {
            throw FulgurError(.unsupported, "\(config.path): architecture '\(arch)' is not supported (supported: \(supported.joined(separator: ", ")))")
        }
        var spec = try build(config)
        spec.quantization = try QuantizationSpec.parse(config)
        return spec
    }
}

/// Pieces every decoder-only architecture file shares.
enum DecoderConfig {
    /// RoPE from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older
    /// configs). `params` may be a per-layer-type entry.
    static func rope(_ c: HFConfig, params: HFConfig?, headDim: Int, defaultPartial: Double = 1,
                     style: RoPESpec.Style = .neox) throws -> RoPESpec {
        let p = try params ?? c.object("rope_parameters") ?? c.object("rope_scaling")
        let theta = try p.map { try $0.double("rope_theta", default: c.double("rope_theta", default: 10000)) }
            ?? c.double("rope_theta", default: 10000)
        let partial = try p?.double("partial_rotary_factor", default: c.double("partial_rotary_factor", default: defaultPartial))
            ?? c.double("partial_rotary_factor", default: defaultPartial)
        let dim = Int(Double(headDim) * partial)
        var spec = RoPESpec.standard(theta: theta, rotaryDim: dim, style: style)
        let type = (try? p?.string("rope_type")) ?? (try? p?.string("type")) ?? "default"
        switch type {
        case "default":
            break
        case "linear":
            let f = try p!.double("factor")
            spec.inverseFrequencies = spec.inverseFrequencies.map { $0 / f }
        case "yarn":
            try applyYaRN(&spec, p!, theta: theta, dim: dim, maxPositions: c.int("max_position_embeddings"))
        case "llama3":
            try applyLlama3(&spec, p!)
        default:
            throw FulgurError(.unsupported, "\(c.path): rope type '\(type)' is not supported (supported: default, linear, yarn, llama3)")
        }
        return spec
    }

    /// YaRN as transformers computes it: interpolate low frequencies, keep high ones, ramp between.
    static func applyYaRN(_ spec: inout RoPESpec, _ p: HFConfig, theta: Double, dim: Int, maxPositions: Int) throws {
        let original = try Double(p.int("original_max_position_embeddings"))
        let factor = try p.has("factor") ? p.double("factor") : Double(maxPositions) / original
        func mscale(_ s: Double, _ m: Double = 1) -> Double { s <= 1 ? 1 : 0.1 * m * log(s) + 1 }
        if p.has("attention_factor") {
            spec.attentionFactor = try p.double("attention_factor")
        } else if p.has("mscale"), p.has("mscale_all_dim"), try p.double("mscale") != 0, try p.double("mscale_all_dim") != 0 {
            spec.attentionFactor = try mscale(factor, p.double("mscale")) / mscale(factor, p.double("mscale_all_dim"))
        } else {
            spec.attentionFactor = mscale(factor)
        }
        let betaFast = try p.double("beta_fast", default: 32), betaSlow = try p.double("beta_slow", default: 1)
        func correctionDim(_ rotations: Double) -> Double {
            Double(dim) * log(original / (rotations * 2 * Double.pi)) / (2 * log(theta))
        }
        var low = correctionDim(betaFast), high = correctionDim(betaSlow)
        if try p.bool("truncate", default: true) { low = low.rounded(.down); high = high.rounded(.up) }
        low = max(low, 0); high = min(high, Double(dim - 1))
        if low == high { high += 0.001 }
        spec.inverseFrequencies = spec.inverseFrequencies.enumerated().map { i, extrapolation in
            let ramp = min(max((Double(i) - low) / (high - low), 0), 1)
            let keep = 1 - ramp
            return extrapolation / factor * (1 - keep) + extrapolation * keep
        }
    }

    static func applyLlama3(_ spec: inout RoPESpec, _ p: HFConfig) throws {
        let factor = try p.double("factor"), lowFactor = try p.double("low_freq_factor")
        let highFactor = try p.double("high_freq_factor")
        let original = try Double(p.int("original_max_position_embeddings"))
        let lowWavelen = original / lowFactor, highWavelen = original / highFactor
        spec.inverseFrequencies = spec.inverseFrequencies.map { f in
            let wavelen = 2 * Double.pi / f
            if wavelen < highWavelen { return f }
            if wavelen > lowWavelen { return f / factor }
            let smooth = (original / wavelen - lowFactor) / (highFactor - lowFactor)
            return (1 - smooth) * f / factor + smooth * f
        }
    }

    static func eos(_ c: HFConfig) -> [Int] { c.ids("eos_token_id") }

    /// Attention of a plain Llama-family layer.
    static func attention(_ c: HFConfig, window: Int?, qkNorm: Bool, rope: RoPESpec? = nil) throws -> AttentionSpec {
        let hidden = try c.int("hidden_size"), heads = try c.int("num_attention_heads")
        guard heads > 0 else { throw c.missing("num_attention_heads", "a positive integer") }
        let headDim = try c.int("head_dim", default: hidden / heads)
        let bias = try c.bool("attention_bias", default: false)
        return AttentionSpec(
            heads: heads, kvHeads: try c.int("num_key_value_heads", default: heads),
            headDim: headDim, valueHeadDim: headDim, window: window, hasSinks: false,
            qkvBias: bias, outputBias: bias, qkNorm: qkNorm, valueScale: 1,
            softmaxScale: 1 / Float(headDim).squareRoot(),
            rope: try rope ?? DecoderConfig.rope(c, params: nil, headDim: headDim))
    }

    static func base(_ c: HFConfig, architecture: String, layers: [LayerSpec], names: TensorNames) throws -> ModelSpec {
        ModelSpec(
            architecture: architecture, vocabSize: try c.int("vocab_size"), hiddenSize: try c.int("hidden_size"),
            rmsNormEps: Float(try c.double("rms_norm_eps", default: 1e-6)),
            tieWordEmbeddings: try c.bool("tie_word_embeddings", default: false),
            maxPositions: try c.int("max_position_embeddings", default: 4096),
            layers: layers, names: names, bosTokenId: c.ids("bos_token_id").first, eosTokenIds: eos(c))
    }

    /// Sliding-window layer types from `layer_types` ("full_attention" / "sliding_attention").
    static func layerTypes(_ c: HFConfig, count: Int) throws -> [Bool]? {
        guard let types = try c.strings("layer_types") else { return nil }
        guard types.count == count else {
            throw FulgurError(.config, "\(c.path): 'layer_types' has \(types.count) entries, expected num_hidden_layers = \(count)")
        }
        return try types.map {
            switch $0 {
            case "full_attention": return false
            case "sliding_attention": return true
            default: throw FulgurError(.config, "\(c.path): layer type '\($0)' is not supported (full_attention, sliding_attention)")
            }
        }
    }
}
