/// What a generator needs from an executor: run tokens at the next positions of one
/// sequence and return logits, and move the end of that sequence. The CPU executor (the
/// oracle) and the CUDA executor (FulgurCUDA) both are one.
public protocol Executor: AnyObject {
    var plan: Plan { get }
    /// Tokens one step takes; longer inputs run in chunks of this many.
    var maxStepTokens: Int { get }
    var vocabSize: Int { get }
    /// Positions held (the next token's position) and the most the cache can hold.
    var length: Int { get }
    var maxPositions: Int { get }
    /// Runs `tokens` at the next positions and returns logits (`[T, vocab]` for `.all`,
    /// `[vocab]` for `.last`, nothing for `.none`).
    func forward(_ tokens: [Int], logits: CPUExecutor.Logits) throws -> [Float]
    /// Runs a plan that starts from given rows of x (`[T, plan.widths[.x]]`) instead of token
    /// embeddings (the DFlash drafter's context features).
    func forward(rows: [Float], logits: CPUExecutor.Logits) throws -> [Float]
    /// Runs `tokens` like `forward` and returns the greedy choice after each position of the
    /// last step (all of them when the tokens fit in one step): a verify block at temperature 0
    /// needs only these, and the GPU computes them without sending `[T, vocab]` logits back.
    func argmax(_ tokens: [Int]) throws -> [Int]
    /// Layers whose output hidden states each forward returns in `capturedFeatures`
    /// (`[T, captureLayers.count * hidden]`, side by side in this order): the DFlash drafter
    /// conditions on them, so they come with the forward pass instead of a second one.
    var captureLayers: [Int] { get set }
    var capturedFeatures: [Float] { get }
    /// An executor for another plan over this one's cache (the same layers' keys and values
    /// and the same positions): the DFlash drafter writes its context with one plan and drafts
    /// with another.
    func sharingCache(plan: Plan) throws -> any Executor
    /// Whether the cache can rewind to `position` (a sliding-window ring may have overwritten
    /// what it would need).
    func canTruncate(to position: Int) -> Bool
    /// Forgets positions at and after `position`; check `canTruncate(to:)` first.
    func truncate(to position: Int)
    func reset()
}

extension Executor {
    /// From the logits, for executors without a device-side argmax.
    public func argmax(_ tokens: [Int]) throws -> [Int] {
        let logits = try forward(tokens, logits: .all)
        let vocab = vocabSize, lastStep = tokens.isEmpty ? 0 : (tokens.count - 1) % maxStepTokens + 1
        return logits.withUnsafeBufferPointer { l in
            ((tokens.count - lastStep)..<tokens.count).map { Sampler.argmax(UnsafeBufferPointer(rebasing: l[($0 * vocab)..<(($0 + 1) * vocab)])) }
        }
    }
}

extension CPUExecutor: Executor {
    public var length: Int { cache.length }
    public var maxPositions: Int { cache.maxPositions }
    public func canTruncate(to position: Int) -> Bool { cache.canTruncate(to: position) }
    public func truncate(to position: Int) { cache.truncate(to: position) }
    public func reset() { cache.reset() }
    public func sharingCache(plan: Plan) throws -> any Executor {
        CPUExecutor(plan: plan, maxPositions: cache.maxPositions, maxStepTokens: maxStepTokens, cache: cache)
    }
}
