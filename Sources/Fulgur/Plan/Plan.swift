/// The model lowered to a static list of ops over named activation buffers. One plan serves
/// every step shape (one decode token, a verify block, a prefill chunk): ops are written for
/// `T` rows and the executor supplies `T` and the positions. Weights are bound into the ops,
/// so an executor never looks tensors up by name while running.
public struct Plan: Sendable {
    public let spec: ModelSpec
    public let ops: [Op]
    /// Width (floats per token) of each buffer.
    public let widths: [Buffer: Int]
    public let embedding: Embedding
    public let lmHead: LinearWeight

    /// Every matrix the plan multiplies by, with the kind of layer it belongs to.
    public var linearWeights: [(kind: String, weight: LinearWeight)] {
        var out: [(String, LinearWeight)] = []
        for op in ops {
            switch op {
            case .linear(let src, let dst, let w, _):
                out.append(([.q, .k, .v].contains(dst) || src == .attn ? "attention" : "dense mlp", w))
            case .fusedQKV(let chunks, _, _, _):
                out += chunks.map { ("attention", $0) }
            case .moe(_, _, let m):
                out.append(("router", m.router))
                for e in m.experts { for w in [e.gateUp, e.gate, e.up, e.down].compactMap({ $0 }) { out.append(("experts", w)) } }
            default: break
            }
        }
        out.append(("lm head", lmHead))
        return out
    }

    /// Bytes of weights one decode step reads (every expert counted at top-k use).
    public var bytesPerDecodeStep: Int {
        var bytes = lmHead.byteCount + embedding.table.rowBytes
        for op in ops {
            switch op {
            case .linear(_, _, let w, _): bytes += w.byteCount
            case .fusedQKV(let chunks, _, _, _): bytes += chunks.reduce(0) { $0 + $1.byteCount }
            case .moe(_, _, let m): bytes += m.router.byteCount + (m.experts.first.map { $0.byteCount * m.spec.topK } ?? 0)
            default: break
            }
        }
        return bytes
    }
}

public enum Buffer: Int, Sendable, CaseIterable {
    case x        // the residual stream
    case h        // normed input of a sublayer
    case q, k, v  // projections
    case attn     // attention output, before o_proj
    case gate, up, act
    case out      // a sublayer's output, added to x
}

public struct Embedding: Sendable {
    public let table: TensorView
}

public struct ExpertWeights: Sendable {
    /// Either a fused gate+up weight (2I outputs) or separate gate and up weights.
    public let gateUp: LinearWeight?
    public let gate: LinearWeight?
    public let up: LinearWeight?
    public let down: LinearWeight
    public let gateUpBias: [Float]?
    public let downBias: [Float]?
    /// gpt-oss: gate and up outputs alternate (gate at even indices).
    public let interleaved: Bool

    public init(gateUp: LinearWeight?, gate: LinearWeight?, up: LinearWeight?, down: LinearWeight,
                gateUpBias: [Float]?, downBias: [Float]?, interleaved: Bool) {
        self.gateUp = gateUp
        self.gate = gate
        self.up = up
        self.down = down
        self.gateUpBias = gateUpBias
        self.downBias = downBias
        self.interleaved = interleaved
    }

    public var byteCount: Int { (gateUp?.byteCount ?? 0) + (gate?.byteCount ?? 0) + (up?.byteCount ?? 0) + down.byteCount }
}

public struct MoEWeights: Sendable {
    public let spec: MoESpec
    public let router: LinearWeight
    public let routerBias: [Float]?
    public let correctionBias: [Float]?
    public let experts: [ExpertWeights]

    public init(spec: MoESpec, router: LinearWeight, routerBias: [Float]?, correctionBias: [Float]?, experts: [ExpertWeights]) {
        self.spec = spec
        self.router = router
        self.routerBias = routerBias
        self.correctionBias = correctionBias
        self.experts = experts
    }
}

public enum Op: Sendable {
    /// x = embedding rows of the step's tokens.
    case embed
    /// dst = RMSNorm(src) with `weight`, normalizing groups of `weight.count` floats (a whole
    /// row, or each head for q/k norms).
    case rmsNorm(src: Buffer, dst: Buffer, weight: [Float], eps: Float)
    case linear(src: Buffer, dst: Buffer, weight: LinearWeight, bias: [Float]?)
    /// A fused q/k/v projection stored in row chunks, each `[q rows | k rows | v rows]`:
    /// chunk c's parts go to columns c * part of .q, .k and .v.
    case fusedQKV(chunks: [LinearWeight], qRows: Int, kRows: Int, vRows: Int)
    /// Rotate the first `rope.rotaryDim` dims of each head by the token's position.
    case rope(buffer: Buffer, headDim: Int, rope: RoPESpec)
    case scale(buffer: Buffer, factor: Float)
    /// Append k/v of the step to layer `layer`'s cache, then attend from q.
    case attention(layer: Int, spec: AttentionSpec, sinks: [Float]?)
    /// Append k/v of the step to layer `layer`'s cache without attending (the DFlash
    /// drafter's context rows, which are keys and values only).
    case storeKV(layer: Int)
    /// Layer `layer` is done: x holds its output. The executor copies x aside when asked to
    /// (the DFlash drafter conditions on these hidden states), so they come with the forward
    /// pass instead of a second one.
    case layerEnd(layer: Int)
    /// act = activation(gate) * up
    case glu(activation: Activation)
    case moe(src: Buffer, dst: Buffer, weights: MoEWeights)
    /// x += src
    case residual(src: Buffer)
    /// h = final norm of x
    case finalNorm(weight: [Float], eps: Float)
    /// A tensor-parallel shard's partial sums in `buffer` ([T, hidden]) summed over all shards,
    /// every shard getting the same total (Plan.shard; the executor's communicator runs it).
    case allReduce(buffer: Buffer)
}
