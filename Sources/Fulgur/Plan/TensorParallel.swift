/// Tensor parallelism: one model cut into N shards that run side by side (one per GPU), each
/// computing a slice of every layer, with the slices' partial sums added across shards by an
/// all-reduce after the two products that end a layer's halves.
///
/// The cut (Megatron's, as vLLM and SGLang do it):
/// - attention: query heads split evenly; key/value heads split with them when their count
///   divides by N, else each shard keeps the key/value heads its query heads read (MiMo's one
///   full-attention key/value head is then on every shard); sinks follow the query heads;
///   o_proj split by its input columns, so each shard's `out` is a partial sum;
/// - dense MLP and every MoE expert: the intermediate dimension split evenly (gate/up rows,
///   down columns; gpt-oss's interleaved gate/up rows in pairs), so one token's expert work is
///   balanced whatever the router picks (the router itself is replicated); MXFP4 experts on
///   32-column blocks, within one block of even (gpt-oss-20b's 2880 over 4 GPUs: 704 or 736
///   each; an even 720 would cut blocks and leave down in f32); down biases and the o_proj
///   bias only on shard 0;
/// - the LM head split by vocabulary rows (`vocabularySlice`): each shard's logits are a slice
///   of the row, gathered (or arg-maxed per slice and compared) by the caller;
/// - embedding, norms, RoPE, the residual stream: replicated;
/// - a DFlash drafter's context plan (DFlashDrafter): its fc replicated, each layer's k/v path
///   split as its block plan's, so both plans' shards share one cache of the shard's heads.
/// An `.allReduce(.out)` op follows o_proj and each feed-forward; it is the only communication.
extension Plan {
    /// This plan without its all-reduces: one tensor-parallel shard's own chain of kernels,
    /// runnable on one GPU with no communicator, for timing what each GPU computes
    /// (`fulgur bench --shard`). Its outputs are partial sums, so its tokens are not the model's.
    public func droppingCommunication() -> Plan {
        Plan(spec: spec, ops: ops.filter { if case .allReduce = $0 { return false } else { return true } },
             widths: widths, embedding: embedding, lmHead: lmHead)
    }

