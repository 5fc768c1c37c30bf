/// The greedy token of logit rows split by vocabulary over tensor-parallel shards
/// (Plan.vocabularySlice), without gathering the rows: each shard offers one candidate per row,
/// its slice's largest logit and that logit's token id; the shards exchange candidates and every
/// shard picks the same winner.
///
/// The exchange is an all-reduce (sum) of a table that is zero except for the shard's own
/// entries: x + 0 = x exactly, so the sum is a gather, and token ids below 2^24 are exact in f32.
/// The rules are Sampler.argmax's, so the pick is the whole row's argmax, bit for bit: a larger
/// value wins; on ties the lower token id (slices are contiguous and in rank order, so a later
/// rank must be strictly larger to win); NaN never wins; a row with nothing above -inf gives
/// token 0. Kernels/sampling.cu (`argmax_slice`, `argmax_pick`) does the same on the GPU.
public enum SlicedArgmax {
    /// Floats per (row, rank) entry of the exchanged table: value, token id, 0, 0 (one float4 on
    /// the GPU, so every table is a whole number of the all-reduce's float4s).
    public static let entryFloats = 4
    /// Token ids are carried as f32: exact below this.
    public static let maxVocabulary = 1 << 24

    /// The largest value of `slice` and its token id (`start` + its index), the first on ties,
    /// NaN skipped; (-inf, `start`) when nothing is above -inf.
    public static func candidate(_ slice: UnsafeBufferPointer<Float>, start: Int) -> (value: Float, token: Int) {
        var best = 0
        var bestValue = -Float.infinity
        for (i, v) in slice.enumerated() where v > bestValue { best = i; bestValue = v }
        return (bestValue, start + best)
    }

    /// The table rank `rank` of `ranks` contributes to the exchange: `[rows, ranks, entryFloats]`,
    /// its candidates in its own entries, zeros elsewhere.
    public static func table(_ candidates: [(value: Float, token: Int)], rank: Int, ranks: Int) -> [Float] {
        var table = [Float](repeating: 0, count: candidates.count * ranks * entryFloats)
        for (row, c) in candidates.enumerated() {
            table[(row * ranks + rank) * entryFloats] = c.value
            table[(row * ranks + rank) * entryFloats + 1] = Float(c.token)
        }
        return table
    }

    /// Each row's winner from the summed table (every rank's entries filled).
    public static func pick(_ table: [Float], ranks: Int) -> [Int] {
        let rows = table.count / (ranks * entryFloats)
        return (0..<rows).map { row in
            var best = (row * ranks) * entryFloats
            for r in 1..<max(ranks, 1) {
                let at = (row * ranks + r) * entryFloats
                if table[at] > table[best] { best = at }
            }
            return Int(table[best + 1])
        }
    }
}
