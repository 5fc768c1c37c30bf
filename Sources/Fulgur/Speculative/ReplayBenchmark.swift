import Foundation

/// DFlash decoding speed at a chosen acceptance length, before a drafter that reaches it
/// exists: every round runs the drafter's block forward and the target's verify forward for
/// real, but how many tokens the round emits is replayed from a schedule with the requested
/// mean (`AcceptanceReplay`); rollback and the drafter's context update then follow that
/// count as in real decoding. The numbers are the engine's speed at that acceptance, not a
/// measurement of any drafter's acceptance. `fulgur bench --replay-acceptance` prints it.
public struct ReplayBenchmark: Codable, Sendable {
    public struct Result: Codable, Sendable {
        /// Tokens per round asked for (in hundredths, as the schedule holds it).
        public let requestedAcceptance: Double
        public let rounds: Int
        /// Tokens the timed rounds emitted.
        public let tokens: Int
        /// tokens / rounds: the requested value within the schedule's rounding (below 1/rounds).
        public let meanAcceptance: Double
        /// Rounds that emitted 1, 2, ..., blockSize tokens.
        public let histogram: [Int]
        public let tokensPerSecond: Double
        public let millisecondsPerRound: Double
        /// Per round: the drafter's block forward; the target's verify forward and the
        /// decision; rollback, the drafter's context update and emitting (see SpeculativeStats).
        public let draftMilliseconds: Double
        public let verifyMilliseconds: Double
        public let otherMilliseconds: Double
        /// Distinct token ids in a verify block, on average over the timed rounds: the MoE's
        /// cost depends on how many experts a block's rows reach, and alike rows reach fewer.
        public let meanDistinctTokens: Double
    }

    /// What the target verifies each round: as many random tokens as the drafter guessed (the
    /// default; the drafter still runs for real, its guesses are dropped), or the guesses. A
    /// random drafter's guesses are alike (2-3 distinct ids in a block of 8 at the gpt-oss-20b
    /// and MiMo shapes, twenty-sixth session), so its verify reaches fewer experts than a real
    /// draft's: 12% faster at gpt-oss-20b's shape on an H200. Random tokens reach as many
    /// experts as distinct text can, so they are the conservative choice.
    public enum VerifyTokens: String, Codable, Sendable, CaseIterable { case drafted, random }

    /// Says what was replayed; written into the JSON too so no number travels without it.
    public let acceptance: String
    public let model: String
    public let drafter: String
    public let device: String
    public let date: String
    public let blockSize: Int
    /// Prompt tokens prefilled before each run.
    public let context: Int
    public let warmupRounds: Int
    public let verifyTokens: VerifyTokens
    public let results: [Result]

    static let replayedNote = "replayed, not measured: each round's emitted count follows a fixed schedule with the requested mean; "
        + "the drafter's and the target's forward passes ran for real every round (greedy verify), and rollback and the drafter's "
        + "context update followed the replayed count"

    /// Positions the target's and the drafter's caches must hold.
    public static func positions(context: Int, rounds: Int, warmupRounds: Int, blockSize: Int) -> Int {
        context + 1 + max(rounds, warmupRounds) * blockSize + blockSize
    }

