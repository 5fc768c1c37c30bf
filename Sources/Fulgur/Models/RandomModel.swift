import Dispatch
import Foundation

/// A model with random weights at the real shape of a published one, for benchmarks: the
/// published `config.json` (optionally cut to fewer layers) and tensors under the checkpoint's
/// own names, so a random model goes through exactly the loader path a real checkpoint does.
///
///     let random = try RandomModel(preset: "gpt-oss-20b", layers: 4, seed: 1)
///     let model = try random.build()                       // in memory: spec, tensors, plan
///     try random.export(to: dir, for: .transformers)       // the same weights, for a peer
///
/// Weights are N(0, 1/fan_in)-like (norm weights near 1, small biases), so activations stay
/// O(1) through the layers and routing spreads over the experts. Matrices are made in their
/// quantized form (MXFP4 experts, FP8 layers with power-of-two scales); their BF16 form holds
/// exactly the dequantized values, so every format of one seed computes the same function and
/// a BF16 export carries the very weights the quantized model runs.
public struct RandomModel: Sendable, CustomStringConvertible {
    public enum ExpertFormat: String, CaseIterable, Sendable { case mxfp4, bf16 }
    public enum LinearFormat: String, CaseIterable, Sendable { case fp8, bf16 }
    /// Who an export is for.
    public enum Reader: String, CaseIterable, Sendable {
        /// Every tensor as the model holds it, in published checkpoints' schemas (gpt-oss's
        /// MXFP4; the MiMo FP4 release's MXFP4 + FP8, which transformers cannot read);
        /// Fulgur's loader reads it back bit for bit.
        case fulgur
        /// What Hugging Face transformers 5.17 loads: BF16, except gpt-oss's MXFP4 experts
        /// (`_blocks`/`_scales`, `quant_method: mxfp4`), which it reads natively.
        case transformers
    }

    /// Preset names: the published models and a tiny variant of each for tests.
    public static var presets: [String] { Preset.all.map(\.name) }

    public let preset: String
    public let layers: Int
    public let seed: UInt64
    public private(set) var experts: ExpertFormat
    public internal(set) var linear: LinearFormat

    /// `layers` (default: the published count) keeps the first layers of the full model:
    /// models of one seed share the weights of the layers they both have.
    public init(preset: String, layers: Int? = nil, seed: UInt64 = 0, experts: ExpertFormat = .mxfp4, linear: LinearFormat = .fp8) throws {
        guard let p = Preset.named(preset) else {
            throw FulgurError(.usage, "unknown random-model preset '\(preset)' (presets: \(Self.presets.joined(separator: ", ")))")
        }
        if let layers, layers < 1 { throw FulgurError(.usage, "a random model needs at least 1 layer, got \(layers)") }
        self.preset = preset
        self.layers = layers ?? p.layers
        self.seed = seed
        self.experts = experts
        self.linear = linear
    }

    public var description: String {
        "\(preset) (\(layers) layers, seed \(seed), experts \(experts.rawValue), other linear layers \(linear.rawValue))"
    }

    private var family: Preset.Family { Preset.named(preset)!.family }

    /// The `config.json` a checkpoint of this model holds, `quantization_config` included.
    public var config: JSONObject {
        var c = unquantizedConfig
        if let q = quantizationConfig { c["quantization_config"] = q }
        return c
    }

    private var unquantizedConfig: JSONObject {
        let p = Preset.named(preset)!
        var c = p.config
        c["num_hidden_layers"] = .int(layers)
        for (key, value) in p.family.perLayer(layers) { c[key] = value }
        return c
    }

    /// The spec, as the loader derives it from `config` (no weights are made).
    public func spec() throws -> ModelSpec { try spec(config) }

    /// Read back as from a file, so the spec is exactly what loading the export gives.
    private func spec(_ config: JSONObject) throws -> ModelSpec {
        let json = JSONValue.object(config).serialized()
        guard let values = try JSONSerialization.jsonObject(with: Data(json.utf8)) as? [String: Any] else {
            throw FulgurError(.config, "random \(preset): config is not a JSON object")
        }
        return try Architectures.spec(config: HFConfig(path: "random \(preset) config", values: values))
    }

