/// Decides which tokens of a verified block are emitted.
protocol AcceptanceRule {
    /// `draft`: the proposed tokens after the block's first one; `logits`: the target's rows
    /// for every block position (`[draft.count + 1, vocab]`). Returns the tokens to emit,
    /// 1 ... draft.count + 1 of them.
    func accept(draft: [Int], logits: [Float], vocab: Int, sampler: inout Sampler) -> [Int]
}

/// Samples the target at each position, in order, with the request's own sampler, and keeps
/// going while the sample equals the draft; the first sample that differs is emitted and ends
/// the block. Every emitted token is thus exactly what plain decoding would have drawn from
/// the same prefix with the same random number (the sampler draws once per emitted token, in
/// the same order), so the output keeps the target's distribution, and for a fixed seed is
/// the very same text. At temperature 0 the sampler is argmax: the longest prefix where the
/// draft equals the target's argmax, then the target's own token.
struct TargetSampling: AcceptanceRule {
    func accept(draft: [Int], logits: [Float], vocab: Int, sampler: inout Sampler) -> [Int] {
        var out: [Int] = []
        for i in 0...draft.count {
            let token = sampler.sample(Array(logits[(i * vocab)..<((i + 1) * vocab)]))
            out.append(token)
            if i == draft.count || token != draft[i] { break }
        }
        return out
    }
}
