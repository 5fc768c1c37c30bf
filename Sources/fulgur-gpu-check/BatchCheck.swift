// Continuous batching and lanes on the GPU (issue 6): for the tiny checkpoint of every
// architecture, six sequences of different lengths run through one batch executor of four
// slots (so slots are reused), prompts in pieces of up to 8 tokens, steps of up to 32 rows
// (so a step runs as two graphs and a sequence's rows may straddle them), each sequence fed
// the CPU's greedy tokens. Every logits row the batch returns must match the CPU executor
// running that sequence alone, and its argmax must be the CPU's token. Then lanes: an
// executor sharing the owner's weights gives the owner's logits bit for bit, also with two
// lanes decoding at once on two threads.
import Dispatch
import Foundation
import Fulgur
import FulgurCUDA

struct BatchRow {
    let model: String
    let worst: Double
    let rows: Int, argmaxAgree: Int
    let maxStepRows: Int
    let expectedRows: Int
    let lanesIdentical: Bool, concurrentIdentical: Bool
    var passed: Bool {
        worst <= executorTolerance && rows == expectedRows && argmaxAgree == rows && maxStepRows > 16 && lanesIdentical && concurrentIdentical
    }
}

func checkBatch(_ device: CUDADevice, _ module: KernelModule, name: String, seed: UInt64) throws -> BatchRow {
    let model = try Model(path: "Tests/FulgurTests/Fixtures/models/\(name)")
    let vocab = model.plan.lmHead.outFeatures
    let table = min(model.plan.embedding.table.shape[0], vocab)
    var rng = SeededGenerator(seed: seed)
    let lengths = [3, 20, 9, 1, 14, 6], decode = 10
    let prompts = lengths.map { n in (0..<n).map { _ in Int(rng.next() % UInt64(table)) } }

    // Alone on the CPU: the logits after the prompt and after each greedy token.
    var want: [[[Float]]] = [], feed: [[Int]] = []
    for p in prompts {
        let cpu = CPUExecutor(plan: model.plan, maxPositions: 256, maxStepTokens: 16)
        var l = try cpu.forward(p, logits: .last)
        var rows = [l], tokens: [Int] = []
        for _ in 0..<decode {
            let t = Sampler.argmax(l)
            tokens.append(t)
            l = try cpu.forward([t])
            rows.append(l)
        }
        want.append(rows)
        feed.append(tokens)
    }

    let owner = try CUDAExecutor(plan: model.plan, device: device, module: module, maxPositions: 256)
    let batch = try owner.batchExecutor(slots: 4, maxSequenceTokens: 8)
    final class Running { let seq: Int; let slot: Int; var prefilled = 0; var decoded = 0; init(_ s: Int, _ slot: Int) { seq = s; self.slot = slot } }
    var waiting = Array(prompts.indices), running: [Running] = [], free = [3, 2, 1, 0]
    var worst = 0.0, rows = 0, agree = 0, maxStepRows = 0
    while !waiting.isEmpty || !running.isEmpty {
        while let slot = free.last, !waiting.isEmpty {
            free.removeLast()
            batch.reset(slot: slot)
            running.append(Running(waiting.removeFirst(), slot))
        }
        var parts: [BatchStep] = []
        for r in running {
            let p = prompts[r.seq]
            if r.prefilled < p.count {
                let piece = min(8, p.count - r.prefilled)
                parts.append(BatchStep(slot: r.slot, tokens: Array(p[r.prefilled..<(r.prefilled + piece)]), wantsLogits: r.prefilled + piece == p.count))
                r.prefilled += piece
            } else {
                parts.append(BatchStep(slot: r.slot, tokens: [feed[r.seq][r.decoded]], wantsLogits: true))
                r.decoded += 1
            }
        }
        maxStepRows = max(maxStepRows, parts.reduce(0) { $0 + $1.tokens.count })
        let got = try batch.forward(batch: parts)
        for (r, (part, l)) in zip(running, zip(parts, got)) where part.wantsLogits {
            let reference = want[r.seq][r.decoded]  // after the prompt, then after each fed token
            let e = worstRowError(l, reference, width: vocab)  // NaN for a missing or non-finite row
            worst = worst.isNaN || e.isNaN ? .nan : max(worst, e)
            rows += 1
            if Sampler.argmax(l) == Sampler.argmax(reference) { agree += 1 }
        }
        for r in running where r.decoded == decode { free.append(r.slot) }
        running.removeAll { $0.decoded == decode }
    }

    // Lanes: the same plan over the owner's weights.
    let ownerLogits = try owner.forward(prompts[1], logits: .all)
    let lane = try owner.sharingWeights()
    let laneLogits = try lane.forward(prompts[1], logits: .all)
    let identical = { (a: [Float], b: [Float]) in a.count == b.count && zip(a, b).allSatisfy { $0.bitPattern == $1.bitPattern } }
    let lanes = [try owner.sharingWeights(), try owner.sharingWeights()]
    final class Results: @unchecked Sendable {
        let lock = NSLock()
        var logits: [[Float]] = [[], []], failures: [String] = []
    }
    let results = Results()
    DispatchQueue.concurrentPerform(iterations: 2) { i in
        do {
            var l = try lanes[i].forward(prompts[i == 0 ? 1 : 4], logits: .last)
            for _ in 0..<decode { l = try lanes[i].forward([Sampler.argmax(l)], logits: .last) }
            results.lock.lock(); results.logits[i] = l; results.lock.unlock()
        } catch {
            results.lock.lock(); results.failures.append("\(error)"); results.lock.unlock()
        }
    }
    let (concurrent, failures) = (results.logits, results.failures)
    // The same two runs one after the other on fresh lanes.
    var sequential: [[Float]] = []
    for i in 0..<2 {
        let e = try owner.sharingWeights()
        var l = try e.forward(prompts[i == 0 ? 1 : 4], logits: .last)
        for _ in 0..<decode { l = try e.forward([Sampler.argmax(l)], logits: .last) }
        sequential.append(l)
    }
    if !failures.isEmpty { print("batch \(name): concurrent lanes failed: \(failures)") }
    return BatchRow(model: name, worst: worst, rows: rows, argmaxAgree: agree, maxStepRows: maxStepRows, expectedRows: lengths.count * (decode + 1),
                    lanesIdentical: identical(ownerLogits, laneLogits),
                    concurrentIdentical: failures.isEmpty && identical(concurrent[0], sequential[0]) && identical(concurrent[1], sequential[1]))
}