    /// Every tensor's name, type and shape, in file order (no weights are made).
    public func entries() throws -> [SafetensorsWriter.Entry] {
        try tensorGroups(spec()).flatMap { $0.map(\.entry) }
    }

    /// Parameters (each MXFP4 or FP8 code counts as one; scales are not counted).
    public func parameterCount() throws -> Int {
        var plain = self
        plain.experts = .bf16
        plain.linear = .bf16
        return try plain.entries().reduce(0) { $0 + $1.shape.reduce(1, *) }
    }

    /// The same weights in the formats transformers 5.17 loads (see `Reader.transformers`).
    public var transformersTwin: RandomModel {
        var twin = self
        twin.linear = .bf16
        if family != .gptOss { twin.experts = .bf16 }
        return twin
    }

    /// Makes every weight in memory (in parallel over the machine's cores) and plans the
    /// model. `progress` gets (steps done, steps): the embedding, each layer, the head.
    public func build(progress: ((Int, Int) -> Void)? = nil) throws -> Model {
        let spec = try spec()
        return try Model(spec: spec, tensors: tensors(spec, progress: progress))
    }

    /// The weights alone, as a tensor source for `PlanBuilder` or an executor.
    public func tensors(progress: ((Int, Int) -> Void)? = nil) throws -> TensorSource {
        try tensors(spec(), progress: progress)
    }

    private func tensors(_ spec: ModelSpec, progress: ((Int, Int) -> Void)?) throws -> TensorSource {
        let groups = try tensorGroups(spec)
        let source = RandomTensors(description: "random \(description)")
        for (g, group) in groups.enumerated() {
            for (t, buffer) in zip(group, Self.make(group)) { source.add(t.entry, buffer) }
            progress?(g + 1, groups.count)
        }
        return source
    }

    /// `tensors` made in memory, their pieces in parallel over the machine's cores.
    static func make(_ tensors: [RandomTensor]) -> [HostAllocation] {
        let buffers = tensors.map { HostAllocation(byteCount: $0.byteCount) }
        let jobs = tensors.indices.flatMap { t in (0..<tensors[t].pieces).map { (t, $0) } }
        DispatchQueue.concurrentPerform(iterations: jobs.count) { j in
            let (t, piece) = jobs[j]
            tensors[t].fill(piece, buffers[t].pointer + tensors[t].pieceOffset(piece))
        }
        return buffers
    }

    /// Writes `config.json` and the weights into `directory` (created; it must not already
    /// hold a checkpoint) for `reader`. Weights are made while they are written, a few dozen
    /// megabytes at a time, so memory stays bounded whatever the model's size; above
    /// `shardBytes` the weights are split into shards with a `model.safetensors.index.json`.
    /// `progress` gets (bytes written, bytes).
    public func export(to directory: String, for reader: Reader = .transformers, shardBytes: Int = 5_000_000_000,
                       progress: ((Int, Int) -> Void)? = nil) throws {
        let model = reader == .transformers ? transformersTwin : self
        try Self.write(model.tensorGroups(model.spec()).flatMap { $0 }, config: model.config, to: directory,
                       shardBytes: shardBytes, progress: progress)
    }

