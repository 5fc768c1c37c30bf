// The whole-model CUDA executor against the CPU executor and transformers, on the tiny
// checkpoints of every architecture (Tests/FulgurTests/Fixtures/models, made by transformers
// 5.17 with recipes/fixtures/make_tiny_models.py; the quantized ones hold MXFP4 experts and
// FP8 block-scaled layers): logits at every prompt position (24 tokens, prefilled as one
// 16-token step and one 8-token step, so the sliding-window rings of 8 wrap), then 32 greedy
// tokens one step at a time, and a verify-sized step of 8 tokens after a prefix.
import Foundation
import Fulgur
import FulgurCUDA

/// GPU vs CPU: both f32 with the same weights; only the order of sums differs.
let executorTolerance = 1e-4
/// Either vs transformers (as ArchitectureParityTests uses for the CPU).
let transformersTolerance = 1e-3

struct ExecutorRow {
    let model: String
    let vsCPU: Double, vsTransformers: Double, verifyVsCPU: Double, graphVsEager: Double
    let greedyMatches: Bool, greedyMatchesCPU: Bool
    let launches: Int
    var passed: Bool {
        vsCPU <= executorTolerance && vsTransformers <= transformersTolerance && verifyVsCPU <= executorTolerance
            && graphVsEager == 0 && greedyMatches && greedyMatchesCPU
    }
}

/// Largest relative L2 error over rows of `width`.
func worstRowError(_ got: [Float], _ want: [Float], width: Int) -> Double {
    guard got.count == want.count, !want.isEmpty else { return .nan }
    var worst = 0.0
    for r in 0..<(want.count / width) {
        var d = 0.0, n = 0.0
        for i in (r * width)..<((r + 1) * width) {
            let e = Double(got[i]) - Double(want[i])
            d += e * e; n += Double(want[i]) * Double(want[i])
        }
        let err = got[(r * width)..<((r + 1) * width)].allSatisfy { $0.isFinite } ? (d / max(n, 1e-30)).squareRoot() : .nan
        worst = err.isNaN || worst.isNaN ? .nan : max(worst, err)
    }
    return worst
}

func checkExecutor(_ device: CUDADevice, _ module: KernelModule, name: String) throws -> ExecutorRow {
    let dir = "Tests/FulgurTests/Fixtures/models/\(name)"
    let model = try Model(path: dir)
    let ref = try SafetensorsFile(path: dir + "/reference.safetensors")
    let ids = try ref.tensor("input_ids").floats().map { Int($0) }
    let refLogits = try ref.tensor("logits").floats()
    let refGreedy = try ref.tensor("greedy").floats().map { Int($0) }
    let vocab = model.plan.lmHead.outFeatures

    let cpu = CPUExecutor(plan: model.plan, maxPositions: 256, maxStepTokens: 16)
    let cpuLogits = try cpu.forward(ids, logits: .all)
    let gpu = try CUDAExecutor(plan: model.plan, device: device, module: module, maxPositions: 256)
    let gpuLogits = try gpu.forward(ids, logits: .all)

    // Greedy, one token a step, on both.
    var cpuGreedy: [Int] = [], gpuGreedy: [Int] = []
    var next = Sampler.argmax(Array(cpuLogits.suffix(vocab)))
    for _ in 0..<refGreedy.count {
        cpuGreedy.append(next)
        next = Sampler.argmax(try cpu.forward([next]))
    }
    gpu.reset()
    var g = try gpu.argmax(ids).last!
    for _ in 0..<refGreedy.count {
        gpuGreedy.append(g)
        g = try gpu.argmax([g]).last!
    }

    // A verify-sized step: 8 tokens after the first 12 of the prompt, all positions' logits.
    cpu.cache.reset(); gpu.reset()
    _ = try cpu.forward(Array(ids.prefix(12)), logits: .none)
    _ = try gpu.forward(Array(ids.prefix(12)), logits: .none)
    let block = Array(ids[12..<20])
    let verifyCPU = try cpu.forward(block, logits: .all), verifyGPU = try gpu.forward(block, logits: .all)

    // The same launches run eagerly must give the same bits as the captured graphs.
    let eager = try CUDAExecutor(plan: model.plan, device: device, module: module, maxPositions: 256)
    eager.useGraphs = false
    let eagerLogits = try eager.forward(ids, logits: .all)
    let graphVsEager = zip(eagerLogits, gpuLogits).contains { $0.bitPattern != $1.bitPattern } || eagerLogits.count != gpuLogits.count ? 1.0 : 0.0

    return ExecutorRow(model: name, vsCPU: worstRowError(gpuLogits, cpuLogits, width: vocab),
                       vsTransformers: worstRowError(gpuLogits, refLogits, width: vocab),
                       verifyVsCPU: worstRowError(verifyGPU, verifyCPU, width: vocab), graphVsEager: graphVsEager,
                       greedyMatches: gpuGreedy == refGreedy, greedyMatchesCPU: gpuGreedy == cpuGreedy, launches: gpu.launchesPerStep)
}

