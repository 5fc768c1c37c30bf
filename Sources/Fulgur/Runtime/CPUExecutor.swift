import Foundation

/// Runs a plan on the CPU in f32, reading weights in their stored types. It is the
/// correctness oracle of every other executor and runs the small default model.
public final class CPUExecutor {
    public let plan: Plan
    public let maxStepTokens: Int
    public let cache: KVCache
    /// Activation buffers, `maxStepTokens` rows of each buffer's widest use.
    private let buffers: [UnsafeMutablePointer<Float>]
    /// The step being run: each row's position, and the sequences its rows belong to.
    private var positions: [Int] = []
    private var parts: [(cache: KVCache, rows: Range<Int>)] = []
    private var rows = StepRows(segments: [])

    /// Layers whose output hidden states each forward returns in `capturedFeatures`.
    public var captureLayers: [Int] = [] {
        didSet {
            captureSlot = Array(repeating: nil, count: plan.spec.layerCount)
            for (slot, layer) in captureLayers.enumerated() { captureSlot[layer] = slot }
            stepFeatures = [Float](repeating: 0, count: maxStepTokens * captureLayers.count * plan.spec.hiddenSize)
        }
    }
    /// `[T, captureLayers.count * hidden]`: for every token of the last `forward`, the hidden
    /// states after each capture layer, side by side in `captureLayers` order.
    public private(set) var capturedFeatures: [Float] = []
    private var captureSlot: [Int?] = []
    private var stepFeatures: [Float] = []
    /// Sums `count` floats at the pointer over every shard of a tensor-parallel group, in
    /// place (CPUTensorParallel sets it); plans with `.allReduce` ops need it.
    public var allReduce: ((UnsafeMutablePointer<Float>, Int) -> Void)?

    /// `cache`: a cache to share with another plan over the same layers (the DFlash drafter
    /// writes its context keys with one plan and drafts with another).
    public init(plan: Plan, maxPositions: Int? = nil, maxStepTokens: Int = 64, cache: KVCache? = nil) {
        self.plan = plan
        self.maxStepTokens = maxStepTokens
        let ctx = min(maxPositions ?? plan.spec.maxPositions, plan.spec.maxPositions)
        self.cache = cache ?? KVCache(spec: plan.spec, maxPositions: ctx, maxStepTokens: maxStepTokens)
        captureSlot = Array(repeating: nil, count: plan.spec.layerCount)
        buffers = Buffer.allCases.map {
            let n = maxStepTokens * max(plan.widths[$0] ?? 0, 1)
            let p = UnsafeMutablePointer<Float>.allocate(capacity: n)
            p.initialize(repeating: 0, count: n)
            return p
        }
    }

    deinit { buffers.forEach { $0.deallocate() } }

    public var vocabSize: Int { plan.lmHead.outFeatures }

    public enum Logits { case last, all, none }

    /// Runs `tokens` at the next positions of the cache and returns logits (`[T, vocab]` for
    /// `.all`, `[vocab]` for `.last`). Longer inputs are split into chunks of `maxStepTokens`.
    public func forward(_ tokens: [Int], logits: Logits = .last) throws -> [Float] {
        for t in tokens where t < 0 || t >= plan.embedding.table.shape[0] {
            throw FulgurError(.usage, "token id \(t) is outside the vocabulary (0..<\(plan.embedding.table.shape[0]))")
        }
        return try run(count: tokens.count, logits: logits) { range in
            step(Array(tokens[range]))
        }
    }

    /// Runs a plan that starts from given rows of x (`[T, plan.widths[.x]]`) instead of
    /// token embeddings: the DFlash drafter's context features.
    public func forward(rows: [Float], logits: Logits = .none) throws -> [Float] {
        let width = plan.widths[.x]!
        precondition(rows.count % width == 0, "rows of \(rows.count) floats do not split into rows of \(width)")
        return try run(count: rows.count / width, logits: logits) { range in
            rows.withUnsafeBufferPointer { ptr(.x).update(from: $0.baseAddress! + range.lowerBound * width, count: range.count * width) }
            step(Array(repeating: 0, count: range.count))
        }
    }

