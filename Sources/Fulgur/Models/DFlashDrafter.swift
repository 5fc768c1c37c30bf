import Foundation

/// z-lab's DFlash drafter (`DFlashDraftModel`, arXiv 2602.06036): a few Qwen3-style decoder
/// layers at the target's hidden size that fill a block of mask tokens in one forward pass.
/// It has no embedding or LM head of its own (the target's are used). Its context is the
/// target's hidden states after `target_layer_ids`, concatenated, projected by `fc` and
/// RMS-normed by `hidden_norm`; every layer turns that feature into keys and values with its
/// own k/v projections (k normed and rotated at the token's position, no input norm), and
/// these stay in the drafter's cache. The block attends to all of it and to itself in both
/// directions.
///
/// Two plans over one cache run it: the context plan (fc, hidden_norm, then each layer's k/v
/// path, stored without attending) and the block plan (embed, the layers, final norm, the
/// target's LM head).
public final class DFlashDrafter {
    public let path: String
    /// The block size the drafter was trained for.
    public let blockSize: Int
    public let maskTokenId: Int
    public let targetLayerIds: [Int]
    /// The executor that writes the target's features into the drafter's cache (context plan)
    /// and the one that drafts a block (block plan), over one cache.
    public let context: any Executor
    public let block: any Executor

    /// Opens the drafter in `directory` for `target`; `maxStepTokens` bounds a block (and the
    /// slack of sliding-window rings). `executor` makes the executor of the block plan for a
    /// context length (default: the CPU executor); the context plan shares its cache.
    public init(directory: String, target: Model, maxPositions: Int, maxStepTokens: Int,
                executor makeExecutor: ((Plan, Int) throws -> any Executor)? = nil) throws {
        path = directory
        let c = try HFConfig(path: directory + "/config.json")
        let arch = try c.strings("architectures")?.first
        guard arch == "DFlashDraftModel" else {
            throw FulgurError(.unsupported, "\(c.path): architecture '\(arch ?? "<none>")' is not a DFlash drafter (expected DFlashDraftModel)")
        }
        let dflash = try c.object("dflash_config") ?? HFConfig(path: c.path, values: [:])
        blockSize = try dflash.int("block_size", default: c.int("block_size", default: 16))
        guard dflash.has("mask_token_id") else { throw c.missing("dflash_config.mask_token_id", "the id of the mask token") }
        maskTokenId = try dflash.int("mask_token_id")
        targetLayerIds = dflash.ids("target_layer_ids")
        let spec = try Self.spec(c, dflash: dflash)
        let targetSpec = target.spec
        guard spec.hiddenSize == targetSpec.hiddenSize else {
            throw FulgurError(.shape, "\(c.path): hidden_size \(spec.hiddenSize) differs from the target's \(targetSpec.hiddenSize)")
        }
        guard !targetLayerIds.isEmpty, targetLayerIds.allSatisfy({ (0..<targetSpec.layerCount).contains($0) }) else {
            throw FulgurError(.config, "\(c.path): dflash_config.target_layer_ids \(targetLayerIds) must name layers of the target (0..<\(targetSpec.layerCount))")
        }
        guard (0..<target.plan.embedding.table.shape[0]).contains(maskTokenId) else {
            throw FulgurError(.config, "\(c.path): mask_token_id \(maskTokenId) is outside the target's vocabulary (0..<\(target.plan.embedding.table.shape[0]))")
        }

        let tensors = try SafetensorsCheckpoint(directory: directory)
        let hidden = spec.hiddenSize
        let (layerOps, widths) = try PlanBuilder.layers(spec: spec, tensors: tensors)
        let blockPlan = Plan(
            spec: spec, ops: [.embed] + layerOps + [.finalNorm(weight: try tensors.floats(spec.names.finalNorm, shape: [hidden]), eps: spec.rmsNormEps)],
            widths: widths, embedding: target.plan.embedding, lmHead: target.plan.lmHead)
        let features = targetLayerIds.count * hidden
        var contextOps: [Op] = [
            .linear(src: .x, dst: .h, weight: try PlanBuilder.resolveLinear("fc.weight", out: hidden, in: features, spec: spec, tensors: tensors), bias: nil),
            .rmsNorm(src: .h, dst: .h, weight: try tensors.floats("hidden_norm.weight", shape: [hidden]), eps: spec.rmsNormEps),
        ]
        // Each layer's key/value path, taken from the block plan so the weights are shared.
        for op in layerOps {
            switch op {
            case .linear(_, let dst, _, _) where dst == .k || dst == .v: contextOps.append(op)
            case .rmsNorm(let src, _, _, _) where src == .k: contextOps.append(op)
            case .rope(let buffer, _, _) where buffer == .k: contextOps.append(op)
            case .scale(let buffer, _) where buffer == .v: contextOps.append(op)
            case .attention(let layer, _, _): contextOps.append(.storeKV(layer: layer))
            default: break
            }
        }
        var contextWidths = widths
        contextWidths[.x] = features
        let contextPlan = Plan(spec: spec, ops: contextOps, widths: contextWidths, embedding: target.plan.embedding, lmHead: target.plan.lmHead)
        block = try makeExecutor?(blockPlan, maxPositions) ?? CPUExecutor(plan: blockPlan, maxPositions: maxPositions, maxStepTokens: maxStepTokens)
        context = try block.sharingCache(plan: contextPlan)
    }