/// A published shape cut to `layers` layers, random weights (host-made, MXFP4 experts, FP8
/// elsewhere): the tiny checkpoints' products are too narrow for the kernels real widths pick
/// (the wide layout at 1 token from 2048 rows, MoE tiles, attention splits), so the CPU checks
/// these too: logits of a 16-token prefill, then `steps` greedy 1-token steps on both.
func checkFullWidth(_ device: CUDADevice, _ module: KernelModule, preset: String, layers: Int, steps: Int = 6) throws -> ExecutorRow {
    let model = try RandomModel(preset: preset, layers: layers, seed: 9).build()
    let vocab = model.plan.lmHead.outFeatures
    var rng = SeededGenerator(seed: 12)
    let ids = (0..<16).map { _ in Int(rng.next() % UInt64(min(vocab, model.plan.embedding.table.shape[0]))) }
    let cpu = CPUExecutor(plan: model.plan, maxPositions: 64, maxStepTokens: 16)
    let gpu = try CUDAExecutor(plan: model.plan, device: device, module: module, maxPositions: 64)
    let cpuPrefill = try cpu.forward(ids, logits: .all), gpuPrefill = try gpu.forward(ids, logits: .all)
    var cpuSteps: [Float] = [], gpuSteps: [Float] = [], cpuGreedy: [Int] = [], gpuGreedy: [Int] = []
    var cn = Sampler.argmax(Array(cpuPrefill.suffix(vocab))), gn = Sampler.argmax(Array(gpuPrefill.suffix(vocab)))
    for _ in 0..<steps {
        cpuGreedy.append(cn)
        gpuGreedy.append(gn)
        let c = try cpu.forward([cn]), g = try gpu.forward([gn])
        cpuSteps += c
        gpuSteps += g
        cn = Sampler.argmax(c)
        gn = Sampler.argmax(g)
    }
    let oneToken = cpuGreedy == gpuGreedy ? worstRowError(gpuSteps, cpuSteps, width: vocab) : .nan
    return ExecutorRow(model: "\(preset), \(layers) layer\(layers == 1 ? "" : "s")", vsCPU: worstRowError(gpuPrefill, cpuPrefill, width: vocab),
                       vsTransformers: 0, verifyVsCPU: oneToken, graphVsEager: 0, greedyMatches: true,
                       greedyMatchesCPU: cpuGreedy == gpuGreedy, launches: gpu.launchesPerStep)
}

func runExecutorChecks(_ device: CUDADevice, _ module: KernelModule) throws -> Bool {
    let names = ["llama", "qwen3", "qwen3_moe", "mimo_v2_flash", "gpt_oss", "mimo_v2_flash_quantized", "gpt_oss_quantized"]
    var rows: [ExecutorRow] = []
    for (preset, layers) in [("gpt-oss-20b", 1), ("mimo-v2-flash", 2)] {
        do {
            rows.append(try checkFullWidth(device, module, preset: preset, layers: layers))
        } catch {
            print("executor \(preset): ERROR \(error)")
            rows.append(ExecutorRow(model: preset, vsCPU: .nan, vsTransformers: .nan, verifyVsCPU: .nan, graphVsEager: 1,
                                    greedyMatches: false, greedyMatchesCPU: false, launches: 0))
        }
    }
    for name in names {
        do {
            rows.append(try checkExecutor(device, module, name: name))
        } catch {
            print("executor \(name): ERROR \(error)")
            rows.append(ExecutorRow(model: name, vsCPU: .nan, vsTransformers: .nan, verifyVsCPU: .nan, graphVsEager: 1,
                                    greedyMatches: false, greedyMatchesCPU: false, launches: 0))
        }
    }
    print("\nwhole-model CUDA executor vs CPU executor (bound \(executorTolerance)) and transformers (bound \(transformersTolerance)), worst position")
    print("(the full-width rows have no transformers reference (0 here); their verify-8 column is their 1-token steps' logits)")
    print("model                      vs CPU     vs HF      verify-8 vs CPU  graph==eager  greedy==HF  greedy==CPU  launches/step")
    for r in rows {
        let yes = { (b: Bool) in b ? "yes" : "NO " }
        print(r.model.padding(toLength: 25, withPad: " ", startingAt: 0)
              + String(format: "  %.2e   %.2e   %.2e         ", r.vsCPU, r.vsTransformers, r.verifyVsCPU)
              + "\(yes(r.graphVsEager == 0))          \(yes(r.greedyMatches))         \(yes(r.greedyMatchesCPU))          \(r.launches)")
    }
    let failed = rows.filter { !$0.passed }
    print(failed.isEmpty ? "executor PASS: \(rows.count) models" : "executor FAIL: \(failed.map(\.model).joined(separator: ", "))")
    return failed.isEmpty
}

// The DFlash checks' prompts and settings (here and in TensorParallelCheck): greedy, 200 tokens
// past EOS, blocks 2, 8 and 16.
let speculativePrompts = [[1, 17, 42, 99, 3], [1, 200, 7, 7, 7, 150, 31, 64, 9, 88, 120, 5]]
let speculativeParameters = GenerationParameters(maxTokens: 200, sampling: SamplingParameters(temperature: 0), stopTokenIds: [])

