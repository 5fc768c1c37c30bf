/// What the target said about a verified block: its logits at every position, or, when
/// nothing needs them, only its greedy choice after each position (the GPU then sends back
/// B ids instead of B x vocab floats).
enum TargetOutput {
    case logits([Float], vocab: Int)
    case greedy([Int])

    /// The target's token after block position `i`: drawn by `sampler` from its logits, or its
    /// greedy choice (greedy output is asked for only at temperature 0, where the sampler is
    /// argmax and draws no random number).
    func token(at i: Int, sampler: inout Sampler) -> Int {
        switch self {
        case .logits(let logits, let vocab): return sampler.sample(Array(logits[(i * vocab)..<((i + 1) * vocab)]))
        case .greedy(let ids): return ids[i]
        }
    }

    /// The logits at block position `i`; nil for greedy output.
    func row(_ i: Int) -> [Float]? {
        guard case .logits(let logits, let vocab) = self else { return nil }
        return Array(logits[(i * vocab)..<((i + 1) * vocab)])
    }
}

/// Decides which tokens of a verified block are emitted.
protocol AcceptanceRule {
    /// Whether `accept` reads the target's logits under `sampling`; when not, verify asks the
    /// executor for its greedy choices alone (`Executor.argmax`).
    func needsLogits(_ sampling: SamplingParameters) -> Bool
    /// `draft`: the proposed tokens after the block's first one; `target`: the target's output
    /// for every block position (`draft.count + 1` of them). Returns the tokens to emit,
    /// 1 ... draft.count + 1 of them.
    func accept(draft: [Int], target: TargetOutput, sampler: inout Sampler) -> [Int]
}

/// Samples the target at each position, in order, with the request's own sampler, and keeps
/// going while the sample equals the draft; the first sample that differs is emitted and ends
/// the block. Every emitted token is thus exactly what plain decoding would have drawn from
/// the same prefix with the same random number (the sampler draws once per emitted token, in
/// the same order), so the output keeps the target's distribution, and for a fixed seed is
/// the very same text. At temperature 0 the sampler is argmax: the longest prefix where the
/// draft equals the target's argmax, then the target's own token.
struct TargetSampling: AcceptanceRule {
    func needsLogits(_ sampling: SamplingParameters) -> Bool { sampling.temperature > 0 }

    func accept(draft: [Int], target: TargetOutput, sampler: inout Sampler) -> [Int] {
        var out: [Int] = []
        for i in 0...draft.count {
            let token = target.token(at: i, sampler: &sampler)
            out.append(token)
            if i == draft.count || token != draft[i] { break }
        }
        return out
    }
}
