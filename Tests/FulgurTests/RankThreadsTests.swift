import Foundation
import Testing
@testable import Fulgur

/// RankThreads: the long-lived thread a rank that runs a split model's calls.
@Suite struct RankThreadsTests {
    struct Boom: Error {}

    /// Sleeping threads (spin 0) and spinning ones (GPU ranks) alike.
    @Test(.timeLimit(.minutes(1)), arguments: [0, 200_000] as [UInt64])
    func everyRankRunsAtOnceResultsInRankOrderErrorsComeBack(spinNanoseconds: UInt64) throws {
        let threads = RankThreads(count: 4, spinNanoseconds: spinNanoseconds)
        let group = SumGroup(count: 4)
        for call in 0..<200 {
            // The all-reduce returns only when all four ranks are in it: the ranks must run at once.
            let got = try threads.run { rank -> Float in
                var x: [Float] = [Float(rank + call)]
                x.withUnsafeMutableBufferPointer { group.allReduce(rank: rank, $0.baseAddress!, count: 1) }
                return x[0] * 10 + Float(rank)
            }
            #expect(got == (0..<4).map { Float(6 + 4 * call) * 10 + Float($0) })
        }
        #expect(throws: Boom.self) { _ = try threads.run { rank -> Int in if rank == 2 { throw Boom() }; return rank } }
        #expect(try threads.run { $0 * $0 } == [0, 1, 4, 9])  // still serving after an error
    }

    @Test(.timeLimit(.minutes(1))) func callsFromSeveralThreadsTakeTurns() throws {
        let threads = RankThreads(count: 2)
        let sums = try CPUTensorParallel.onEveryRank(3) { caller in
            try (0..<50).map { i in try threads.run { rank in caller * 1000 + i * 10 + rank }.reduce(0, +) }.reduce(0, +)
        }
        #expect(sums == (0..<3).map { caller in (0..<50).map { i in 2 * (caller * 1000 + i * 10) + 1 }.reduce(0, +) })
    }

    /// Calls that come while the threads spin, just as they give up, and after they sleep: a
    /// thread that misses its wake-up hangs the call (the time limit fails the test), one woken
    /// twice runs a call twice (a wrong sum or count).
    @Test(.timeLimit(.minutes(1))) func spinningThreadsNeitherMissNorDoubleAWakeUp() throws {
        let spin: UInt64 = 30_000
        var rng = SeededGenerator(seed: 3)
        for _ in 0..<3 {
            let threads = RankThreads(count: 3, spinNanoseconds: spin)
            let runs = RunCounter()
            for call in 0..<300 {
                // Gaps from none to three spins, so calls land on both sides of the threads' sleep.
                let gap = rng.next() % (3 * spin)
                let until = DispatchTime.now().uptimeNanoseconds + gap
                while DispatchTime.now().uptimeNanoseconds < until {}
                let got = try threads.run { rank -> Int in runs.add(); return call * 10 + rank }
                #expect(got == [call * 10, call * 10 + 1, call * 10 + 2])
            }
            #expect(runs.value == 900)
        }  // each RankThreads ends here, its threads asleep or spinning
    }
}

/// Counts job runs across rank threads.
private final class RunCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var n = 0
    func add() { lock.lock(); n += 1; lock.unlock() }
    var value: Int { lock.lock(); defer { lock.unlock() }; return n }
}
