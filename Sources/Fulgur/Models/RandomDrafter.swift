import Foundation

/// A DFlash drafter with random weights at the shape z-lab published for a preset's model,
/// for benchmarks: the published `config.json` (hidden size, vocabulary and the target layers
/// it reads taken from the target, so a target cut to fewer layers still gets one) and
/// tensors under the published names, made by RandomModel's machinery, written to a directory
/// and read back by `DFlashDrafter` exactly as a downloaded drafter is.
///
///     let drafter = try RandomDrafter(for: RandomModel(preset: "gpt-oss-20b"))
///     let loaded = try drafter.load(for: model, maxPositions: 4096, maxStepTokens: 16)
public struct RandomDrafter: Sendable, CustomStringConvertible {
    /// Target presets that have a drafter shape.
    public static var presets: [String] { shapes.keys.sorted() }

    public let target: RandomModel
    /// The drafter's linear layers. z-lab publishes BF16; FP8 (128x128 block scales) is how
    /// Fulgur would store it, like the target's attention.
    public let linear: RandomModel.LinearFormat

    /// `linear` defaults to the target's.
    public init(for target: RandomModel, linear: RandomModel.LinearFormat? = nil) throws {
        guard let shape = Self.shapes[target.preset] else {
            throw FulgurError(.usage, "no published DFlash drafter shape for preset '\(target.preset)' (presets with one: \(Self.presets.joined(separator: ", ")))")
        }
        guard target.layers > shape.targetLayers else {
            throw FulgurError(.usage, "the \(target.preset) drafter reads \(shape.targetLayers) target layers; keep at least \(shape.targetLayers + 1) of them (got \(target.layers))")
        }
        self.target = target
        self.linear = linear ?? target.linear
    }

    private var shape: Shape { Self.shapes[target.preset]! }

    public var description: String {
        let parameters = (try? parameterCount()).map { String(format: "%.1fM parameters, ", Double($0) / 1e6) } ?? ""
        return "\(shape.source) shape (\(shape.layers) layers, \(parameters)random weights, seed \(target.seed), linear layers \(linear.rawValue))"
    }

    /// The `config.json` the drafter is written with.
    public func config() throws -> JSONObject {
        let t = try target.spec()
        var c = shape.config
        c["hidden_size"] = .int(t.hiddenSize)
        c["vocab_size"] = .int(t.vocabSize)
        c["num_hidden_layers"] = .int(shape.layers)
        c["dflash_config"] = ["mask_token_id": .int(shape.maskTokenId),
                              "target_layer_ids": .array(Self.spread(targetLayers: t.layerCount, count: shape.targetLayers).map { .int($0) })]
        if linear == .fp8 {
            c["quantization_config"] = ["quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]]
        }
        return c
    }

    /// Parameters (each FP8 code counts as one; scales are not counted).
    public func parameterCount() throws -> Int {
        try tensors(linear: .bf16).reduce(0) { $0 + $1.entry.shape.reduce(1, *) }
    }

    /// Writes the drafter into `directory` (created; it must not already hold a checkpoint).
    public func export(to directory: String, progress: ((Int, Int) -> Void)? = nil) throws {
        try RandomModel.write(tensors(linear: linear), config: config(), to: directory, shardBytes: 5_000_000_000, progress: progress)
    }

    /// The tensors, from the spec the loader reads off `config` (no weights are made).
    private func tensors(linear: RandomModel.LinearFormat) throws -> [RandomTensor] {
        var maker = target
        maker.linear = linear
        return try Self.tensors(config: config(), maker: maker, name: "random \(target.preset) drafter")
    }

    /// The tensors of the drafter `config` describes, made by `maker` (its seed and formats).
    private static func tensors(config: JSONObject, maker: RandomModel, name: String) throws -> [RandomTensor] {
        let json = JSONValue.object(config).serialized()
        guard let values = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            throw FulgurError(.config, "\(name): config is not a JSON object")
        }
        let c = HFConfig(path: "\(name) config", values: values)
        let dflash = try c.object("dflash_config")!
        let spec = try DFlashDrafter.spec(c, dflash: dflash)
        return try maker.tensorGroups(spec, contextFeatures: dflash.ids("target_layer_ids").count * spec.hiddenSize).flatMap { $0 }
    }

