import Foundation
import Fulgur

/// A model split over the GPUs of a DeviceGroup (Plan.shard): one CUDAExecutor per GPU over its
/// shard, whose `.allReduce` ops run the peer all-reduce of Kernels/comm.cu inside each step's
/// graph. Every call drives all shards at once, one thread each (a shard's all-reduce waits on
/// the GPU for the others). Logits come back as whole rows, gathered from the vocabulary slices.
public final class CUDATensorParallel {
    public let group: DeviceGroup
    public let shards: [CUDAExecutor]
    public let vocabularySlices: [Range<Int>]
    public let vocabSize: Int
    let allReduce: PeerAllReduce

    public init(plan: Plan, group: DeviceGroup, maxPositions: Int? = nil, maxStepTokens: Int = 16, moeVersion: Int = CUDAMoE.defaultVersion,
                progress: ((Int, Int) -> Void)? = nil) throws {
        let n = group.count
        let allReduce = try PeerAllReduce(group: group, maxFloats: maxStepTokens * plan.spec.hiddenSize)
        var shards: [CUDAExecutor] = []
        for r in 0..<n {
            let shard = try plan.shard(rank: r, of: n)
            try group.makeCurrent(r)
            shards.append(try CUDAExecutor(plan: shard, device: group.devices[r], module: group.modules[r], maxPositions: maxPositions,
                                           maxStepTokens: maxStepTokens, moeVersion: moeVersion,
                                           communicator: RankAllReduce(allReduce, rank: r),
                                           progress: progress.map { p in { done, all in p(r * all + done, n * all) } }))
        }
        self.group = group
        self.shards = shards
        self.allReduce = allReduce
        vocabularySlices = (0..<n).map { plan.vocabularySlice(rank: $0, of: n) }
        vocabSize = plan.lmHead.outFeatures
    }

    /// As CUDAExecutor.forward, on every shard at once; logits as whole rows.
    public func forward(_ tokens: [Int], logits want: CPUExecutor.Logits = .last) throws -> [Float] {
        let shards = self.shards
        let parts = try CPUTensorParallel.onEveryRank(shards.count) { try shards[$0].forward(tokens, logits: want) }
        guard want != .none else { return [] }
        return CPUTensorParallel.gather(parts, slices: vocabularySlices, rows: want == .all ? tokens.count : 1, vocab: vocabSize)
    }

    public var length: Int { shards[0].length }

    public func reset() { for s in shards { s.reset() } }

    /// Milliseconds per replayed step of `T` tokens (CUDAExecutor.timeReplayedSteps on every
    /// shard at once; the slowest shard's time). Each shard feeds its own slice's greedy token
    /// to its next step, so the shards' tokens differ: the timing is the step's, the tokens are
    /// not the model's.
    public func timeReplayedSteps(tokens T: Int, steps: Int, warmup: Int = 5, skipping: Set<String> = [], advance: Bool = true) throws -> Double {
        let shards = self.shards
        return try CPUTensorParallel.onEveryRank(shards.count) {
            try shards[$0].timeReplayedSteps(tokens: T, steps: steps, warmup: warmup, skipping: skipping, advance: advance)
        }.max()!
    }
}

/// Rank `rank`'s side of a PeerAllReduce, as a CUDAExecutor's communicator.
final class RankAllReduce: StepAllReduce {
    let allReduce: PeerAllReduce, rank: Int
    init(_ allReduce: PeerAllReduce, rank: Int) { self.allReduce = allReduce; self.rank = rank }
    func enqueue(input: DeviceBuffer, output: DeviceBuffer, count: Int, stream: CUDAStream) throws {
        try allReduce.enqueue(rank: rank, input: input, output: output, count: count, stream: stream)
    }
}