    /// Shard `rank` of `count`. Throws when a layer's shape does not split (heads or the
    /// intermediate size not divisible by `count`).
    public func shard(rank: Int, of count: Int) throws -> Plan {
        precondition(count >= 1 && (0..<count).contains(rank), "shard \(rank) of \(count)")
        if count == 1 { return self }
        func unsupported(_ why: String) -> FulgurError {
            FulgurError(.unsupported, "tensor parallelism over \(count) GPUs: \(why)")
        }
        func evenSlice(_ n: Int, _ what: String) throws -> Range<Int> {
            guard n % count == 0 else { throw unsupported("\(what) (\(n)) does not divide by \(count)") }
            return (rank * n / count)..<((rank + 1) * n / count)
        }
        /// The shard's part of n cut on blocks of `align` (MXFP4 experts: 32-column blocks, so
        /// that each shard's down slice stays MXFP4 instead of becoming f32), block counts
        /// differing by at most one between shards; evenSlice where the even cut is on blocks
        /// already or n has fewer blocks than shards.
        func blockSlice(_ n: Int, align: Int, _ what: String) throws -> Range<Int> {
            if align <= 1 || n % align != 0 || n / align < count || (n % count == 0 && (n / count) % align == 0) { return try evenSlice(n, what) }
            let blocks = n / align
            return (rank * blocks / count * align)..<((rank + 1) * blocks / count * align)
        }
        var newSpec = spec
        var layerOps: [Op] = [], layer = 0
        var widths = self.widths
        for b in [Buffer.q, .k, .v, .attn, .gate, .up, .act] { widths[b] = 0 }
        func grow(_ b: Buffer, _ w: Int) { widths[b] = max(widths[b] ?? 0, w) }
        // Per layer: this shard's query heads and key/value heads.
        var qHeads = 0..<0, kvHeads = 0..<0
        func headSlices(_ a: AttentionSpec) throws -> (q: Range<Int>, kv: Range<Int>) {
            let q = try evenSlice(a.heads, "layer \(layer)'s \(a.heads) query heads")
            if a.kvHeads % count == 0 { return (q, try evenSlice(a.kvHeads, "key/value heads")) }
            let group = a.heads / a.kvHeads
            let kv = (q.lowerBound / group)..<((q.upperBound - 1) / group + 1)
            guard q.count % kv.count == 0, q.lowerBound % group == 0 || kv.count == 1 else {
                throw unsupported("layer \(layer)'s \(a.heads) query heads over \(a.kvHeads) key/value heads do not group evenly over \(count) shards")
            }
            return (q, kv)
        }
        for op in ops {
            switch op {
            case .embed, .rope, .scale, .residual, .finalNorm:
                layerOps.append(op)
            case .layerEnd(let l):
                layerOps.append(op)
                layer = l + 1
            case .rmsNorm:
                layerOps.append(op)  // full-width norms of x, and per-head q/k norms (same weight every head)
            case .storeKV(let l):
                // A DFlash drafter's context plan (no .layerEnd): each layer's k/v path ends here,
                // storing this shard's key/value heads into the cache its block plan's shard reads.
                (qHeads, kvHeads) = try headSlices(spec.layers[l].attention)
                newSpec.layers[l].attention.heads = qHeads.count
                newSpec.layers[l].attention.kvHeads = kvHeads.count
                layerOps.append(op)
                layer = l + 1
            case .linear(let src, let dst, let w, let bias):
                let a = spec.layers[min(layer, spec.layerCount - 1)].attention
                switch (src, dst) {
                case (.h, .q), (.h, .k), (.h, .v):
                    // (A drafter's context plan has k and v without q.)
                    (qHeads, kvHeads) = try headSlices(a)
                    let heads = dst == .q ? qHeads : kvHeads, dim = dst == .v ? a.valueHeadDim : a.headDim
                    let rows = Array((heads.lowerBound * dim)..<(heads.upperBound * dim))
                    layerOps.append(.linear(src: src, dst: dst, weight: try w.selecting(rows: rows), bias: bias.map { b in rows.map { b[$0] } }))
                    grow(dst, rows.count)
                case (.attn, .out):
                    let columns = (qHeads.lowerBound * a.valueHeadDim)..<(qHeads.upperBound * a.valueHeadDim)
                    layerOps.append(.linear(src: src, dst: dst, weight: try w.selecting(columns: columns), bias: rank == 0 ? bias : nil))
                    layerOps.append(.allReduce(buffer: .out))
                case (.h, .gate), (.h, .up):
                    let rows = Array(try evenSlice(w.outFeatures, "layer \(layer)'s MLP intermediate size"))
                    if case .dense(_, let act) = newSpec.layers[layer].feedForward { newSpec.layers[layer].feedForward = .dense(intermediate: rows.count, activation: act) }
                    layerOps.append(.linear(src: src, dst: dst, weight: try w.selecting(rows: rows), bias: bias.map { b in rows.map { b[$0] } }))
                    grow(dst, rows.count)
                    grow(.act, rows.count)
                case (.act, .out):
                    let columns = try evenSlice(w.inFeatures, "layer \(layer)'s MLP intermediate size")
                    layerOps.append(.linear(src: src, dst: dst, weight: try w.selecting(columns: columns), bias: rank == 0 ? bias : nil))
                    layerOps.append(.allReduce(buffer: .out))
                case (.x, .h):
                    // DFlash's fc (the target's features into the hidden size), before the
                    // drafter's k/v paths: replicated, as the residual stream is.
                    layerOps.append(op)
                default:
                    throw unsupported("a product from \(src) into \(dst) has no rule for splitting")
                }
            case .fusedQKV(let chunks, let qRows, let kRows, let vRows):
                // One chunk per key/value head group: split the chunks.
                let mine = try evenSlice(chunks.count, "layer \(layer)'s fused q/k/v chunks")
                let a = spec.layers[layer].attention
                qHeads = (mine.lowerBound * a.heads / chunks.count)..<(mine.upperBound * a.heads / chunks.count)
                kvHeads = (mine.lowerBound * a.kvHeads / chunks.count)..<(mine.upperBound * a.kvHeads / chunks.count)
                layerOps.append(.fusedQKV(chunks: Array(chunks[mine]), qRows: qRows, kRows: kRows, vRows: vRows))
                grow(.q, mine.count * qRows); grow(.k, mine.count * kRows); grow(.v, mine.count * vRows)
            case .attention(let l, var a, let sinks):
                a.heads = qHeads.count
                a.kvHeads = kvHeads.count
                newSpec.layers[l].attention.heads = a.heads
                newSpec.layers[l].attention.kvHeads = a.kvHeads
                layerOps.append(.attention(layer: l, spec: a, sinks: sinks.map { Array($0[qHeads]) }))
                grow(.attn, a.heads * a.valueHeadDim)
            case .glu:
                layerOps.append(op)
            case .moe(let src, let dst, let m):
                var s = m.spec
                let mxfp4 = m.experts.allSatisfy { $0.down.format == .mxfp4 }
                let mine = try blockSlice(s.intermediate, align: mxfp4 ? 32 : 1, "layer \(layer)'s expert intermediate size")
                s.intermediate = mine.count
                let experts = try m.experts.map { e -> ExpertWeights in
                    let inter = m.spec.intermediate
                    var gateUp: LinearWeight? = nil, gate: LinearWeight? = nil, up: LinearWeight? = nil, guRows: [Int] = []
                    if let gu = e.gateUp {
                        guRows = e.interleaved ? mine.flatMap { [2 * $0, 2 * $0 + 1] } : Array(mine) + mine.map { inter + $0 }
                        gateUp = try gu.selecting(rows: guRows)
                    } else {
                        gate = try e.gate!.selecting(rows: Array(mine))
                        up = try e.up!.selecting(rows: Array(mine))
                    }
                    return ExpertWeights(gateUp: gateUp, gate: gate, up: up, down: try e.down.selecting(columns: mine),
                                         gateUpBias: e.gateUpBias.map { b in guRows.map { b[$0] } }, downBias: rank == 0 ? e.downBias : nil,
                                         interleaved: e.interleaved)
                }
                if case .moe = newSpec.layers[layer].feedForward { newSpec.layers[layer].feedForward = .moe(s) }
                layerOps.append(.moe(src: src, dst: dst, weights: MoEWeights(spec: s, router: m.router, routerBias: m.routerBias,
                                                                             correctionBias: m.correctionBias, experts: experts)))
                layerOps.append(.allReduce(buffer: dst))
            case .allReduce:
                throw unsupported("the plan is already a shard")
            }
        }
        let vocab = vocabularySlice(rank: rank, of: count)
        return Plan(spec: newSpec, ops: layerOps, widths: widths, embedding: embedding, lmHead: try lmHead.selecting(rows: Array(vocab)))
    }

    /// The LM head rows (token ids) shard `rank` of `count` computes: contiguous, the first
    /// `vocab % count` shards one row longer.
    public func vocabularySlice(rank: Int, of count: Int) -> Range<Int> {
        let vocab = lmHead.outFeatures, base = vocab / count, extra = vocab % count
        let start = rank * base + min(rank, extra)
        return start..<(start + base + (rank < extra ? 1 : 0))
    }
}