func runBatchChecks(_ device: CUDADevice, _ module: KernelModule, seed: UInt64) throws -> Bool {
    let names = ["llama", "qwen3", "qwen3_moe", "mimo_v2_flash", "gpt_oss", "mimo_v2_flash_quantized", "gpt_oss_quantized"]
    var rows: [BatchRow] = []
    for (i, name) in names.enumerated() {
        do {
            rows.append(try checkBatch(device, module, name: name, seed: seed + UInt64(i)))
        } catch {
            print("batch \(name): ERROR \(error)")
            rows.append(BatchRow(model: name, worst: .nan, rows: 0, argmaxAgree: -1, maxStepRows: 0, expectedRows: 1,
                                 lanesIdentical: false, concurrentIdentical: false))
        }
    }
    print("\ncontinuous batching on the GPU: 6 sequences through 4 slots vs each alone on the CPU (bound \(executorTolerance)); lanes sharing weights")
    print("model                      worst vs CPU  logits rows  argmax==CPU  most rows a step  lane==owner  2 lanes at once")
    for r in rows {
        let yes = { (b: Bool) in b ? "yes" : "NO " }
        print(r.model.padding(toLength: 25, withPad: " ", startingAt: 0) + String(format: "  %.2e", r.worst)
              + "      \(String(r.rows).padding(toLength: 11, withPad: " ", startingAt: 0))  \(String(r.argmaxAgree).padding(toLength: 11, withPad: " ", startingAt: 0))"
              + "  \(String(r.maxStepRows).padding(toLength: 16, withPad: " ", startingAt: 0))  \(yes(r.lanesIdentical))          \(yes(r.concurrentIdentical))")
    }
    let failed = rows.filter { !$0.passed }
    print(failed.isEmpty ? "batch PASS: \(rows.count) models" : "batch FAIL: \(failed.map(\.model).joined(separator: ", "))")
    return failed.isEmpty
}
