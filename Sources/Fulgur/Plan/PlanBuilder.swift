/// Lowers a model spec and its tensors to a plan, checking every tensor's shape on the way
/// so that a wrong checkpoint fails at load with the tensor's name, not later with garbage.
public enum PlanBuilder {
    public static func build(spec: ModelSpec, tensors: TensorSource, progress: ((Int, Int) -> Void)? = nil) throws -> Plan {
        let names = spec.names, hidden = spec.hiddenSize
        let (layerOps, widths) = try layers(spec: spec, tensors: tensors, progress: progress)
        let ops: [Op] = [.embed] + layerOps + [.finalNorm(weight: try tensors.floats(names.finalNorm, shape: [hidden]), eps: spec.rmsNormEps)]
        let table = try tensors.tensor(names.embedding)
        guard table.shape == [spec.vocabSize, hidden] || (table.shape.count == 2 && table.shape[1] == hidden && table.shape[0] >= spec.vocabSize) else {
            throw FulgurError(.shape, "\(tensors.sourceDescription): tensor '\(names.embedding)' has shape \(table.shape), expected [\(spec.vocabSize), \(hidden)]")
        }
        try tensors.checkConvertible(table)
        let lmHead: LinearWeight
        if tensors.tensorIfPresent(names.lmHead) != nil {
            lmHead = try resolveLinear(names.lmHead, out: table.shape[0], in: hidden, spec: spec, tensors: tensors)
        } else if spec.tieWordEmbeddings {
            lmHead = try tensors.linearWeight(table)
        } else {
            throw FulgurError(.format, "\(tensors.sourceDescription): tensor '\(names.lmHead)' is missing and the config does not tie it to the embeddings")
        }
        return Plan(spec: spec, ops: ops, widths: widths, embedding: Embedding(table: table), lmHead: lmHead)
    }