    /// Writes `tensors` (made while they are written) and `config` as a checkpoint into
    /// `directory`, as `export` describes.
    static func write(_ tensors: [RandomTensor], config: JSONObject, to directory: String, shardBytes: Int,
                      progress: ((Int, Int) -> Void)?) throws {
        let fm = FileManager.default
        if let existing = try? fm.contentsOfDirectory(atPath: directory),
           existing.contains(where: { $0 == "config.json" || $0.hasSuffix(".safetensors") || $0.hasSuffix(".safetensors.index.json") }) {
            throw FulgurError(.io, "\(directory): already holds a checkpoint; remove it or choose another directory")
        }
        do {
            try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw FulgurError(.io, "\(directory): cannot create directory (\(error.localizedDescription))")
        }
        let writer = try SafetensorsWriter(directory: directory, entries: tensors.map(\.entry), shardBytes: shardBytes)
        // All pieces in file order, then made in parallel batches of up to `batchBytes`.
        let pieces = tensors.indices.flatMap { t in (0..<tensors[t].pieces).map { (t, $0) } }
        func size(_ p: (Int, Int)) -> Int { tensors[p.0].pieceOffset(p.1 + 1) - tensors[p.0].pieceOffset(p.1) }
        let batchBytes = 64 << 20
        var staging = HostAllocation(byteCount: batchBytes)
        let total = tensors.reduce(0) { $0 + $1.byteCount }
        var done = 0, first = 0
        while first < pieces.count {
            var end = first + 1, bytes = size(pieces[first])
            while end < pieces.count && bytes + size(pieces[end]) <= batchBytes { bytes += size(pieces[end]); end += 1 }
            if bytes > staging.byteCount { staging = HostAllocation(byteCount: bytes) }
            var offsets = [0]
            for p in pieces[first..<end] { offsets.append(offsets.last! + size(p)) }
            let base = staging.pointer, batch = Array(pieces[first..<end])
            DispatchQueue.concurrentPerform(iterations: batch.count) { k in
                tensors[batch[k].0].fill(batch[k].1, base + offsets[k])
            }
            try writer.append(UnsafeRawBufferPointer(start: base, count: bytes))
            done += bytes
            progress?(done, total)
            first = end
        }
        try writer.finish()
        let path = directory + "/config.json"
        guard fm.createFile(atPath: path, contents: Data((JSONValue.object(config).serialized(indent: "  ") + "\n").utf8)) else {
            throw FulgurError(.io, "\(path): cannot write")
        }
    }

    // MARK: Quantization config and tensors

    /// `quantization_config` for the stored formats: none for BF16; gpt-oss's own for its
    /// MXFP4 experts with BF16 elsewhere; otherwise the MiMo FP4 release's schema (DeepSeek's
    /// FP8 one when experts are BF16), which lists the linear modules left in BF16.
    private var quantizationConfig: JSONValue? {
        switch (experts, linear) {
        case (.bf16, .bf16):
            return nil
        case (.mxfp4, .bf16) where family == .gptOss:
            return ["quant_method": "mxfp4",
                    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]]
        default:
            var q: JSONObject = ["quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]]
            if experts == .mxfp4 { q["store_dtype"] = "mxfp4"; q["mxfp4_block_size"] = 32 }
            q["ignored_layers"] = .array(linear == .bf16 ? ((try? bf16LinearModules()) ?? []).map { .string($0) } : [])
            return .object(q)
        }
    }

    /// Linear modules (other than experts, router and head) of the model, for `ignored_layers`.
    private func bf16LinearModules() throws -> [String] {
        let spec = try spec(unquantizedConfig)
        return spec.layers.indices.flatMap { i -> [String] in
            let roles: [TensorNames.Role] = spec.layers[i].feedForward.isDense ? [.q, .k, .v, .o, .gate, .up, .down] : [.q, .k, .v, .o]
            return roles.map { String(spec.names.name(i, $0).dropLast(".weight".count)) }
        }
    }

