// Deferred random weights made on the GPU (issue 7: RandomModel.buildDeferred, Kernels/random.cu):
// 1. bytes: every matrix kind the kernels fill against DeferredRandomMatrix's bytes made on the
//    CPU, exactly: CUDALinear's FP8 codes + tile scales, MXFP4 codes + block scales and BF16 of
//    each (whole, sliced, strided, a batch of a stacked tensor, parts stacked by rows, MiMo-V2-
//    Flash shards), and CUDAMoE's tiled layout (separate gate/up, fused interleaved gate/up with
//    an odd block count, shards; tiny presets and MiMo-V2-Flash / gpt-oss expert widths);
// 2. tiny deferred models: CUDAExecutor against the CPU executor (logits at every prompt
//    position within executorTolerance, 8 greedy tokens identical), MoE kernels 7 and 1, and
//    BF16 forms (the dense MoE fallback);
// 3. with 2 GPUs: CUDATensorParallel over 2 against 1 GPU (tensorParallelTolerance, greedy
//    tokens identical): the tiny models and MiMo-V2-Flash at full width cut to 2 layers (the
//    dense layer and one MoE layer of 256 experts), with its build time.
import Foundation
import Fulgur
import FulgurCUDA

func runRandomChecks(_ device: CUDADevice, _ module: KernelModule) throws -> Bool {
    var failures: [String] = []
    func record(_ passed: Bool, _ line: String) {
        print("random: " + line + (passed ? "" : "  FAIL"))
        if !passed { failures.append(line) }
    }
    /// "identical", or how many bytes differ and where the first is.
    func compare(_ got: [UInt8], _ want: [UInt8]) -> (Bool, String) {
        guard got.count == want.count else { return (false, "\(got.count) bytes on the GPU, \(want.count) on the CPU") }
        guard let first = got.indices.first(where: { got[$0] != want[$0] }) else { return (true, "identical") }
        let differ = zip(got, want).filter { $0.0 != $0.1 }.count
        return (false, "\(differ) of \(got.count) bytes differ, the first at \(first) (GPU \(got[first]), CPU \(want[first]))")
    }

    // 1. Bytes, CUDALinear.
    func w(_ kind: DeferredRandomMatrix.Kind, form: DeferredRandomMatrix.Form = .quantized, batches: Int = 1, batch: Int = 0,
           _ rows: Int, _ columns: Int, seed: UInt64 = 0x5EED) -> LinearWeight {
        LinearWeight(deferred: DeferredRandomMatrix(kind, form: form, seed: seed, batches: batches, batch: batch, rows: rows, columns: columns,
                                                    std: 1 / Float(columns).squareRoot()), name: "\(kind) [\(rows), \(columns)]")
    }
    var linears: [(String, [LinearWeight])] = []
    for form in [DeferredRandomMatrix.Form.quantized, .bf16] {
        let f = form == .bf16 ? " as bf16" : ""
        linears += [
            ("fp8\(f) [200, 192] whole (ragged tiles)", [w(.fp8, form: form, 200, 192)]),
            ("fp8\(f) rows 128..<256, columns 128..<320 of batch 2 of 3", [try w(.fp8, form: form, batches: 3, batch: 2, 384, 320).selecting(rows: Array(128..<256), columns: 128..<320)]),
            ("fp8\(f) every other row from 129", [try w(.fp8, form: form, 384, 320).selecting(rows: Array(stride(from: 129, to: 256, by: 2)), columns: 0..<256)]),
            ("mxfp4\(f) [96, 256] whole", [w(.mxfp4, form: form, 96, 256)]),
            ("mxfp4\(f) every third row, columns 64..<224 of batch 1 of 2", [try w(.mxfp4, form: form, batches: 2, batch: 1, 100, 256).selecting(rows: Array(stride(from: 3, to: 100, by: 3)), columns: 64..<224)]),
        ]
    }
    let (q, k, v) = (w(.fp8, 12288, 4096, seed: 1), w(.fp8, 1536, 4096, seed: 2), w(.fp8, 1024, 4096, seed: 3))
    linears.append(("fp8 MiMo-V2-Flash sliding layer q/k/v, shard 1 of 2, stacked",
                    [try q.selecting(rows: Array(6144..<12288)), try k.selecting(rows: Array(768..<1536)), try v.selecting(rows: Array(512..<1024))]))
    linears.append(("fp8 MiMo-V2-Flash dense down_proj, shard 1 of 2", [try w(.fp8, 4096, 16384, seed: 4).selecting(columns: 8192..<16384)]))
    for (what, parts) in linears {
        guard parts.allSatisfy({ $0.deferred != nil }), CUDALinear.canStack(parts) else {
            record(false, "\(what): not deferred or not stackable (the check's own mistake)")
            continue
        }
        let gpu = try CUDALinear(stacking: parts, biases: parts.map { _ in nil }, name: what, module: module)
        let got = try gpu.deviceBytes()
        let codes = compare(got.codes, parts.flatMap { Array($0.storage.codes) })
        let scales = got.scales.map { compare($0, parts.flatMap { Array($0.storage.scales!) }) } ?? (true, "none")
        record(codes.0 && scales.0, "\(what): codes \(codes.1), scales \(scales.1)")
    }

    // 1. Bytes, CUDAMoE's tiled layout.
    var layers: [(String, MoEWeights)] = []
    for (preset, shards) in [("tiny-mimo-v2-flash", 1), ("tiny-mimo-v2-flash", 2), ("tiny-gpt-oss", 1), ("tiny-qwen3-moe", 2)] {
        let plan = try RandomModel(preset: preset, seed: 5).buildDeferred().plan
        for rank in 0..<shards {
            for case .moe(_, _, let m) in try plan.shard(rank: rank, of: shards).ops {
                layers.append(("\(preset) \(rank == 0 && shards == 1 ? "whole" : "shard \(rank) of \(shards)")", m))
                break
            }
        }
    }
    /// Shard `rank` of 2 of an MoE layer of deferred experts: separate gate and up (MiMo), or
    /// gate and up fused with their rows interleaved (gpt-oss; the shard's rows stay contiguous).
    func expertLayer(experts E: Int, hidden H: Int, intermediate I: Int, interleaved: Bool, rank: Int) throws -> MoEWeights {
        let mine = (rank * I / 2)..<((rank + 1) * I / 2)
        let experts = try (0..<E).map { e -> ExpertWeights in
            let down = try w(.mxfp4, H, I, seed: 100 + UInt64(e)).selecting(columns: mine)
            guard interleaved else {
                return ExpertWeights(gateUp: nil, gate: try w(.mxfp4, I, H, seed: 200 + UInt64(e)).selecting(rows: Array(mine)),
                                     up: try w(.mxfp4, I, H, seed: 300 + UInt64(e)).selecting(rows: Array(mine)), down: down,
                                     gateUpBias: nil, downBias: nil, interleaved: false)
            }
            return ExpertWeights(gateUp: try w(.mxfp4, batches: E, batch: e, 2 * I, H, seed: 400).selecting(rows: Array((2 * mine.lowerBound)..<(2 * mine.upperBound))),
                                 gate: nil, up: nil, down: down, gateUpBias: nil, downBias: nil, interleaved: true)
        }
        let spec = MoESpec(experts: E, topK: 2, intermediate: I / 2, routing: .topKSoftmax, routerBias: false, expertBias: false,
                           activation: .silu, layout: interleaved ? .gptOss : .perExpert)
        return MoEWeights(spec: spec, router: w(.fp8, form: .bf16, E, H, seed: 500), routerBias: nil, correctionBias: nil, experts: experts)
    }
    layers.append(("MiMo-V2-Flash width (hidden 4096, intermediate 2048), 8 experts, shard 1 of 2",
                   try expertLayer(experts: 8, hidden: 4096, intermediate: 2048, interleaved: false, rank: 1)))
    layers.append(("gpt-oss width (2880, 2880: 45 blocks a shard row), 4 experts interleaved, shard 1 of 2",
                   try expertLayer(experts: 4, hidden: 2880, intermediate: 2880, interleaved: true, rank: 1)))
    for (what, m) in layers {
        let deferred = m.experts.allSatisfy { e in [e.gateUp, e.gate, e.up, e.down].allSatisfy { $0 == nil || $0!.deferred != nil } }
        let moe = try CUDAMoE(m, module: module)
        guard deferred, let got = try moe.deviceTiledBytes() else {
            record(false, "MoE \(what): experts not deferred or not tiled (the check's own mistake)")
            continue
        }
        let want = CUDAMoE.hostTiled(m)
        let gateUp = compare(got.gateUp, want.gateUp), down = compare(got.down, want.down)
        record(gateUp.0 && down.0, "MoE \(what): gate_up \(gateUp.1), down \(down.1)")
    }

    // 2. Tiny deferred models: GPU against CPU.
    let prompt = (0..<24).map { ($0 * 37 + 11) % 512 }
    func greedy(_ executor: any Executor, _ first: [Float], steps: Int) throws -> [Int] {
        var tokens = [Sampler.argmax(first)]
        while tokens.count < steps { tokens.append(Sampler.argmax(try executor.forward([tokens.last!], logits: .last))) }
        return tokens
    }
    let tiny: [(String, RandomModel, Int)] = [
        ("tiny-mimo-v2-flash", try RandomModel(preset: "tiny-mimo-v2-flash", seed: 6), CUDAMoE.defaultVersion),
        ("tiny-mimo-v2-flash, MoE version 1", try RandomModel(preset: "tiny-mimo-v2-flash", seed: 6), 1),
        ("tiny-gpt-oss", try RandomModel(preset: "tiny-gpt-oss", seed: 6), CUDAMoE.defaultVersion),
        ("tiny-qwen3-moe", try RandomModel(preset: "tiny-qwen3-moe", seed: 6), CUDAMoE.defaultVersion),
        ("tiny-qwen3-moe, bf16 experts and layers", try RandomModel(preset: "tiny-qwen3-moe", seed: 6, experts: .bf16, linear: .bf16), CUDAMoE.defaultVersion),
    ]
    for (what, random, version) in tiny {
        let model = try random.buildDeferred(), vocab = model.spec.vocabSize
        let cpu = CPUExecutor(plan: model.plan, maxPositions: 128, maxStepTokens: 16)
        let gpu = try CUDAExecutor(plan: model.plan, device: device, module: module, maxPositions: 128, moeVersion: version)
        let a = try cpu.forward(prompt, logits: .all), b = try gpu.forward(prompt, logits: .all)
        let error = worstRowError(b, a, width: vocab)
        let same = try greedy(cpu, Array(a.suffix(vocab)), steps: 8) == greedy(gpu, Array(b.suffix(vocab)), steps: 8)
        record(error <= executorTolerance && same, String(format: "%@, deferred: GPU vs CPU logits %.2e (bound %.0e), 8 greedy tokens %@",
                                                          what, error, executorTolerance, same ? "identical" : "DIFFER"))
    }

    // 3. Over 2 GPUs against 1, and the full-width MiMo cut over 4 where there are 4: logits,
    // greedy tokens and (MiMo) both layers' captured hidden states, whose 8-token step has the
    // all-reduce after each feed-forward do the next norm on 4 GPUs (tokens x GPUs <= 32).
    let visible = try CUDADevice.visibleCount()
    if visible >= 2 {
        var split: [(String, RandomModel, [Int], Bool)] = tiny.filter { $0.2 == CUDAMoE.defaultVersion }.map { ($0.0, $0.1, [2], false) }
        split.append(("mimo-v2-flash, 2 layers (dense + 256 experts)", try RandomModel(preset: "mimo-v2-flash", layers: 2, seed: 6),
                      visible >= 4 ? [2, 4] : [2], true))
        for (what, random, sizes, full) in split {
            let start = Date()
            let model = try random.buildDeferred(), vocab = model.spec.vocabSize
            let built = Date().timeIntervalSince(start)
            for n in sizes {
                let group = try DeviceGroup(ordinals: (0..<Int32(n)).map { $0 })
                let begun = Date()
                try group.makeCurrent(0)
                let whole = try CUDAExecutor(plan: model.plan, device: group.devices[0], module: group.modules[0], maxPositions: 64)
                let filled = Date().timeIntervalSince(begun)
                let tp = try CUDATensorParallel(plan: model.plan, group: group, maxPositions: 64)
                let shards = Date().timeIntervalSince(begun) - filled
                if full { whole.captureLayers = [0, 1]; tp.captureLayers = [0, 1] }
                let a = try whole.forward(prompt.map { $0 % vocab }, logits: .all), b = try tp.forward(prompt.map { $0 % vocab }, logits: .all)
                let error = worstRowError(b, a, width: vocab)
                var features = ""
                var featuresOK = true
                if full {
                    let fa = try whole.capturedFeatures, fb = try tp.capturedFeatures
                    let e = fa.count == fb.count && fa.count == prompt.count * 2 * model.spec.hiddenSize
                        ? worstRowError(fb, fa, width: 2 * model.spec.hiddenSize) : .infinity
                    featuresOK = e <= tensorParallelTolerance
                    features = String(format: ", captured layers %.2e", e)
                    whole.captureLayers = []; tp.captureLayers = []
                }
                let same = try greedy(whole, Array(a.suffix(vocab)), steps: 8) == greedy(tp, Array(b.suffix(vocab)), steps: 8)
                record(error <= tensorParallelTolerance && same && featuresOK,
                       String(format: "%@, deferred, over %d GPUs vs 1: logits %.2e (bound %.0e)%@, 8 greedy tokens %@; host tensors %.1f s, 1 GPU filled %.1f s, %d GPUs %.1f s",
                              what, n, error, tensorParallelTolerance, features, same ? "identical" : "DIFFER", built, filled, n, shards))
            }
        }
    } else {
        print("random: over 2 GPUs skipped, \(visible) GPU")
    }
    print(failures.isEmpty ? "random PASS" : "random FAIL: \(failures.count) checks")
    return failures.isEmpty
}
