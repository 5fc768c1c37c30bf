import Foundation

/// A model run as `count` tensor-parallel shards (Plan.shard) on the CPU, one thread per shard,
/// with an in-process all-reduce: the reference the multi-GPU executor is checked against, and
/// the proof that the cut adds up (its logits equal the whole model's up to summation order).
public final class CPUTensorParallel {
    public let shards: [CPUExecutor]
    public let vocabularySlices: [Range<Int>]
    public let vocabSize: Int
    private let group: SumGroup

    public init(plan: Plan, count: Int, maxPositions: Int? = nil, maxStepTokens: Int = 64) throws {
        let plans = try (0..<count).map { try plan.shard(rank: $0, of: count) }
        let group = SumGroup(count: count)
        shards = plans.enumerated().map { rank, p in
            let e = CPUExecutor(plan: p, maxPositions: maxPositions, maxStepTokens: maxStepTokens)
            e.allReduce = { pointer, n in group.allReduce(rank: rank, pointer, count: n) }
            return e
        }
        vocabularySlices = (0..<count).map { plan.vocabularySlice(rank: $0, of: count) }
        vocabSize = plan.lmHead.outFeatures
        self.group = group
    }

    /// As CPUExecutor.forward: every shard runs the tokens on its own thread; the logits'
    /// vocabulary slices are put back together (`[T, vocab]` for `.all`, `[vocab]` for `.last`).
    public func forward(_ tokens: [Int], logits want: CPUExecutor.Logits = .last) throws -> [Float] {
        let shards = self.shards
        let parts = try Self.onEveryRank(shards.count) { try shards[$0].forward(tokens, logits: want) }
        guard want != .none else { return [] }
        return Self.gather(parts, slices: vocabularySlices, rows: want == .all ? tokens.count : 1, vocab: vocabSize)
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
        let results = Results<R>(count: count)
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

/// Each shard thread's result.
private final class Results<R>: @unchecked Sendable {
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
