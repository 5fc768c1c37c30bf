import Foundation
import Testing
@testable import Fulgur

/// `fulgur quantize`: layouts against Python references (recipes/fixtures/
/// make_quantized_fixtures.py), the checkpoint it writes, its errors, and its report.
@Suite struct QuantizeTests {
    static func bits(_ xs: [Float]) -> [UInt32] { xs.map(\.bitPattern) }

    /// gpt-oss blocks/scales decode as transformers' `convert_moe_packed_tensors` does, and
    /// Swift's quantizer writes those values back in the same layout.
    @Test func gptOssPackedExpertsDequantizeLikeTransformers() throws {
        let f = try SafetensorsFile(path: Fixtures.path("quantized/gpt_oss_packed.safetensors"))
        let blocks = try f.tensor("blocks"), scales = try f.tensor("scales")
        let expected = try f.tensor("dequantized").floats()  // [E, in, out]
        let (experts, out, inF) = (blocks.shape[0], blocks.shape[1], blocks.shape[2] * 32)
        for e in 0..<experts {
            let w = try LinearWeight(mxfp4: blocks, scales: scales, expert: e)
            #expect(w.outFeatures == out && w.inFeatures == inF)
            for r in 0..<out {
                var row = [Float](repeating: 0, count: inF)
                w.dequantizeRow(r, into: &row)
                let want = (0..<inF).map { expected[(e * inF + $0) * out + r] }
                #expect(Self.bits(row) == Self.bits(want), "expert \(e) row \(r)")

                // 2^127 scales overflow to inf, which quantizes to NaN: only finite rows go back.
                guard want.allSatisfy(\.isFinite) else { continue }
                var codes = [UInt8](repeating: 0, count: inF / 2), scale = [UInt8](repeating: 0, count: inF / 32)
                Quantize.mxfp4Split(want, inF, codes: &codes, scales: &scale)
                let again = (0..<inF).map { j in
                    E2M1.decode(j % 2 == 0 ? codes[j / 2] & 0xF : codes[j / 2] >> 4) * E8M0.decode(scale[j / 32])
                }
                #expect(Self.bits(again) == Self.bits(want), "requantized expert \(e) row \(r)")
            }
        }
    }

    /// The split layout holds the same scales and element codes as the GGUF-layout blocks of
    /// the ml_dtypes reference quantizer (recipes/fixtures/make_codec_fixtures.py).
    @Test func mxfp4SplitMatchesTheReferenceQuantizer() throws {
        let x = try CodecTests.load("mxfp4_input.bin", as: Float.self)
        let reference = try CodecTests.load("mxfp4_blocks.bin", as: UInt8.self)
        var codes = [UInt8](repeating: 0xAA, count: x.count / 2), scales = [UInt8](repeating: 0xAA, count: x.count / 32)
        Quantize.mxfp4Split(x, x.count, codes: &codes, scales: &scales)
        var mismatched = 0
        for b in 0..<(x.count / 32) {
            let block = reference[(17 * b)..<(17 * b + 17)]
            let want = (0..<32).map { j in j < 16 ? block[17 * b + 1 + j] & 0xF : block[17 * b + 1 + j - 16] >> 4 }
            let got = (0..<32).map { j in j % 2 == 0 ? codes[16 * b + j / 2] & 0xF : codes[16 * b + j / 2] >> 4 }
            if scales[b] != block[17 * b] || got != want { mismatched += 1 }
        }
        #expect(mismatched == 0, "\(mismatched) of \(x.count / 32) blocks differ")
    }

