/// A checkpoint's `quantization_config`, as far as loading needs it. Two published schemas:
/// the MiMo FP4 / DeepSeek FP8 one (`quant_method: fp8`, `weight_block_size: [128, 128]`,
/// and for MXFP4 experts `store_dtype: mxfp4`, `mxfp4_block_size: 32`) and gpt-oss's
/// (`quant_method: mxfp4`). Which tensors are quantized is read off the tensors themselves
/// (their dtype and companion scale tensors) and checked against this.
public struct QuantizationSpec: Sendable, Equatable {
    public var method: String
    /// Side of the square FP8 scale tiles.
    public var fp8Tile: Int?
    /// Whether MXFP4 tensors may appear.
    public var allowsMXFP4: Bool

    static func parse(_ c: HFConfig) throws -> QuantizationSpec? {
        guard let q = try c.object("quantization_config") else { return nil }
        let method = try q.string("quant_method")
        switch method {
        case "fp8":
            if q.has("fmt"), try q.string("fmt") != "e4m3" {
                throw FulgurError(.unsupported, "\(q.path): fmt '\(try q.string("fmt"))' is not supported (e4m3)")
            }
            var tile = 128
            if q.has("weight_block_size") {
                guard let block = q.values["weight_block_size"] as? [Int], block.count == 2, block[0] == block[1], block[0] > 0 else {
                    throw FulgurError(.unsupported, "\(q.path): weight_block_size is \(q.values["weight_block_size"]!), expected a square block such as [128, 128]")
                }
                tile = block[0]
            }
            let store = q.has("store_dtype") ? try q.string("store_dtype") : nil
            if let store, store != "mxfp4", store != "fp8", store != "e4m3" {
                throw FulgurError(.unsupported, "\(q.path): store_dtype '\(store)' is not supported (mxfp4)")
            }
            if store == "mxfp4", try q.int("mxfp4_block_size", default: 32) != 32 {
                throw FulgurError(.unsupported, "\(q.path): mxfp4_block_size \(try q.int("mxfp4_block_size")) is not supported (32)")
            }
            return QuantizationSpec(method: method, fp8Tile: tile, allowsMXFP4: store == "mxfp4")
        case "mxfp4":
            return QuantizationSpec(method: method, fp8Tile: nil, allowsMXFP4: true)
        default:
            throw FulgurError(.unsupported, "\(q.path): quant_method '\(method)' is not supported (fp8 with 128x128 blocks and optional MXFP4 experts, or mxfp4)")
        }
    }
}

extension PlanBuilder {
    /// The weight at `name` (a `.weight` tensor), whatever its storage: plain, FP8 with a
    /// `weight_scale_inv` companion, or MXFP4 codes with a `weight_scale` companion.
    static func resolveLinear(_ name: String, out: Int, in inFeatures: Int, spec: ModelSpec, tensors: TensorSource) throws -> LinearWeight {
        try tensors.namingSource { try resolveLinearUnnamed(name, out: out, in: inFeatures, spec: spec, tensors: tensors) }
    }

    private static func resolveLinearUnnamed(_ name: String, out: Int, in inFeatures: Int, spec: ModelSpec, tensors: TensorSource) throws -> LinearWeight {
        if let w = tensors.deferredWeight(name, expert: nil) { return try checked(w, out: out, in: inFeatures, tensors: tensors) }
        let t = try tensors.tensor(name)
        let base = name.hasSuffix(".weight") ? String(name.dropLast(".weight".count)) : name
        let source = tensors.sourceDescription
        switch t.dtype {
        case .fp8e4m3:
            guard let tile = spec.quantization?.fp8Tile else {
                throw FulgurError(.config, "\(source): tensor '\(name)' is F8_E4M3 but config.json has no quantization_config with quant_method 'fp8'")
            }
            guard t.shape == [out, inFeatures] else {
                throw FulgurError(.shape, "\(source): tensor '\(name)' has shape \(t.shape), expected [\(out), \(inFeatures)]")
            }
            guard let scale = tensors.tensorIfPresent(base + ".weight_scale_inv") else {
                throw FulgurError(.format, "\(source): FP8 tensor '\(name)' has no '\(base).weight_scale_inv'")
            }
            return try LinearWeight(fp8: t, scaleInv: scale, tile: tile)
        case .u8, .i8:
            guard let scales = tensors.tensorIfPresent(base + ".weight_scale") else {
                throw FulgurError(.format, "\(source): tensor '\(name)' is \(t.dtype) (packed MXFP4?) but '\(base).weight_scale' is missing")
            }
            guard spec.quantization?.allowsMXFP4 == true else {
                throw FulgurError(.config, "\(source): tensor '\(name)' is MXFP4 but config.json's quantization_config does not declare MXFP4 (store_dtype: mxfp4)")
            }
            let w = try LinearWeight(mxfp4: t, scales: scales)
            guard w.outFeatures == out, w.inFeatures == inFeatures else {
                throw FulgurError(.shape, "\(source): MXFP4 tensor '\(name)' holds [\(w.outFeatures), \(w.inFeatures)], expected [\(out), \(inFeatures)]")
            }
            return w
        default:
            return try LinearWeight(tensors.tensor(name, shape: [out, inFeatures]))
        }
    }

    /// A deferred weight, checked to be `[out, in]`.
    static func checked(_ w: LinearWeight, out: Int, in inFeatures: Int, tensors: TensorSource) throws -> LinearWeight {
        guard w.outFeatures == out, w.inFeatures == inFeatures else {
            throw FulgurError(.shape, "\(tensors.sourceDescription): deferred matrix '\(w.name)' is [\(w.outFeatures), \(w.inFeatures)], expected [\(out), \(inFeatures)]")
        }
        return w
    }
}
