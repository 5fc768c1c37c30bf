import Foundation
import Testing
@testable import Fulgur

/// Random models at the shape of published ones (`RandomModel`): the full presets' shapes
/// (from their configs alone, no weights made), then the tiny presets built, run, exported,
/// reloaded, and compared with Hugging Face transformers.
@Suite struct RandomModelTests {
    static let tiny = ["tiny-gpt-oss", "tiny-qwen3-moe", "tiny-mimo-v2-flash"]
    /// The seed of the committed transformers references (recipes/fixtures/make_random_model_references.py).
    static let referenceSeed: UInt64 = 7

    // MARK: Published shapes

    @Test func gptOss20bHasThePublishedShape() throws {
        let random = try RandomModel(preset: "gpt-oss-20b")
        let spec = try random.spec()
        #expect(spec.architecture == "GptOssForCausalLM" && spec.layerCount == 24)
        #expect(spec.vocabSize == 201088 && spec.hiddenSize == 2880 && !spec.tieWordEmbeddings)
        for (i, layer) in spec.layers.enumerated() {
            let a = layer.attention
            #expect(a.heads == 64 && a.kvHeads == 8 && a.headDim == 64 && a.valueHeadDim == 64)
            #expect(a.window == (i % 2 == 0 ? 128 : nil), "layer \(i): sliding window first, then alternating")
            #expect(a.hasSinks && a.qkvBias && a.outputBias && !a.qkNorm)
            #expect(a.rope.rotaryDim == 64 && a.rope.attentionFactor > 1, "YaRN")
            guard case .moe(let m) = layer.feedForward else { Issue.record("layer \(i) is not MoE"); continue }
            #expect(m.experts == 32 && m.topK == 4 && m.intermediate == 2880 && m.routing == .topKSoftmax)
            #expect(m.routerBias && m.expertBias && m.activation == .clampedSwiGLU(alpha: 1.702, limit: 7) && m.layout == .gptOss)
        }
        // Published: 20.9 B parameters.
        let billions = Double(try random.parameterCount()) / 1e9
        #expect(abs(billions - 20.91) < 0.02, "\(billions) B")
        #expect(spec.quantization == QuantizationSpec(method: "fp8", fp8Tile: 128, allowsMXFP4: true))
    }

    @Test func qwen3MoeHasThePublishedShape() throws {
        let random = try RandomModel(preset: "qwen3-30b-a3b")
        let spec = try random.spec()
        #expect(spec.architecture == "Qwen3MoeForCausalLM" && spec.layerCount == 48)
        #expect(spec.vocabSize == 151936 && spec.hiddenSize == 2048 && spec.rmsNormEps == 1e-6)
        for layer in spec.layers {
            let a = layer.attention
            #expect(a.heads == 32 && a.kvHeads == 4 && a.headDim == 128 && a.qkNorm && a.window == nil && !a.hasSinks)
            guard case .moe(let m) = layer.feedForward else { Issue.record("dense layer"); continue }
            #expect(m.experts == 128 && m.topK == 8 && m.intermediate == 768 && m.routing == .softmaxTopK(normalize: true))
        }
        // Published: 30.5 B parameters.
        let billions = Double(try random.parameterCount()) / 1e9
        #expect(abs(billions - 30.53) < 0.02, "\(billions) B")
    }

    @Test func mimoV2FlashHasThePublishedShape() throws {
        let random = try RandomModel(preset: "mimo-v2-flash")
        let spec = try random.spec()
        #expect(spec.architecture == "MiMoV2FlashForCausalLM" && spec.layerCount == 48)
        #expect(spec.vocabSize == 152576 && spec.hiddenSize == 4096)
        for (i, layer) in spec.layers.enumerated() {
            let a = layer.attention, full = i == 0 || (i + 1) % 6 == 0
            #expect(a.heads == 64 && a.kvHeads == (full ? 4 : 8) && a.headDim == 192 && a.valueHeadDim == 128)
            #expect(a.window == (full ? nil : 128) && a.hasSinks == !full && a.valueScale == 0.707)
            #expect(a.rope.rotaryDim == 64)
            switch layer.feedForward {
            case .dense(let inter, _):
                #expect(i == 0 && inter == 16384)
            case .moe(let m):
                #expect(i > 0 && m.experts == 256 && m.topK == 8 && m.intermediate == 2048)
                #expect(m.routing == .sigmoidWithBias(normalize: true, scaling: 1, groups: 1, topKGroups: 1))
            }
        }
        // Published: 309 B parameters.
        let billions = Double(try random.parameterCount()) / 1e9
        #expect(abs(billions - 309) < 1, "\(billions) B")
    }

