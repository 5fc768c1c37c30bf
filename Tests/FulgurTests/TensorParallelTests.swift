import Foundation
import Testing
@testable import Fulgur

/// Plan.shard cuts each tiny checkpoint into 2 (and 4 where the heads allow) tensor-parallel
/// shards; run side by side with an all-reduce (CPUTensorParallel), they must give the whole
/// model's logits at every prompt position (up to summation order) and the same greedy tokens.
/// Covers split query heads with shared key/value heads (MiMo's full layers: 1 key/value head),
/// sinks, biases on shard 0 only, interleaved gpt-oss gate/up pairs, MXFP4 and FP8 slices.
@Suite struct TensorParallelTests {
    static let cases: [(String, Int)] = [
        ("llama", 2), ("qwen3", 2), ("qwen3_moe", 2), ("mimo_v2_flash", 2), ("gpt_oss", 2),
        ("gpt_oss_quantized", 2), ("mimo_v2_flash_quantized", 2), ("gpt_oss", 4), ("qwen3_moe", 4),
    ]

    @Test(arguments: cases)
    func shardsAddUpToTheWholeModel(_ name: String, _ count: Int) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let prompt = (0..<24).map { ($0 * 37 + 11) % model.spec.vocabSize }
        let whole = try CPUExecutor(plan: model.plan, maxStepTokens: 8).forward(prompt, logits: .all)
        let tp = try CPUTensorParallel(plan: model.plan, count: count, maxStepTokens: 8)
        let split = try tp.forward(prompt, logits: .all)
        #expect(split.count == whole.count)
        let vocab = tp.vocabSize
        var worst: Float = 0
        for t in 0..<prompt.count {
            let a = split[(t * vocab)..<((t + 1) * vocab)], b = whole[(t * vocab)..<((t + 1) * vocab)]
            let err = zip(a, b).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot()
            worst = max(worst, err / b.map { $0 * $0 }.reduce(0, +).squareRoot())
        }
        #expect(worst <= 1e-5, "\(name) over \(count) shards: worst relative error \(worst)")
        // Greedy continuation, one token at a time through both.
        let single = CPUExecutor(plan: model.plan, maxStepTokens: 8)
        let tp2 = try CPUTensorParallel(plan: model.plan, count: count, maxStepTokens: 8)
        var l1 = try single.forward(prompt), l2 = try tp2.forward(prompt)
        for _ in 0..<8 {
            let t1 = Sampler.argmax(l1), t2 = Sampler.argmax(l2)
            #expect(t1 == t2)
            l1 = try single.forward([t1]); l2 = try tp2.forward([t2])
        }
    }

    @Test func shardsTellWhatDoesNotSplit() throws {
        let model = try Model(path: Fixtures.path("models/llama"))  // 4 query heads
        #expect(throws: FulgurError.self) { _ = try model.plan.shard(rank: 0, of: 3) }
        do {
            _ = try model.plan.shard(rank: 1, of: 3)
        } catch let e as FulgurError {
            #expect(e.description.contains("query heads"))
        }
    }

    /// `fulgur bench --shard` times one shard's own chain on one GPU: the shard's plan with its
    /// all-reduces left out, which an executor without a communicator runs (the shard itself
    /// needs one: CPUExecutor stops on an all-reduce it cannot do).
    @Test func aShardWithoutCommunicationRunsAlone() throws {
        let model = try Model(path: Fixtures.path("models/mimo_v2_flash"))
        let shard = try model.plan.shard(rank: 1, of: 2)
        func isAllReduce(_ op: Op) -> Bool { if case .allReduce = op { return true } else { return false } }
        let reduces = shard.ops.filter(isAllReduce).count
        #expect(reduces == 2 * model.spec.layerCount)
        let alone = shard.droppingCommunication()
        #expect(alone.ops.count == shard.ops.count - reduces && !alone.ops.contains(where: isAllReduce))
        #expect(alone.lmHead.outFeatures == shard.lmHead.outFeatures && alone.widths == shard.widths)
        let prompt = (0..<6).map { ($0 * 37 + 11) % model.spec.vocabSize }
        let logits = try CPUExecutor(plan: alone, maxStepTokens: 8).forward(prompt)
        #expect(logits.count == alone.lmHead.outFeatures && logits.allSatisfy(\.isFinite))
    }

    /// MXFP4 experts are cut on their 32-column blocks: tiny-gpt-oss's intermediate 96 over 2
    /// shards is 32 + 64, not 48 + 48 (which cut a block and left down in f32), and the shards
    /// still add up to the whole model.
    @Test func mxfp4ExpertsSplitOnTheirBlocks() throws {
        let model = try RandomModel(preset: "tiny-gpt-oss", seed: 2).build()
        var sizes: [Int] = []
        for rank in 0..<2 {
            let shard = try model.plan.shard(rank: rank, of: 2)
            var mine = Set<Int>()
            for case .moe(_, _, let m) in shard.ops {
                mine.insert(m.spec.intermediate)
                for e in m.experts {
                    #expect(e.down.format == .mxfp4 && e.down.inFeatures == m.spec.intermediate, "\(e.down.name): \(e.down.format)")
                }
            }
            #expect(mine.count == 1, "rank \(rank): intermediates \(mine)")
            sizes += mine
        }
        #expect(sizes.count == 2 && sizes[0] + sizes[1] == 96 && sizes[0] != sizes[1], "shard intermediates \(sizes)")
        let prompt = (0..<12).map { ($0 * 37 + 11) % model.spec.vocabSize }
        let whole = try CPUExecutor(plan: model.plan, maxStepTokens: 8).forward(prompt, logits: .all)
        let split = try CPUTensorParallel(plan: model.plan, count: 2, maxStepTokens: 8).forward(prompt, logits: .all)
        let err = zip(split, whole).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot() / whole.map { $0 * $0 }.reduce(0, +).squareRoot()
        #expect(err <= 1e-5, "relative error \(err)")
    }

    @Test func vocabularySlicesCoverTheVocabularyOnce() throws {
        let model = try Model(path: Fixtures.path("models/llama"))
        for count in 1...5 {
            let slices = (0..<count).map { model.plan.vocabularySlice(rank: $0, of: count) }
            #expect(slices.first!.lowerBound == 0 && slices.last!.upperBound == model.plan.lmHead.outFeatures)
            for (a, b) in zip(slices, slices.dropFirst()) { #expect(a.upperBound == b.lowerBound) }
        }
    }
}
