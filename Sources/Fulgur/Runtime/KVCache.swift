import Foundation

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
        let keys: UnsafeMutablePointer<Float>
        let values: UnsafeMutablePointer<Float>

        /// A layer over `[capacity, kvHeads, dim]` keys and values the caller owns and keeps
        /// alive (KVCache's own, or a GPU check's reference copy of a device cache).
        public init(capacity: Int, kvHeads: Int, keyDim: Int, valueDim: Int, keys: UnsafeMutablePointer<Float>, values: UnsafeMutablePointer<Float>) {
            self.capacity = capacity
            self.kvHeads = kvHeads
            self.keyDim = keyDim
            self.valueDim = valueDim
            self.keys = keys
            self.values = values
        }

        @inline(__always) func slot(_ position: Int) -> Int { position % capacity }
        @inline(__always) func key(_ position: Int) -> UnsafeMutablePointer<Float> { keys + slot(position) * kvHeads * keyDim }
        @inline(__always) func value(_ position: Int) -> UnsafeMutablePointer<Float> { values + slot(position) * kvHeads * valueDim }
    }

    public let layers: [Layer]
    /// Windows of the sliding layers (nil for full layers), to know how far a ring can rewind.
    let windows: [Int?]
    /// Positions held so far (the next token's position).
    public internal(set) var length = 0
    public let maxPositions: Int
    /// The most tokens one step may bring: a sliding-window ring's slack.
    public let maxStepTokens: Int

    public init(spec: ModelSpec, maxPositions: Int, maxStepTokens: Int) {
        self.maxPositions = maxPositions
        self.maxStepTokens = maxStepTokens
        windows = spec.layers.map { $0.attention.window }
        layers = spec.layers.map { l in
            let a = l.attention
            let cap = Self.capacity(a, maxPositions: maxPositions, maxStepTokens: maxStepTokens)
            // calloc: zeroed pages the kernel maps on first write, so a cache costs memory
            // only as far as its sequences have reached (a server holds one per lane).
            let keys = calloc(cap * a.kvHeads * a.headDim, 4)!.assumingMemoryBound(to: Float.self)
            let values = calloc(cap * a.kvHeads * a.valueHeadDim, 4)!.assumingMemoryBound(to: Float.self)
            return Layer(capacity: cap, kvHeads: a.kvHeads, keyDim: a.headDim, valueDim: a.valueHeadDim, keys: keys, values: values)
        }
    }

    deinit {
        for l in layers { free(l.keys); free(l.values) }
    }

    static func capacity(_ a: AttentionSpec, maxPositions: Int, maxStepTokens: Int) -> Int {
        a.window.map { min($0 + maxStepTokens, maxPositions) } ?? maxPositions
    }

    /// Bytes a cache of this shape takes.
    public static func bytes(spec: ModelSpec, maxPositions: Int, maxStepTokens: Int) -> Int {
        spec.layers.reduce(0) { total, l in
            let a = l.attention
            return total + 4 * capacity(a, maxPositions: maxPositions, maxStepTokens: maxStepTokens) * a.kvHeads * (a.headDim + a.valueHeadDim)
        }
    }

    public func reset() { length = 0 }

    /// Whether positions before `position` are all still held, so the cache can rewind to it:
    /// a ring keeps its window only while the positions written since `position` fit in its
    /// slack (`capacity - window`).
    public func canTruncate(to position: Int) -> Bool {
        guard position >= 0, position <= length else { return false }
        for (layer, window) in zip(layers, windows) {
            if let window, layer.capacity < maxPositions, length - position > layer.capacity - window { return false }
        }
        return true
    }

    /// Forget positions at and after `position` (speculative rollback, or a new request that
    /// shares a prefix). The caller checks `canTruncate(to:)` first.
    public func truncate(to position: Int) {
        precondition(canTruncate(to: position), "KV cache cannot rewind from \(length) to \(position)")
        length = position
    }
}