    @Test func fewerLayersKeepTheFirstLayersAndTheirWeights() throws {
        let four = try RandomModel(preset: "tiny-mimo-v2-flash", layers: 4, seed: 3).tensors()
        let six = try RandomModel(preset: "tiny-mimo-v2-flash", seed: 3).tensors()
        let other = try RandomModel(preset: "tiny-mimo-v2-flash", seed: 4).tensors()
        #expect(six.tensorNames.filter { $0.hasPrefix("model.layers.") }.count > four.tensorNames.filter { $0.hasPrefix("model.layers.") }.count)
        for name in four.tensorNames {
            let a = try four.tensor(name), b = try six.tensor(name)
            #expect(a.shape == b.shape && memcmp(a.data, b.data, a.byteCount) == 0, "\(name)")
        }
        let name = "model.layers.1.mlp.experts.3.up_proj.weight"
        #expect(memcmp(try six.tensor(name).data, try other.tensor(name).data, try six.tensor(name).byteCount) != 0)
    }

    // MARK: Tiny models on the CPU executor

    /// A fixed prompt longer than the tiny models' sliding window (8).
    static func prompt(_ vocab: Int, count: Int = 24) -> [Int] {
        var rng = SeededGenerator(seed: 11)
        return (0..<count).map { _ in Int(rng.next() % UInt64(vocab)) }
    }

    static func logits(_ model: Model, _ tokens: [Int]) throws -> [Float] {
        try CPUExecutor(plan: model.plan, maxStepTokens: 8).forward(tokens, logits: .all)
    }

    /// The router's choices at every MoE layer for `tokens`. Each MoE layer's input comes
    /// from running that layer's ops up to its MoE op (attention, residual, norm) on the
    /// hidden states the full model captured before the layer, in a plan whose "LM head" is
    /// the router: its logits are then exactly what the MoE op routes on.
    static func routing(_ model: Model, _ tokens: [Int]) throws -> [(layer: Int, choices: [[(expert: Int, weight: Float)]])] {
        let plan = model.plan, hidden = model.spec.hiddenSize
        let full = CPUExecutor(plan: plan)
        full.captureLayers = Array(0..<model.spec.layerCount)
        _ = try full.forward(tokens, logits: .none)
        var result: [(Int, [[(expert: Int, weight: Float)]])] = []
        var layerOps: [Op] = [], layer = 0
        for op in plan.ops.dropFirst() {
            if case .layerEnd = op { layerOps = []; layer += 1; continue }
            guard case .moe(_, _, let m) = op else { layerOps.append(op); continue }
            var input = [Float](repeating: 0, count: tokens.count * hidden)
            for (t, id) in tokens.enumerated() {
                if layer == 0 {
                    let table = plan.embedding.table
                    input.withUnsafeMutableBufferPointer { Dequant.row(table.dtype, table.data + id * table.rowBytes, hidden, $0.baseAddress! + t * hidden) }
                } else {
                    let width = model.spec.layerCount * hidden
                    for j in 0..<hidden { input[t * hidden + j] = full.capturedFeatures[t * width + (layer - 1) * hidden + j] }
                }
            }
            let probe = Plan(spec: plan.spec, ops: layerOps, widths: plan.widths, embedding: plan.embedding, lmHead: m.router)
            let logits = try CPUExecutor(plan: probe).forward(rows: input, logits: .all)
            let E = m.spec.experts
            result.append((layer, (0..<tokens.count).map { t in
                var row = Array(logits[(t * E)..<((t + 1) * E)])
                if let b = m.routerBias { row = zip(row, b).map { $0 + $1 } }
                return MoE.route(row, m)
            }))
        }
        return result
    }

    @Test(arguments: tiny)
    func tinyModelRunsWithFiniteLogitsAndSpreadRouting(_ preset: String) throws {
        let model = try RandomModel(preset: preset, seed: 1).build()
        let tokens = Self.prompt(model.spec.vocabSize)
        let logits = try Self.logits(model, tokens)
        #expect(logits.allSatisfy { $0.isFinite })
        let vocab = model.spec.vocabSize
        for t in 0..<tokens.count {
            let row = logits[(t * vocab)..<((t + 1) * vocab)]
            let mean = row.reduce(0, +) / Float(vocab)
            let std = (row.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Float(vocab)).squareRoot()
            // Weights of about N(0, 1/fan_in) keep the logits O(1): neither flat nor saturated.
            #expect(std > 0.3 && std < 10, "position \(t): logit std \(std)")
        }
        let routing = try Self.routing(model, tokens)
        #expect(routing.count == model.spec.layers.filter { !$0.feedForward.isDense }.count)
        for (layer, choices) in routing {
            guard case .moe(let m) = model.spec.layers[layer].feedForward else { continue }
            var load = [Int](repeating: 0, count: m.experts)
            for token in choices { for c in token { load[c.expert] += 1 } }
            let used = load.filter { $0 > 0 }.count, top = load.max()!
            let topWeight = choices.map { $0.map(\.weight).max()! }.reduce(0, +) / Float(choices.count)
            // Not degenerate: most experts used, none taken by nearly every token (a uniform
            // router gives each expert tokens * k / E, 6 here), weights not one-hot.
            #expect(used >= m.experts * 3 / 4, "layer \(layer): \(used) of \(m.experts) experts used, load \(load)")
            #expect(top <= tokens.count * 3 / 4, "layer \(layer): one expert chosen by \(top) of \(tokens.count) tokens, load \(load)")
            #expect(topWeight < 0.9, "layer \(layer): mean top routing weight \(topWeight)")
        }
    }