    private func run(count: Int, logits: Logits, step: (Range<Int>) -> Void) throws -> [Float] {
        capturedFeatures.removeAll(keepingCapacity: true)
        guard count > 0 else { return [] }
        guard cache.length + count <= cache.maxPositions else {
            throw FulgurError(.usage, "context is full: \(cache.length) + \(count) tokens exceed the \(cache.maxPositions)-position context")
        }
        var result: [Float] = []
        var start = 0
        while start < count {
            let range = start..<min(start + maxStepTokens, count)
            start = range.upperBound
            step(range)
            if !captureLayers.isEmpty {
                capturedFeatures += stepFeatures[0..<(range.count * captureLayers.count * plan.spec.hiddenSize)]
            }
            switch logits {
            case .all: result += lmHead(rows: 0..<range.count)
            case .last where start == count: result = lmHead(rows: (range.count - 1)..<range.count)
            default: break
            }
        }
        return result
    }

    private func lmHead(rows: Range<Int>) -> [Float] {
        let hidden = plan.spec.hiddenSize, vocab = plan.lmHead.outFeatures
        var out = [Float](repeating: 0, count: rows.count * vocab)
        out.withUnsafeMutableBufferPointer { o in
            plan.lmHead.apply(buffers[Buffer.h.rawValue] + rows.lowerBound * hidden, tokens: rows.count, into: o.baseAddress!)
        }
        return out
    }

    private func step(_ tokens: [Int]) {
        step(tokens, parts: [(cache, tokens.count)])
    }

    /// Runs the plan once over the rows of `parts`, in order, each sequence at the next
    /// positions of its own cache.
    private func step(_ tokens: [Int], parts counts: [(cache: KVCache, count: Int)]) {
        var start = 0
        parts = counts.map { part in
            defer { start += part.count }
            return (part.cache, start..<(start + part.count))
        }
        positions = parts.flatMap { part in part.rows.map { part.cache.length + $0 - part.rows.lowerBound } }
        rows = StepRows(segments: parts.map(\.rows))
        for op in plan.ops { run(op, tokens) }
        for part in parts { part.cache.length += part.rows.count }
    }

    /// One sequence's share of a batched step: its next tokens, run at the next positions of
    /// its own cache.
    public struct SequenceStep {
        public let cache: KVCache
        public let tokens: [Int]
        /// Whether the step returns logits after the last of these tokens.
        public let wantsLogits: Bool

        public init(cache: KVCache, tokens: [Int], wantsLogits: Bool) {
            self.cache = cache
            self.tokens = tokens
            self.wantsLogits = wantsLogits
        }
    }

