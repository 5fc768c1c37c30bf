import Foundation
@testable import Fulgur
@testable import FulgurServer

/// A model without weights: a byte is a token, chats render as "role: content" lines, and a
/// generation spells `reply` one byte per token. `gate`, when set, holds every generation
/// until the test signals it, so that tests can fill the queue; `tokenDelay` paces tokens
/// like a real model, so that a client can leave mid-generation.
final class FakeModel: ServingModel, ModelSequence, @unchecked Sendable {
    let id = "fake"
    let contextLength: Int
    let vocabularySize = 256
    let stopTokenIds: Set<Int> = [0]
    let reply: String
    let gate: DispatchSemaphore?
    let tokenDelay: Duration
    private let lock = NSLock()
    private var startedPrompts: [[Int]] = []
    /// The prompts of the generations started so far, in the order they started.
    var started: [[Int]] { lock.withLock { startedPrompts } }

    init(reply: String = "Hello, world!", contextLength: Int = 64, gate: DispatchSemaphore? = nil, tokenDelay: Duration = .zero) {
        self.reply = reply
        self.contextLength = contextLength
        self.gate = gate
        self.tokenDelay = tokenDelay
    }

    func encode(_ text: String) -> [Int] { text.utf8.map(Int.init) }
    func renderChat(_ messages: [ChatMessage]) throws -> String {
        messages.map { "\($0.role): \($0.content ?? "")\n" }.joined()
    }
    func bytes(of token: Int) -> [UInt8] { [UInt8(token)] }
    /// Stateless, so every lane can share it.
    func makeSequences(_ count: Int) -> [any ModelSequence] { Array(repeating: self, count: count) }

    func generate(prompt: [Int], parameters: GenerationParameters,
                  onToken: (Int, TokenLogprobs?) -> Void, onText: (String) -> Bool) throws -> GenerationResult {
        lock.withLock { startedPrompts.append(prompt) }
        gate?.wait()
        var result = GenerationResult()
        result.promptTokens = prompt.count
        for byte in reply.utf8.prefix(parameters.maxTokens) {
            if tokenDelay > .zero { Thread.sleep(forTimeInterval: Double(tokenDelay.components.attoseconds) / 1e18) }
            let token = Int(byte)
            result.tokens.append(token)
            onToken(token, parameters.topLogprobs.map { TokenLogprobs(logits: [Float](repeating: 0, count: 256), token: token, top: $0) })
            result.text += String(UnicodeScalar(byte))
            if !onText(String(UnicodeScalar(byte))) { result.finishReason = .cancelled; return result }
        }
        result.finishReason = result.tokens.count < reply.utf8.count ? .length : .stop
        return result
    }
}
