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
        let results = Results(count: shards.count)
        let done = DispatchGroup()
        for (rank, shard) in shards.enumerated() {
            done.enter()
            let thread = Thread {
                results.set(rank, Result { try shard.forward(tokens, logits: want) })
                done.leave()
            }
            thread.stackSize = 8 << 20
            thread.start()
        }
        done.wait()
        let slices = try results.all.map { try $0!.get() }
        guard want != .none else { return [] }
        let rows = want == .all ? tokens.count : 1
        var out = [Float](repeating: 0, count: rows * vocabSize)
        for (slice, part) in zip(vocabularySlices, slices) {
            for r in 0..<rows {
                for (j, v) in part[(r * slice.count)..<((r + 1) * slice.count)].enumerated() { out[r * vocabSize + slice.lowerBound + j] = v }
            }
        }
        return out
    }
}

/// Each shard thread's result.
private final class Results: @unchecked Sendable {
    private var values: [Result<[Float], Error>?]
    private let lock = NSLock()
    init(count: Int) { values = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ r: Result<[Float], Error>) { lock.lock(); values[i] = r; lock.unlock() }
    var all: [Result<[Float], Error>?] { lock.lock(); defer { lock.unlock() }; return values }
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