    /// One forward pass over the tokens of several sequences (continuous batching): the
    /// row-wise ops (embedding, linear layers, experts, norms, LM head) run once over all rows,
    /// so the weights are read once a step; attention reads and writes each sequence's own
    /// cache at its own positions. Returns, for each sequence in order, the logits after its
    /// last token (`[vocab]`), or an empty array where `wantsLogits` is false.
    ///
    /// Every sequence's logits are bit-identical to running its tokens alone with
    /// `forward(_:logits: .last)` on an executor whose steps are as long as its share here:
    /// each row computes the same sums in the same order, and a sequence's rows take the
    /// same kernels as they would alone (`StepRows`).
    public func forward(batch: [SequenceStep]) throws -> [[Float]] {
        let total = batch.reduce(0) { $0 + $1.tokens.count }
        guard total <= maxStepTokens else {
            throw FulgurError(.usage, "a batched step of \(total) tokens exceeds this executor's \(maxStepTokens) rows a step")
        }
        for (i, part) in batch.enumerated() {
            let c = part.cache
            guard !part.tokens.isEmpty else { throw FulgurError(.usage, "sequence \(i) of a batched step has no tokens") }
            guard c.layers.count == plan.spec.layerCount else {
                throw FulgurError(.usage, "sequence \(i) of a batched step has a cache of \(c.layers.count) layers; the model has \(plan.spec.layerCount)")
            }
            guard part.tokens.count <= c.maxStepTokens else {
                throw FulgurError(.usage, "sequence \(i) brings \(part.tokens.count) tokens to a batched step; its cache takes at most \(c.maxStepTokens) a step")
            }
            guard c.length + part.tokens.count <= c.maxPositions else {
                throw FulgurError(.usage, "context is full: \(c.length) + \(part.tokens.count) tokens exceed the \(c.maxPositions)-position context")
            }
            guard !batch[..<i].contains(where: { $0.cache === c }) else {
                throw FulgurError(.usage, "sequences \(batch[..<i].firstIndex { $0.cache === c }!) and \(i) of a batched step share a cache")
            }
            for t in part.tokens where t < 0 || t >= plan.embedding.table.shape[0] {
                throw FulgurError(.usage, "token id \(t) is outside the vocabulary (0..<\(plan.embedding.table.shape[0]))")
            }
        }
        capturedFeatures.removeAll(keepingCapacity: true)
        guard total > 0 else { return [] }
        // Sequences with fewer rows than the decode-once threshold first (StepRows).
        let order = batch.indices.sorted { a, b in
            let (sa, sb) = (StepRows.decodesOnce(batch[a].tokens.count), StepRows.decodesOnce(batch[b].tokens.count))
            return sa != sb ? !sa : a < b
        }
        step(order.flatMap { batch[$0].tokens }, parts: order.map { (batch[$0].cache, batch[$0].tokens.count) })
        // The rows that want logits, gathered, and through the LM head with the per-token
        // kernels a lone sequence's `.last` row uses.
        let hidden = plan.spec.hiddenSize, vocab = plan.lmHead.outFeatures
        let wanted = order.indices.filter { batch[order[$0]].wantsLogits }
        var results = [[Float]](repeating: [], count: batch.count)
        guard !wanted.isEmpty else { return results }
        var lastRows = [Float](repeating: 0, count: wanted.count * hidden)
        var logits = [Float](repeating: 0, count: wanted.count * vocab)
        let h = ptr(.h)
        lastRows.withUnsafeMutableBufferPointer { r in
            for (i, p) in wanted.enumerated() { (r.baseAddress! + i * hidden).update(from: h + (parts[p].rows.upperBound - 1) * hidden, count: hidden) }
        }
        plan.lmHead.apply(lastRows, tokens: wanted.count, into: &logits, decodeOnceFrom: wanted.count)
        for (i, p) in wanted.enumerated() { results[order[p]] = Array(logits[(i * vocab)..<((i + 1) * vocab)]) }
        return results
    }

    @inline(__always)
    private func ptr(_ b: Buffer) -> UnsafeMutablePointer<Float> { buffers[b.rawValue] }

