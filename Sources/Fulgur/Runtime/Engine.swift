import Foundation

public struct ChatMessage: Sendable, Equatable {
    public var role: String
    public var content: String?

    public init(role: String, content: String?) {
        self.role = role
        self.content = content
    }
}

/// A model ready to talk: weights, plan, executor, tokenizer and chat template. The path of
/// a request is text -> tokens (Tokenizer) -> prefill and decode (Generator over the plan on
/// an executor) -> sampled ids -> streamed text (StreamingDetokenizer).
public final class Engine {
    public let model: Model
    public let tokenizer: Tokenizer
    public let chatTemplate: ChatTemplate?
    public let generator: Generator
    /// DFlash decoding over the same executor, once a drafter is loaded; generation then goes
    /// through it.
    public private(set) var speculative: SpeculativeGenerator?
    private let makeExecutor: ((Plan, Int) throws -> any Executor)?

    public var name: String { URL(fileURLWithPath: model.path).lastPathComponent }

    /// Ids that end a generation: the model's and the tokenizer's EOS.
    public var stopTokenIds: [Int] { Array(Set(model.spec.eosTokenIds + tokenizer.eosTokenIds)).sorted() }

    /// `executor` makes the executor for the plan and a context length (default: the CPU
    /// executor); the CLI passes one that picks the GPU when there is one.
    public init(modelPath: String, contextLength: Int? = nil, progress: ((Int, Int) -> Void)? = nil,
                executor makeExecutor: ((Plan, Int) throws -> any Executor)? = nil) throws {
        model = try Model(path: modelPath, progress: progress)
        tokenizer = try Self.loadTokenizer(modelPath: modelPath, gguf: model.gguf)
        chatTemplate = try Self.loadChatTemplate(modelPath: modelPath, gguf: model.gguf)
        let context = min(contextLength ?? 8192, model.spec.maxPositions)
        guard context > 0 else { throw FulgurError(.usage, "context length must be positive") }
        generator = Generator(executor: try makeExecutor?(model.plan, context) ?? CPUExecutor(plan: model.plan, maxPositions: context))
        self.makeExecutor = makeExecutor
    }

    /// Loads the DFlash drafter in `directory`; later generations decode speculatively with
    /// blocks of `blockSize` (default: the size the drafter was trained for).
    public func useDrafter(directory: String, blockSize: Int? = nil) throws {
        let executor = generator.executor
        let drafter = try DFlashDrafter(directory: directory, target: model, maxPositions: executor.maxPositions,
                                        maxStepTokens: executor.maxStepTokens, executor: makeExecutor)
        speculative = try SpeculativeGenerator(target: executor, drafter: drafter, blockSize: blockSize ?? min(drafter.blockSize, 16))
    }

    /// DFlash decoding on `generator` (the engine's own, or one from `makeGenerator`) with the
    /// drafter `useDrafter` loaded: the engine's own generator gets `speculative`; another gets
    /// a drafter over the same drafter weights with a cache of its own, so that sequences on
    /// different threads each decode speculatively (a server's lanes).
    public func makeSpeculativeGenerator(on generator: Generator) throws -> SpeculativeGenerator {
        guard let speculative else { throw FulgurError(.usage, "no drafter is loaded: call useDrafter first") }
        if generator === self.generator { return speculative }
        guard let drafter = speculative.drafter as? DFlashDrafter else {
            throw FulgurError(.unsupported, "only a DFlash drafter can be given to another sequence")
        }
        return try SpeculativeGenerator(target: generator.executor, drafter: drafter.withOwnCache(), blockSize: speculative.blockSize)
    }

    /// Generates after the token ids `prompt` with `speculative` (from
    /// `makeSpeculativeGenerator`); see `Generator.generate` for the callbacks.
    public func generate(prompt: [Int], parameters: GenerationParameters, speculative: SpeculativeGenerator,
                         onToken: (Int, TokenLogprobs?) -> Void = { _, _ in },
                         onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        var detokenizer = StreamingDetokenizer(tokenizer: tokenizer, skipSpecialTokens: false)
        var result = try speculative.generate(prompt: prompt, parameters: parameters, decode: { detokenizer.append($0) },
                                              onToken: onToken, onText: onText)
        result.appendTail(detokenizer.finish(), onText: onText)
        return result
    }

    /// The tokenizer of a .gguf file (its metadata) or of a checkpoint directory (tokenizer.json).
    public static func loadTokenizer(modelPath: String, gguf: GGUFFile? = nil) throws -> Tokenizer {
        if let g = try gguf ?? (modelPath.hasSuffix(".gguf") ? GGUFFile(path: modelPath) : nil) {
            return try Tokenizer(gguf: g)
        }
        let json = modelPath + "/tokenizer.json"
        guard FileManager.default.fileExists(atPath: json) else {
            throw FulgurError(.io, "\(modelPath): no tokenizer.json; Fulgur needs the checkpoint's tokenizer to turn text into tokens")
        }
        let config = modelPath + "/tokenizer_config.json"
        return try Tokenizer(tokenizerJSON: json, configPath: FileManager.default.fileExists(atPath: config) ? config : nil)
    }