    @Test(arguments: tiny)
    func everyFormatHoldsTheSameWeights(_ preset: String) throws {
        // The BF16 forms hold exactly what the MXFP4 and FP8 forms dequantize to, so logits
        // differ only by summation order.
        let quantized = try RandomModel(preset: preset, seed: 2).build()
        let tokens = Self.prompt(quantized.spec.vocabSize, count: 12)
        let want = try Self.logits(quantized, tokens)
        for (experts, linear) in [(RandomModel.ExpertFormat.bf16, RandomModel.LinearFormat.fp8), (.mxfp4, .bf16), (.bf16, .bf16)] {
            let got = try Self.logits(RandomModel(preset: preset, seed: 2, experts: experts, linear: linear).build(), tokens)
            #expect(Self.relativeError(got, want) < 1e-5, "experts \(experts), linear \(linear)")
        }
    }

    static func relativeError(_ got: [Float], _ want: [Float]) -> Float {
        let err = zip(got, want).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot()
        return err / want.map { $0 * $0 }.reduce(0, +).squareRoot()
    }

    // MARK: Export

    @Test(arguments: tiny)
    func fulgurExportReloadsBitForBit(_ preset: String) throws {
        let random = try RandomModel(preset: preset, seed: 5)
        let dir = try temporaryDirectory() + "/checkpoint"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        // Small shards, so the sharded layout and its index are exercised too.
        try random.export(to: dir, for: .fulgur, shardBytes: 400_000)
        #expect(FileManager.default.fileExists(atPath: dir + "/model.safetensors.index.json"))
        let built = try random.build(), loaded = try Model(path: dir)
        #expect(Set(loaded.tensors.tensorNames) == Set(built.tensors.tensorNames))
        for name in built.tensors.tensorNames {
            let a = try built.tensors.tensor(name), b = try loaded.tensors.tensor(name)
            #expect(a.dtype == b.dtype && a.shape == b.shape && memcmp(a.data, b.data, a.byteCount) == 0, "\(name)")
        }
        let tokens = Self.prompt(built.spec.vocabSize, count: 12)
        #expect(try Self.logits(loaded, tokens) == Self.logits(built, tokens))
    }

    @Test(arguments: tiny)
    func transformersExportIsTheSameModelInBF16(_ preset: String) throws {
        let random = try RandomModel(preset: preset, seed: 5)
        let dir = try temporaryDirectory() + "/checkpoint"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try random.export(to: dir, for: .transformers)
        let loaded = try Model(path: dir)
        let dtypes = Set(loaded.tensors.tensorNames.map { try! loaded.tensors.tensor($0).dtype })
        // gpt-oss keeps its MXFP4 experts (transformers reads them); everything else is BF16
        // (MiMo's correction bias F32, as transformers keeps it).
        #expect(dtypes.isSubset(of: preset == "tiny-gpt-oss" ? [.bf16, .u8] : [.bf16, .f32]), "\(dtypes)")
        let tokens = Self.prompt(loaded.spec.vocabSize, count: 12)
        #expect(try Self.logits(loaded, tokens) == Self.logits(random.transformersTwin.build(), tokens))
        #expect(Self.relativeError(try Self.logits(loaded, tokens), try Self.logits(random.build(), tokens)) < 1e-5)
    }

    // MARK: Against Hugging Face transformers

    /// transformers 5.17 ran the tiny models exported for it (recipes/fixtures/
    /// make_random_model_references.py); Fulgur runs them as built in memory, with MXFP4
    /// experts and FP8 layers: the same weights, so the logits agree at every position.
    @Test(arguments: tiny)
    func logitsMatchTransformers(_ preset: String) throws {
        let f = try SafetensorsFile(path: Fixtures.path("random_models/\(preset).safetensors"))
        #expect(f.metadata["generator"]?.contains("fulgur random-model \(preset) --seed \(Self.referenceSeed) (mxfp4 experts, fp8 layers") == true)
        let ids = try f.tensor("input_ids").floats().map { Int($0) }, want = try f.tensor("logits").floats()
        let greedy = try f.tensor("greedy").floats().map { Int($0) }
        let model = try RandomModel(preset: preset, seed: Self.referenceSeed, experts: .mxfp4, linear: .fp8).build()
        let executor = CPUExecutor(plan: model.plan, maxStepTokens: 8)
        let got = try executor.forward(ids, logits: .all), vocab = model.spec.vocabSize
        #expect(got.count == want.count)
        for t in 0..<ids.count {
            let range = (t * vocab)..<((t + 1) * vocab)
            let err = Self.relativeError(Array(got[range]), Array(want[range]))
            #expect(err <= 1e-3, "\(preset): position \(t) relative error \(err)")
        }
        // Greedy from the prompt's cache, one token a step.
        func argmax(_ row: ArraySlice<Float>) -> Int { row.indices.max { row[$0] < row[$1] }! - row.startIndex }
        var tokens = [argmax(got[((ids.count - 1) * vocab)...])]
        while tokens.count < greedy.count { tokens.append(argmax(try executor.forward([tokens.last!])[...])) }
        #expect(tokens == greedy)
    }
}
