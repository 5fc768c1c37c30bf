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

/// A second prompt that extends the first (the next turn of a chat) reuses the cached
/// prefix; the tokens must be exactly those of a fresh generator, also for sliding-window
/// models whose rings may or may not still hold the prefix.
@Test(arguments: ["llama", "mimo_v2_flash", "gpt_oss"])
func reusingTheCachedPrefixGivesTheSameTokensAsAFreshStart(_ name: String) throws {
    let model = try Model(path: Fixtures.path("models/\(name)"))
    let first = Array((0..<20).map { ($0 * 37 + 11) % 256 })
    let parameters = GenerationParameters(maxTokens: 12)
    let reused = Generator(executor: CPUExecutor(plan: model.plan, maxPositions: 256, maxStepTokens: 8))
    let firstResult = try reused.generate(prompt: first, parameters: parameters, decode: { _ in "" })
    // Same prefix, then the reply and a new turn; and one that diverges early.
    for second in [first + firstResult.tokens + [5, 6, 7], first + [9], Array(first.prefix(3)) + [1, 2, 3]] {
        let got = try reused.generate(prompt: second, parameters: parameters, decode: { _ in "" }).tokens
        let fresh = Generator(executor: CPUExecutor(plan: model.plan, maxPositions: 256, maxStepTokens: 8))
        #expect(got == (try fresh.generate(prompt: second, parameters: parameters, decode: { _ in "" }).tokens))
    }
}

// MARK: Log-probabilities

@Test func logprobsAreTheLogSoftmaxOfTheLogitsWithTheTopAlternativesInOrder() {
    let logits: [Float] = [1, 3, 2, 3, -1]
    let lp = TokenLogprobs(logits: logits, token: 2, top: 3)
    let logZ = log(logits.map { exp(Double($0)) }.reduce(0, +))
    #expect(abs(Double(lp.logprob) - (2 - logZ)) < 1e-5)
    // Ties go to the lower id.
    #expect(lp.top.map(\.token) == [1, 3, 2])
    #expect(abs(Double(lp.top[0].logprob) - (3 - logZ)) < 1e-5)
    #expect(TokenLogprobs(logits: logits, token: 0, top: 0).top.isEmpty)
}

/// OpenAI's logprobs come from the model's distribution at temperature 1, so the greedy and
/// the sampled generation of the same token report the same numbers, and the greedy token is
/// the most likely alternative.
@Test func generatedTokensReportLogprobsIndependentOfSampling() throws {
    func run(_ sampling: SamplingParameters) throws -> [TokenLogprobs] {
        var seen: [TokenLogprobs] = []
        _ = try generator().generate(prompt: prompt, parameters: GenerationParameters(maxTokens: 4, sampling: sampling, topLogprobs: 5),
                                     decode: { _ in "" }, onToken: { _, lp in seen.append(lp!) })
        return seen
    }
    let greedy = try run(SamplingParameters())
    #expect(greedy.count == 4)
    for lp in greedy {
        #expect(lp.top.count == 5)
        #expect(lp.top[0].token == lp.token)
        #expect(lp.logprob <= 0)
    }
    let sampled = try run(SamplingParameters(temperature: 0.3, topK: 1, seed: 1))
    #expect(sampled == greedy)
}

/// Serving lanes: generators over one plan share only its read-only weights, so generations
/// running at the same time on different threads give what each gives alone.
@Test(.timeLimit(.minutes(2)))
func generatorsOverOnePlanRunningAtOnceGiveWhatEachGivesAlone() async throws {
    let plan = try tinyLlama.get().plan
    let prompts = (0..<4).map { lane in (0..<12).map { ($0 * 31 + lane * 7 + 3) % 256 } }
    let parameters = GenerationParameters(maxTokens: 24)
    func run(_ prompt: [Int]) throws -> [Int] {
        try Generator(executor: CPUExecutor(plan: plan, maxPositions: 128)).generate(prompt: prompt, parameters: parameters, decode: { _ in "" }).tokens
    }
    let alone = try prompts.map(run)
    let together = try await withThrowingTaskGroup(of: (Int, [Int]).self) { group in
        for (i, prompt) in prompts.enumerated() {
            group.addTask { (i, try run(prompt)) }
        }
        var out = [[Int]](repeating: [], count: prompts.count)
        for try await (i, tokens) in group { out[i] = tokens }
        return out
    }
    #expect(together == alone)
    #expect(Set(alone).count > 1)
}