    /// Writes a random drafter for any target, one without a published drafter shape
    /// included (the default model, for the server's speculative tests), into `directory`:
    /// `layers` Qwen3-style layers (BF16) with the target's first layer's attention heads and
    /// MLP width (three times the hidden size for an MoE target), reading up to 5 target layers
    /// spread as z-lab spreads them, block 8, the vocabulary's last id as the mask token. Its
    /// guesses are noise, so about one token a round is emitted: enough for tests that
    /// speculative output equals plain output, not for speed. Returns the config written.
    @discardableResult
    public static func export(matching target: ModelSpec, layers: Int = 1, seed: UInt64 = 0, to directory: String) throws -> JSONObject {
        guard layers >= 1 else { throw FulgurError(.usage, "a drafter needs at least 1 layer, got \(layers)") }
        guard let first = target.layers.first else { throw FulgurError(.config, "\(target.architecture): the target has no layers") }
        let a = first.attention
        let intermediate: Int
        if case .dense(let width, _) = first.feedForward { intermediate = width } else { intermediate = 3 * target.hiddenSize }
        var c = qwen3Drafter(heads: a.heads, kvHeads: a.kvHeads, headDim: a.headDim, intermediate: intermediate,
                             eos: target.eosTokenIds.first ?? 0)
        c["hidden_size"] = .int(target.hiddenSize)
        c["vocab_size"] = .int(target.vocabSize)
        c["num_hidden_layers"] = .int(layers)
        c["max_position_embeddings"] = .int(target.maxPositions)
        let read = min(5, max(1, target.layerCount - 1))
        c["dflash_config"] = ["mask_token_id": .int(target.vocabSize - 1),
                              "target_layer_ids": .array(spread(targetLayers: target.layerCount, count: read).map { .int($0) })]
        // tensorGroups reads only the maker's seed and formats for a dense drafter spec; the
        // preset names nothing here.
        let maker = try RandomModel(preset: "tiny-gpt-oss", seed: seed, experts: .bf16, linear: .bf16)
        try RandomModel.write(tensors(config: c, maker: maker, name: "random drafter for \(target.architecture)"), config: c,
                              to: directory, shardBytes: 5_000_000_000, progress: nil)
        return c
    }

    /// Writes the drafter to a temporary directory and opens it for `model` (see
    /// `DFlashDrafter.init`). The directory is removed once loaded: the weights stay mapped.
    public func load(for model: Model, maxPositions: Int, maxStepTokens: Int,
                     executor: ((Plan, Int) throws -> any Executor)? = nil) throws -> DFlashDrafter {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("fulgur-random-drafter-\(UUID())").path
        defer { try? FileManager.default.removeItem(atPath: directory) }
        try export(to: directory)
        return try DFlashDrafter(directory: directory, target: model, maxPositions: maxPositions, maxStepTokens: maxStepTokens,
                                 executor: executor)
    }

    /// `count` target layers spread evenly from the 2nd to the 3rd-to-last, z-lab's choice
    /// (build_target_layer_ids in their code; [1, 6, 11, 16, 21] for gpt-oss-20b's 24 layers),
    /// kept distinct in targets too shallow for that span.
    static func spread(targetLayers n: Int, count: Int) -> [Int] {
        let start = 1, end = max(n - 3, start + count - 1)
        guard count > 1 else { return [n / 2] }
        return (0..<count).map { start + Int((Double($0 * (end - start)) / Double(count - 1)).rounded()) }
    }

    // MARK: Shapes

    /// What a drafter's config.json holds besides what its target decides.
    struct Shape: Sendable {
        let source: String
        let layers: Int
        /// How many target layers' hidden states it reads.
        let targetLayers: Int
        let maskTokenId: Int
        /// config.json without hidden_size, vocab_size, num_hidden_layers and dflash_config.
        let config: JSONObject
    }

