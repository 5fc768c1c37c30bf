import Foundation

public struct GenerationParameters: Sendable {
    public var maxTokens: Int = 256
    public var sampling = SamplingParameters()
    /// Generation ends when the text contains one of these; the stop string is not emitted.
    public var stopStrings: [String] = []
    /// Generation ends on these ids (the model's EOS ids by default); they are not emitted.
    public var stopTokenIds: Set<Int> = []
    /// When set, every generated token comes with its log-probability and this many most
    /// likely alternatives (see `TokenLogprobs`).
    public var topLogprobs: Int? = nil

    public init(maxTokens: Int = 256, sampling: SamplingParameters = SamplingParameters(),
                stopStrings: [String] = [], stopTokenIds: Set<Int> = [], topLogprobs: Int? = nil) {
        self.maxTokens = maxTokens
        self.sampling = sampling
        self.stopStrings = stopStrings
        self.stopTokenIds = stopTokenIds
        self.topLogprobs = topLogprobs
    }
}

/// Log-probabilities of one generated token, as OpenAI's API reports them: from the model's
/// own distribution, log-softmax of the logits at temperature 1 over the whole vocabulary,
/// before temperature, top-k, top-p and min-p. So they do not depend on the sampling settings,
/// a greedy token has a finite log-probability, and an alternative the filters removed still
/// shows how likely the model found it.
public struct TokenLogprobs: Sendable, Equatable {
    public var token: Int
    public var logprob: Float
    /// The most likely tokens, most likely first (ties by lower id).
    public var top: [Alternative]

    public struct Alternative: Sendable, Equatable {
        public var token: Int
        public var logprob: Float

        public init(token: Int, logprob: Float) {
            self.token = token
            self.logprob = logprob
        }
    }

    /// The log-probabilities of `token` and the `top` most likely ids under `logits`.
    public init(logits: [Float], token: Int, top: Int) {
        let maxLogit = logits.max() ?? 0
        var sum = 0.0
        for l in logits { sum += exp(Double(l - maxLogit)) }
        let logZ = Double(maxLogit) + log(sum)
        self.token = token
        logprob = Float(Double(logits[token]) - logZ)
        // A sorted buffer of at most `top` entries (OpenAI allows 20), holding raw logits
        // until logZ is known to be subtracted.
        var best: [Alternative] = []
        best.reserveCapacity(top + 1)
        if top > 0 {
            for (id, l) in logits.enumerated() {
                if best.count == top, let last = best.last, l <= last.logprob { continue }
                let at = best.firstIndex { l > $0.logprob } ?? best.count
                best.insert(Alternative(token: id, logprob: l), at: at)
                if best.count > top { best.removeLast() }
            }
        }
        self.top = best.map { Alternative(token: $0.token, logprob: Float(Double($0.logprob) - logZ)) }
    }
}

public enum FinishReason: String, Sendable { case stop, length, cancelled }

public struct GenerationResult: Sendable {
    public var tokens: [Int] = []
    public var text = ""
    public var finishReason: FinishReason = .length
    public var promptTokens = 0
    /// Seconds from the start to the first generated token (prefill included).
    public var timeToFirstToken: Double = 0
    /// Seconds spent after the first token.
    public var decodeSeconds: Double = 0
    /// Acceptance and timing of speculative decoding, when it ran.
    public var speculative: SpeculativeStats? = nil

    /// Tokens per second after the first one.
    public var decodeTokensPerSecond: Double {
        tokens.count > 1 && decodeSeconds > 0 ? Double(tokens.count - 1) / decodeSeconds : 0
    }
}

/// Holds back the end of the text that could still grow into a stop string, so that a stop
/// string split across tokens is never partly emitted.
struct StopMatcher {
    let stops: [String]
    var pending = ""