    /// FP8 with 128x128 tiles on a shape that is not a multiple of 128: Swift's codes and
    /// scales equal numpy/ml_dtypes', and dequantization equals numpy's.
    @Test func fp8BlocksMatchPythonReference() throws {
        let f = try SafetensorsFile(path: Fixtures.path("quantized/fp8_blocks.safetensors"))
        let weight = try f.tensor("weight"), codes = try f.tensor("codes"), scaleInv = try f.tensor("scale_inv")
        let (rows, columns) = (weight.shape[0], weight.shape[1])
        var myCodes = [UInt8](repeating: 0, count: rows * columns), myScales = [Float](repeating: 0, count: scaleInv.elementCount)
        Quantize.fp8Blocks(weight.floats(), rows: rows, columns: columns, codes: &myCodes, scales: &myScales)
        #expect(myCodes == Array(UnsafeRawBufferPointer(start: codes.data, count: codes.byteCount)))
        #expect(Self.bits(myScales) == Self.bits(scaleInv.floats()))

        let w = try LinearWeight(fp8: codes, scaleInv: scaleInv)
        let expected = try f.tensor("dequantized").floats()
        var row = [Float](repeating: 0, count: columns), mismatched = 0
        for r in 0..<rows {
            w.dequantizeRow(r, into: &row)
            if Self.bits(row) != Self.bits(Array(expected[(r * columns)..<((r + 1) * columns)])) { mismatched += 1 }
        }
        #expect(mismatched == 0, "\(mismatched) of \(rows) rows differ")
    }

    static func quantized(_ model: String, keep: [String] = [], shardBytes: Int = 5_000_000_000) throws -> (String, [QuantizationReport.TensorError]) {
        let dst = try temporaryDirectory() + "/out"
        let errors = try Quantizer(source: Fixtures.path("models/\(model)"), keep: keep).write(to: dst, shardBytes: shardBytes)
        return (dst, errors)
    }

    static func header(_ dir: String) throws -> [String: (DType, [Int])] {
        let c = try SafetensorsCheckpoint(directory: dir)
        return try Dictionary(uniqueKeysWithValues: c.tensorNames.map { ($0, (try c.tensor($0).dtype, try c.tensor($0).shape)) })
    }

    @Test func mimoCheckpointHasTheReleaseLayout() throws {
        let (dst, errors) = try Self.quantized("mimo_v2_flash")
        let h = try Self.header(dst)
        let expert = "model.layers.1.mlp.experts.3."
        #expect(h[expert + "gate_proj.weight"]! == (.u8, [32, 32]))
        #expect(h[expert + "gate_proj.weight_scale"]! == (.u8, [32, 2]))
        #expect(h[expert + "down_proj.weight"]! == (.u8, [64, 16]))
        #expect(h[expert + "down_proj.weight_scale"]! == (.u8, [64, 1]))
        #expect(h["model.layers.1.self_attn.q_proj.weight"]! == (.fp8e4m3, [96, 64]))
        #expect(h["model.layers.1.self_attn.q_proj.weight_scale_inv"]! == (.f32, [1, 1]))
        #expect(h["model.layers.0.mlp.down_proj.weight"]! == (.fp8e4m3, [64, 128]))
        #expect(h["model.layers.0.mlp.down_proj.weight_scale_inv"]! == (.f32, [1, 1]))
        for kept in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
                     "model.layers.1.self_attn.attention_sink_bias"] {
            #expect(h[kept]?.0 == .bf16, "\(kept)")
        }
        #expect(h["model.layers.1.mlp.gate.e_score_correction_bias"]?.0 == .f32)
        #expect(h.keys.filter { $0.hasSuffix("weight_scale") }.count == 72)

