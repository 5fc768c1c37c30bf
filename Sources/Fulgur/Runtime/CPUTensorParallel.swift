import Foundation

/// A model run as `count` tensor-parallel shards (Plan.shard) on the CPU, one thread per shard,
/// with an in-process all-reduce: the reference the multi-GPU executor is checked against, and
/// the proof that the cut adds up (its logits equal the whole model's up to summation order).
/// It is an Executor, so a generator or DFlash (SpeculativeGenerator) runs on it as on one
/// CPUExecutor; the drafter runs whole on an executor of its own or split the same way.
public final class CPUTensorParallel {
    /// The whole model's plan (each shard runs its Plan.shard).
    public let plan: Plan
    public let shards: [CPUExecutor]
    public let vocabularySlices: [Range<Int>]
    public let vocabSize: Int
    private let group: SumGroup
    private let threads: RankThreads

    public convenience init(plan: Plan, count: Int, maxPositions: Int? = nil, maxStepTokens: Int = 64) throws {
        let plans = try (0..<count).map { try plan.shard(rank: $0, of: count) }
        try self.init(plan: plan, shards: plans.map { CPUExecutor(plan: $0, maxPositions: maxPositions, maxStepTokens: maxStepTokens) })
    }

    /// `threads`: another split executor's over the same shards (sharingCache), else its own.
    private init(plan: Plan, shards: [CPUExecutor], threads: RankThreads? = nil) throws {
        let count = shards.count
        guard plan.lmHead.outFeatures <= SlicedArgmax.maxVocabulary else {
            throw FulgurError(.unsupported, "tensor parallelism: a vocabulary of \(plan.lmHead.outFeatures) tokens; the shards exchange token ids as f32, exact up to \(SlicedArgmax.maxVocabulary)")
        }
        let group = SumGroup(count: count)
        for (rank, e) in shards.enumerated() {
            e.allReduce = { pointer, n in group.allReduce(rank: rank, pointer, count: n) }
        }
        self.plan = plan
        self.shards = shards
        vocabularySlices = (0..<count).map { plan.vocabularySlice(rank: $0, of: count) }
        vocabSize = plan.lmHead.outFeatures
        self.group = group
        self.threads = threads ?? RankThreads(count: count)
    }

    /// As CPUExecutor.forward: every shard runs the tokens on its own thread; the logits'
    /// vocabulary slices are put back together (`[T, vocab]` for `.all`, `[vocab]` for `.last`).
    public func forward(_ tokens: [Int], logits want: CPUExecutor.Logits = .last) throws -> [Float] {
        let shards = self.shards
        let parts = try threads.run { try shards[$0].forward(tokens, logits: want) }
        guard want != .none else { return [] }
        return Self.gather(parts, slices: vocabularySlices, rows: want == .all ? tokens.count : 1, vocab: vocabSize)
    }

    /// As CPUExecutor.forward(rows:): the rows go to every shard (x is replicated).
    public func forward(rows: [Float], logits want: CPUExecutor.Logits = .none) throws -> [Float] {
        let shards = self.shards
        let parts = try threads.run { try shards[$0].forward(rows: rows, logits: want) }
        guard want != .none, let first = parts.first, !first.isEmpty else { return [] }
        return Self.gather(parts, slices: vocabularySlices, rows: first.count / vocabularySlices[0].count, vocab: vocabSize)
    }

    /// The greedy choice after each position of the last step, as Executor.argmax, found the way
    /// the GPUs find it (SlicedArgmax): each shard's candidates from its own slice, exchanged
    /// through the shards' all-reduce, the same pick on every shard. No whole logit row is built.
    public func argmax(_ tokens: [Int]) throws -> [Int] {
        let shards = self.shards, slices = vocabularySlices, ranks = shards.count
        let lastStep = tokens.isEmpty ? 0 : (tokens.count - 1) % maxStepTokens + 1
        let picks = try threads.run { rank -> [Int] in
            let shard = shards[rank], width = slices[rank].count
            let logits = try shard.forward(tokens, logits: .all)
            let candidates = logits.withUnsafeBufferPointer { l in
                ((tokens.count - lastStep)..<tokens.count).map {
                    SlicedArgmax.candidate(UnsafeBufferPointer(rebasing: l[($0 * width)..<(($0 + 1) * width)]), start: slices[rank].lowerBound)
                }
            }
            var table = SlicedArgmax.table(candidates, rank: rank, ranks: ranks)
            if !table.isEmpty { table.withUnsafeMutableBufferPointer { shard.allReduce!($0.baseAddress!, $0.count) } }
            return SlicedArgmax.pick(table, ranks: ranks)
        }
        // Every shard summed the same tables in the same order: they cannot disagree unless the
        // exchange is broken.
        guard picks.allSatisfy({ $0 == picks[0] }) else {
            throw FulgurError(.shape, "tensor-parallel argmax: the shards picked different tokens \(picks)")
        }
        return picks[0]
    }

