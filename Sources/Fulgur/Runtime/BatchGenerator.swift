/// Continuous batching: up to `slots` generations advance together, one
/// forward pass over all of them per `step`. A generation that is decoding brings its next
/// token; one still prefilling brings the next piece of its prompt, of at most `prefillChunk`
/// tokens, and a step takes pieces while their total stays within `prefillChunk`, so a long
/// prompt delays the others by a chunk a step, never by its whole prefill. Each generation
/// holds a KV cache of its own (a slot) until it ends or is removed; ended slots are reused.
///
/// On the CPU a generation's tokens are the ones it gets alone from a `Generator` whose
/// executor runs steps of `prefillChunk` tokens: its pieces are the same, and a batched step
/// computes each sequence's logits bit for bit as alone (`CPUExecutor.forward(batch:)`). On a
/// GPU (`CUDAExecutor.forward(batch:)`) the logits agree with alone's to float rounding: a
/// kernel may sum in another order at another step size.
public final class BatchGenerator {
    public let slots: Int
    public let prefillChunk: Int
    private let executor: any BatchExecutor
    private var running: [Sequence] = []
    private var idleSlots: [Int]

    private final class Sequence {
        let generation: Generation
        let slot: Int
        /// Prompt tokens run so far.
        var prefilled = 0
        /// The sampled token to run next, once the prompt is in.
        var next: Int?

        init(_ generation: Generation, _ slot: Int) {
            self.generation = generation
            self.slot = slot
        }
    }

    /// Batches on `executor`'s slots, whose sequences take at least `prefillChunk` tokens a step.
    public init(executor: any BatchExecutor, prefillChunk: Int) throws {
        guard prefillChunk >= 1 else { throw FulgurError(.usage, "the prefill chunk must be at least 1 token, got \(prefillChunk)") }
        self.executor = executor
        self.prefillChunk = prefillChunk
        slots = executor.slots
        idleSlots = Array((0..<executor.slots).reversed())
    }

    /// Batches on the CPU executor.
    public convenience init(plan: Plan, slots: Int, maxPositions: Int, prefillChunk: Int) throws {
        guard prefillChunk >= 1 else { throw FulgurError(.usage, "the prefill chunk must be at least 1 token, got \(prefillChunk)") }
        try self.init(executor: CPUBatchExecutor(plan: plan, slots: slots, maxPositions: maxPositions, maxSequenceTokens: prefillChunk),
                      prefillChunk: prefillChunk)
    }

    /// Generations in the batch.
    public var count: Int { running.count }

    /// Adds a generation in a free slot; it starts prefilling at the next step.
    public func add(_ generation: Generation) throws {
        guard let slot = idleSlots.last else { throw FulgurError(.usage, "all \(slots) slots of the batch are taken") }
        guard !running.contains(where: { $0.generation === generation }) else { throw FulgurError(.usage, "the generation is already in the batch") }
        idleSlots.removeLast()
        executor.reset(slot: slot)
        running.append(Sequence(generation, slot))
    }

    /// Takes a generation out of the batch before its end (its client left), freeing its slot;
    /// its `finish` then reports it cancelled.
    public func remove(_ generation: Generation) {
        guard let index = running.firstIndex(where: { $0.generation === generation }) else { return }
        generation.cancel()
        idleSlots.append(running.remove(at: index).slot)
    }

    /// Runs one forward pass over the batch and samples the next token of every generation
    /// whose step ended on logits; returns the generations that ended, their slots freed (call
    /// `finish` on each). When the pass fails every generation is taken out of the batch.
    public func step() throws -> [Generation] {
        var parts: [BatchStep] = [], stepping: [Sequence] = []
        var budget = prefillChunk
        for s in running {
            if let token = s.next {
                parts.append(.init(slot: s.slot, tokens: [token], wantsLogits: true))
            } else {
                let prompt = s.generation.prompt
                let piece = min(prefillChunk, prompt.count - s.prefilled)
                guard piece <= budget else { continue }
                budget -= piece
                parts.append(.init(slot: s.slot, tokens: Array(prompt[s.prefilled..<(s.prefilled + piece)]),
                                   wantsLogits: s.prefilled + piece == prompt.count))
                s.prefilled += piece
            }
            stepping.append(s)
        }
        guard !parts.isEmpty else { return [] }
        let logits: [[Float]]
        do { logits = try executor.forward(batch: parts) } catch {
            idleSlots += running.map(\.slot)
            running.removeAll()
            throw error
        }
        var ended: [Sequence] = []
        for (s, l) in zip(stepping, logits) where !l.isEmpty {
            s.next = s.generation.next(after: l)
            if s.next == nil { ended.append(s) }
        }
        running.removeAll { s in ended.contains { $0 === s } }
        idleSlots += ended.map(\.slot)
        return ended.map(\.generation)
    }
}
