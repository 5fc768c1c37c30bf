import Foundation
import Testing
@testable import Fulgur

/// BatchGenerator on the default model (Q4_1, so the kernel choice matters): each generation,
/// with its own sampling settings, stop strings and log-probabilities, equals the same
/// generation run alone by a Generator whose steps are as long as the batch's prefill chunk;
/// more generations than slots wait for a slot; a removed one frees its slot.
@Suite(.serialized) struct BatchGeneratorTests {
    struct Request {
        let text: String
        let parameters: GenerationParameters
    }

    static let requests: [Request] = [
        Request(text: "The capital of France is", parameters: GenerationParameters(maxTokens: 12)),
        Request(text: "Once upon a time, in a land far away, there lived a dragon who loved to count: one, two, three,",
                parameters: GenerationParameters(maxTokens: 10, topLogprobs: 3)),
        Request(text: "def fibonacci(n):", parameters: GenerationParameters(maxTokens: 16, sampling: SamplingParameters(temperature: 0.9, topP: 0.9, seed: 7))),
        Request(text: "1, 2, 3, 4,", parameters: GenerationParameters(maxTokens: 20, stopStrings: [" 9"])),
        Request(text: "Hi", parameters: GenerationParameters(maxTokens: 5, sampling: SamplingParameters(temperature: 1.2, topK: 20, minP: 0.05, seed: 3))),
    ]

    struct Streamed: Equatable {
        var tokens: [Int] = []
        var logprobs: [TokenLogprobs] = []
        var text = ""
        var finish: FinishReason?
        var resultText = ""
    }

    static func engine() throws -> Engine {
        let path = DefaultModel.path
        guard FileManager.default.fileExists(atPath: path) else {
            throw FulgurError(.io, "default model not found at \(path): run `swift run fulgur pull` (or set FULGUR_DEFAULT_MODEL)")
        }
        return try Engine(modelPath: path, contextLength: 256)
    }

    @Test func everyGenerationEqualsItselfAlone() throws {
        let engine = try Self.engine()
        let chunk = 8
        var alone: [Streamed] = []
        for r in Self.requests {
            var s = Streamed()
            let generator = Generator(executor: CPUExecutor(plan: engine.model.plan, maxPositions: engine.contextLength, maxStepTokens: chunk))
            let result = try engine.generate(prompt: engine.tokenizer.encode(r.text, addSpecialTokens: true), parameters: r.parameters, on: generator,
                                             onToken: { s.tokens.append($0); if let lp = $1 { s.logprobs.append(lp) } },
                                             onText: { s.text += $0; return true })
            s.finish = result.finishReason
            s.resultText = result.text
            alone.append(s)
        }
        #expect(Set(alone.map(\.text)).count == alone.count)

        // Three slots for five generations: the last two start as the first ones end.
        let batch = try engine.makeBatchGenerator(slots: 3, prefillChunk: chunk)
        var streamed = [Streamed](repeating: Streamed(), count: Self.requests.count)
        var generations: [Generation] = []
        for (i, r) in Self.requests.enumerated() {
            generations.append(try engine.generation(
                prompt: engine.tokenizer.encode(r.text, addSpecialTokens: true), parameters: r.parameters,
                onToken: { streamed[i].tokens.append($0); if let lp = $1 { streamed[i].logprobs.append(lp) } },
                onText: { streamed[i].text += $0; return true }))
        }
        var waiting = generations, steps = 0
        while batch.count > 0 || !waiting.isEmpty {
            while batch.count < batch.slots, !waiting.isEmpty { try batch.add(waiting.removeFirst()) }
            for g in try batch.step() {
                let i = generations.firstIndex { $0 === g }!
                let result = g.finish()
                streamed[i].finish = result.finishReason
                streamed[i].resultText = result.text
            }
            steps += 1
        }
        for i in Self.requests.indices { #expect(streamed[i] == alone[i], "request \(i): \(Self.requests[i].text)") }
        #expect(steps < alone.reduce(0) { $0 + $1.tokens.count })
    }

    @Test func aRemovedGenerationFreesItsSlotAndEndsCancelled() throws {
        let engine = try Self.engine()
        let batch = try engine.makeBatchGenerator(slots: 1, prefillChunk: 16)
        let prompt = engine.tokenizer.encode("1, 2, 3,", addSpecialTokens: true)
        let first = try engine.generation(prompt: prompt, parameters: GenerationParameters(maxTokens: 50), onToken: { _, _ in }, onText: { _ in true })
        try batch.add(first)
        let second = try engine.generation(prompt: prompt, parameters: GenerationParameters(maxTokens: 3), onToken: { _, _ in }, onText: { _ in true })
        expectError(["all 1 slots of the batch are taken"]) { try batch.add(second) }
        for _ in 0..<3 { #expect(try batch.step().isEmpty) }
        batch.remove(first)
        #expect(batch.count == 0)
        let cancelled = first.finish()
        #expect(cancelled.finishReason == .cancelled && cancelled.tokens.count == 3)
        try batch.add(second)
        var ended: [Generation] = []
        while ended.isEmpty { ended = try batch.step() }
        #expect(ended.count == 1 && ended[0] === second)
        // The second reused the first's cache, and starts from its own prompt.
        #expect(second.finish().tokens == Array(cancelled.tokens.prefix(3)))
    }
}