    /// The ops of the decoder layers (x in, x out) and the buffer widths they need; the
    /// DFlash drafter builds its layers with this too.
    static func layers(spec: ModelSpec, tensors: TensorSource, progress: ((Int, Int) -> Void)? = nil) throws -> (ops: [Op], widths: [Buffer: Int]) {
        let names = spec.names, hidden = spec.hiddenSize
        func vector(_ name: String, _ count: Int) throws -> [Float] {
            try tensors.floats(name, shape: [count])
        }
        func optionalVector(_ name: String, _ count: Int, _ present: Bool) throws -> [Float]? {
            present ? try vector(name, count) : nil
        }
        func linear(_ name: String, out: Int, in inFeatures: Int) throws -> LinearWeight {
            try resolveLinear(name, out: out, in: inFeatures, spec: spec, tensors: tensors)
        }
        var ops: [Op] = []
        var widths: [Buffer: Int] = [.x: hidden, .h: hidden, .out: hidden, .q: 0, .k: 0, .v: 0, .attn: 0, .gate: 0, .up: 0, .act: 0]
        func grow(_ b: Buffer, _ w: Int) { widths[b] = max(widths[b]!, w) }

        for (i, layer) in spec.layers.enumerated() {
            let a = layer.attention
            let n = { (role: TensorNames.Role) in names.name(i, role) }
            // The executor divides by these: a zero or a ragged grouping must fail here, by name.
            guard a.heads > 0, a.kvHeads > 0, a.heads % a.kvHeads == 0, a.headDim > 0, a.valueHeadDim > 0 else {
                throw FulgurError(.config, "\(tensors.sourceDescription): layer \(i) has \(a.heads) attention heads, \(a.kvHeads) key/value heads and head dimensions \(a.headDim)/\(a.valueHeadDim); expected positive sizes with key/value heads dividing attention heads")
            }
            grow(.q, a.heads * a.headDim); grow(.k, a.kvHeads * a.headDim); grow(.v, a.kvHeads * a.valueHeadDim)
            grow(.attn, a.heads * a.valueHeadDim)
            ops.append(.rmsNorm(src: .x, dst: .h, weight: try vector(n(.attnNorm), hidden), eps: spec.rmsNormEps))
            if spec.names.roles[.qkv] != nil, tensors.tensorIfPresent(n(.qkv)) != nil {
                ops.append(try fusedQKV(n(.qkv), a, spec: spec, tensors: tensors))
            } else {
                ops.append(.linear(src: .h, dst: .q, weight: try linear(n(.q), out: a.heads * a.headDim, in: hidden),
                                   bias: try optionalVector(n(.qBias), a.heads * a.headDim, a.qkvBias)))
                ops.append(.linear(src: .h, dst: .k, weight: try linear(n(.k), out: a.kvHeads * a.headDim, in: hidden),
                                   bias: try optionalVector(n(.kBias), a.kvHeads * a.headDim, a.qkvBias)))
                ops.append(.linear(src: .h, dst: .v, weight: try linear(n(.v), out: a.kvHeads * a.valueHeadDim, in: hidden),
                                   bias: try optionalVector(n(.vBias), a.kvHeads * a.valueHeadDim, a.qkvBias)))
            }
            if a.qkNorm {
                ops.append(.rmsNorm(src: .q, dst: .q, weight: try vector(n(.qNorm), a.headDim), eps: spec.rmsNormEps))
                ops.append(.rmsNorm(src: .k, dst: .k, weight: try vector(n(.kNorm), a.headDim), eps: spec.rmsNormEps))
            }
            if a.rope.rotaryDim > 0 {
                ops.append(.rope(buffer: .q, headDim: a.headDim, rope: a.rope))
                ops.append(.rope(buffer: .k, headDim: a.headDim, rope: a.rope))
            }
            if a.valueScale != 1 { ops.append(.scale(buffer: .v, factor: a.valueScale)) }
            ops.append(.attention(layer: i, spec: a, sinks: try optionalVector(n(.sinks), a.heads, a.hasSinks)))
            ops.append(.linear(src: .attn, dst: .out, weight: try linear(n(.o), out: hidden, in: a.heads * a.valueHeadDim),
                               bias: try optionalVector(n(.oBias), hidden, a.outputBias)))
            ops.append(.residual(src: .out))
            ops.append(.rmsNorm(src: .x, dst: .h, weight: try vector(n(.ffnNorm), hidden), eps: spec.rmsNormEps))
            switch layer.feedForward {
            case .dense(let inter, let act):
                grow(.gate, inter); grow(.up, inter); grow(.act, inter)
                ops.append(.linear(src: .h, dst: .gate, weight: try linear(n(.gate), out: inter, in: hidden), bias: nil))
                ops.append(.linear(src: .h, dst: .up, weight: try linear(n(.up), out: inter, in: hidden), bias: nil))
                ops.append(.glu(activation: act))
                ops.append(.linear(src: .act, dst: .out, weight: try linear(n(.down), out: hidden, in: inter), bias: nil))
            case .moe(let m):
                ops.append(.moe(src: .h, dst: .out, weights: try moeWeights(m, layer: i, spec: spec, tensors: tensors)))
            }
            ops.append(.residual(src: .out))
            ops.append(.layerEnd(layer: i))
            progress?(i + 1, spec.layers.count)
        }
        return (ops, widths)
    }