    /// An executor for another plan over these shards' caches (Executor.sharingCache): the
    /// plan is split the same way (Plan.shard throws for plans that do not split).
    public func sharingCache(plan other: Plan) throws -> any Executor {
        let parts = try shards.indices.map { try other.shard(rank: $0, of: shards.count) }
        return try CPUTensorParallel(plan: other, shards: zip(parts, shards).map { p, s in
            CPUExecutor(plan: p, maxPositions: s.cache.maxPositions, maxStepTokens: s.maxStepTokens, cache: s.cache)
        }, threads: threads)
    }

    /// Whole logit rows from each shard's vocabulary slice of them (`parts[r]` is
    /// `[rows, slices[r].count]`).
    public static func gather(_ parts: [[Float]], slices: [Range<Int>], rows: Int, vocab: Int) -> [Float] {
        var out = [Float](repeating: 0, count: rows * vocab)
        for (slice, part) in zip(slices, parts) {
            for r in 0..<rows {
                for (j, v) in part[(r * slice.count)..<((r + 1) * slice.count)].enumerated() { out[r * vocab + slice.lowerBound + j] = v }
            }
        }
        return out
    }

    /// Runs `body(rank)` for every rank at once, one thread each (shards wait for each other in
    /// their all-reduces, so they must run concurrently), and returns the results in rank order.
    public static func onEveryRank<R>(_ count: Int, _ body: @escaping @Sendable (Int) throws -> R) throws -> [R] {
        let results = RankResults<R>(count: count)
        let done = DispatchGroup()
        for rank in 0..<count {
            done.enter()
            let thread = Thread {
                results.set(rank, Result { try body(rank) })
                done.leave()
            }
            thread.stackSize = 8 << 20
            thread.start()
        }
        done.wait()
        return try results.all.map { try $0!.get() }
    }
}

/// The residual stream is replicated: every all-reduce gives all shards the same bits and the
/// rest of a layer (norms, residual adds) is the same arithmetic on every shard, so rank 0's
/// hidden states are the whole model's and DFlash's captured features come from rank 0 alone.
extension CPUTensorParallel: Executor {
    public var maxStepTokens: Int { shards[0].maxStepTokens }
    public var length: Int { shards[0].cache.length }
    public var maxPositions: Int { shards[0].cache.maxPositions }
    public var captureLayers: [Int] {
        get { shards[0].captureLayers }
        set { shards[0].captureLayers = newValue }
    }
    public var capturedFeatures: [Float] { shards[0].capturedFeatures }
    public func canTruncate(to position: Int) -> Bool { shards.allSatisfy { $0.cache.canTruncate(to: position) } }
    public func truncate(to position: Int) { for s in shards { s.cache.truncate(to: position) } }
    public func reset() { for s in shards { s.cache.reset() } }
}

/// Each shard thread's result.
final class RankResults<R>: @unchecked Sendable {
    private var values: [Result<R, Error>?]
    private let lock = NSLock()
    init(count: Int) { values = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ r: Result<R, Error>) { lock.lock(); values[i] = r; lock.unlock() }
    var all: [Result<R, Error>?] { lock.lock(); defer { lock.unlock() }; return values }
}

/// An all-reduce among `count` threads: each deposits its buffer, every one sums all buffers in
/// rank order (so all get the same bits), and none writes its result until all have read.
final class SumGroup: @unchecked Sendable {
    let count: Int
    private var pointers: [UnsafeMutablePointer<Float>?]
    private let condition = NSCondition()
    private var arrived = 0, generation = 0

    init(count: Int) {
        self.count = count
        pointers = Array(repeating: nil, count: count)
    }

    private func barrier() {
        condition.lock()
        let g = generation
        arrived += 1
        if arrived == count {
            arrived = 0
            generation += 1
            condition.broadcast()
        } else {
            while generation == g { condition.wait() }
        }
        condition.unlock()
    }

    func allReduce(rank: Int, _ p: UnsafeMutablePointer<Float>, count n: Int) {
        condition.lock(); pointers[rank] = p; condition.unlock()
        barrier()
        var sum = [Float](repeating: 0, count: n)
        condition.lock(); let all = pointers.map { $0! }; condition.unlock()
        for src in all { for i in 0..<n { sum[i] += src[i] } }
        barrier()  // every shard has read every buffer
        sum.withUnsafeBufferPointer { p.update(from: $0.baseAddress!, count: n) }
    }
}