    /// Feeds new text; returns (text safe to emit, whether a stop string was hit).
    mutating func feed(_ text: String) -> (String, Bool) {
        pending += text
        guard !stops.isEmpty else { defer { pending = "" }; return (pending, false) }
        if let hit = stops.compactMap({ pending.range(of: $0) }).min(by: { $0.lowerBound < $1.lowerBound }) {
            let out = String(pending[..<hit.lowerBound])
            pending = ""
            return (out, true)
        }
        // Keep the longest suffix of `pending` that is a proper prefix of some stop string.
        var keep = 0
        for s in stops {
            for n in stride(from: min(s.count - 1, pending.count), through: 1, by: -1) where n > keep {
                if pending.hasSuffix(s.prefix(n)) { keep = n; break }
            }
        }
        let cut = pending.index(pending.endIndex, offsetBy: -keep)
        let out = String(pending[..<cut])
        pending = String(pending[cut...])
        return (out, false)
    }

    mutating func flush() -> String { defer { pending = "" }; return pending }
}

/// The end of every decode loop: takes sampled tokens one at a time, stops on a stop id, a
/// stop string or the token limit, streams the text, and keeps the timing.
struct TokenSink {
    private(set) var result = GenerationResult()
    private var stop: StopMatcher
    private let stopIds: Set<Int>
    let limit: Int
    private let decode: (Int) -> String
    private let onToken: (Int, TokenLogprobs?) -> Void
    private let topLogprobs: Int?
    private let onText: (String) -> Bool
    private let start = DispatchTime.now().uptimeNanoseconds
    private var firstTokenAt: UInt64 = 0

    init(parameters: GenerationParameters, promptTokens: Int, limit: Int, decode: @escaping (Int) -> String,
         onToken: @escaping (Int, TokenLogprobs?) -> Void = { _, _ in }, onText: @escaping (String) -> Bool) {
        result.promptTokens = promptTokens
        stop = StopMatcher(stops: parameters.stopStrings.filter { !$0.isEmpty })
        stopIds = parameters.stopTokenIds
        self.limit = limit
        self.decode = decode
        self.onToken = onToken
        topLogprobs = parameters.topLogprobs
        self.onText = onText
        firstTokenAt = start
    }

    /// Whether another token may come.
    var open: Bool { result.tokens.count < limit }

    /// Takes the next token, sampled from `logits` (needed for log-probabilities); returns
    /// false when generation is over.
    mutating func take(_ token: Int, logits: [Float]? = nil) -> Bool {
        if result.tokens.isEmpty { firstTokenAt = DispatchTime.now().uptimeNanoseconds }
        if stopIds.contains(token) { result.finishReason = .stop; return false }
        result.tokens.append(token)
        let logprobs = topLogprobs.flatMap { top in logits.map { TokenLogprobs(logits: $0, token: token, top: top) } }
        onToken(token, logprobs)
        let (text, hit) = stop.feed(decode(token))
        result.text += text
        if !text.isEmpty && !onText(text) { result.finishReason = .cancelled; return false }
        if hit { result.finishReason = .stop; return false }
        return open
    }

    /// Ends the generation before its end, as a client that left does.
    mutating func cancel() { result.finishReason = .cancelled }

    mutating func finish() -> GenerationResult {
        if result.finishReason != .stop {
            let rest = stop.flush()
            result.text += rest
            if !rest.isEmpty { _ = onText(rest) }
        }
        let end = DispatchTime.now().uptimeNanoseconds
        result.timeToFirstToken = Double(firstTokenAt - start) / 1e9
        result.decodeSeconds = Double(end - firstTokenAt) / 1e9
        return result
    }
}

/// Checks a request before any forward pass; returns the token limit it leaves.
func tokenLimit(prompt: [Int], parameters: GenerationParameters, maxPositions: Int) throws -> Int {
    guard !prompt.isEmpty else { throw FulgurError(.usage, "the prompt is empty") }
    guard parameters.maxTokens >= 0 else { throw FulgurError(.usage, "max tokens must be >= 0") }
    if let top = parameters.topLogprobs, top < 0 { throw FulgurError(.usage, "top logprobs must be >= 0, got \(top)") }
    try parameters.sampling.validate()
    let room = maxPositions - prompt.count
    guard room > 0 else {
        throw FulgurError(.usage, "the prompt has \(prompt.count) tokens; the context holds \(maxPositions)")
    }
    return min(parameters.maxTokens, room)
}

