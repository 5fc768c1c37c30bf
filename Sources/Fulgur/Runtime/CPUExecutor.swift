import Foundation

/// Runs a plan on the CPU in f32, reading weights in their stored types. It is the
/// correctness oracle of every other executor and runs the small default model.
public final class CPUExecutor {
    public let plan: Plan
    public let maxStepTokens: Int
    public let cache: KVCache
    /// Activation buffers, `maxStepTokens` rows of each buffer's widest use.
    private let buffers: [UnsafeMutablePointer<Float>]
    private var positions: [Int] = []

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
        let T = tokens.count
        positions = (0..<T).map { cache.length + $0 }
        for op in plan.ops { run(op, tokens) }
        cache.length += T
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
                b.withUnsafeBufferPointer { w.apply(ptr(src), tokens: T, bias: $0.baseAddress!, into: ptr(dst)) }
            } else {
                w.apply(ptr(src), tokens: T, into: ptr(dst))
            }
            activeWidths[dst.rawValue] = w.outFeatures
        case .fusedQKV(let chunks, let qRows, let kRows, let vRows):
            let rows = qRows + kRows + vRows, count = chunks.count
            var part = [Float](repeating: 0, count: T * rows)
            let q = ptr(.q), k = ptr(.k), v = ptr(.v)
            for (c, w) in chunks.enumerated() {
                w.apply(ptr(.h), tokens: T, into: &part)
                for t in 0..<T {
                    part.withUnsafeBufferPointer { p in
                        (k + t * count * kRows + c * kRows).update(from: p.baseAddress! + t * rows + qRows, count: kRows)
                        (v + t * count * vRows + c * vRows).update(from: p.baseAddress! + t * rows + qRows + kRows, count: vRows)
                        (q + t * count * qRows + c * qRows).update(from: p.baseAddress! + t * rows, count: qRows)
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
            Self.store(k: ptr(.k), v: ptr(.v), into: cache.layers[layer], positions: positions)
            activeWidths[Buffer.attn.rawValue] = spec.heads * spec.valueHeadDim
            Self.attention(q: ptr(.q), out: ptr(.attn), cache: cache.layers[layer], heads: spec.heads, window: spec.window, causal: spec.causal,
                           scale: spec.softmaxScale, sinks: sinks, positions: positions)
        case .storeKV(let layer):
            Self.store(k: ptr(.k), v: ptr(.v), into: cache.layers[layer], positions: positions)
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
            MoE.run(weights, x: ptr(src), tokens: T, hidden: plan.spec.hiddenSize, out: ptr(dst))
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
        let T = positions.count, headDim = c.keyDim, valueDim = c.valueDim
        let qw = heads * headDim, ow = heads * valueDim
        let group = heads / c.kvHeads
        let lastKey = positions[T - 1]
        let work = T * heads * (lastKey + 1) * (headDim + valueDim)
        Parallel.chunks(T * heads, work: work) { range in
            var scores = [Float](repeating: 0, count: lastKey + 1)
            for job in range {
                let t = job / heads, h = job % heads, kvh = h / group
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
