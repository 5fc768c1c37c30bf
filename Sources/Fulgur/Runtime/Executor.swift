/// What a generator needs from an executor: run tokens at the next positions of one
/// sequence and return logits, and move the end of that sequence. The CPU executor (the
/// oracle) and the CUDA executor (FulgurCUDA) both are one.
public protocol Executor: AnyObject {
    /// Tokens one step takes; longer inputs run in chunks of this many.
    var maxStepTokens: Int { get }
    var vocabSize: Int { get }
    /// Positions held (the next token's position) and the most the cache can hold.
    var length: Int { get }
    var maxPositions: Int { get }
    /// Runs `tokens` at the next positions and returns logits (`[T, vocab]` for `.all`,
    /// `[vocab]` for `.last`, nothing for `.none`).
    func forward(_ tokens: [Int], logits: CPUExecutor.Logits) throws -> [Float]
    /// Whether the cache can rewind to `position` (a sliding-window ring may have overwritten
    /// what it would need).
    func canTruncate(to position: Int) -> Bool
    /// Forgets positions at and after `position`; check `canTruncate(to:)` first.
    func truncate(to position: Int)
    func reset()
}

extension CPUExecutor: Executor {
    public var length: Int { cache.length }
    public var maxPositions: Int { cache.maxPositions }
    public func canTruncate(to position: Int) -> Bool { cache.canTruncate(to: position) }
    public func truncate(to position: Int) { cache.truncate(to: position) }
    public func reset() { cache.reset() }
}