/// Prompt `p`'s speculative runs at blocks 2, 8 and 16, each with a fresh `target()` and the
/// tiny fixture drafter of `name` on `drafterExecutor`, against the plain greedy tokens `plain`:
/// the entries of the check's line; mismatches are appended to `failures` with `what`.
func speculativeBlocks(model: Model, name: String, prompt p: Int, plain: [Int], target: () throws -> any Executor,
                       drafterExecutor: @escaping (Plan, Int) throws -> any Executor, what: String,
                       checks: inout Int, failures: inout [String]) throws -> String {
    var line = ""
    for block in [2, 8, 16] {
        let spec = try SpeculativeGenerator(target: target(), drafter: DFlashDrafter(
            directory: "Tests/FulgurTests/Fixtures/drafters/\(name)", target: model, maxPositions: 512, maxStepTokens: 16,
            executor: drafterExecutor), blockSize: block)
        let r = try spec.generate(prompt: speculativePrompts[p], parameters: speculativeParameters, decode: { _ in "" })
        checks += 1
        let ok = r.tokens == plain && r.tokens.count == 200
        if !ok { failures.append("\(name) prompt \(p) block \(block): \(what)") }
        let mean = r.speculative.map { Double($0.acceptanceLengths.reduce(0, +)) / Double(max($0.acceptanceLengths.count, 1)) } ?? 0
        line += "  p\(p)/b\(block) \(ok ? "ok" : "DIFF")" + String(format: " (acc %.2f)", mean)
    }
    return line
}

// DFlash on the GPU (issue 5, Done-means 1 on the GPU): target and drafter both on the CUDA
// executor, greedy, 200 tokens past EOS for two prompts at blocks 2, 8 and 16, against plain
// greedy decoding on the same GPU and on the CPU, and a server lane's DFlash (the target's and
// the drafter's weights shared, not copied). The drafters are the tiny random fixtures
// (Tests/FulgurTests/Fixtures/drafters), so most guesses are wrong and the rollback paths run.
func runSpeculativeChecks(_ device: CUDADevice, _ module: KernelModule) throws -> Bool {
    let names = ["llama", "qwen3", "qwen3_moe", "mimo_v2_flash", "gpt_oss"]
    var failures: [String] = [], checks = 0
    print("\nDFlash on the GPU: speculative greedy == plain greedy (GPU and CPU), 200 tokens")
    for name in names {
        let model = try Model(path: "Tests/FulgurTests/Fixtures/models/\(name)")
        let make: (Plan, Int) throws -> any Executor = { plan, context in
            try CUDAExecutor(plan: plan, device: device, module: module, maxPositions: context)
        }
        var line = name.padding(toLength: 15, withPad: " ", startingAt: 0)
        var plain0: [Int] = []
        for (p, prompt) in speculativePrompts.enumerated() {
            let cpu = try Generator(executor: CPUExecutor(plan: model.plan, maxPositions: 512)).generate(prompt: prompt, parameters: speculativeParameters, decode: { _ in "" })
            let gpu = try Generator(executor: make(model.plan, 512)).generate(prompt: prompt, parameters: speculativeParameters, decode: { _ in "" })
            if gpu.tokens != cpu.tokens { failures.append("\(name) prompt \(p): GPU plain != CPU plain") }
            if p == 0 { plain0 = gpu.tokens }
            line += try speculativeBlocks(model: model, name: name, prompt: p, plain: gpu.tokens, target: { try make(model.plan, 512) },
                                          drafterExecutor: make, what: "speculative != plain", checks: &checks, failures: &failures)
        }
        // A server lane's DFlash (Engine.makeSpeculativeGenerator): the target's sibling and the
        // drafter's withOwnCache, whose block and context executors run on the first drafter's
        // device copies of the weights (nothing uploaded again), decoding as plain greedy.
        let drafter = try DFlashDrafter(directory: "Tests/FulgurTests/Fixtures/drafters/\(name)", target: model, maxPositions: 512,
                                        maxStepTokens: 16, executor: make)
        let target = try make(model.plan, 512), lane = try drafter.withOwnCache()
        let shared = (lane.block as? CUDAExecutor)?.sharesWeights(with: drafter.block) == true
            && (lane.context as? CUDAExecutor)?.sharesWeights(with: drafter.context) == true
        let r = try SpeculativeGenerator(target: target.sharingWeights(), drafter: lane, blockSize: 8)
            .generate(prompt: speculativePrompts[0], parameters: speculativeParameters, decode: { _ in "" })
        checks += 1
        let laneOK = shared && r.tokens == plain0 && r.tokens.count == 200
        if !laneOK { failures.append("\(name) lane: \(shared ? "speculative != plain" : "the lane's drafter does not share the device weights")") }
        line += "  lane/b8 \(laneOK ? "ok" : "DIFF")"
        print(line)
    }
    print(failures.isEmpty ? "speculative PASS: \(checks) runs" : "speculative FAIL: " + failures.joined(separator: "; "))
    return failures.isEmpty
}
