import Fulgur

/// What the server needs from a model. Everything here is safe to call from any request
/// handler at once; generation goes through sequences, one per lane of the scheduler.
public protocol ServingModel: Sendable {
    /// The name clients pass as `model`.
    var id: String { get }
    /// The most tokens a prompt and its completion can hold together.
    var contextLength: Int { get }
    var vocabularySize: Int { get }
    /// Ids that end a generation (EOS, end of turn).
    var stopTokenIds: Set<Int> { get }
    func encode(_ text: String) -> [Int]
    /// The chat rendered through the model's template, ending with the assistant's turn.
    func renderChat(_ messages: [ChatMessage]) throws -> String
    /// The bytes a token stands for, for logprobs.
    func bytes(of token: Int) -> [UInt8]
    /// `count` sequences that can generate at the same time: each holds the mutable state of
    /// one generation (a KV cache) over weights they share. Called once, by the scheduler;
    /// throws when the model cannot run that many.
    func makeSequences(_ count: Int) throws -> [any ModelSequence]
    /// Continuous batching: up to `slots` generations advanced together, one forward pass
    /// over all of them at a time, prompts in pieces of at most `prefillChunk` tokens. Called
    /// once, by a throughput-first scheduler; throws when the model cannot batch.
    func makeBatch(slots: Int, prefillChunk: Int) throws -> any ModelBatch
}

/// One generation at a time, called only by the lane that owns the sequence.
public protocol ModelSequence: AnyObject {
    func generate(prompt: [Int], parameters: GenerationParameters,
                  onToken: (Int, TokenLogprobs?) -> Void, onText: (String) -> Bool) throws -> GenerationResult
}

/// Generations that advance together, a forward pass at a time; called only by the
/// scheduler's engine thread.
public protocol ModelBatch: AnyObject {
    /// Starts a generation in a free slot, to run from the next `step`; returns its id.
    /// Throws when the request cannot run.
    func start(prompt: [Int], parameters: GenerationParameters, onToken: @escaping (Int, TokenLogprobs?) -> Void,
               onText: @escaping (String) -> Bool) throws -> Int
    /// One forward pass over every started generation; returns those that ended in it, their
    /// slots freed. When it throws, every generation has been dropped.
    func step() throws -> [(id: Int, result: GenerationResult)]
    /// Ends a generation before its end, freeing its slot; the result says `cancelled`.
    func stop(_ id: Int) -> GenerationResult
}

/// An Engine served over HTTP. `@unchecked Sendable`: the tokenizer, template and weights are
/// immutable; the engine's generators, the only mutable state, are each used by one lane.
public final class EngineModel: ServingModel, @unchecked Sendable {
    let engine: Engine
    public let id: String

    public init(_ engine: Engine) {
        self.engine = engine
        // The file name without its extension: what `ls` of the models folder shows.
        id = engine.name.hasSuffix(".gguf") ? String(engine.name.dropLast(5)) : engine.name
    }

    public var contextLength: Int { engine.contextLength }
    public var vocabularySize: Int { engine.tokenizer.vocabularySize }
    public var stopTokenIds: Set<Int> { Set(engine.stopTokenIds) }
    public func encode(_ text: String) -> [Int] { engine.tokenizer.encode(text, addSpecialTokens: true) }
    public func renderChat(_ messages: [ChatMessage]) throws -> String { try engine.renderChat(messages, addGenerationPrompt: true) }
    public func bytes(of token: Int) -> [UInt8] { engine.tokenizer.bytes(of: token) }

    /// The first lane uses the engine's own generator, the others new ones over the same plan.
    /// With a drafter loaded (`Engine.useDrafter`), every lane decodes speculatively with a
    /// drafter cache of its own.
    public func makeSequences(_ count: Int) throws -> [any ModelSequence] {
        try (0..<count).map { lane in
            let generator = lane == 0 ? engine.generator : try engine.makeGenerator()
            return EngineSequence(engine: engine, generator: generator,
                                  speculative: engine.speculative == nil ? nil : try engine.makeSpeculativeGenerator(on: generator))
        }
    }

    public func makeBatch(slots: Int, prefillChunk: Int) throws -> any ModelBatch {
        // The batch's forward passes take one token per decoding sequence; a verify block
        // would need a step of several tokens for some sequences and one for others.
        guard engine.speculative == nil else {
            throw FulgurError(.unsupported, "DFlash decoding runs on the latency-first schedule's lanes; batched generation (--schedule throughput) does not decode speculatively")
        }
        return EngineBatch(engine: engine, batch: try engine.makeBatchGenerator(slots: slots, prefillChunk: prefillChunk))
    }
}

final class EngineBatch: ModelBatch {
    let engine: Engine
    let batch: BatchGenerator
    private var generations: [Int: Generation] = [:]
    private var ids: [ObjectIdentifier: Int] = [:]
    private var lastId = 0

    init(engine: Engine, batch: BatchGenerator) {
        self.engine = engine
        self.batch = batch
    }

    func start(prompt: [Int], parameters: GenerationParameters, onToken: @escaping (Int, TokenLogprobs?) -> Void,
               onText: @escaping (String) -> Bool) throws -> Int {
        let generation = try engine.generation(prompt: prompt, parameters: parameters, onToken: onToken, onText: onText)
        try batch.add(generation)
        lastId += 1
        generations[lastId] = generation
        ids[ObjectIdentifier(generation)] = lastId
        return lastId
    }

    func step() throws -> [(id: Int, result: GenerationResult)] {
        let ended: [Generation]
        do { ended = try batch.step() } catch {
            generations.removeAll()
            ids.removeAll()
            throw error
        }
        return ended.map { generation in (forget(generation), generation.finish()) }
    }

    func stop(_ id: Int) -> GenerationResult {
        let generation = generations[id]!
        batch.remove(generation)
        _ = forget(generation)
        return generation.finish()
    }

    private func forget(_ generation: Generation) -> Int {
        let id = ids.removeValue(forKey: ObjectIdentifier(generation))!
        generations[id] = nil
        return id
    }
}

final class EngineSequence: ModelSequence {
    let engine: Engine
    let generator: Generator
    /// DFlash decoding over `generator`'s executor, when the server decodes speculatively.
    let speculative: SpeculativeGenerator?

    init(engine: Engine, generator: Generator, speculative: SpeculativeGenerator?) {
        self.engine = engine
        self.generator = generator
        self.speculative = speculative
    }

    func generate(prompt: [Int], parameters: GenerationParameters,
                  onToken: (Int, TokenLogprobs?) -> Void, onText: (String) -> Bool) throws -> GenerationResult {
        if let speculative {
            return try engine.generate(prompt: prompt, parameters: parameters, speculative: speculative, onToken: onToken, onText: onText)
        }
        return try engine.generate(prompt: prompt, parameters: parameters, on: generator, onToken: onToken, onText: onText)
    }
}
