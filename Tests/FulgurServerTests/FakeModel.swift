import Foundation
@testable import Fulgur
@testable import FulgurServer

/// A model without weights: a byte is a token, chats render as "role: content" lines, and a
/// generation spells `reply` one byte per token. `gate`, when set, holds every generation
/// until the test signals it, so that tests can fill the queue; `tokenDelay` paces tokens
/// like a real model, so that a client can leave mid-generation. Batched (`makeBatch`), a
/// generation waits for the gate when it starts, and every step paces one token of each.
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
    func makeBatch(slots: Int, prefillChunk: Int) -> any ModelBatch { FakeBatch(model: self, slots: slots) }

    private var batchSizes: [Int] = []
    /// How many generations each batched step advanced, in order.
    var stepSizes: [Int] { lock.withLock { batchSizes } }

    func started(_ prompt: [Int]) { lock.withLock { startedPrompts.append(prompt) } }
    func stepped(_ size: Int) { lock.withLock { batchSizes.append(size) } }

    func generate(prompt: [Int], parameters: GenerationParameters,
                  onToken: (Int, TokenLogprobs?) -> Void, onText: (String) -> Bool) throws -> GenerationResult {
        started(prompt)
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

/// FakeModel's generations advanced together, a token each a step.
final class FakeBatch: ModelBatch {
    let model: FakeModel
    let slots: Int
    private var entries: [Int: Entry] = [:]
    private var lastId = 0

    final class Entry {
        let reply: [UInt8]
        let onToken: (Int, TokenLogprobs?) -> Void
        let onText: (String) -> Bool
        let topLogprobs: Int?
        var result = GenerationResult()

        init(reply: [UInt8], promptTokens: Int, topLogprobs: Int?, onToken: @escaping (Int, TokenLogprobs?) -> Void,
             onText: @escaping (String) -> Bool) {
            self.reply = reply
            self.topLogprobs = topLogprobs
            self.onToken = onToken
            self.onText = onText
            result.promptTokens = promptTokens
        }
    }

    init(model: FakeModel, slots: Int) {
        self.model = model
        self.slots = slots
    }

    func start(prompt: [Int], parameters: GenerationParameters, onToken: @escaping (Int, TokenLogprobs?) -> Void,
               onText: @escaping (String) -> Bool) throws -> Int {
        precondition(entries.count < slots, "the scheduler started more generations than the batch has slots")
        model.started(prompt)
        model.gate?.wait()
        lastId += 1
        let reply = Array(model.reply.utf8)
        entries[lastId] = Entry(reply: Array(reply.prefix(parameters.maxTokens)), promptTokens: prompt.count,
                                         topLogprobs: parameters.topLogprobs, onToken: onToken, onText: onText)
        entries[lastId]!.result.finishReason = parameters.maxTokens < reply.count ? .length : .stop
        return lastId
    }

    func step() throws -> [(id: Int, result: GenerationResult)] {
        model.stepped(entries.count)
        if model.tokenDelay > .zero { Thread.sleep(forTimeInterval: Double(model.tokenDelay.components.attoseconds) / 1e18) }
        var ended: [(id: Int, result: GenerationResult)] = []
        for (id, g) in entries.sorted(by: { $0.key < $1.key }) {
            if g.result.tokens.count < g.reply.count {
                let byte = g.reply[g.result.tokens.count], token = Int(byte)
                g.result.tokens.append(token)
                g.onToken(token, g.topLogprobs.map { TokenLogprobs(logits: [Float](repeating: 0, count: 256), token: token, top: $0) })
                g.result.text += String(UnicodeScalar(byte))
                if !g.onText(String(UnicodeScalar(byte))) { g.result.finishReason = .cancelled }
            }
            if g.result.tokens.count == g.reply.count || g.result.finishReason == .cancelled {
                entries[id] = nil
                ended.append((id, g.result))
            }
        }
        return ended
    }

    func stop(_ id: Int) -> GenerationResult {
        var result = entries.removeValue(forKey: id)!.result
        result.finishReason = .cancelled
        return result
    }
}
