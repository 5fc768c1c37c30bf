// Tensor parallelism on 2 GPUs (issue 7): each tiny MoE checkpoint split by Plan.shard over a
// DeviceGroup (CUDATensorParallel: one CUDAExecutor per GPU, the peer all-reduce of
// Kernels/comm.cu in every step's graph) against the whole model on one GPU: logits at every
// prompt position and 16 greedy tokens, one step at a time; the greedy tokens the GPUs find
// among themselves (argmax_slice, the all-reduce, argmax_pick) against the argmax of the
// gathered logits, on the model and on crafted rows (ties across slices, NaN, -inf); and DFlash
// with the target split over 2 GPUs and the drafter on GPU 0 or split like the target against
// plain greedy on one GPU; the split drafter's block logits against the whole drafter's.
import Foundation
import Fulgur
import FulgurCUDA

/// Split vs whole, both on GPUs in f32: the shards' partial products are summed in another
/// order (the MoE's expert halves, o_proj's head halves), nothing else differs.
let tensorParallelTolerance = 1e-4

func runTensorParallelChecks() throws -> Bool {
    let visible = try CUDADevice.visibleCount()
    guard visible >= 2 else {
        print("tp: skipped, \(visible) GPU")
        return true
    }
    let group = try DeviceGroup(ordinals: [0, 1])
    var failures = 0
    for name in ["gpt_oss", "gpt_oss_quantized", "mimo_v2_flash", "mimo_v2_flash_quantized", "qwen3_moe", "llama"] {
        let model = try Model(path: "Tests/FulgurTests/Fixtures/models/\(name)")
        let vocab = model.plan.lmHead.outFeatures
        let prompt = (0..<24).map { ($0 * 37 + 11) % vocab }
        try group.makeCurrent(0)
        let whole = try CUDAExecutor(plan: model.plan, device: group.devices[0], module: group.modules[0], maxPositions: 64)
        let split = try CUDATensorParallel(plan: model.plan, group: group, maxPositions: 64)
        let a = try whole.forward(prompt, logits: .all), b = try split.forward(prompt, logits: .all)
        let error = a.count == b.count ? worstRowError(b, a, width: vocab) : .infinity
        // The GPUs' own greedy tokens for the prompt's last step (16 + 8 tokens) against the
        // gathered rows' argmax; the cache ends where it was.
        split.reset()
        var argmaxAgrees = try split.argmax(prompt) == (16..<24).map { Sampler.argmax(Array(b[($0 * vocab)..<(($0 + 1) * vocab)])) }
        var same = true, tokens: [Int] = []
        var la = try whole.forward([prompt.last!]), lb = try split.forward([prompt.last!])
        for _ in 0..<16 {
            let ta = Sampler.argmax(la), tb = Sampler.argmax(lb)
            tokens.append(tb)
            if ta != tb { same = false; break }
            // The same step again, through the GPUs' argmax.
            split.truncate(to: split.length - 1)
            if try split.argmax([tokens.count == 1 ? prompt.last! : tokens[tokens.count - 2]]) != [tb] { argmaxAgrees = false }
            la = try whole.forward([ta]); lb = try split.forward([tb])
        }
        // Every layer's hidden states as DFlash captures them, for the prompt (steps of 16 and 8
        // tokens, where the all-reduce after a layer's feed-forward also does the next layer's
        // residual add and norm) and one token (where it does not).
        let layers = Array(0..<model.plan.spec.layerCount)
        var featureError = 0.0
        for steps in [[prompt], [prompt, [prompt[0]]]] {
            whole.reset(); split.reset()
            whole.captureLayers = layers; split.captureLayers = layers
            for s in steps { _ = try whole.forward(s, logits: .none); _ = try split.forward(s, logits: .none) }
            let fa = try whole.capturedFeatures, fb = try split.capturedFeatures
            let e = fa.count == fb.count && fa.count == steps.last!.count * layers.count * model.plan.spec.hiddenSize
                ? worstRowError(fb, fa, width: layers.count * model.plan.spec.hiddenSize) : .infinity
            featureError = e.isNaN || featureError.isNaN ? .nan : max(featureError, e)
        }
        whole.captureLayers = []; split.captureLayers = []
        let passed = error <= tensorParallelTolerance && same && argmaxAgrees && featureError <= tensorParallelTolerance
        if !passed { failures += 1 }
        print(String(format: "tp: %@ over 2 GPUs: logits vs 1 GPU %.2e (bound %.0e), 16 greedy tokens %@, GPU argmax %@, captured layers %.2e", name, error, tensorParallelTolerance,
                     same ? "identical" : "DIFFER after \(tokens.count - 1)", argmaxAgrees ? "== gathered argmax" : "DIFFERS from the gathered argmax", featureError))
    }
    let kernels = try checkSlicedArgmaxKernels(group)
    let speculative = try runTensorParallelSpeculativeChecks(group)
    var drafters = try splitDrafterChecks(group)
    if visible >= 4 { drafters = try splitDrafterChecks(DeviceGroup(ordinals: [0, 1, 2, 3])) && drafters }
    drafters = try capturedRowsChecks(group) && drafters
    let passed = failures == 0 && kernels && speculative && drafters
    print(passed ? "tp PASS: 6 models, crafted argmax rows, DFlash over 2 GPUs, split drafters"
                 : "tp FAIL: \(failures) of 6 models\(kernels ? "" : ", crafted argmax rows")\(speculative ? "" : ", DFlash over 2 GPUs")\(drafters ? "" : ", split drafters")")
    return passed
}

