// Long-context steps (CUDAExecutor.longContextPositions: version 3 with up to 64 splits on the
// full-attention layers) against the old path, on the same executor and the same random weights
// at a published shape (made on the GPU). The prompt is long enough (2100 positions) for 64
// splits at one token, where the two paths differ most: at 8 tokens both run version 3 with the
// same grid on an H200 (one wave of resident blocks caps the splits), so the 8-token block is
// compared, but only the 1-token steps exercise the long path's own grid and merge batches.
// Compared: an 8-token block's logits, a 1-token step's, 12 greedy 1-token steps called from
// the host, and the token 30 back-to-back replayed 1-token steps leave behind.
// gpu-check layer checks the kernels alone; this is meant to catch what only a whole, many-layer
// step shows (a merge as its own launch passed the layer check and still made a 24-layer
// gpt-oss-20b's replayed rows collapse to one token: Kernels/NOTES.md, twenty-seventh session).
import Foundation
import Fulgur
import FulgurCUDA

func runLongContextChecks(_ device: CUDADevice, _ module: KernelModule) throws -> Bool {
    print("\nlong-context steps against the old path, same executor and weights (random, made on the GPU)")
    var failures = 0
    for (preset, layers) in [("gpt-oss-20b", 24), ("mimo-v2-flash", 6)] {
        let model = try RandomModel(preset: preset, layers: layers, seed: 8).buildDeferred()
        let vocab = model.plan.lmHead.outFeatures
        let prompt = 2100, T = 8, greedySteps = 12, replayed = 30
        let gpu = try CUDAExecutor(plan: model.plan, device: device, module: module,
                                   maxPositions: prompt + T + 1 + greedySteps + (5 + replayed) + 16)
        var rng = SeededGenerator(seed: 9)
        let ids = (0..<(prompt + T + 1)).map { _ in Int(rng.next() % UInt64(min(vocab, model.plan.embedding.table.shape[0]))) }
        // Full layers long from 256 positions (their cache holds the whole context); sliding
        // rings (window + 16) stay on the old path, as at the default threshold.
        func run(threshold: Int) throws -> (block: [Float], step: [Float], greedy: [Int], fed: Int) {
            gpu.longContextPositions = threshold
            gpu.reset()
            _ = try gpu.forward(Array(ids.prefix(prompt)), logits: .none)
            let block = try gpu.forward(Array(ids[prompt..<(prompt + T)]), logits: .all)
            let step = try gpu.forward([ids[prompt + T]], logits: .last)
            var greedy = [Sampler.argmax(step)]
            while greedy.count < greedySteps { greedy.append(try gpu.argmax([greedy.last!]).last!) }
            _ = try gpu.timeReplayedSteps(tokens: 1, steps: replayed, warmup: 5)
            return (block, step, greedy, try gpu.fedTokens(1)[0])
        }
        let old = try run(threshold: Int.max), long = try run(threshold: 256)
        let blockError = worstRowError(long.block, old.block, width: vocab), stepError = worstRowError(long.step, old.step, width: vocab)
        let argmaxes = { (rows: [Float]) in (0..<(rows.count / vocab)).map { Sampler.argmax(Array(rows[($0 * vocab)..<(($0 + 1) * vocab)])) } }
        let sameBlock = argmaxes(old.block) == argmaxes(long.block)
        let ok = blockError <= executorTolerance && stepError <= executorTolerance && sameBlock && old.greedy == long.greedy && old.fed == long.fed
        if !ok { failures += 1 }
        print(String(format: "long: %@, %d layers, %d positions: 8-token block logits %.2e, 1-token step %.2e (bound %.0e), block's greedy tokens %@, %d greedy steps %@, token after %d replayed steps %d / %d  %@",
                     preset, layers, prompt, blockError, stepError, executorTolerance, sameBlock ? "identical" : "DIFFER", greedySteps,
                     old.greedy == long.greedy ? "identical" : "DIFFER \(old.greedy) / \(long.greedy)", replayed, old.fed, long.fed, ok ? "ok" : "FAIL"))
    }
    print(failures == 0 ? "long PASS" : "long FAIL: \(failures) models")
    return failures == 0
}
