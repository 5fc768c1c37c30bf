import Fulgur

/// A linear weight copied to the GPU, applied by the gemv kernels (Kernels/gemv.cu) to 1-16
/// tokens of f32 activations. Formats: MXFP4 with split E8M0 scales, and FP8 E4M3 with f32
/// tile multipliers.
public final class CUDALinear: @unchecked Sendable {
    public static let maxTokens = 16
    public let name: String
    public let format: LinearWeight.Format
    public let outFeatures: Int
    public let inFeatures: Int
    /// Bytes of weights and scales one product reads.
    public let weightBytes: Int
    let module: KernelModule
    /// The kernel for 1...maxTokens tokens, at index tokens - 1.
    let kernels: [KernelModule.Function]
    let codes: DeviceBuffer
    let scales: DeviceBuffer

    public init(_ w: LinearWeight, module: KernelModule) throws {
        switch w.format {
        case .mxfp4:
            break
        case .fp8(let tile) where tile % 16 == 0 && w.inFeatures % 16 == 0:
            break
        default:
            throw FulgurError(.unsupported, "weight '\(w.name)' is \(w.format) [\(w.outFeatures), \(w.inFeatures)]; the CUDA executor's matrix-vector kernels take MXFP4 with split scales, or FP8 with tiles and an input size that are multiples of 16")
        }
        let (c, s) = w.storage
        self.name = w.name
        self.format = w.format
        self.outFeatures = w.outFeatures
        self.inFeatures = w.inFeatures
        self.weightBytes = w.byteCount
        self.module = module
        let family = if case .mxfp4 = w.format { "gemv_mxfp4" } else { "gemv_fp8" }
        self.kernels = try (1...Self.maxTokens).map { try module.function("\(family)_t\($0)") }
        for (i, f) in kernels.enumerated() { try module.allowSharedMemory(f, bytes: Self.plan(w.format, tokens: i + 1).sharedBytes) }
        self.codes = try module.device.upload(c)
        self.scales = try module.device.upload(s!)
    }

    /// Launch shape of gemv_<format>_t<tokens>; mirrors gemv::Plan and kWarps in Kernels/gemv.cu:
    /// 4 warps of `rows` rows each, x staged in tiles of 32 * unroll chunks of `elements`
    /// (padded by 4 floats each) per token.
    static func plan(_ format: LinearWeight.Format, tokens: Int) -> (rowsPerBlock: Int, sharedBytes: Int) {
        let rows = tokens == 1 ? 1 : tokens == 2 ? 2 : 4
        let unroll = tokens == 1 ? 4 : tokens < 8 ? 2 : 1
        let elements = if case .mxfp4 = format { 32 } else { 16 }
        return (4 * rows, tokens * 32 * unroll * (elements + 4) * 4)
    }

    /// out[t, o] = sum_i w[o, i] * x[t, i] for `tokens` rows of f32 `x` ([tokens, in]) into
    /// f32 `out` ([tokens, out]), enqueued on `stream`. With `overlapPrevious` (the default)
    /// the kernel starts streaming its weights while the previous kernel in the stream still
    /// runs, and waits for that kernel before it reads `x` or writes `out`.
    public func apply(_ x: DeviceBuffer, tokens: Int, into out: DeviceBuffer, stream: CUDAStream,
                      overlapPrevious: Bool = true) throws {
        precondition((1...Self.maxTokens).contains(tokens), "CUDALinear takes 1 to \(Self.maxTokens) tokens")
        precondition(x.byteCount >= 4 * tokens * inFeatures && out.byteCount >= 4 * tokens * outFeatures,
                     "activation buffers too small for \(tokens) tokens of '\(name)'")
        let plan = Self.plan(format, tokens: tokens)
        let grid = ((outFeatures + plan.rowsPerBlock - 1) / plan.rowsPerBlock, 1, 1)
        let n = Int32(outFeatures), k = Int32(inFeatures)
        switch format {
        case .mxfp4:
            try module.launch(kernels[tokens - 1], grid: grid, block: (128, 1, 1), sharedBytes: plan.sharedBytes, stream: stream, overlapPrevious: overlapPrevious,
                              [.pointer(codes.address), .pointer(scales.address), .pointer(x.address), .pointer(out.address), .int32(n), .int32(k)])
        case .fp8(let tile):
            try module.launch(kernels[tokens - 1], grid: grid, block: (128, 1, 1), sharedBytes: plan.sharedBytes, stream: stream, overlapPrevious: overlapPrevious,
                              [.pointer(codes.address), .pointer(scales.address), .pointer(x.address), .pointer(out.address), .int32(n), .int32(k), .int32(Int32(tile))])
        case .plain:
            fatalError("unreachable: format checked at init")
        }
    }
}