/// A DFlash drafter split over `group` like its target (CUDATensorParallel over its block plan
/// and, sharing the cache, its context plan) against the same drafter whole on GPU 0: after
/// the same context (the target's features on GPU 0), a block's logits within
/// tensorParallelTolerance. DFlash is lossless whatever the drafter proposes, so only this
/// shows the split drafter computes the drafter.
func splitDrafterChecks(_ group: DeviceGroup) throws -> Bool {
    var passed = true
    for (name, drafterName) in [("gpt_oss", "gpt_oss"), ("mimo_v2_flash", "mimo_v2_flash_swa"), ("qwen3_moe", "qwen3_moe")] {
        let model = try Model(path: "Tests/FulgurTests/Fixtures/models/\(name)")
        let directory = "Tests/FulgurTests/Fixtures/drafters/\(drafterName)"
        let onGPU0 = executorOnFirstGPU(group)
        let whole = try DFlashDrafter(directory: directory, target: model, maxPositions: 512, maxStepTokens: 16, executor: onGPU0)
        let split = try DFlashDrafter(directory: directory, target: model, maxPositions: 512, maxStepTokens: 16,
                                      executor: { plan, context in try CUDATensorParallel(plan: plan, group: group, maxPositions: context) })
        let target = try onGPU0(model.plan, 512)
        target.captureLayers = whole.targetLayerIds
        let prompt = (0..<13).map { ($0 * 41 + 7) % model.spec.vocabSize }
        _ = try target.forward(prompt, logits: .none)
        try whole.extend(tokens: prompt, features: target.capturedFeatures)
        try split.extend(tokens: prompt, features: target.capturedFeatures)
        // The context the split drafter holds, before the block's forward adds the block to it.
        let heldContext = split.contextLength
        let block = [prompt.last!] + Array(repeating: whole.maskTokenId, count: 7)
        let vocab = model.plan.lmHead.outFeatures
        let a = try whole.block.forward(block, logits: .all), b = try split.block.forward(block, logits: .all)
        let error = a.count == b.count && a.count == block.count * vocab ? worstRowError(b, a, width: vocab) : .infinity
        let ok = error <= tensorParallelTolerance && heldContext == prompt.count
        passed = passed && ok
        print(String(format: "tp: drafter %@ split over %d GPUs: context %d positions (prompt %d), block logits vs whole on GPU 0 %.2e (bound %.0e) %@",
                     drafterName, group.count, heldContext, prompt.count, error, tensorParallelTolerance, ok ? "ok" : "FAIL"))
    }
    return passed
}