    static func loadChatTemplate(modelPath: String, gguf: GGUFFile?) throws -> ChatTemplate? {
        if let g = gguf {
            return try g.metadata["tokenizer.chat_template"]?.string.map { try ChatTemplate($0) }
        }
        let jinja = modelPath + "/chat_template.jinja"
        if let s = try? String(contentsOfFile: jinja, encoding: .utf8) { return try ChatTemplate(s) }
        let configPath = modelPath + "/tokenizer_config.json"
        if FileManager.default.fileExists(atPath: configPath),
           let s = try HFConfig(path: configPath).values["chat_template"] as? String {
            return try ChatTemplate(s)
        }
        return nil
    }

    public func renderChat(_ messages: [ChatMessage], addGenerationPrompt: Bool) throws -> String {
        guard let chatTemplate else {
            throw FulgurError(.template, "\(model.path) has no chat template; use plain generation instead")
        }
        let special = { (id: Int?) -> JSONValue in id.map { .string(self.tokenizer.decode([$0])) } ?? .null }
        return try chatTemplate.render(
            messages: messages.map { m in
                .object(["role": .string(m.role), "content": m.content.map { .string($0) } ?? .null])
            },
            addGenerationPrompt: addGenerationPrompt,
            extra: ["bos_token": special(tokenizer.bosTokenId), "eos_token": special(tokenizer.eosTokenIds.first)])
    }

    /// The most tokens a prompt and its generation can hold together.
    public var contextLength: Int { generator.executor.maxPositions }

    /// Generates after `text` (special tokens written in the text, as chat templates do, are
    /// recognised), streaming the new text to `onText`.
    public func generate(text: String, parameters: GenerationParameters,
                         onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        try generate(prompt: tokenizer.encode(text, addSpecialTokens: true), parameters: parameters, onText: onText)
    }

    /// Another sequence over the same weights: a KV cache and activation buffers (on a GPU, a
    /// stream) of its own, the weights shared. A server runs one per lane, each on its own thread.
    public func makeGenerator() throws -> Generator {
        Generator(executor: try generator.executor.sharingWeights())
    }

    /// Generates after the token ids `prompt`; see `Generator.generate` for the callbacks.
    /// `generator`: one from `makeGenerator` to run on instead of the engine's own (which is
    /// the only one DFlash decodes on).
    public func generate(prompt: [Int], parameters: GenerationParameters, on generator: Generator? = nil,
                         onToken: (Int, TokenLogprobs?) -> Void = { _, _ in },
                         onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        var detokenizer = StreamingDetokenizer(tokenizer: tokenizer, skipSpecialTokens: false)
        let generator = generator ?? self.generator
        var result = try (generator === self.generator ? speculative : nil).map {
            try $0.generate(prompt: prompt, parameters: parameters, decode: { detokenizer.append($0) }, onToken: onToken, onText: onText)
        } ?? generator.generate(prompt: prompt, parameters: parameters, decode: { detokenizer.append($0) }, onToken: onToken, onText: onText)
        result.appendTail(detokenizer.finish(), onText: onText)
        return result
    }

    /// A generation after the token ids `prompt` for a caller that runs its forward passes
    /// (a `BatchGenerator`), streaming text through a detokenizer of its own.
    public func generation(prompt: [Int], parameters: GenerationParameters, onToken: @escaping (Int, TokenLogprobs?) -> Void,
                           onText: @escaping (String) -> Bool) throws -> Generation {
        var detokenizer = StreamingDetokenizer(tokenizer: tokenizer, skipSpecialTokens: false)
        return try Generation(prompt: prompt, parameters: parameters, maxPositions: contextLength, decode: { detokenizer.append($0) },
                              tail: { detokenizer.finish() }, onToken: onToken, onText: onText)
    }

    /// Continuous batching over the engine's weights: up to `slots` generations advanced
    /// together (see `BatchGenerator`), on the engine's executor's device.
    public func makeBatchGenerator(slots: Int, prefillChunk: Int) throws -> BatchGenerator {
        guard slots >= 1 else { throw FulgurError(.usage, "a batch needs at least one slot, got \(slots)") }
        guard prefillChunk >= 1 else { throw FulgurError(.usage, "the prefill chunk must be at least 1 token, got \(prefillChunk)") }
        return try BatchGenerator(executor: generator.executor.batchExecutor(slots: slots, maxSequenceTokens: prefillChunk), prefillChunk: prefillChunk)
    }
}