    static let shapes: [String: Shape] = [
        // z-lab/gpt-oss-20b-DFlash (Hugging Face), config.json as shipped 2026-04-20, quoted in
        // full by third-party ports (e.g. an MLX port's DFlashDrafterForwardTests) and
        // consistent with the checkpoint's size: 8 Qwen3-style layers at hidden 2880, 64 query
        // heads and 8 KV heads of 64, MLP 7680, q/k/v/o biases, block 8, mask id 200000,
        // target layers [1, 6, 11, 16, 21]; 784.8M parameters, 1.46 GiB in BF16. YaRN as the
        // target's (factor 32 over 4096 positions), as vllm-neuron's RoPE probe reads the file.
        "gpt-oss-20b": Shape(source: "z-lab/gpt-oss-20b-DFlash", layers: 8, targetLayers: 5, maskTokenId: 200000,
                             config: gptOssDrafter(heads: 64, kvHeads: 8, headDim: 64, intermediate: 7680, bos: 199998, eos: 200002)),
        // MiMo targets: no drafter config for them was available here (the MiMo release keeps
        // its drafter in a dflash/ subfolder), so these are assumed from ARCHITECTURE.md's
        // description: about 5 Qwen3-style layers at the target's hidden size, reading 5 target
        // layers; 32 query and 8 key/value heads of 128, an MLP of 3x hidden, no biases, block
        // 8 (z-lab's Qwen3 drafters' proportions). mimo-v2-flash: 1.1 B parameters;
        // mimo-v2.5-pro: 2.4 B. Replayed-acceptance numbers with them say so.
        "mimo-v2-flash": Shape(source: "assumed MiMo-V2-Flash drafter", layers: 5, targetLayers: 5, maskTokenId: 152575,
                               config: qwen3Drafter(heads: 32, kvHeads: 8, headDim: 128, intermediate: 3 * 4096, eos: 151645)),
        "mimo-v2.5-pro": Shape(source: "assumed MiMo-V2.5-Pro drafter", layers: 5, targetLayers: 5, maskTokenId: 152575,
                               config: qwen3Drafter(heads: 32, kvHeads: 8, headDim: 128, intermediate: 3 * 6144, eos: 151645)),
        // The same structure at test size.
        "tiny-gpt-oss": Shape(source: "tiny z-lab/gpt-oss-20b-DFlash", layers: 2, targetLayers: 2, maskTokenId: 511,
                              config: gptOssDrafter(heads: 4, kvHeads: 2, headDim: 32, intermediate: 256, bos: 1, eos: 2)),
    ]

    static func qwen3Drafter(heads: Int, kvHeads: Int, headDim: Int, intermediate: Int, eos: Int) -> JSONObject {
        ["architectures": ["DFlashDraftModel"], "model_type": "qwen3", "attention_bias": false, "block_size": 8,
         "eos_token_id": .int(eos), "dtype": "bfloat16", "head_dim": .int(headDim), "hidden_act": "silu",
         "intermediate_size": .int(intermediate), "max_position_embeddings": 262144,
         "num_attention_heads": .int(heads), "num_key_value_heads": .int(kvHeads), "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "tie_word_embeddings": false]
    }

    static func gptOssDrafter(heads: Int, kvHeads: Int, headDim: Int, intermediate: Int, bos: Int, eos: Int) -> JSONObject {
        ["architectures": ["DFlashDraftModel"], "model_type": "gpt_oss",
         "attention_bias": true, "attention_dropout": 0.0, "block_size": 8,
         "bos_token_id": .int(bos), "eos_token_id": .int(eos), "dtype": "bfloat16",
         "head_dim": .int(headDim), "hidden_act": "silu", "initial_context_length": 4096, "initializer_range": 0.02,
         "intermediate_size": .int(intermediate), "max_position_embeddings": 131072,
         "num_attention_heads": .int(heads), "num_key_value_heads": .int(kvHeads), "rms_norm_eps": 1e-5,
         "rope_theta": 150000.0,
         "rope_scaling": ["rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096]]
    }
}
