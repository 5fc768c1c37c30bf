import Foundation

/// DFlash decoding: prefill, then rounds of draft a block (the last token, then the drafter's
/// guesses) -> verify it with one target forward -> emit the accepted tokens -> roll the
/// target's cache back to them and give the drafter their hidden states. Output is the plain
/// Generator's, token for token (see `TargetSampling`).
public final class SpeculativeGenerator {
    public let target: any Executor
    public let drafter: Drafter
    public let blockSize: Int
    let rule: AcceptanceRule

    /// `blockSize` in 2...16, at most the target's `maxStepTokens` (a verify block must run
    /// as one step, and sliding-window rings keep that much slack for rejected tokens).
    public convenience init(target: any Executor, drafter: Drafter, blockSize: Int = 8) throws {
        try self.init(target: target, drafter: drafter, blockSize: blockSize, rule: TargetSampling())
    }

    init(target: any Executor, drafter: Drafter, blockSize: Int, rule: AcceptanceRule) throws {
        guard (2...16).contains(blockSize) else { throw FulgurError(.usage, "block size must be in 2...16, got \(blockSize)") }
        guard blockSize <= target.maxStepTokens else {
            throw FulgurError(.usage, "block size \(blockSize) exceeds the executor's \(target.maxStepTokens)-token steps")
        }
        self.target = target
        self.drafter = drafter
        self.blockSize = blockSize
        self.rule = rule
        target.captureLayers = drafter.targetLayerIds
    }

    /// Same contract as `Generator.generate`; the result carries `speculative` stats.
    public func generate(prompt: [Int], parameters: GenerationParameters, decode: (Int) -> String,
                         onToken: (Int, TokenLogprobs?) -> Void = { _, _ in },
                         onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        let limit = try tokenLimit(prompt: prompt, parameters: parameters, maxPositions: target.maxPositions)
        return try withoutActuallyEscaping(decode) { decode in
          try withoutActuallyEscaping(onToken) { onToken in
            try withoutActuallyEscaping(onText) { onText in
                var sink = TokenSink(parameters: parameters, promptTokens: prompt.count, limit: limit, decode: decode,
                                     onToken: onToken, onText: onText)
                // Log-probabilities come from the target's logits at the emitting position, as
                // in plain decoding; a verify without them and without sampling needs only the
                // target's greedy choices, which the GPU sends back instead of [B, vocab] logits.
                let wantLogits = parameters.topLogprobs != nil
                let vocab = target.vocabSize
                var stats = SpeculativeStats(blockSize: blockSize)
                var sampler = Sampler(parameters.sampling)
                target.reset()
                drafter.reset()
                let logits = try target.forward(prompt, logits: .last)
                try drafter.extend(tokens: prompt, capturedBy: target)
                var token = sampler.sample(logits)
                var going = sink.open && sink.take(token, logits: wantLogits ? logits : nil)
                while going {
                    // The block is `token` (already emitted, not yet in the target's cache) and
                    // the guesses after it; it emits at most its size, so it never passes the limit.
                    let start = target.length
                    let size = min(blockSize, sink.limit - sink.result.tokens.count)
                    let t0 = DispatchTime.now().uptimeNanoseconds
                    let draft = size > 1 ? try drafter.propose(after: token, count: size - 1) : []
                    let t1 = DispatchTime.now().uptimeNanoseconds
                    let output: TargetOutput = wantLogits || rule.needsLogits(parameters.sampling)
                        ? .logits(try target.forward([token] + draft, logits: .all), vocab: vocab)
                        : .greedy(try target.argmax([token] + draft))
                    let emitted = rule.accept(draft: draft, target: output, sampler: &sampler)
                    let t2 = DispatchTime.now().uptimeNanoseconds
                    stats.acceptanceLengths.append(emitted.count)
                    // Keep the block tokens that led to accepted ones: `token` and the matching guesses.
                    let kept = emitted.count
                    target.truncate(to: start + kept)
                    try drafter.extend(tokens: [token] + draft.prefix(kept - 1), capturedBy: target)
                    for (i, t) in emitted.enumerated() {
                        going = sink.take(t, logits: wantLogits ? output.row(i) : nil)
                        if !going { break }
                    }
                    token = emitted.last!
                    let t3 = DispatchTime.now().uptimeNanoseconds
                    stats.draftSeconds += Double(t1 - t0) / 1e9
                    stats.verifySeconds += Double(t2 - t1) / 1e9
                    stats.otherSeconds += Double(t3 - t2) / 1e9
                }
                var result = sink.finish()
                result.speculative = stats
                return result
            }
          }
        }
    }
}
