/// How many tokens each round emits when acceptance is replayed: round r (from 1) emits
/// floor(r·a) − floor((r−1)·a), so every round emits floor(a) or ceil(a) and the first R
/// rounds emit floor(R·a) in all: the mean is a to within 1/R, and exactly a whenever R is a
/// multiple of the period (10 rounds for 4.3 and 6.3, 5 for 5.6). `a` is held in hundredths,
/// so the arithmetic is exact.
struct AcceptanceSchedule: Sendable {
    let hundredths: Int
    private(set) var round = 0

    /// `mean`: tokens emitted per round, the bonus token included, in 1...blockSize; rounded
    /// to hundredths.
    init(mean: Double, blockSize: Int) throws {
        guard mean.isFinite, mean >= 1, mean <= Double(blockSize) else {
            throw FulgurError(.usage, "a replayed acceptance length must be in 1...\(blockSize) (the block size): every round emits 1 to \(blockSize) tokens; got \(mean)")
        }
        hundredths = Int((mean * 100).rounded())
    }

    var mean: Double { Double(hundredths) / 100 }

    /// Tokens the first `rounds` rounds emit together.
    func total(rounds: Int) -> Int { rounds * hundredths / 100 }

    /// The next round's count.
    mutating func next() -> Int {
        round += 1
        return total(rounds: round) - total(rounds: round - 1)
    }
}

/// Replays an acceptance length instead of measuring one, for benchmarks: the drafter and the
/// target's verify forward have run, but how many tokens the round emits comes from the
/// schedule, not from comparing the draft with the target. The round then emits the first
/// n − 1 guesses and the target's own token after them, so rollback and the drafter's context
/// update do exactly what real decoding does at that acceptance length. The output is not the
/// target's text.
final class AcceptanceReplay: AcceptanceRule {
    private(set) var schedule: AcceptanceSchedule
    private let start: AcceptanceSchedule

    init(_ schedule: AcceptanceSchedule) {
        self.schedule = schedule
        start = schedule
    }

    /// Starts the schedule again from its first round.
    func restart() { schedule = start }

    func needsLogits(_ sampling: SamplingParameters) -> Bool { sampling.temperature > 0 }

    func accept(draft: [Int], target: TargetOutput, sampler: inout Sampler) -> [Int] {
        // A block cut short by the token limit cannot emit more than it holds.
        let n = min(schedule.next(), draft.count + 1)
        return Array(draft.prefix(n - 1)) + [target.token(at: n - 1, sampler: &sampler)]
    }
}
