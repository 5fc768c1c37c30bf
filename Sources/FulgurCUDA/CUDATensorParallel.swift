import Foundation
import Fulgur

/// A model split over the GPUs of a DeviceGroup (Plan.shard): one CUDAExecutor per GPU over its
/// shard, whose `.allReduce` ops run the peer all-reduce of Kernels/comm.cu inside each step's
/// graph. Every call drives all shards at once, one thread each (a shard's all-reduce waits on
/// the GPU for the others). Logits come back as whole rows, gathered from the vocabulary slices;
/// greedy tokens are found on the GPUs without them (SlicedArgmax, inside each step's graph).
/// It is an Executor, so DFlash runs on it with the drafter on a GPU of its own choosing.
public final class CUDATensorParallel: @unchecked Sendable {
    /// The whole model's plan (each shard runs its Plan.shard).
    public let plan: Plan
    public let group: DeviceGroup
    public let shards: [CUDAExecutor]
    public let vocabularySlices: [Range<Int>]
    public let vocabSize: Int
    let allReduce: PeerAllReduce
    let threads: RankThreads
    /// How long the rank threads spin for the next call (`FULGUR_RANK_SPIN_US`, microseconds;
    /// 0 sleeps at once, as before the twenty-ninth session).
    static let rankSpinNanoseconds = UInt64(ProcessInfo.processInfo.environment["FULGUR_RANK_SPIN_US"].flatMap { UInt64($0) } ?? 200) * 1000

    public convenience init(plan: Plan, group: DeviceGroup, maxPositions: Int? = nil, maxStepTokens: Int = 16, moeVersion: Int = CUDAMoE.defaultVersion,
                            progress: ((Int, Int) -> Void)? = nil) throws {
        let n = group.count
        guard plan.lmHead.outFeatures <= SlicedArgmax.maxVocabulary else {
            throw FulgurError(.unsupported, "tensor parallelism: a vocabulary of \(plan.lmHead.outFeatures) tokens; the GPUs exchange token ids as f32, exact up to \(SlicedArgmax.maxVocabulary)")
        }
        // Room for a step's hidden states and for its greedy-token exchange.
        let allReduce = try PeerAllReduce(group: group, maxFloats: maxStepTokens * max(plan.spec.hiddenSize, SlicedArgmax.entryFloats * n))
        let plans = try (0..<n).map { try plan.shard(rank: $0, of: n) }
        var shards: [CUDAExecutor] = []
        for r in 0..<n {
            try group.makeCurrent(r)
            shards.append(try CUDAExecutor(plan: plans[r], device: group.devices[r], module: group.modules[r], maxPositions: maxPositions,
                                           maxStepTokens: maxStepTokens, moeVersion: moeVersion,
                                           communicator: RankAllReduce(allReduce, rank: r), vocabularyStart: plan.vocabularySlice(rank: r, of: n).lowerBound,
                                           progress: progress.map { p in { done, all in p(r * all + done, n * all) } }))
        }
        self.init(plan: plan, group: group, shards: shards, allReduce: allReduce)
    }

    /// `threads`: another split executor's over the same shards (sharingCache), else its own.
    private init(plan: Plan, group: DeviceGroup, shards: [CUDAExecutor], allReduce: PeerAllReduce, threads: RankThreads? = nil) {
        self.plan = plan
        self.group = group
        self.shards = shards
        self.allReduce = allReduce
        // GPU ranks spin between calls: they mostly wait on the GPU, and a semaphore's wake-up
        // costs more than a verify's launch (RankThreads).
        self.threads = threads ?? RankThreads(count: shards.count, spinNanoseconds: Self.rankSpinNanoseconds)
        vocabularySlices = (0..<shards.count).map { plan.vocabularySlice(rank: $0, of: shards.count) }
        vocabSize = plan.lmHead.outFeatures
    }

    /// As CUDAExecutor.forward, on every shard at once; logits as whole rows.
    public func forward(_ tokens: [Int], logits want: CPUExecutor.Logits = .last) throws -> [Float] {
        let shards = self.shards
        let parts = try threads.run { try shards[$0].forward(tokens, logits: want) }
        guard want != .none else { return [] }
        return CPUTensorParallel.gather(parts, slices: vocabularySlices, rows: want == .all ? tokens.count : 1, vocab: vocabSize)
    }

    /// As CUDAExecutor.forward(rows:): the rows go to every shard (x is replicated).
    public func forward(rows: [Float], logits want: CPUExecutor.Logits = .none) throws -> [Float] {
        let shards = self.shards
        let parts = try threads.run { try shards[$0].forward(rows: rows, logits: want) }
        guard want != .none, let first = parts.first, !first.isEmpty else { return [] }
        return CPUTensorParallel.gather(parts, slices: vocabularySlices, rows: first.count / vocabularySlices[0].count, vocab: vocabSize)
    }

    /// As CUDAExecutor.forward(capturedRowsOf:count:) on every shard (each copies the rows into
    /// its own x); false, with nothing run, unless every shard can read them.
    public func forward(capturedRowsOf source: any Executor, count: Int) throws -> Bool {
        guard shards.allSatisfy({ $0.featureSource(source, count: count) != nil }) else { return false }
        let shards = self.shards
        let done = try threads.run { try shards[$0].forward(capturedRowsOf: source, count: count) }
        guard done.allSatisfy({ $0 }) else {
            throw CUDAError(operation: "tensor-parallel context update", code: nil, message: "a GPU could not read the captured rows the others read")
        }
        return true
    }