    /// For each acceptance length: `warmupRounds` rounds (CUDA graphs get captured), then
    /// `rounds` timed ones, each run after prefilling the same `context` random tokens.
    public static func run(target: any Executor, drafter: any Drafter, model: String, drafterName: String, device: String,
                           acceptance: [Double], blockSize: Int = 8, context: Int = 512, rounds: Int = 200, warmupRounds: Int = 20,
                           verifyTokens: VerifyTokens = .random,
                           log: (String) -> Void = { _ in }) throws -> ReplayBenchmark {
        guard rounds >= 1, warmupRounds >= 0, context >= 1 else {
            throw FulgurError(.usage, "the replay benchmark needs at least 1 timed round, 0 or more warm-up rounds and a prompt of at least 1 token")
        }
        guard !acceptance.isEmpty else { throw FulgurError(.usage, "no acceptance length to replay") }
        let schedules = try acceptance.map { try AcceptanceSchedule(mean: $0, blockSize: blockSize) }
        let needed = positions(context: context, rounds: rounds, warmupRounds: warmupRounds, blockSize: blockSize)
        guard target.maxPositions >= needed else {
            throw FulgurError(.usage, "the replay benchmark needs \(needed) positions; the target's context holds \(target.maxPositions)")
        }
        var rng = SeededGenerator(seed: 7)
        let vocab = min(target.plan.embedding.table.shape[0], target.plan.spec.vocabSize)
        let prompt = (0..<context).map { _ in Int(rng.next() % UInt64(vocab)) }

        var results: [Result] = []
        let counted = CountingGuesses(drafter, random: verifyTokens == .random ? vocab : nil)
        for schedule in schedules {
            let replay = AcceptanceReplay(schedule)
            let generator = try SpeculativeGenerator(target: target, drafter: counted, blockSize: blockSize, rule: replay)
            // Exactly `n` rounds: the limit leaves every block whole, and generation is
            // cancelled at the last token of round n.
            func run(_ n: Int) throws -> SpeculativeStats {
                replay.restart()
                let tokens = 1 + schedule.total(rounds: n)  // the prefill's token, then the rounds'
                var seen = 0
                let r = try generator.generate(prompt: prompt, parameters: GenerationParameters(maxTokens: tokens + blockSize),
                                               decode: { _ in "." }, onText: { _ in seen += 1; return seen < tokens })
                return r.speculative!
            }
            if warmupRounds > 0 { _ = try run(warmupRounds) }
            counted.blocks = 0
            counted.distinct = 0
            let s = try run(rounds)
            let tokens = s.acceptanceLengths.reduce(0, +)
            precondition(s.rounds == rounds && tokens == schedule.total(rounds: rounds),
                         "replay at \(schedule.mean): \(s.rounds) rounds emitted \(tokens) tokens; the schedule asks for \(rounds) and \(schedule.total(rounds: rounds))")
            let seconds = s.draftSeconds + s.verifySeconds + s.otherSeconds
            let perRound = { (x: Double) in 1000 * x / Double(rounds) }
            let result = Result(requestedAcceptance: schedule.mean, rounds: rounds, tokens: tokens, meanAcceptance: s.meanAcceptance,
                                histogram: s.histogram, tokensPerSecond: Double(tokens) / seconds, millisecondsPerRound: perRound(seconds),
                                draftMilliseconds: perRound(s.draftSeconds), verifyMilliseconds: perRound(s.verifySeconds),
                                otherMilliseconds: perRound(s.otherSeconds),
                                meanDistinctTokens: Double(counted.distinct) / Double(max(counted.blocks, 1)))
            log(String(format: "acceptance %.2f (replayed): %.1f tokens/s, %.3f ms a round", result.requestedAcceptance, result.tokensPerSecond,
                       result.millisecondsPerRound))
            results.append(result)
        }
        let date = ISO8601DateFormatter().string(from: Date()).prefix(10)
        return ReplayBenchmark(acceptance: replayedNote, model: model, drafter: drafterName, device: device, date: String(date),
                               blockSize: blockSize, context: context, warmupRounds: warmupRounds, verifyTokens: verifyTokens, results: results)
    }

    public var table: String {
        var lines: [String] = []
        lines.append("DFlash decoding at replayed acceptance lengths: \(model), \(device), \(date)")
        lines.append("drafter: \(drafter)")
        lines.append("block \(blockSize), prompt \(context) tokens, \(warmupRounds) warm-up rounds, then \(results.first?.rounds ?? 0) timed rounds per value")
        lines.append("verified tokens: " + (verifyTokens == .random ? "random (the drafter ran; its guesses were replaced)" : "the drafter's guesses"))
        lines.append("acceptance   rounds   mean emitted   tokens/s   ms/round   draft ms   verify ms   other ms   distinct/block")
        for r in results {
            lines.append(String(format: "%10.2f   %6d   %12.3f   %8.1f   %8.3f   %8.3f   %9.3f   %8.3f   %14.2f", r.requestedAcceptance, r.rounds,
                                r.meanAcceptance, r.tokensPerSecond, r.millisecondsPerRound, r.draftMilliseconds, r.verifyMilliseconds,
                                r.otherMilliseconds, r.meanDistinctTokens))
        }
        lines.append("The acceptance decision was \(acceptance).")
        return lines.joined(separator: "\n")
    }

    public var json: String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try! e.encode(self), as: UTF8.self)
    }
}

/// The replay's drafter: passes everything to `inner`, counts the distinct tokens of each block
/// the target will verify (the token and the guesses), and with `random` (a vocabulary size)
/// returns that many random guesses instead of the drafter's, after running its proposal.
final class CountingGuesses: Drafter {
    let inner: any Drafter
    let random: Int?
    var blocks = 0, distinct = 0
    private var rng = SeededGenerator(seed: 11)

    init(_ inner: any Drafter, random: Int?) {
        self.inner = inner
        self.random = random
    }

    var targetLayerIds: [Int] { inner.targetLayerIds }
    var contextLength: Int { inner.contextLength }
    func reset() { inner.reset() }
    func extend(tokens: [Int], features: [Float]) throws { try inner.extend(tokens: tokens, features: features) }
    func extend(tokens: [Int], capturedBy target: any Executor) throws { try inner.extend(tokens: tokens, capturedBy: target) }

    func propose(after token: Int, count: Int) throws -> [Int] {
        var guesses = try inner.propose(after: token, count: count)
        if let vocab = random { guesses = (0..<count).map { _ in Int(rng.next() % UInt64(vocab)) } }
        blocks += 1
        distinct += Set([token] + guesses).count
        return guesses
    }
}
