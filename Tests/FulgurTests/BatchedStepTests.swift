import Foundation
import Testing
@testable import Fulgur

/// Continuous batching: a batched step runs the rows of several sequences in one forward pass,
/// and every sequence must get the logits it gets alone, bit for bit, whatever else shares
/// its steps: sequences at different lengths, prompt pieces next to decode rows, pieces below
/// and above the size where linear layers switch kernels, sliding-window rings that wrap.
@Suite struct BatchedStepTests {
    /// Tiny checkpoints of every architecture (f32), and two with MXFP4 experts and FP8
    /// layers, whose kernels depend on how many rows a sequence brings.
    static let models = ["llama", "qwen3", "qwen3_moe", "mimo_v2_flash", "gpt_oss", "gpt_oss_quantized", "mimo_v2_flash_quantized"]
    static let chunk = 8

    /// Prompts of 24, 3, 10 and 17 tokens from the fixture's reference ids: pieces of 8, 3 (all
    /// the prompt), 8 + 2, and 8 + 8 + 1.
    static func prompts(_ ids: [Int]) -> [[Int]] {
        [ids, Array(ids[5..<8]), Array(ids[2..<12].reversed()), Array((ids + ids)[7..<24])]
    }

    /// Every logits vector a sequence sees when it runs alone: after its prompt (prefilled in
    /// pieces of `chunk`), then after each of `decode` greedy tokens.
    static func alone(_ plan: Plan, _ prompt: [Int], decode: Int) throws -> [[Float]] {
        let executor = CPUExecutor(plan: plan, maxPositions: 64, maxStepTokens: chunk)
        var logits = [try executor.forward(prompt, logits: .last)]
        for _ in 0..<decode { logits.append(try executor.forward([Sampler.argmax(logits.last!)], logits: .last)) }
        return logits
    }

    /// The same sequences together: every step takes each one's next prompt piece or its next
    /// greedy token.
    static func batched(_ plan: Plan, _ prompts: [[Int]], decode: Int) throws -> [[[Float]]] {
        let executor = CPUExecutor(plan: plan, maxPositions: 1, maxStepTokens: prompts.count * chunk)
        let caches = prompts.map { _ in KVCache(spec: plan.spec, maxPositions: 64, maxStepTokens: chunk) }
        var logits = [[[Float]]](repeating: [], count: prompts.count)
        var prefilled = [Int](repeating: 0, count: prompts.count)
        while logits.contains(where: { $0.count < decode + 1 }) {
            var parts: [CPUExecutor.SequenceStep] = [], who: [Int] = []
            for (s, prompt) in prompts.enumerated() where logits[s].count < decode + 1 {
                if prefilled[s] < prompt.count {
                    let piece = min(chunk, prompt.count - prefilled[s])
                    parts.append(.init(cache: caches[s], tokens: Array(prompt[prefilled[s]..<(prefilled[s] + piece)]),
                                       wantsLogits: prefilled[s] + piece == prompt.count))
                    prefilled[s] += piece
                } else {
                    parts.append(.init(cache: caches[s], tokens: [Sampler.argmax(logits[s].last!)], wantsLogits: true))
                }
                who.append(s)
            }
            for (s, l) in zip(who, try executor.forward(batch: parts)) where !l.isEmpty { logits[s].append(l) }
        }
        return logits
    }

    @Test(arguments: models)
    func everySequenceGetsTheLogitsItGetsAlone(_ name: String) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let ids = try ArchitectureParityTests.reference(name.replacingOccurrences(of: "_quantized", with: "")).inputIds
        let prompts = Self.prompts(ids)
        let together = try Self.batched(model.plan, prompts, decode: 6)
        for (s, prompt) in prompts.enumerated() {
            let alone = try Self.alone(model.plan, prompt, decode: 6)
            let differing = zip(together[s], alone).filter { $0 != $1 }.count
            #expect(together[s].count == alone.count && differing == 0,
                    "\(name): sequence \(s) (\(prompt.count) prompt tokens): \(differing) of \(alone.count) logits vectors differ")
        }
    }

    @Test func aBatchedStepRefusesWhatItCannotRun() throws {
        let model = try Model(path: Fixtures.path("models/llama"))
        let executor = CPUExecutor(plan: model.plan, maxPositions: 1, maxStepTokens: 4)
        let cache = KVCache(spec: model.plan.spec, maxPositions: 8, maxStepTokens: 2)
        expectError(["exceeds this executor's 4 rows"]) { _ = try executor.forward(batch: [.init(cache: cache, tokens: [1, 2, 3, 4, 5], wantsLogits: true)]) }
        expectError(["its cache takes at most 2"]) { _ = try executor.forward(batch: [.init(cache: cache, tokens: [1, 2, 3], wantsLogits: true)]) }
        expectError(["share a cache"]) {
            _ = try executor.forward(batch: [.init(cache: cache, tokens: [1], wantsLogits: true), .init(cache: cache, tokens: [2], wantsLogits: true)])
        }
        expectError(["outside the vocabulary"]) { _ = try executor.forward(batch: [.init(cache: cache, tokens: [-1], wantsLogits: true)]) }
        cache.length = 7
        expectError(["context is full"]) { _ = try executor.forward(batch: [.init(cache: cache, tokens: [1, 2], wantsLogits: true)]) }
    }

    /// The slots view the BatchGenerator and the server use: a slot outside the batch is an
    /// error, a reset slot starts over (the same logits as the first time), and an executor
    /// that cannot batch says so instead of running.
    @Test func slotsOfABatchExecutor() throws {
        let model = try Model(path: Fixtures.path("models/llama"))
        let batch = try CPUExecutor(plan: model.plan, maxPositions: 64).batchExecutor(slots: 2, maxSequenceTokens: 4)
        #expect(batch.slots == 2)
        expectError(["slot 2 of a batched step is outside the batch's 2 slots"]) { _ = try batch.forward(batch: [.init(slot: 2, tokens: [1], wantsLogits: true)]) }
        let first = try batch.forward(batch: [.init(slot: 0, tokens: [1, 2, 3], wantsLogits: true), .init(slot: 1, tokens: [4], wantsLogits: false)])
        #expect(first[0].count == model.plan.lmHead.outFeatures && first[1].isEmpty)
        #expect(batch.length(slot: 0) == 3 && batch.length(slot: 1) == 1)
        batch.reset(slot: 0)
        let again = try batch.forward(batch: [.init(slot: 0, tokens: [1, 2, 3], wantsLogits: true)])
        #expect(again[0] == first[0] && batch.length(slot: 0) == 3 && batch.length(slot: 1) == 1)
        let split = try CPUTensorParallel(plan: model.plan, count: 2, maxStepTokens: 8)
        expectError(["cannot batch sequences"]) { _ = try split.batchExecutor(slots: 2, maxSequenceTokens: 4) }
        expectError(["cannot run another sequence over its weights"]) { _ = try split.sharingWeights() }
    }
}
