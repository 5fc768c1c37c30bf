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
    /// Throws where bringing them to the host fails (a GPU executor downloads its last step's
    /// rows when first asked).
    var capturedFeatures: [Float] { get throws }
    /// Runs the plan from the first `count` rows `source` captured in its last forward, as
    /// forward(rows: source.capturedFeatures[..<count rows], logits: .none), where this executor
    /// can read them where they are (a GPU executor from the target's device buffer on its GPU
    /// or a peer, without the host). Returns false, having done nothing, where it cannot; the
    /// caller then passes the host copy.
    func forward(capturedRowsOf source: any Executor, count: Int) throws -> Bool
    /// An executor for another plan over this one's cache (the same layers' keys and values
    /// and the same positions): the DFlash drafter writes its context with one plan and drafts
    /// with another.
    func sharingCache(plan: Plan) throws -> any Executor
    /// The same, with the weights of `weightsOf` (an executor of `plan` already made, with a
    /// cache of its own): another sequence's drafter context (a server lane) then does not copy
    /// the weights again. Executors whose weights are never copied ignore it.
    func sharingCache(plan: Plan, weightsOf: any Executor) throws -> any Executor
    /// Whether the cache can rewind to `position` (a sliding-window ring may have overwritten
    /// what it would need).
    func canTruncate(to position: Int) -> Bool
    /// Forgets positions at and after `position`; check `canTruncate(to:)` first.
    func truncate(to position: Int)
    func reset()
    /// Another executor over the same weights (shared, not copied) with a cache, buffers and,
    /// on a GPU, a stream of its own: a server lane decodes on one from its own thread.
    func sharingWeights() throws -> any Executor
    /// An executor over the same weights whose cache holds `slots` sequences that one forward
    /// pass advances together (continuous batching); a sequence brings at most
    /// `maxSequenceTokens` tokens to a step.
    func batchExecutor(slots: Int, maxSequenceTokens: Int) throws -> any BatchExecutor
}

/// Sequences that advance together, one forward pass over the tokens of all of them at a time
/// (continuous batching): each sequence lives in a slot of the cache, from `reset(slot:)` on.
public protocol BatchExecutor: AnyObject {
    var slots: Int { get }
    /// The most positions a slot holds.
    var maxPositions: Int { get }
    /// Positions slot `slot` holds (its next token's position). `slot` is in 0..<slots: another
    /// is a programming error and stops the process with a message (as an array index would).
    func length(slot: Int) -> Int
    /// Empties slot `slot` (in 0..<slots, as for `length`) for a new sequence.
    func reset(slot: Int)
    /// Runs each part's tokens at the next positions of its slot; returns, per part in order,
    /// the logits after its last token (`[vocab]`), or nothing where `wantsLogits` is false.
    func forward(batch: [BatchStep]) throws -> [[Float]]
}

extension BatchExecutor {
    /// `slot`, after stopping the process with a message if it is not in 0..<slots (the
    /// `length(slot:)` / `reset(slot:)` contract).
    public func checkedSlot(_ slot: Int) -> Int {
        precondition((0..<slots).contains(slot), "slot \(slot) of a batch executor with \(slots) slots")
        return slot
    }
}

/// One sequence's share of a batched step.
public struct BatchStep: Sendable {
    public let slot: Int
    public let tokens: [Int]
    /// Whether the step returns logits after the last of these tokens.
    public let wantsLogits: Bool

    public init(slot: Int, tokens: [Int], wantsLogits: Bool) {
        self.slot = slot
        self.tokens = tokens
        self.wantsLogits = wantsLogits
    }
}

extension Executor {
    public func sharingCache(plan: Plan, weightsOf: any Executor) throws -> any Executor {
        try sharingCache(plan: plan)
    }
    public func sharingWeights() throws -> any Executor {
        throw FulgurError(.unsupported, "\(type(of: self)) cannot run another sequence over its weights; run one lane, or on one device (--device cpu or one GPU)")
    }
    public func batchExecutor(slots: Int, maxSequenceTokens: Int) throws -> any BatchExecutor {
        throw FulgurError(.unsupported, "\(type(of: self)) cannot batch sequences (--schedule throughput); run on one device (--device cpu or one GPU), or --schedule latency")
    }

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
    public func sharingWeights() throws -> any Executor {
        CPUExecutor(plan: plan, maxPositions: cache.maxPositions, maxStepTokens: maxStepTokens)
    }
    public func batchExecutor(slots: Int, maxSequenceTokens: Int) throws -> any BatchExecutor {
        try CPUBatchExecutor(plan: plan, slots: slots, maxPositions: cache.maxPositions, maxSequenceTokens: maxSequenceTokens)
    }
}

/// Continuous batching on the CPU: a KV cache per slot and one CPUExecutor whose steps take a
/// token from every slot plus `maxSequenceTokens` more (`CPUExecutor.forward(batch:)`, which
/// gives each sequence's logits bit for bit as alone).
public final class CPUBatchExecutor: BatchExecutor {
    public let slots: Int
    public let maxPositions: Int
    private let executor: CPUExecutor
    private let caches: [KVCache]

    public init(plan: Plan, slots: Int, maxPositions: Int, maxSequenceTokens: Int) throws {
        guard slots >= 1 else { throw FulgurError(.usage, "a batch needs at least one slot, got \(slots)") }
        guard maxSequenceTokens >= 1 else { throw FulgurError(.usage, "a batched sequence takes at least 1 token a step, got \(maxSequenceTokens)") }
        self.slots = slots
        self.maxPositions = min(maxPositions, plan.spec.maxPositions)
        // The executor's own cache is never used (every sequence brings its own), hence its
        // single position.
        executor = CPUExecutor(plan: plan, maxPositions: 1, maxStepTokens: slots + maxSequenceTokens)
        caches = (0..<slots).map { _ in KVCache(spec: plan.spec, maxPositions: min(maxPositions, plan.spec.maxPositions), maxStepTokens: maxSequenceTokens) }
    }

    public func length(slot: Int) -> Int { caches[checkedSlot(slot)].length }
    public func reset(slot: Int) { caches[checkedSlot(slot)].reset() }

    public func forward(batch: [BatchStep]) throws -> [[Float]] {
        for part in batch where !(0..<slots).contains(part.slot) {
            throw FulgurError(.usage, "slot \(part.slot) of a batched step is outside the batch's \(slots) slots")
        }
        return try executor.forward(batch: batch.map { .init(cache: caches[$0.slot], tokens: $0.tokens, wantsLogits: $0.wantsLogits) })
    }
}

extension Executor {
    /// Executors that read captured rows only from the host.
    public func forward(capturedRowsOf source: any Executor, count: Int) throws -> Bool { false }
}