    /// Qwen3 decoder layers with non-causal attention; with `use_swa`, the layers marked
    /// `sliding_attention` in `layer_types` (all layers without it) see keys within
    /// `swa_window_size - 1` positions on either side (TensorRT-LLM's reading of the DSpark
    /// drafters), and `attention_sink_bias` adds a learned sink logit per head
    /// (`self_attn.attention_sink_bias`, as in MiMo's attention).
    static func spec(_ c: HFConfig, dflash: HFConfig) throws -> ModelSpec {
        let n = try c.int("num_hidden_layers")
        let useSWA = try dflash.bool("use_swa", default: false)
        let window = useSWA ? try dflash.int("swa_window_size") : nil
        if let window, window < 1 { throw FulgurError(.config, "\(c.path): swa_window_size must be positive, got \(window)") }
        let sliding = try DecoderConfig.layerTypes(c, count: n) ?? Array(repeating: true, count: n)
        let sinks = try dflash.bool("attention_sink_bias", default: false)
        let causal = try dflash.bool("causal", default: false)
        var names = TensorNames.huggingFace()
        names.layerPrefix = { "layers.\($0)." }
        names.finalNorm = "norm.weight"
        names.roles[.sinks] = "self_attn.attention_sink_bias"
        let layers = try (0..<n).map { i in
            var a = try DecoderConfig.attention(c, window: sliding[i] ? window : nil, qkNorm: true)
            a.causal = causal
            a.hasSinks = sinks
            return LayerSpec(attention: a, feedForward: .dense(intermediate: try c.int("intermediate_size"), activation: .silu))
        }
        var spec = try DecoderConfig.base(c, architecture: "DFlashDraftModel", layers: layers, names: names)
        // A drafter quantized like its target (FP8 with block scales) loads like the target.
        spec.quantization = try QuantizationSpec.parse(c)
        return spec
    }

    private init(path: String, blockSize: Int, maskTokenId: Int, targetLayerIds: [Int], context: any Executor, block: any Executor) {
        self.path = path
        self.blockSize = blockSize
        self.maskTokenId = maskTokenId
        self.targetLayerIds = targetLayerIds
        self.context = context
        self.block = block
    }

    /// Another drafter over the same weights with a cache of its own, for another sequence of
    /// the same target (a server lane): the plans, and so the weights, are shared, as
    /// `Engine.makeGenerator` shares the target's (`Executor.sharingWeights`); on a GPU both the
    /// block's and the context's device copies (the context's were uploaded again per lane
    /// until the thirteenth session).
    public func withOwnCache() throws -> DFlashDrafter {
        let ownBlock = try block.sharingWeights()
        return DFlashDrafter(path: path, blockSize: blockSize, maskTokenId: maskTokenId, targetLayerIds: targetLayerIds,
                             context: try ownBlock.sharingCache(plan: context.plan, weightsOf: context), block: ownBlock)
    }

    /// Positions of context the drafter holds.
    public var contextLength: Int { block.length }

    public func reset() { block.reset() }
}

extension DFlashDrafter: Drafter {
    public func extend(tokens: [Int], features: [Float]) throws {
        _ = try context.forward(rows: features, logits: .none)
    }

    /// On the GPU the rows go from the target's buffer to the context plan's input directly
    /// (Executor.forward(capturedRowsOf:count:)); else through the host.
    public func extend(tokens: [Int], capturedBy target: any Executor) throws {
        if try context.forward(capturedRowsOf: target, count: tokens.count) { return }
        try extend(tokens: tokens, features: try hostFeatures(capturedBy: target, rows: tokens.count))
    }

    /// The drafter's greedy guesses, from the executor's argmax (on the GPU: B ids come back,
    /// not B x vocab logits).
    public func propose(after token: Int, count: Int) throws -> [Int] {
        guard count < block.maxStepTokens else {
            throw FulgurError(.usage, "a drafter block of \(count + 1) tokens exceeds the executor's \(block.maxStepTokens)-token steps")
        }
        let start = block.length
        let ids = try block.argmax([token] + Array(repeating: maskTokenId, count: count))
        block.truncate(to: start)
        return Array(ids[1...count])
    }
}