extension GenerationResult {
    /// Adds the text a streaming detokenizer still held at the end, unless a stop string
    /// ended the text.
    mutating func appendTail(_ tail: String, onText: (String) -> Bool) {
        guard !tail.isEmpty, finishReason != .stop else { return }
        text += tail
        _ = onText(tail)
    }
}

/// One generation between forward passes: samples the next token from the logits after the
/// last one with its own sampler, streams it, and stops on EOS, a stop string or the token
/// limit. `Generator.generate` drives one on its executor; `BatchGenerator` drives many, one
/// batched forward pass at a time.
public final class Generation {
    public let prompt: [Int]
    private var sink: TokenSink
    private var sampler: Sampler
    private let tail: () -> String
    private let onText: (String) -> Bool

    /// Throws when the request cannot run: an empty prompt, bad parameters, or no room left
    /// after the prompt in `maxPositions`. `decode` turns one id into the text it completes (a
    /// streaming detokenizer) and `tail` returns what it still holds at the end; `onToken` and
    /// `onText` are as in `Generator.generate`.
    public init(prompt: [Int], parameters: GenerationParameters, maxPositions: Int, decode: @escaping (Int) -> String,
                tail: @escaping () -> String = { "" }, onToken: @escaping (Int, TokenLogprobs?) -> Void = { _, _ in },
                onText: @escaping (String) -> Bool = { _ in true }) throws {
        let limit = try tokenLimit(prompt: prompt, parameters: parameters, maxPositions: maxPositions)
        self.prompt = prompt
        sink = TokenSink(parameters: parameters, promptTokens: prompt.count, limit: limit, decode: decode, onToken: onToken, onText: onText)
        sampler = Sampler(parameters.sampling)
        self.tail = tail
        self.onText = onText
    }

    /// Takes the logits after the last token run; returns the next token to run, or nil when
    /// the generation is over.
    public func next(after logits: [Float]) -> Int? {
        guard sink.open else { return nil }
        let token = sampler.sample(logits)
        return sink.take(token, logits: logits) ? token : nil
    }

    /// Ends the generation where it is, with finish reason `cancelled`.
    public func cancel() { sink.cancel() }

    public func finish() -> GenerationResult {
        var result = sink.finish()
        result.appendTail(tail(), onText: onText)
        return result
    }
}

/// Prefill, then the decode loop: sample, stream text, stop on EOS, a stop string or the
/// token limit.
public final class Generator {
    public let executor: any Executor
    /// The tokens whose keys and values the cache holds, so that a prompt extending them (the
    /// next turn of a chat) prefills only what is new.
    private var cachedTokens: [Int] = []

    public init(executor: any Executor) {
        self.executor = executor
    }

    /// Generates after `prompt` (reusing the cached prefix). `decode` turns one id into the
    /// text it completes (a streaming detokenizer); `onToken` sees each generated id (with its
    /// log-probabilities when `parameters.topLogprobs` is set) before its text; `onText`
    /// receives text as it becomes final and returns false to cancel.
    public func generate(prompt: [Int], parameters: GenerationParameters, decode: (Int) -> String,
                         onToken: (Int, TokenLogprobs?) -> Void = { _, _ in },
                         onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        try withoutActuallyEscaping(decode) { decode in
          try withoutActuallyEscaping(onToken) { onToken in
            try withoutActuallyEscaping(onText) { onText in
                let generation = try Generation(prompt: prompt, parameters: parameters, maxPositions: executor.maxPositions,
                                                decode: decode, onToken: onToken, onText: onText)
                // Reuse the cached prefix; at least the last prompt token is run again for its logits.
                var reuse = zip(cachedTokens, prompt).prefix { $0 == $1 }.count
                reuse = min(reuse, prompt.count - 1, executor.length)
                if executor.canTruncate(to: reuse) { executor.truncate(to: reuse) } else { executor.reset(); reuse = 0 }
                cachedTokens = Array(prompt[..<reuse])
                var logits = try executor.forward(Array(prompt[reuse...]), logits: .last)
                cachedTokens = prompt
                while let token = generation.next(after: logits) {
                    logits = try executor.forward([token], logits: .last)
                    cachedTokens.append(token)
                }
                return generation.finish()
            }
          }
        }
    }
}