    private func run(_ op: Op, _ tokens: [Int]) {
        let T = tokens.count
        switch op {
        case .embed:
            let table = plan.embedding.table, x = ptr(.x), hidden = plan.spec.hiddenSize
            for (t, id) in tokens.enumerated() {
                Dequant.row(table.dtype, table.data + id * table.rowBytes, hidden, x + t * hidden)
            }
        case .rmsNorm(let src, let dst, let weight, let eps):
            let width = activeWidths[src.rawValue]
            activeWidths[dst.rawValue] = width
            Self.rmsNorm(ptr(src), ptr(dst), rows: T * width / weight.count, weight: weight, eps: eps)
        case .linear(let src, let dst, let w, let bias):
            let b = bias
            if let b {
                b.withUnsafeBufferPointer { w.apply(ptr(src), tokens: T, bias: $0.baseAddress!, into: ptr(dst), decodeOnceFrom: rows.decodeOnceFrom) }
            } else {
                w.apply(ptr(src), tokens: T, into: ptr(dst), decodeOnceFrom: rows.decodeOnceFrom)
            }
            activeWidths[dst.rawValue] = w.outFeatures
        case .fusedQKV(let chunks, let qRows, let kRows, let vRows):
            let width = qRows + kRows + vRows, count = chunks.count
            var part = [Float](repeating: 0, count: T * width)
            let q = ptr(.q), k = ptr(.k), v = ptr(.v)
            for (c, w) in chunks.enumerated() {
                w.apply(ptr(.h), tokens: T, into: &part, decodeOnceFrom: rows.decodeOnceFrom)
                for t in 0..<T {
                    part.withUnsafeBufferPointer { p in
                        (k + t * count * kRows + c * kRows).update(from: p.baseAddress! + t * width + qRows, count: kRows)
                        (v + t * count * vRows + c * vRows).update(from: p.baseAddress! + t * width + qRows + kRows, count: vRows)
                        (q + t * count * qRows + c * qRows).update(from: p.baseAddress! + t * width, count: qRows)
                    }
                }
            }
            activeWidths[Buffer.q.rawValue] = count * qRows
            activeWidths[Buffer.k.rawValue] = count * kRows
            activeWidths[Buffer.v.rawValue] = count * vRows
        case .rope(let buffer, let headDim, let rope):
            Self.applyRoPE(ptr(buffer), width: activeWidths[buffer.rawValue], headDim: headDim, rope: rope, positions: positions)
        case .scale(let buffer, let factor):
            let p = ptr(buffer)
            for i in 0..<(T * activeWidths[buffer.rawValue]) { p[i] *= factor }
        case .attention(let layer, let spec, let sinks):
            storeKV(layer)
            activeWidths[Buffer.attn.rawValue] = spec.heads * spec.valueHeadDim
            Self.attention(q: ptr(.q), out: ptr(.attn), caches: parts.map { $0.cache.layers[layer] }, segments: rows.segments, heads: spec.heads,
                           window: spec.window, causal: spec.causal, scale: spec.softmaxScale, sinks: sinks, positions: positions)
        case .storeKV(let layer):
            storeKV(layer)
        case .layerEnd(let layer):
            guard let slot = captureSlot[layer] else { break }
            let hidden = plan.spec.hiddenSize, width = captureLayers.count * hidden, x = ptr(.x)
            stepFeatures.withUnsafeMutableBufferPointer { f in
                for t in 0..<T { (f.baseAddress! + t * width + slot * hidden).update(from: x + t * hidden, count: hidden) }
            }
        case .glu(let activation):
            let gate = ptr(.gate), up = ptr(.up), act = ptr(.act), n = T * activeWidths[Buffer.gate.rawValue]
            activeWidths[Buffer.act.rawValue] = activeWidths[Buffer.gate.rawValue]
            for i in 0..<n { act[i] = Activations.glu(gate[i], up[i], activation) }
        case .moe(let src, let dst, let weights):
            MoE.run(weights, x: ptr(src), tokens: T, hidden: plan.spec.hiddenSize, out: ptr(dst), rows: rows)
        case .residual(let src):
            let x = ptr(.x), s = ptr(src)
            for i in 0..<(T * plan.spec.hiddenSize) { x[i] += s[i] }
        case .finalNorm(let weight, let eps):
            Self.rmsNorm(ptr(.x), ptr(.h), rows: T, weight: weight, eps: eps)
        case .allReduce(let buffer):
            guard let allReduce else { preconditionFailure("a tensor-parallel shard's plan runs without a communicator (set CPUExecutor.allReduce)") }
            allReduce(ptr(buffer), T * plan.spec.hiddenSize)
        }
    }