    /// The tensors, grouped for building: the embedding, each layer, then the final norm and
    /// LM head. Each group is made in parallel. With `contextFeatures`, the tensors of a DFlash
    /// drafter of `spec` instead: no embedding or LM head (it uses its target's), and first the
    /// projection of that many concatenated target features (`fc`, `hidden_norm`).
    func tensorGroups(_ spec: ModelSpec, contextFeatures: Int? = nil) throws -> [[RandomTensor]] {
        let names = spec.names, hidden = spec.hiddenSize, seed = self.seed
        func std(_ fanIn: Int) -> Float { 1 / Float(fanIn).squareRoot() }
        func vector(_ name: String, _ count: Int, mean: Float = 0, std: Float) -> RandomTensor {
            .vector(name, [count], mean: mean, std: std, seed: seed)
        }
        func norm(_ name: String, _ count: Int) -> RandomTensor { vector(name, count, mean: 1, std: 0.1) }
        func bias(_ name: String, _ shape: [Int]) -> RandomTensor { .vector(name, shape, mean: 0, std: 0.05, seed: seed) }
        func linear(_ name: String, out: Int, in inFeatures: Int) -> [RandomTensor] {
            let m = RandomMatrix(.fp8, seed: RandomFill.seed(seed, name), rows: out, cols: inFeatures, std: std(inFeatures))
            switch self.linear {
            case .fp8: return [.codes(name, m, dtype: .fp8e4m3, shape: [out, inFeatures]).part(of: m, named: name, form: .quantized),
                               .tileScales(Self.module(name) + ".weight_scale_inv", m).part(of: m, named: name, form: nil)]
            case .bf16: return [.bf16(name, m, shape: [out, inFeatures]).part(of: m, named: name, form: .bf16)]
            }
        }
        func mxfp4Check(_ name: String, _ inFeatures: Int) throws {
            guard inFeatures % 32 == 0 else {
                throw FulgurError(.config, "random \(preset): expert '\(name)' has \(inFeatures) inputs, not a multiple of 32 (MXFP4 blocks)")
            }
        }
        func expert(_ name: String, out: Int, in inFeatures: Int) throws -> [RandomTensor] {
            try mxfp4Check(name, inFeatures)
            let m = RandomMatrix(.mxfp4, seed: RandomFill.seed(seed, name), rows: out, cols: inFeatures, std: std(inFeatures))
            switch experts {
            case .mxfp4:
                return [.codes(name, m, dtype: .u8, shape: [out, inFeatures / 2]).part(of: m, named: name, form: .quantized),
                        .blockScales(Self.module(name) + ".weight_scale", m, shape: [out, inFeatures / 32]).part(of: m, named: name, form: nil)]
            case .bf16: return [.bf16(name, m, shape: [out, inFeatures]).part(of: m, named: name, form: .bf16)]
            }
        }
        /// gpt-oss's stacked experts: `[E, out, in]` as MXFP4 `_blocks`/`_scales`, or BF16 `[E, in, out]`.
        func stackedExperts(_ name: String, count: Int, out: Int, in inFeatures: Int) throws -> [RandomTensor] {
            try mxfp4Check(name, inFeatures)
            let m = RandomMatrix(.mxfp4, seed: RandomFill.seed(seed, name), batches: count, rows: out, cols: inFeatures, std: std(inFeatures))
            switch experts {
            case .mxfp4:
                return [.codes(name + "_blocks", m, dtype: .u8, shape: [count, out, inFeatures / 32, 16]).part(of: m, named: name, form: .quantized),
                        .blockScales(name + "_scales", m, shape: [count, out, inFeatures / 32]).part(of: m, named: name, form: nil)]
            case .bf16: return [.bf16Transposed(name, m).part(of: m, named: name, form: .bf16)]
            }
        }

        var groups: [[RandomTensor]] = [contextFeatures.map { linear("fc.weight", out: hidden, in: $0) + [norm("hidden_norm.weight", hidden)] }
                                         ?? [.normal(names.embedding, [spec.vocabSize, hidden], std: 1, seed: seed)]]
        for (i, layer) in spec.layers.enumerated() {
            let a = layer.attention
            let n = { (role: TensorNames.Role) in names.name(i, role) }
            var g: [RandomTensor] = [norm(n(.attnNorm), hidden)]
            g += linear(n(.q), out: a.heads * a.headDim, in: hidden)
            g += linear(n(.k), out: a.kvHeads * a.headDim, in: hidden)
            g += linear(n(.v), out: a.kvHeads * a.valueHeadDim, in: hidden)
            if a.qkvBias {
                g += [bias(n(.qBias), [a.heads * a.headDim]), bias(n(.kBias), [a.kvHeads * a.headDim]),
                      bias(n(.vBias), [a.kvHeads * a.valueHeadDim])]
            }
            if a.qkNorm { g += [norm(n(.qNorm), a.headDim), norm(n(.kNorm), a.headDim)] }
            if a.hasSinks { g.append(vector(n(.sinks), a.heads, std: 1)) }
            g += linear(n(.o), out: hidden, in: a.heads * a.valueHeadDim)
            if a.outputBias { g.append(bias(n(.oBias), [hidden])) }
            g.append(norm(n(.ffnNorm), hidden))
            switch layer.feedForward {
            case .dense(let inter, _):
                g += linear(n(.gate), out: inter, in: hidden) + linear(n(.up), out: inter, in: hidden)
                    + linear(n(.down), out: hidden, in: inter)
            case .moe(let m):
                g.append(.normal(n(.router), [m.experts, hidden], std: std(hidden), seed: seed))
                if m.routerBias { g.append(bias(n(.routerBias), [m.experts])) }
                if case .sigmoidWithBias = m.routing {
                    // F32, as transformers keeps it and the MiMo release stores it.
                    g.append(.vector(n(.correctionBias), [m.experts], dtype: .f32, mean: 0, std: 0.02, seed: seed))
                }
                switch m.layout {
                case .gptOss:
                    g += try stackedExperts(n(.expertGateUp), count: m.experts, out: 2 * m.intermediate, in: hidden)
                    g.append(bias(n(.expertGateUpBias), [m.experts, 2 * m.intermediate]))
                    g += try stackedExperts(n(.expertDownFused), count: m.experts, out: hidden, in: m.intermediate)
                    g.append(bias(n(.expertDownBias), [m.experts, hidden]))
                case .perExpert, .fusedGateUp:
                    // Per-expert tensors: the names of published checkpoints and of transformers' saves.
                    for e in 0..<m.experts {
                        g += try expert(names.name(i, .expertGate, expert: e), out: m.intermediate, in: hidden)
                        g += try expert(names.name(i, .expertUp, expert: e), out: m.intermediate, in: hidden)
                        g += try expert(names.name(i, .expertDown, expert: e), out: hidden, in: m.intermediate)
                    }
                }
            }
            groups.append(g)
        }
        var head = [norm(names.finalNorm, hidden)]
        if contextFeatures == nil && !spec.tieWordEmbeddings { head.append(.normal(names.lmHead, [spec.vocabSize, hidden], std: std(hidden), seed: seed)) }
        groups.append(head)
        return groups
    }