/// The drafter's context update straight from the target's device buffer
/// (Executor.forward(capturedRowsOf:count:), what decoding does after a verify) against the same
/// rows through the host (forward(rows:)): a block's logits bit-identical after either, for the
/// target and the drafter each on GPU 0 or split over `group` (of one GPU: both on it). The speculative checks cannot
/// show this: DFlash stays lossless whatever rows the drafter reads.
func capturedRowsChecks(_ group: DeviceGroup) throws -> Bool {
    var passed = true
    let onGPU0 = executorOnFirstGPU(group)
    let split: (Plan, Int) throws -> any Executor = { plan, context in try CUDATensorParallel(plan: plan, group: group, maxPositions: context) }
    for (name, drafterName) in [("gpt_oss", "gpt_oss"), ("mimo_v2_flash", "mimo_v2_flash_swa")] {
        let model = try Model(path: "Tests/FulgurTests/Fixtures/models/\(name)")
        for (targetPlace, drafterPlace) in group.count == 1 ? [("GPU 0", "GPU 0")] : [("GPU 0", "GPU 0"), ("split", "GPU 0"), ("split", "split")] {
            let target = try (targetPlace == "split" ? split : onGPU0)(model.plan, 512)
            let drafter = try DFlashDrafter(directory: "Tests/FulgurTests/Fixtures/drafters/\(drafterName)", target: model, maxPositions: 512,
                                            maxStepTokens: 16, executor: drafterPlace == "split" ? split : onGPU0)
            target.captureLayers = drafter.targetLayerIds
            let prompt = (0..<13).map { ($0 * 41 + 7) % model.spec.vocabSize }
            _ = try target.forward(prompt, logits: .none)
            try drafter.extend(tokens: prompt, features: target.capturedFeatures)
            // A verify block; its first 5 rows are "accepted".
            let verify = (0..<8).map { ($0 * 97 + 3) % model.spec.vocabSize }
            _ = try target.argmax(verify)
            let block = [verify[4]] + Array(repeating: drafter.maskTokenId, count: 7)
            let onDevice = try drafter.context.forward(capturedRowsOf: target, count: 5)
            let a = try drafter.block.forward(block, logits: .all)
            drafter.block.truncate(to: prompt.count)
            let width = drafter.targetLayerIds.count * model.spec.hiddenSize
            _ = try drafter.context.forward(rows: Array(try target.capturedFeatures[0..<(5 * width)]), logits: .none)
            let b = try drafter.block.forward(block, logits: .all)
            let same = !a.isEmpty && a.map(\.bitPattern) == b.map(\.bitPattern)
            let ok = onDevice && same && drafter.contextLength == prompt.count + 5 + block.count
            passed = passed && ok
            print("\(group.count == 1 ? "speculative" : "tp"): drafter \(drafterName) (\(drafterPlace)) fed by the target (\(targetPlace)), \(group.count) GPU\(group.count == 1 ? "" : "s"): "
                  + (onDevice ? "rows read on the GPU" : "rows NOT read on the GPU") + ", block logits "
                  + (same ? "bit-identical to the rows through the host" : "DIFFER from the rows through the host") + (ok ? " ok" : " FAIL"))
        }
    }
    return passed
}

/// Rows no model gives on purpose: ties across the slice boundary and between the first and
/// last token, NaN and -inf around the only finite value, +inf ties, -0 against +0, all NaN,
/// all -inf, denormals. Every GPU must pick Sampler.argmax of the whole row.
func checkSlicedArgmaxKernels(_ group: DeviceGroup) throws -> Bool {
    let plan = try Model(path: "Tests/FulgurTests/Fixtures/models/gpt_oss").plan
    let vocab = plan.lmHead.outFeatures, half = vocab / 2, ranks = group.count
    func row(_ fill: Float, _ set: [Int: Float] = [:]) -> [Float] {
        var r = [Float](repeating: fill, count: vocab)
        for (i, v) in set { r[i] = v }
        return r
    }
    var rng = SeededGenerator(seed: UInt64(Date().timeIntervalSince1970))
    var rows = [row(-1, [half - 1: 5, half: 5]), row(-1, [vocab - 1: 5, 3: 5]), row(-1, [vocab - 1: 5]), row(.nan, [vocab - 2: -3]), row(.nan),
                row(-.infinity), row(-.infinity, [vocab - 1: .nan, half + 1: -1e30]), row(0, [0: -0.0, half: 0]),
                row(-.infinity, [half + 2: .infinity, vocab - 1: .infinity]), row(-2, [1: .leastNonzeroMagnitude, half + 1: .leastNonzeroMagnitude])]
    while rows.count < 16 { rows.append((0..<vocab).map { _ in Float(Int(rng.next() % 7)) - 3 }) }
    let T = rows.count, entry = SlicedArgmax.entryFloats
    let expected = rows.map { Sampler.argmax($0) }
    let allReduce = try PeerAllReduce(group: group, maxFloats: entry * T * ranks)
    var buffers: [(stream: CUDAStream, table: DeviceBuffer, ids: DeviceBuffer, keep: DeviceBuffer)] = []
    for r in 0..<ranks {
        try group.makeCurrent(r)
        let device = group.devices[r], module = group.modules[r], slice = plan.vocabularySlice(rank: r, of: ranks)
        let logits = try rows.flatMap { Array($0[slice]) }.withUnsafeBytes { try device.upload($0) }
        try device.synchronize()  // a pageable upload may return before its DMA is done
        let stream = try device.makeStream(), table = try device.allocate(4 * entry * T * ranks), ids = try device.allocate(4 * T)
        try module.launch(try module.function("argmax_slice"), grid: (CUDAExecutor.argmaxSplits, T, 1), block: (1024, 1, 1), stream: stream,
                          [.pointer(logits.address), .int32(Int32(slice.count)), .int32(Int32(slice.lowerBound)), .int32(Int32(r)), .int32(Int32(ranks)),
                           .pointer(table.address)])
        try allReduce.enqueue(rank: r, input: table, output: table, count: entry * T * ranks, stream: stream)
        try group.makeCurrent(r)
        try module.launch(try module.function("argmax_pick"), grid: (1, 1, 1), block: (32, 1, 1), stream: stream,
                          [.pointer(table.address), .int32(Int32(T)), .int32(Int32(ranks)), .pointer(ids.address)])
        buffers.append((stream, table, ids, logits))
    }
    var passed = true
    for (r, b) in buffers.enumerated() {
        try group.makeCurrent(r)
        try b.stream.synchronize()
        var got = [Int32](repeating: -1, count: T)
        try got.withUnsafeMutableBytes { try b.ids.download(into: $0) }
        if got.map({ Int($0) }) != expected {
            passed = false
            print("tp: crafted rows, GPU \(r) picked \(got), the whole rows' argmax is \(expected)")
        }
    }
    print("tp: distributed argmax on \(T) crafted rows (ties across slices, NaN, -inf, +inf, -0, denormals) over \(ranks) GPUs: "
          + (passed ? "every GPU == Sampler.argmax" : "FAIL"))
    return passed
}