    /// Writes the step's keys and values into each sequence's cache of `layer`.
    private func storeKV(_ layer: Int) {
        let k = ptr(.k), v = ptr(.v)
        for part in parts {
            let c = part.cache.layers[layer], first = part.rows.lowerBound
            Self.store(k: k + first * c.kvHeads * c.keyDim, v: v + first * c.kvHeads * c.valueDim, into: c,
                       positions: Array(positions[part.rows]))
        }
    }

    /// Current width of each buffer (set by the op that last wrote it).
    private lazy var activeWidths: [Int] = Buffer.allCases.map { $0 == .x || $0 == .h || $0 == .out ? plan.spec.hiddenSize : 0 }
}

// MARK: The per-layer math, public as the reference the GPU kernel checks compare against
// (Sources/fulgur-gpu-check/LayerCheck.swift).

extension CPUExecutor {
    /// dst = weight * src / sqrt(mean(src^2) + eps) over `rows` rows of `weight.count` floats
    /// (a whole row, or one head for q/k norms); `dst` may be `src`.
    public static func rmsNorm(_ src: UnsafePointer<Float>, _ dst: UnsafeMutablePointer<Float>, rows: Int, weight: [Float], eps: Float) {
        let n = weight.count
        for r in 0..<rows {
            let s = src + r * n, d = dst + r * n
            var sum: Float = 0
            for i in 0..<n { sum += s[i] * s[i] }
            let inv = 1 / (sum / Float(n) + eps).squareRoot()
            for i in 0..<n { d[i] = weight[i] * (s[i] * inv) }
        }
    }

    /// Rotates the first `rope.rotaryDim` dims of every head in rows of `width` floats, row t
    /// at `positions[t]`, in place.
    public static func applyRoPE(_ p: UnsafeMutablePointer<Float>, width: Int, headDim: Int, rope: RoPESpec, positions: [Int]) {
        let heads = width / headDim, half = rope.rotaryDim / 2
        for t in positions.indices {
            let pos = Double(positions[t])
            for i in 0..<half {
                let angle = pos * rope.inverseFrequencies[i]
                let c = Float(cos(angle) * rope.attentionFactor), s = Float(sin(angle) * rope.attentionFactor)
                for h in 0..<heads {
                    let base = p + t * width + h * headDim
                    let (a, b) = rope.style == .neox ? (i, i + half) : (2 * i, 2 * i + 1)
                    let x0 = base[a], x1 = base[b]
                    base[a] = x0 * c - x1 * s
                    base[b] = x1 * c + x0 * s
                }
            }
        }
    }

    /// Writes the step's keys and values (rows of `kvHeads * keyDim` / `kvHeads * valueDim`)
    /// into a layer's cache at `positions`.
    public static func store(k: UnsafePointer<Float>, v: UnsafePointer<Float>, into c: KVCache.Layer, positions: [Int]) {
        let kw = c.kvHeads * c.keyDim, vw = c.kvHeads * c.valueDim
        for t in positions.indices {
            c.key(positions[t]).update(from: k + t * kw, count: kw)
            c.value(positions[t]).update(from: v + t * vw, count: vw)
        }
    }

    /// out[t, h * valueDim ..] = attention of query head h of row t (at `positions[t]`) over
    /// the layer's cache: GQA (`heads` a multiple of the cache's KV heads), an optional window,
    /// non-causal steps (a query also sees the step's later keys), and sink logits that join
    /// the softmax but not the output.
    public static func attention(q: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, cache c: KVCache.Layer, heads: Int, window: Int?,
                                 causal: Bool, scale: Float, sinks: [Float]?, positions: [Int]) {
        attention(q: q, out: out, caches: [c], segments: [positions.indices], heads: heads, window: window, causal: causal,
                  scale: scale, sinks: sinks, positions: positions)
    }

