/// Keys and values of every layer, f32. A full-attention layer keeps every position; a
/// sliding-window layer keeps a ring of `window + slack` positions, where the slack covers
/// the tokens of one step (a prefill chunk or a verify block): the step's own keys are written
/// before its queries attend, and must not overwrite keys those queries still need.
public final class KVCache {
    public struct Layer {
        public let capacity: Int
        public let kvHeads: Int
        public let keyDim: Int
        public let valueDim: Int
        var keys: [Float]
        var values: [Float]

        @inline(__always) func slot(_ position: Int) -> Int { position % capacity }
    }

    public private(set) var layers: [Layer]
    /// Positions held so far (the next token's position).
    public internal(set) var length = 0
    public let maxPositions: Int

    public init(spec: ModelSpec, maxPositions: Int, maxStepTokens: Int) {
        self.maxPositions = maxPositions
        layers = spec.layers.map { l in
            let a = l.attention
            let cap = a.window.map { min($0 + maxStepTokens, maxPositions) } ?? maxPositions
            return Layer(capacity: cap, kvHeads: a.kvHeads, keyDim: a.headDim, valueDim: a.valueHeadDim,
                         keys: [Float](repeating: 0, count: cap * a.kvHeads * a.headDim),
                         values: [Float](repeating: 0, count: cap * a.kvHeads * a.valueHeadDim))
        }
    }

    public func reset() { length = 0 }

    /// Forget positions at and after `position` (speculative rollback, or a new request that
    /// shares a prefix).
    public func truncate(to position: Int) {
        precondition(position <= length)
        length = position
    }

    public var bytes: Int { layers.reduce(0) { $0 + 4 * ($1.keys.count + $1.values.count) } }

    func withLayer<R>(_ i: Int, _ body: (inout Layer) -> R) -> R { body(&layers[i]) }
}
