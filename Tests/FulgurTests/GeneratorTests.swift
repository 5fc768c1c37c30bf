import Foundation
import Testing
@testable import Fulgur

// MARK: StopMatcher

/// Feeds `pieces` and returns what was emitted piece by piece, and whether a stop was hit.
private func emitted(_ pieces: [String], stops: [String]) -> (pieces: [String], stopped: Bool) {
    var matcher = StopMatcher(stops: stops)
    var out: [String] = []
    for piece in pieces {
        let (text, hit) = matcher.feed(piece)
        out.append(text)
        if hit { return (out, true) }
    }
    out.append(matcher.flush())
    return (out, false)
}

@Test func stopStringSplitAcrossPiecesIsNeverPartlyEmitted() {
    let r = emitted(["Hello wo", "rld<|e", "nd|> more"], stops: ["<|end|>"])
    #expect(r.stopped)
    #expect(r.pieces == ["Hello wo", "rld", ""])
    #expect(!r.pieces.joined().contains("<"))
}

@Test func textBeforeAStopInTheSamePieceIsEmitted() {
    let r = emitted(["one two", " three STOP four"], stops: ["STOP", "four"])
    #expect(r.stopped)
    #expect(r.pieces.joined() == "one two three ")
}

@Test func heldBackTextIsEmittedWhenItCannotBecomeAStop() {
    let r = emitted(["a<", "|x", "y"], stops: ["<|end|>"])
    #expect(!r.stopped)
    #expect(r.pieces == ["a", "<|x", "y", ""])
}

@Test func withoutStopsAllTextIsEmittedAtOnce() {
    let r = emitted(["a", "b<|e", "nd"], stops: [])
    #expect(!r.stopped)
    #expect(r.pieces == ["a", "b<|e", "nd", ""])
}

// MARK: Generator on the tiny llama

private let tinyLlama = Result { try Model(path: Fixtures.path("models/llama")) }
private let prompt = [1, 17, 42, 99, 3]

private func generator() throws -> Generator {
    Generator(executor: CPUExecutor(plan: try tinyLlama.get().plan))
}

/// Greedy continuation of `prompt` with no stops.
private func greedy(_ count: Int) throws -> [Int] {
    try generator().generate(prompt: prompt, parameters: GenerationParameters(maxTokens: count), decode: { _ in "" }).tokens
}

@Test func generationStopsAtMaxTokens() throws {
    let all = try greedy(8)
    #expect(all.count == 8)
    let r = try generator().generate(prompt: prompt, parameters: GenerationParameters(maxTokens: 5), decode: { "<\($0)>" })
    #expect(r.finishReason == .length)
    #expect(r.tokens == Array(all.prefix(5)))
    #expect(r.text == all.prefix(5).map { "<\($0)>" }.joined())
}

@Test func generationStopsOnAStopTokenWithoutEmittingIt() throws {
    let all = try greedy(8)
    let stopId = all[3]
    let before = Array(all.prefix { $0 != stopId })
    var streamed = ""
    let r = try generator().generate(
        prompt: prompt, parameters: GenerationParameters(maxTokens: 8, stopTokenIds: [stopId]),
        decode: { "<\($0)>" }, onText: { streamed += $0; return true })
    #expect(r.finishReason == .stop)
    #expect(r.tokens == before)
    #expect(!r.tokens.contains(stopId))
    #expect(r.text == before.map { "<\($0)>" }.joined())
    #expect(streamed == r.text)
}

@Test func generationStopsOnAStopStringSpanningTwoPieces() throws {
    // Pieces by step, whatever the ids: "brown" is split over the third and fourth.
    let pieces = ["The", " quick", " bro", "wn fox", " jumps", " over"]
    var step = 0
    var streamed: [String] = []
    let r = try generator().generate(
        prompt: prompt, parameters: GenerationParameters(maxTokens: pieces.count, stopStrings: ["brown"]),
        decode: { _ in defer { step += 1 }; return pieces[step] }, onText: { streamed.append($0); return true })
    #expect(r.finishReason == .stop)
    #expect(r.tokens.count == 4)
    #expect(r.text == "The quick ")
    #expect(streamed.joined() == "The quick ")
    #expect(!streamed.contains { $0.contains("b") })
}

@Test func onTextReturningFalseCancels() throws {
    var calls = 0
    let r = try generator().generate(
        prompt: prompt, parameters: GenerationParameters(maxTokens: 8),
        decode: { "<\($0)>" }, onText: { _ in calls += 1; return calls < 2 })
    #expect(r.finishReason == .cancelled)
    #expect(r.tokens.count == 2)
    #expect(calls == 2)
}

@Test func seededSamplingReproducesAGeneration() throws {
    let parameters = GenerationParameters(maxTokens: 12, sampling: SamplingParameters(temperature: 1, seed: 5))
    let a = try generator().generate(prompt: prompt, parameters: parameters, decode: { _ in "" })
    let b = try generator().generate(prompt: prompt, parameters: parameters, decode: { _ in "" })
    #expect(a.tokens == b.tokens)
}

@Test func generatorRejectsBadRequests() throws {
    expectError(["prompt is empty"]) { _ = try generator().generate(prompt: [], parameters: GenerationParameters(), decode: { _ in "" }) }
    expectError(["top-p"]) {
        _ = try generator().generate(prompt: prompt, parameters: GenerationParameters(sampling: SamplingParameters(topP: 0)),
                                     decode: { _ in "" })
    }
}
