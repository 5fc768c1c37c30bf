import Foundation
import Testing
@testable import Fulgur

/// RankThreads: the long-lived thread a rank that runs a split model's calls.
@Suite struct RankThreadsTests {
    struct Boom: Error {}

    @Test(.timeLimit(.minutes(1))) func everyRankRunsAtOnceResultsInRankOrderErrorsComeBack() throws {
        let threads = RankThreads(count: 4)
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
}