    /// `a.b.weight` -> `a.b`.
    static func module(_ weightName: String) -> String {
        weightName.hasSuffix(".weight") ? String(weightName.dropLast(".weight".count)) : weightName
    }
}

extension FeedForwardSpec {
    var isDense: Bool { if case .dense = self { return true } else { return false } }
}

/// Host memory that random tensors live in.
final class HostAllocation: @unchecked Sendable {
    let pointer: UnsafeMutableRawPointer
    let byteCount: Int
    init(byteCount: Int) {
        self.byteCount = byteCount
        pointer = .allocate(byteCount: max(byteCount, 1), alignment: 64)
    }
    deinit { pointer.deallocate() }
}

/// The tensors of a random model, in memory.
final class RandomTensors: TensorSource {
    let sourceDescription: String
    private(set) var tensorNames: [String] = []
    private var views: [String: TensorView] = [:]

    init(description: String) { sourceDescription = description }

    func add(_ entry: SafetensorsWriter.Entry, _ buffer: HostAllocation) {
        tensorNames.append(entry.name)
        views[entry.name] = TensorView(name: entry.name, dtype: entry.dtype, shape: entry.shape, data: buffer.pointer,
                                       byteCount: entry.byteCount, owner: buffer)
    }

    func tensorIfPresent(_ name: String) -> TensorView? { views[name] }
}