        let config = try JSONValue(parsing: Data(contentsOf: URL(fileURLWithPath: dst + "/config.json")))
        let expected: JSONValue = ["quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
                                   "store_dtype": "mxfp4", "mxfp4_block_size": 32, "ignored_layers": []]
        #expect(config["quantization_config"] == expected)
        #expect(config["architectures"] == ["MiMoV2FlashForCausalLM"])
        #expect(FileManager.default.fileExists(atPath: dst + "/generation_config.json"))
        #expect(errors.filter { $0.kind == .mxfp4 }.allSatisfy { $0.relativeError > 0 && $0.relativeError < 0.2 })
        #expect(errors.filter { $0.kind == .fp8 }.allSatisfy { $0.relativeError > 0 && $0.relativeError < 0.05 })
    }

    @Test func gptOssCheckpointHasThePublishedLayout() throws {
        let (dst, _) = try Self.quantized("gpt_oss")
        let h = try Self.header(dst)
        let p = "model.layers.0.mlp.experts."
        #expect(h[p + "gate_up_proj_blocks"]! == (.u8, [8, 64, 2, 16]))
        #expect(h[p + "gate_up_proj_scales"]! == (.u8, [8, 64, 2]))
        #expect(h[p + "down_proj_blocks"]! == (.u8, [8, 64, 1, 16]))
        #expect(h[p + "down_proj_scales"]! == (.u8, [8, 64, 1]))
        #expect(h[p + "gate_up_proj_bias"]! == (.f32, [8, 64]))
        #expect(h[p + "gate_up_proj"] == nil)
        #expect(h["model.layers.0.self_attn.o_proj.weight"]! == (.fp8e4m3, [64, 128]))
        #expect(h["model.layers.0.mlp.router.weight"]! == (.f32, [8, 64]))
    }

    /// Same input, same bytes; and the committed quantized fixtures are what this code writes.
    @Test(arguments: ["mimo_v2_flash", "gpt_oss"])
    func quantizeIsDeterministic(_ model: String) throws {
        let (a, _) = try Self.quantized(model), (b, _) = try Self.quantized(model)
        for file in ["model.safetensors", "config.json"] {
            let x = try Data(contentsOf: URL(fileURLWithPath: a + "/" + file)), y = try Data(contentsOf: URL(fileURLWithPath: b + "/" + file))
            let committed = try Data(contentsOf: URL(fileURLWithPath: Fixtures.path("models/\(model)_quantized/\(file)")))
            #expect(x == y, "\(file)")
            #expect(x == committed, "\(file) differs from the committed models/\(model)_quantized")
        }
    }

    /// transformers 5 stacks experts (`gate_up_proj` [E, 2I, H], `down_proj` [E, H, I]); they
    /// stay stacked, each row quantized as in the per-expert layout, so the two quantized
    /// checkpoints compute the same logits.
    @Test func stackedExpertsQuantizeLikePerExpertOnes() throws {
        let perExpert = try SafetensorsCheckpoint(directory: Fixtures.path("models/qwen3_moe"))
        let stackedSource = try copyOfFixtureModel("qwen3_moe")
        try FileManager.default.removeItem(atPath: stackedSource + "/model.safetensors")
        let experts = 8
        var entries: [SafetensorsWriter.Entry] = [], chunks: [[UInt8]] = []
        func bytes(_ name: String) throws -> [UInt8] {
            let t = try perExpert.tensor(name)
            return Array(UnsafeRawBufferPointer(start: t.data, count: t.byteCount))
        }
        for name in perExpert.tensorNames where !name.contains(".experts.") {
            let t = try perExpert.tensor(name)
            entries.append(.init(name: name, dtype: t.dtype, shape: t.shape))
            chunks.append(try bytes(name))
        }
        for layer in 0..<2 {
            let p = "model.layers.\(layer).mlp.experts."
            let gate = try perExpert.tensor(p + "0.gate_proj.weight"), down = try perExpert.tensor(p + "0.down_proj.weight")
            entries.append(.init(name: p + "gate_up_proj", dtype: gate.dtype, shape: [experts, 2 * gate.shape[0], gate.shape[1]]))
            chunks.append(try (0..<experts).flatMap { try bytes(p + "\($0).gate_proj.weight") + bytes(p + "\($0).up_proj.weight") })
            entries.append(.init(name: p + "down_proj", dtype: down.dtype, shape: [experts] + down.shape))
            chunks.append(try (0..<experts).flatMap { try bytes(p + "\($0).down_proj.weight") })
        }
        let writer = try SafetensorsWriter(directory: stackedSource, entries: entries)
        for c in chunks { try writer.append(c) }
        try writer.finish()

        let dst = try temporaryDirectory() + "/out"
        _ = try Quantizer(source: stackedSource).write(to: dst)
        let h = try Self.header(dst)
        #expect(h["model.layers.1.mlp.experts.gate_up_proj"]! == (.u8, [8, 64, 32]))
        #expect(h["model.layers.1.mlp.experts.gate_up_proj_scale"]! == (.u8, [8, 64, 2]))
        #expect(h["model.layers.1.mlp.experts.down_proj"]! == (.u8, [8, 64, 16]))
        #expect(h["model.layers.1.mlp.experts.down_proj_scale"]! == (.u8, [8, 64, 1]))

        let (perExpertQuantized, _) = try Self.quantized("qwen3_moe")
        let ids = QuantizationReport.randomPrompts(vocab: 256, count: 1, length: 12)[0]
        let a = try CPUExecutor(plan: Model(path: dst).plan).forward(ids, logits: .all)
        let b = try CPUExecutor(plan: Model(path: perExpertQuantized).plan).forward(ids, logits: .all)
        let err = zip(a, b).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot() / b.map { $0 * $0 }.reduce(0, +).squareRoot()
        #expect(err < 1e-5)
    }

    @Test func keepLeavesMatchingModulesInHighPrecision() throws {
        let (dst, errors) = try Self.quantized("mimo_v2_flash", keep: [#"self_attn\.o_proj"#, #"layers\.3\.mlp\.experts\.7\."#])
        let h = try Self.header(dst)
        #expect(h["model.layers.2.self_attn.o_proj.weight"]?.0 == .bf16)
        #expect(h["model.layers.2.self_attn.o_proj.weight_scale_inv"] == nil)
        #expect(h["model.layers.3.mlp.experts.7.up_proj.weight"]! == (.bf16, [32, 64]))
        #expect(h["model.layers.3.mlp.experts.6.up_proj.weight"]?.0 == .u8)
        let config = try JSONValue(parsing: Data(contentsOf: URL(fileURLWithPath: dst + "/config.json")))
        let ignored = config["quantization_config"]?["ignored_layers"]?.array?.compactMap(\.string) ?? []
        #expect(ignored == ((0..<4).map { "model.layers.\($0).self_attn.o_proj" }
                + ["model.layers.3.mlp.experts.7.down_proj", "model.layers.3.mlp.experts.7.gate_proj", "model.layers.3.mlp.experts.7.up_proj"]).sorted())
        #expect(errors.filter { $0.kind == .kept }.count == 19 + 4 + 3)
        // Fulgur loads what it wrote.
        _ = try Model(path: dst)
    }

    @Test func largeOutputsAreShardedWithAnIndex() throws {
        let (single, _) = try Self.quantized("gpt_oss")
        let (sharded, _) = try Self.quantized("gpt_oss", shardBytes: 40_000)
        let files = try FileManager.default.contentsOfDirectory(atPath: sharded).filter { $0.hasSuffix(".safetensors") }.sorted()
        #expect(files.count > 2)
        #expect(files.first == "model-00001-of-\(String(format: "%05d", files.count)).safetensors")
        let a = try SafetensorsCheckpoint(directory: single), b = try SafetensorsCheckpoint(directory: sharded)
        #expect(b.shards.count == files.count)
        #expect(a.tensorNames == b.tensorNames)
        for name in a.tensorNames {
            let x = try a.tensor(name), y = try b.tensor(name)
            #expect(x.shape == y.shape && x.dtype == y.dtype)
            #expect(memcmp(x.data, y.data, x.byteCount) == 0, "\(name)")
        }
    }

    @Test func badInputsGiveClearErrors() throws {
        expectError(["already quantized", "quantization_config"]) {
            _ = try Quantizer(source: Fixtures.path("models/gpt_oss_quantized"))
        }
        let dir = try temporaryDirectory()
        expectError([dir + "/config.json", "cannot read"]) { _ = try Quantizer(source: dir) }
        expectError(["--keep '(unclosed'", "not a valid regular expression"]) {
            _ = try Quantizer(source: Fixtures.path("models/llama"), keep: ["(unclosed"])
        }
        // A source without quantization_config whose tensors are quantized anyway.
        let sneaky = try copyOfFixtureModel("llama")
        try FileManager.default.removeItem(atPath: sneaky + "/model.safetensors")
        try FileManager.default.copyItem(atPath: Fixtures.path("models/gpt_oss_quantized/model.safetensors"), toPath: sneaky + "/model.safetensors")
        expectError(["already quantized", "tensor '"]) { _ = try Quantizer(source: sneaky) }
        let source = Fixtures.path("models/llama")
        expectError(["already holds a checkpoint"]) { _ = try Quantizer(source: source).write(to: Fixtures.path("models/qwen3")) }
        expectError(["must differ from the source"]) { _ = try Quantizer(source: source).write(to: source + "/") }
    }

    @Test func writerRejectsShortAndLongWrites() throws {
        let dir = try temporaryDirectory()
        let writer = try SafetensorsWriter(directory: dir, entries: [.init(name: "a", dtype: .f32, shape: [2])])
        try writer.append([Float(1)])
        expectError(["tensor 'a'", "not (fully) written"]) { try writer.finish() }
        expectError(["past the last declared tensor"]) { try writer.append([Float(2), Float(3)]) }
    }

    @Test func reportOfAModelAgainstItselfIsExact() throws {
        let model = try Model(path: Fixtures.path("models/mimo_v2_flash"))
        let prompts = QuantizationReport.randomPrompts(vocab: model.spec.vocabSize)
        #expect(prompts.count == 3 && prompts.allSatisfy { $0.count == 32 })
        #expect(prompts == QuantizationReport.randomPrompts(vocab: model.spec.vocabSize))
        let a = try QuantizationReport.compare(original: model, quantized: model, prompts: prompts)
        #expect(a == QuantizationReport.Agreement(positions: 96, top1: 1, meanKL: 0, maxKL: 0))
    }

    @Test func reportSummarizesByKindAndRanksByError() throws {
        let (dst, errors) = try Self.quantized("gpt_oss")
        var report = QuantizationReport(tensors: errors)
        report.agreement = try QuantizationReport.compare(
            original: Model(path: Fixtures.path("models/gpt_oss")), quantized: Model(path: dst),
            prompts: QuantizationReport.randomPrompts(vocab: 256, count: 1, length: 8))
        let kinds = report.summary.map(\.kind)
        #expect(kinds == [.mxfp4, .fp8, .kept])
        let mx = report.summary[0]
        #expect(mx.tensors == 4 && mx.storedBytes * 4 < mx.sourceBytes)
        let text = report.render(worst: 3)
        #expect(text.contains("worst 3 of 12 quantized tensors"))
        #expect(text.contains("Next-token agreement over 8 positions"))
        let a = report.agreement!
        #expect(a.meanKL > 0 && a.top1 > 0 && a.top1 <= 1)
    }
}