    /// The greedy choice after each position of the last step, found on the GPUs (each shard's
    /// step ends with the exchange of Kernels/sampling.cu): T ids come back from each GPU, no logits.
    public func argmax(_ tokens: [Int]) throws -> [Int] {
        let shards = self.shards
        let picks = try threads.run { try shards[$0].argmax(tokens) }
        // Every GPU summed the same tables in rank order: they cannot disagree unless the exchange is broken.
        guard picks.allSatisfy({ $0 == picks[0] }) else {
            throw CUDAError(operation: "tensor-parallel argmax", code: nil, message: "the GPUs picked different tokens: \(picks)")
        }
        return picks[0]
    }

    /// An executor for another plan over these shards' caches (Executor.sharingCache), split the
    /// same way (Plan.shard throws for plans that do not split) and on the same streams, so the
    /// all-reduces of both stay in one order per GPU.
    public func sharingCache(plan other: Plan) throws -> any Executor {
        let n = shards.count
        var parts: [CUDAExecutor] = []
        for (r, s) in shards.enumerated() {
            try group.makeCurrent(r)
            parts.append(try CUDAExecutor(plan: try other.shard(rank: r, of: n), device: s.device, module: s.module, maxStepTokens: s.maxStepTokens,
                                          moeVersion: s.moeVersion, communicator: s.communicator,
                                          vocabularyStart: other.vocabularySlice(rank: r, of: n).lowerBound, sharing: s))
        }
        for p in parts { p.longContextPositions = longContextPositions }
        return CUDATensorParallel(plan: other, group: group, shards: parts, allReduce: allReduce, threads: threads)
    }

    /// Each GPU's timeline of replayed steps of `T` tokens (CUDAExecutor.timeline on every shard
    /// at once, so the all-reduces inside the steps complete): where a split step's time goes on
    /// each GPU, the communication kernels included. Needs the trace build of the kernels.
    public func timelines(tokens T: Int) throws -> [Timeline] {
        let shards = self.shards
        return try threads.run { try shards[$0].timeline(tokens: T) }
    }

    /// Milliseconds per replayed step of `T` tokens (CUDAExecutor.timeReplayedSteps on every
    /// shard at once; the slowest shard's time). The greedy tokens are exchanged inside the
    /// step, so every shard feeds the model's own token to its next step, as decoding does; with
    /// `fixedTokens` every shard runs the same fixed ids (drawn from the same seed).
    public func timeReplayedSteps(tokens T: Int, steps: Int, warmup: Int = 5, skipping: Set<String> = [], advance: Bool = true,
                                  fixedTokens: Bool = false) throws -> Double {
        let shards = self.shards
        return try threads.run {
            try shards[$0].timeReplayedSteps(tokens: T, steps: steps, warmup: warmup, skipping: skipping, advance: advance, fixedTokens: fixedTokens)
        }.max()!
    }
}

/// The residual stream is replicated (every all-reduce gives all GPUs the same bits, and the
/// rest of a layer is the same arithmetic on each), so rank 0's hidden states are the whole
/// model's: DFlash's captured features come from GPU 0 alone.
extension CUDATensorParallel: Executor {
    public var maxStepTokens: Int { shards[0].maxStepTokens }
    public var length: Int { shards[0].length }
    public var maxPositions: Int { shards[0].maxPositions }
    public var captureLayers: [Int] {
        get { shards[0].captureLayers }
        set { shards[0].captureLayers = newValue }
    }
    public var capturedFeatures: [Float] { get throws { try shards[0].capturedFeatures } }
    /// CUDAExecutor.longContextPositions, on every shard.
    public var longContextPositions: Int {
        get { shards[0].longContextPositions }
        set { for s in shards { s.longContextPositions = newValue } }
    }
    public func canTruncate(to position: Int) -> Bool { shards.allSatisfy { $0.canTruncate(to: position) } }
    public func truncate(to position: Int) { for s in shards { s.truncate(to: position) } }
    public func reset() { for s in shards { s.reset() } }
}

/// Rank `rank`'s side of a PeerAllReduce, as a CUDAExecutor's communicator.
/// A step's all-reduces overlap the kernels around them (PeerAllReduce.enqueue's `overlap`)
/// unless `FULGUR_COMM_OVERLAP=0`.
public final class RankAllReduce: StepAllReduce {
    let allReduce: PeerAllReduce
    public let rank: Int
    public var ranks: Int { allReduce.group.count }
    static let overlap = ProcessInfo.processInfo.environment["FULGUR_COMM_OVERLAP"] != "0"
    public init(_ allReduce: PeerAllReduce, rank: Int) { self.allReduce = allReduce; self.rank = rank }
    public func enqueue(input: DeviceBuffer, output: DeviceBuffer, count: Int, stream: CUDAStream) throws {
        try allReduce.enqueue(rank: rank, input: input, output: output, count: count, stream: stream, overlap: Self.overlap)
    }
    /// `FULGUR_COMM_NORM=0` keeps the all-reduce and the norm after it two launches.
    public var fusesNorm: Bool { Self.fuseNorm }
    static let fuseNorm = ProcessInfo.processInfo.environment["FULGUR_COMM_NORM"] != "0"
    public func enqueueNorm(input: DeviceBuffer, tokens: Int, hidden: Int, norm: ResidualNorm, stream: CUDAStream) throws {
        precondition(norm.add == input.address, "the norm after an all-reduce adds the all-reduced buffer")
        try allReduce.enqueueNorm(rank: rank, input: input, tokens: tokens, hidden: hidden, x: norm.resid, h: norm.h, weight: norm.weight, eps: norm.eps,
                                  stream: stream, overlap: Self.overlap)
    }
}