    static func moeWeights(_ m: MoESpec, layer i: Int, spec: ModelSpec, tensors: TensorSource) throws -> MoEWeights {
        let names = spec.names, hidden = spec.hiddenSize, inter = m.intermediate
        let n = { (role: TensorNames.Role) in names.name(i, role) }
        let router = try resolveLinear(n(.router), out: m.experts, in: hidden, spec: spec, tensors: tensors)
        let routerBias = m.routerBias ? try tensors.floats(n(.routerBias), shape: [m.experts]) : nil
        var correction: [Float]? = nil
        if case .sigmoidWithBias = m.routing {
            correction = try tensors.floats(n(.correctionBias), shape: [m.experts])
        }
        var experts: [ExpertWeights] = []
        // Checkpoints store experts either one tensor per expert or stacked; take what is there.
        let stacked = tensors.tensorIfPresent(n(.expertGateUp))
        switch (m.layout, stacked) {
        case (.gptOss, _):
            let guBias = try tensors.floats(n(.expertGateUpBias), shape: [m.experts, 2 * inter])
            let downBias = try tensors.floats(n(.expertDownBias), shape: [m.experts, hidden])
            // Published gpt-oss checkpoints store experts as MXFP4 `_blocks`/`_scales` ([out, in]);
            // unquantized ones as [in, out] matrices.
            let guName = n(.expertGateUp), downName = n(.expertDownFused)
            let packed = tensors.tensorIfPresent(guName + "_blocks") != nil
            if packed, spec.quantization?.allowsMXFP4 != true {
                throw FulgurError(.config, "\(tensors.sourceDescription): '\(guName)_blocks' is MXFP4 but config.json has no quantization_config with quant_method 'mxfp4'")
            }
            for e in 0..<m.experts {
                let gateUp: LinearWeight, down: LinearWeight
                if let gu = tensors.deferredWeight(guName, expert: e), let d = tensors.deferredWeight(downName, expert: e) {
                    gateUp = try checked(gu, out: 2 * inter, in: hidden, tensors: tensors)
                    down = try checked(d, out: hidden, in: inter, tensors: tensors)
                } else if packed {
                    gateUp = try LinearWeight(mxfp4: tensors.tensor(guName + "_blocks"), scales: tensors.tensor(guName + "_scales"), expert: e)
                    down = try LinearWeight(mxfp4: tensors.tensor(downName + "_blocks"), scales: tensors.tensor(downName + "_scales"), expert: e)
                    guard gateUp.outFeatures == 2 * inter, gateUp.inFeatures == hidden, down.outFeatures == hidden, down.inFeatures == inter else {
                        throw FulgurError(.shape, "\(tensors.sourceDescription): MXFP4 experts '\(guName)_blocks' / '\(downName)_blocks' hold [\(gateUp.outFeatures), \(gateUp.inFeatures)] / [\(down.outFeatures), \(down.inFeatures)], expected [\(2 * inter), \(hidden)] / [\(hidden), \(inter)]")
                    }
                } else {
                    gateUp = try LinearWeight(stacked: tensors.tensor(guName, shape: [m.experts, hidden, 2 * inter]), index: e, transposed: true)
                    down = try LinearWeight(stacked: tensors.tensor(downName, shape: [m.experts, inter, hidden]), index: e, transposed: true)
                }
                experts.append(ExpertWeights(
                    gateUp: gateUp, gate: nil, up: nil, down: down,
                    gateUpBias: Array(guBias[(e * 2 * inter)..<((e + 1) * 2 * inter)]),
                    downBias: Array(downBias[(e * hidden)..<((e + 1) * hidden)]), interleaved: true))
            }
        case (_, .some(let gu)):
            // Stacked [E, 2I, H] / [E, H, I]; MXFP4 ones as codes [E, rows, cols/2] with `_scale`.
            let down = try tensors.tensor(n(.expertDownFused))
            let guScale = tensors.tensorIfPresent(n(.expertGateUp) + "_scale")
            for e in 0..<m.experts {
                let gateUp: LinearWeight, downW: LinearWeight
                if let guScale {
                    guard spec.quantization?.allowsMXFP4 == true else {
                        throw FulgurError(.config, "\(tensors.sourceDescription): '\(gu.name)' is MXFP4 but config.json's quantization_config does not declare MXFP4")
                    }
                    gateUp = try LinearWeight(mxfp4: gu, scales: guScale, expert: e)
                    downW = try LinearWeight(mxfp4: down, scales: tensors.tensor(n(.expertDownFused) + "_scale"), expert: e)
                } else {
                    guard gu.shape == [m.experts, 2 * inter, hidden] else {
                        throw FulgurError(.shape, "\(tensors.sourceDescription): tensor '\(gu.name)' has shape \(gu.shape), expected [\(m.experts), \(2 * inter), \(hidden)]")
                    }
                    gateUp = try LinearWeight(stacked: gu, index: e)
                    downW = try LinearWeight(stacked: tensors.tensor(n(.expertDownFused), shape: [m.experts, hidden, inter]), index: e)
                }
                guard gateUp.outFeatures == 2 * inter, gateUp.inFeatures == hidden, downW.outFeatures == hidden, downW.inFeatures == inter else {
                    throw FulgurError(.shape, "\(tensors.sourceDescription): experts '\(gu.name)' hold [\(gateUp.outFeatures), \(gateUp.inFeatures)], expected [\(2 * inter), \(hidden)]")
                }
                experts.append(ExpertWeights(gateUp: gateUp, gate: nil, up: nil, down: downW, gateUpBias: nil, downBias: nil, interleaved: false))
            }
        case (_, .none):
            for e in 0..<m.experts {
                experts.append(ExpertWeights(
                    gateUp: nil,
                    gate: try resolveLinear(names.name(i, .expertGate, expert: e), out: inter, in: hidden, spec: spec, tensors: tensors),
                    up: try resolveLinear(names.name(i, .expertUp, expert: e), out: inter, in: hidden, spec: spec, tensors: tensors),
                    down: try resolveLinear(names.name(i, .expertDown, expert: e), out: hidden, in: inter, spec: spec, tensors: tensors),
                    gateUpBias: nil, downBias: nil, interleaved: false))
            }
        }
        return MoEWeights(spec: m, router: router, routerBias: routerBias, correctionBias: correction, experts: experts)
    }