/// The tiny MiMo-V2-Flash and gpt-oss checkpoints as `fulgur quantize` writes them, run by
/// the CPU executor, against the same quantized weights dequantized in numpy and run by
/// transformers (recipes/fixtures/make_quantized_fixtures.py).
@Suite struct QuantizedParityTests {
    @Test(arguments: ["mimo_v2_flash_quantized", "gpt_oss_quantized"])
    func logitsAndGreedyMatchTransformers(_ name: String) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let ref = try ArchitectureParityTests.reference(name)
        let logits = try CPUExecutor(plan: model.plan, maxStepTokens: 8).forward(ref.inputIds, logits: .all)
        let vocab = model.spec.vocabSize
        #expect(logits.count == ref.logits.count)
        for t in 0..<ref.inputIds.count {
            let got = logits[(t * vocab)..<((t + 1) * vocab)], want = ref.logits[(t * vocab)..<((t + 1) * vocab)]
            let err = zip(got, want).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot()
            let norm = want.map { $0 * $0 }.reduce(0, +).squareRoot()
            #expect(err / norm <= 1e-3, "\(name): position \(t) relative error \(err / norm)")
        }
        let gen = Generator(executor: CPUExecutor(plan: model.plan, maxStepTokens: 16))
        let result = try gen.generate(prompt: ref.inputIds, parameters: GenerationParameters(maxTokens: ref.greedy.count),
                                      decode: { _ in "" })
        #expect(result.tokens == ref.greedy)
    }
}
