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
        self.codes = try module.device.upload(c)
        self.scales = try module.device.upload(s!)
    }

    /// out[t, o] = sum_i w[o, i] * x[t, i] for `tokens` rows of f32 `x` ([tokens, in]) into
    /// f32 `out` ([tokens, out]), enqueued on `stream`.
    public func apply(_ x: DeviceBuffer, tokens: Int, into out: DeviceBuffer, stream: CUDAStream) throws {
        precondition((1...Self.maxTokens).contains(tokens), "CUDALinear takes 1 to \(Self.maxTokens) tokens")
        precondition(x.byteCount >= 4 * tokens * inFeatures && out.byteCount >= 4 * tokens * outFeatures,
                     "activation buffers too small for \(tokens) tokens of '\(name)'")
        // Must match GEMV_ROWS and kWarps in gemv.cu.
        let rowsPerBlock = 8 * (tokens == 1 ? 1 : 2)
        let grid = ((outFeatures + rowsPerBlock - 1) / rowsPerBlock, 1, 1)
        let n = Int32(outFeatures), k = Int32(inFeatures)
        switch format {
        case .mxfp4:
            try module.launch(kernels[tokens - 1], grid: grid, block: (256, 1, 1), stream: stream,
                              [.pointer(codes.address), .pointer(scales.address), .pointer(x.address), .pointer(out.address), .int32(n), .int32(k)])
        case .fp8(let tile):
            try module.launch(kernels[tokens - 1], grid: grid, block: (256, 1, 1), stream: stream,
                              [.pointer(codes.address), .pointer(scales.address), .pointer(x.address), .pointer(out.address), .int32(n), .int32(k), .int32(Int32(tile))])
        case .plain:
            fatalError("unreachable: format checked at init")
        }
    }
}