    /// A fused `qkv_proj` in row chunks, each `[q | k | v]` for its share of the heads. Every
    /// chunk is a weight of its own; FP8 ones carry their own rows of tile scales (the scale
    /// grid restarts at each chunk), so each is an ordinary block-scaled matrix.
    static func fusedQKV(_ name: String, _ a: AttentionSpec, spec: ModelSpec, tensors: TensorSource) throws -> Op {
        let source = tensors.sourceDescription, hidden = spec.hiddenSize
        let chunks = a.qkvChunks ?? a.kvHeads
        guard chunks > 0, a.heads % chunks == 0, a.kvHeads % chunks == 0 else {
            throw FulgurError(.config, "\(source): '\(name)': \(a.heads) query and \(a.kvHeads) KV heads do not split into \(chunks) chunks")
        }
        guard !a.qkvBias else {
            throw FulgurError(.unsupported, "\(source): '\(name)' is fused and the config asks for q/k/v biases; fused projections with biases are not supported")
        }
        let qRows = a.heads / chunks * a.headDim, kRows = a.kvHeads / chunks * a.headDim, vRows = a.kvHeads / chunks * a.valueHeadDim
        let chunkRows = qRows + kRows + vRows
        let t = try tensors.tensor(name, shape: [chunks * chunkRows, hidden])
        let rowBytes = t.dtype.byteCount(elements: hidden)
        var scale: TensorView? = nil
        if t.dtype == .fp8e4m3 {
            guard let tile = spec.quantization?.fp8Tile else {
                throw FulgurError(.config, "\(source): tensor '\(name)' is F8_E4M3 but config.json has no quantization_config with quant_method 'fp8'")
            }
            let base = String(name.dropLast(".weight".count))
            let perChunk = (chunkRows + tile - 1) / tile, columns = (hidden + tile - 1) / tile
            scale = try tensors.tensor(base + ".weight_scale_inv", shape: [chunks * perChunk, columns])
        }
        let weights = try (0..<chunks).map { c -> LinearWeight in
            let view = TensorView(name: "\(name)[chunk \(c)]", dtype: t.dtype, shape: [chunkRows, hidden],
                                  data: t.data + c * chunkRows * rowBytes, byteCount: chunkRows * rowBytes, owner: t.owner)
            guard let scale, let tile = spec.quantization?.fp8Tile else { return try tensors.linearWeight(view) }
            let perChunk = scale.shape[0] / chunks, columns = scale.shape[1]
            let scaleView = TensorView(name: "\(scale.name)[chunk \(c)]", dtype: .f32, shape: [perChunk, columns],
                                       data: scale.data + 4 * c * perChunk * columns, byteCount: 4 * perChunk * columns, owner: scale.owner)
            return try tensors.namingSource { try LinearWeight(fp8: view, scaleInv: scaleView, tile: tile) }
        }
        return .fusedQKV(chunks: weights, qRows: qRows, kRows: kRows, vRows: vRows)
    }
}
