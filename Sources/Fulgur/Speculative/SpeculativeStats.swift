/// How speculative decoding went for one request: tokens emitted per round (the acceptance
/// length, 1 ... block size) and where the time went, by host clocks: draft (the drafter's
/// block forward), verify (the target's forward over the block and the acceptance decision)
/// and other (rollback, the drafter's context update, emitting). GPU work a phase queues
/// without waiting for it (the context update) is waited for, and counted, by the next one.
public struct SpeculativeStats: Sendable {
    public let blockSize: Int
    public var acceptanceLengths: [Int] = []
    public var draftSeconds: Double = 0
    public var verifySeconds: Double = 0
    public var otherSeconds: Double = 0

    public init(blockSize: Int) { self.blockSize = blockSize }

    public var rounds: Int { acceptanceLengths.count }

    public var meanAcceptance: Double {
        rounds == 0 ? 0 : Double(acceptanceLengths.reduce(0, +)) / Double(rounds)
    }

    /// Rounds that emitted 1, 2, ..., blockSize tokens.
    public var histogram: [Int] {
        var h = Array(repeating: 0, count: blockSize)
        for n in acceptanceLengths { h[n - 1] += 1 }
        return h
    }

    public var summary: String {
        let ms = { (s: Double) in String(format: "%.1f ms", s * 1000) }
        let perRound = { (s: Double) in rounds == 0 ? "-" : String(format: "%.2f ms", s * 1000 / Double(rounds)) }
        return """
            speculative: block \(blockSize), \(rounds) rounds, mean acceptance \(String(format: "%.2f", meanAcceptance)) tokens/round
            acceptance histogram (tokens per round: rounds): \(histogram.enumerated().map { "\($0 + 1): \($1)" }.joined(separator: ", "))
            draft \(ms(draftSeconds)) (\(perRound(draftSeconds))/round), verify \(ms(verifySeconds)) (\(perRound(verifySeconds))/round), \
            other \(ms(otherSeconds)) (\(perRound(otherSeconds))/round)
            """
    }
}