    /// The same over the rows of several sequences: rows `segments[s]` attend over `caches[s]`
    /// (a batched step; the caches share their shape). A non-causal row sees keys up to its
    /// own sequence's last row.
    static func attention(q: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, caches: [KVCache.Layer], segments: [Range<Int>], heads: Int,
                          window: Int?, causal: Bool, scale: Float, sinks: [Float]?, positions: [Int]) {
        let T = positions.count, headDim = caches[0].keyDim, valueDim = caches[0].valueDim
        let qw = heads * headDim, ow = heads * valueDim
        let group = heads / caches[0].kvHeads
        var segmentOf = [Int](repeating: 0, count: T)
        for (s, rows) in segments.enumerated() { for t in rows { segmentOf[t] = s } }
        let lastKeys = segments.map { positions[$0.upperBound - 1] }
        let longest = lastKeys.max()!
        let work = segments.indices.reduce(0) { $0 + segments[$1].count * (lastKeys[$1] + 1) } * heads * (headDim + valueDim)
        Parallel.chunks(T * heads, work: work) { range in
            var scores = [Float](repeating: 0, count: longest + 1)
            for job in range {
                let t = job / heads, h = job % heads, kvh = h / group
                let c = caches[segmentOf[t]], lastKey = lastKeys[segmentOf[t]]
                let query = positions[t]
                let first = window.map { max(0, query - $0 + 1) } ?? 0
                // A non-causal query (the drafter's block) also sees the step's later keys.
                let pos = causal ? query : window.map { min(lastKey, query + $0 - 1) } ?? lastKey
                let qh = q + t * qw + h * headDim
                // Logits, with the sink logit (if any) joining the softmax but not the output.
                var maxScore = sinks?[h] ?? -Float.infinity
                for j in first...pos {
                    let kp = c.key(j) + kvh * headDim
                    var d: Float = 0
                    for i in 0..<headDim { d += qh[i] * kp[i] }
                    d *= scale
                    scores[j - first] = d
                    maxScore = max(maxScore, d)
                }
                var denom: Float = sinks.map { exp($0[h] - maxScore) } ?? 0
                for j in 0...(pos - first) {
                    scores[j] = exp(scores[j] - maxScore)
                    denom += scores[j]
                }
                let oh = out + t * ow + h * valueDim
                oh.update(repeating: 0, count: valueDim)
                for j in first...pos {
                    let p = scores[j - first] / denom
                    let vp = c.value(j) + kvh * valueDim
                    for i in 0..<valueDim { oh[i] += p * vp[i] }
                }
            }
        }
    }
}

public enum Activations {
    @inline(__always) static func silu(_ x: Float) -> Float { x / (1 + exp(-x)) }

    @inline(__always) public static func glu(_ gate: Float, _ up: Float, _ a: Activation) -> Float {
        switch a {
        case .silu:
            return silu(gate) * up
        case .clampedSwiGLU(let alpha, let limit):
            let g = min(gate, limit), u = min(max(up, -limit), limit)
            return (u + 1) * (g / (1 + exp(-g * alpha)))
        }
    }
}

/// How a step's rows divide among sequences, for the products whose rounding depends on how
/// many rows a sequence brings: a linear layer decodes a quantized row once for a step of
/// `LinearWeight.decodeOnceTokens` rows or more, and uses per-token kernels below that (an
/// expert likewise, counting the rows routed to it). Alone, a sequence's step is all its rows;
/// in a batched step each sequence's rows keep the path they would take alone, which needs the
/// sequences that bring fewer rows to come first.
struct StepRows {
    /// Consecutive row ranges, one per sequence.
    let segments: [Range<Int>]
    /// The first row of a sequence that brings enough rows to decode once.
    let decodeOnceFrom: Int

    init(segments: [Range<Int>]) {
        precondition(zip(segments, segments.dropFirst()).allSatisfy { !Self.decodesOnce($0.count) || Self.decodesOnce($1.count) },
                     "sequences with few rows must come first in a batched step")
        self.segments = segments
        decodeOnceFrom = segments.first { Self.decodesOnce($0.count) }?.lowerBound ?? segments.last?.upperBound ?? 0
    }

    static func decodesOnce(_ rows: Int) -> Bool { rows >= LinearWeight.decodeOnceTokens }
}
