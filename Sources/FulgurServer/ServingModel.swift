import Fulgur

/// What the server needs from a model. Everything but `generate` is safe to call from any
/// request handler at once; `generate` is called by the scheduler's lane, one generation at
/// a time, because the engine holds one sequence's KV cache.
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
    func generate(prompt: [Int], parameters: GenerationParameters,
                  onToken: (Int, TokenLogprobs?) -> Void, onText: (String) -> Bool) throws -> GenerationResult
}

/// An Engine served over HTTP. `@unchecked Sendable`: the tokenizer and template are
/// immutable, and the scheduler's single lane is the only caller of `generate`, the one
/// method that touches the engine's mutable state.
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

    public func generate(prompt: [Int], parameters: GenerationParameters,
                         onToken: (Int, TokenLogprobs?) -> Void, onText: (String) -> Bool) throws -> GenerationResult {
        try engine.generate(prompt: prompt, parameters: parameters, onToken: onToken, onText: onText)
    }
}