/// DFlash with the target split over the group (CUDATensorParallel) and the drafter whole on
/// GPU 0 (a CUDAExecutor) or split like the target: greedy, 200 tokens for two prompts at
/// blocks 2, 8 and 16, against plain greedy of the whole model on GPU 0. The drafters are the
/// tiny random fixtures, so most guesses are wrong and rollback runs on every shard.
func runTensorParallelSpeculativeChecks(_ group: DeviceGroup) throws -> Bool {
    var failures: [String] = [], checks = 0
    print("tp: DFlash, target over \(group.count) GPUs, drafter on GPU 0 or split: speculative greedy == plain greedy on 1 GPU, 200 tokens")
    for name in ["gpt_oss", "mimo_v2_flash"] {
        let model = try Model(path: "Tests/FulgurTests/Fixtures/models/\(name)")
        let onGPU0 = executorOnFirstGPU(group)
        let split: (Plan, Int) throws -> any Executor = { plan, context in try CUDATensorParallel(plan: plan, group: group, maxPositions: context) }
        for (placement, drafterExecutor) in [("GPU 0", onGPU0), ("split", split)] {
            var line = "tp:   " + name.padding(toLength: 15, withPad: " ", startingAt: 0) + "drafter " + placement.padding(toLength: 6, withPad: " ", startingAt: 0)
            for (p, prompt) in speculativePrompts.enumerated() {
                let plain = try Generator(executor: onGPU0(model.plan, 512)).generate(prompt: prompt, parameters: speculativeParameters, decode: { _ in "" })
                line += try speculativeBlocks(model: model, name: name, prompt: p, plain: plain.tokens,
                                              target: { try CUDATensorParallel(plan: model.plan, group: group, maxPositions: 512) },
                                              drafterExecutor: drafterExecutor, what: "speculative over \(group.count) GPUs (drafter \(placement)) != plain on 1",
                                              checks: &checks, failures: &failures)
            }
            print(line)
        }
    }
    print(failures.isEmpty ? "tp: DFlash over \(group.count) GPUs PASS: \(checks) runs" : "tp: DFlash over \(group.count) GPUs FAIL: " + failures.joined(separator: "; "))
    return failures.isEmpty
}

/// An executor for a plan whole on the group's first GPU (the drafter's place, or the one-GPU reference).
func executorOnFirstGPU(_ group: DeviceGroup) -> (Plan, Int) throws -> any Executor {
    { plan, context in
        try group.makeCurrent(0)
        return try CUDAExecutor(plan: plan, device: group.devices[0], module: group.modules[0], maxPositions: context)
    }
}
