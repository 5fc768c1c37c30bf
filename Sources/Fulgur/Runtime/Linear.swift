/// A linear layer's weight as stored, used in place: `[out, in]` rows in any supported
/// format, or `[in, out]` (`transposed`, as gpt-oss stores its unquantized experts) for
/// f32/bf16/f16. A view may select one expert of a stacked `[E, ...]` tensor without copying.
public struct LinearWeight: @unchecked Sendable {
    public enum Format: Sendable, Equatable {
        /// One tensor: f32, f16, bf16, or GGML blocks (q8_0, q4_0, q4_1, mxfp4 in 17-byte blocks).
        case plain(DType)
        /// MXFP4 codes (16 bytes per 32 elements, even element in the low nibble) with one
        /// E8M0 scale per 32 elements in a separate tensor (gpt-oss, MiMo).
        case mxfp4
        /// FP8 E4M3 with one f32 multiplier per `tile` x `tile` block in a separate tensor
        /// (`weight_scale_inv` of DeepSeek and MiMo checkpoints).
        case fp8(tile: Int)
    }

    public let name: String
    public let format: Format
    public let outFeatures: Int
    public let inFeatures: Int
    public let transposed: Bool
    /// A deferred random matrix (RandomModel.buildDeferred) holds no bytes: executors that
    /// can make them where they are used (CUDALinear, CUDAMoE) read this description; anything
    /// that reads `data` or `scales` makes them in memory first, once (`DeferredBytes`).
    public let deferred: DeferredRandomMatrix?
    private let stored: (data: UnsafeRawPointer, scales: UnsafeRawPointer?)?
    private let deferredBytes: DeferredBytes?
    let owners: [AnyObject]

    var data: UnsafeRawPointer { stored?.data ?? deferredBytes!.pointers.data }
    /// Per-row E8M0 scales (mxfp4) or the tile multipliers (fp8).
    var scales: UnsafeRawPointer? { stored != nil ? stored!.scales : deferredBytes!.pointers.scales }

    public var dtype: DType {
        switch format {
        case .plain(let d): return d
        case .mxfp4: return .mxfp4
        case .fp8: return .fp8e4m3
        }
    }

    public init(_ t: TensorView, transposed: Bool = false) throws {
        guard t.shape.count == 2 else {
            throw FulgurError(.shape, "tensor '\(t.name)' has shape \(t.shape), expected a 2-D weight")
        }
        try self.init(name: t.name, format: .plain(t.dtype), rows: t.shape[0], columns: t.shape[1], data: t.data,
                      scales: nil, owners: [t.owner].compactMap { $0 }, transposed: transposed)
    }

    /// Expert `index` of a stacked 3-D tensor `[E, rows, columns]`.
    public init(stacked t: TensorView, index: Int, transposed: Bool = false) throws {
        guard t.shape.count == 3, index < t.shape[0] else {
            throw FulgurError(.shape, "tensor '\(t.name)' has shape \(t.shape), expected [experts, rows, columns] with more than \(index) experts")
        }
        let bytes = t.dtype.byteCount(elements: t.shape[1] * t.shape[2])
        try self.init(name: "\(t.name)[\(index)]", format: .plain(t.dtype), rows: t.shape[1], columns: t.shape[2],
                      data: t.data + index * bytes, scales: nil, owners: [t.owner].compactMap { $0 }, transposed: transposed)
    }

    /// MXFP4 codes `[(E,) out, in/2]` or `[(E,) out, in/32, 16]` (u8) with scales
    /// `[(E,) out, in/32]` (u8 or e8m0); `expert` picks one of a stacked tensor.
    public init(mxfp4 codes: TensorView, scales: TensorView, expert: Int? = nil) throws {
        let lead = expert == nil ? 0 : 1
        let s = scales.shape
        guard codes.dtype == .u8 || codes.dtype == .i8, scales.dtype == .u8 || scales.dtype == .e8m0, s.count == 2 + lead else {
            throw FulgurError(.shape, "MXFP4 tensor '\(codes.name)' (\(codes.dtype) \(codes.shape)) with scales '\(scales.name)' (\(scales.dtype) \(s)): expected u8 codes and u8/e8m0 scales of shape [\(lead == 1 ? "experts, " : "")out, in/32]")
        }
        let out = s[lead], groups = s[lead + 1]
        let expectedCodes = [codes.shape.count == 3 + lead ? [out, groups, 16] : [out, groups * 16]]
            .map { (lead == 1 ? [s[0]] : []) + $0 }[0]
        guard codes.shape == expectedCodes else {
            throw FulgurError(.shape, "MXFP4 tensor '\(codes.name)' has shape \(codes.shape), expected \(expectedCodes) to match its scales '\(scales.name)' \(s)")
        }
        if let e = expert, e >= s[0] {
            throw FulgurError(.shape, "MXFP4 tensor '\(codes.name)' has \(s[0]) experts, asked for expert \(e)")
        }
        let e = expert ?? 0
        try self.init(name: expert.map { "\(codes.name)[\($0)]" } ?? codes.name, format: .mxfp4, rows: out, columns: groups * 32,
                      data: codes.data + e * out * groups * 16, scales: scales.data + e * out * groups,
                      owners: [codes.owner, scales.owner].compactMap { $0 }, transposed: false)
    }

    /// FP8 E4M3 `[out, in]` with f32 multipliers `[ceil(out/tile), ceil(in/tile)]`.
    public init(fp8 weight: TensorView, scaleInv: TensorView, tile: Int = 128) throws {
        guard weight.dtype == .fp8e4m3, weight.shape.count == 2 else {
            throw FulgurError(.shape, "FP8 tensor '\(weight.name)' is \(weight.dtype) \(weight.shape), expected a 2-D F8_E4M3 weight")
        }
        let out = weight.shape[0], inF = weight.shape[1]
        let expected = [(out + tile - 1) / tile, (inF + tile - 1) / tile]
        guard scaleInv.dtype == .f32, scaleInv.shape == expected else {
            throw FulgurError(.shape, "FP8 scale '\(scaleInv.name)' is \(scaleInv.dtype) \(scaleInv.shape), expected f32 \(expected) (one per \(tile)x\(tile) block of '\(weight.name)')")
        }
        try self.init(name: weight.name, format: .fp8(tile: tile), rows: out, columns: inF, data: weight.data,
                      scales: scaleInv.data, owners: [weight.owner, scaleInv.owner].compactMap { $0 }, transposed: false)
    }

    init(name: String, format: Format, rows: Int, columns: Int, data: UnsafeRawPointer, scales: UnsafeRawPointer?,
         owners: [AnyObject], transposed: Bool) throws {
        switch (format, transposed) {
        case (.plain(.f32), _), (.plain(.f16), _), (.plain(.bf16), _): break
        case (.plain(.q8_0), false), (.plain(.q4_0), false), (.plain(.q4_1), false), (.plain(.mxfp4), false): break
        case (.mxfp4, false), (.fp8, false): break
        default:
            throw FulgurError(.unsupported, "tensor '\(name)' is stored as \(format), which the CPU executor cannot use as a linear weight\(transposed ? " in [in, out] layout" : "") (expected f32, f16 or bf16\(transposed ? "" : ", a GGML block type, or MXFP4/FP8 with their scale tensors"))")
        }
        self.name = name
        self.format = format
        self.transposed = transposed
        self.outFeatures = transposed ? columns : rows
        self.inFeatures = transposed ? rows : columns
        stored = (data, scales)
        deferred = nil
        deferredBytes = nil
        self.owners = owners
    }

    /// A deferred random matrix as a weight: `[rows, columns]` of its format, no bytes yet.
    public init(deferred m: DeferredRandomMatrix, name: String) {
        self.name = name
        format = m.format
        transposed = false
        outFeatures = m.rows
        inFeatures = m.columns
        stored = nil
        deferred = m
        deferredBytes = DeferredBytes(m)
        owners = []
    }

    /// The stored bytes `storage` gives, counted without making them (deferred weights).
    public var storageByteCounts: (codes: Int, scales: Int) {
        if let deferred { return deferred.byteCounts }
        let rows = transposed ? inFeatures : outFeatures
        switch format {
        case .plain: return (rows * storedRowBytes, 0)
        case .mxfp4: return (rows * storedRowBytes, outFeatures * inFeatures / 32)
        case .fp8(let tile): return (rows * storedRowBytes, 4 * ((outFeatures + tile - 1) / tile) * ((inFeatures + tile - 1) / tile))
        }
    }

    /// Bytes of the stored row (codes only, scales excluded).
    var storedRowBytes: Int {
        switch format {
        case .plain(let d): return d.byteCount(elements: transposed ? outFeatures : inFeatures)
        case .mxfp4: return inFeatures / 2
        case .fp8: return inFeatures
        }
    }

    /// Bytes a product reads: codes plus scales.
    public var byteCount: Int {
        switch format {
        case .plain(let d): return d.byteCount(elements: outFeatures * inFeatures)
        case .mxfp4: return outFeatures * inFeatures / 2 + outFeatures * inFeatures / 32
        case .fp8(let tile): return outFeatures * inFeatures + 4 * ((outFeatures + tile - 1) / tile) * ((inFeatures + tile - 1) / tile)
        }
    }

    /// The stored bytes a product reads, for copying to a device: the codes and, for MXFP4
    /// and FP8, the scale tensor (E8M0 bytes `[out, in/32]`, or f32 tile multipliers).
    public var storage: (codes: UnsafeRawBufferPointer, scales: UnsafeRawBufferPointer?) {
        let counts = storageByteCounts
        let codes = UnsafeRawBufferPointer(start: data, count: counts.codes)
        switch format {
        case .plain: return (codes, nil)
        case .mxfp4, .fp8: return (codes, UnsafeRawBufferPointer(start: scales, count: counts.scales))
        }
    }

    /// Row `r` (an output feature) as f32; for the transposed layout, stored row `r` (an input).
    public func dequantizeRow(_ r: Int, into dst: UnsafeMutablePointer<Float>) {
        let n = transposed ? outFeatures : inFeatures
        let row = data + r * storedRowBytes
        switch format {
        case .plain(let d):
            Dequant.row(d, row, n, dst)
        case .mxfp4:
            for b in 0..<(n / 32) {
                let scale = E8M0.decode(scales!.load(fromByteOffset: r * (n / 32) + b, as: UInt8.self))
                for j in 0..<16 {
                    let q = row.load(fromByteOffset: 16 * b + j, as: UInt8.self)
                    dst[32 * b + 2 * j] = E2M1.decode(q & 0xF) * scale
                    dst[32 * b + 2 * j + 1] = E2M1.decode(q >> 4) * scale
                }
            }
        case .fp8(let tile):
            let rowScales = fp8RowScales(r, tile)
            for i in 0..<n { dst[i] = E4M3.decode(row.load(fromByteOffset: i, as: UInt8.self)) * rowScales[i / tile] }
        }
    }

    @inline(__always)
    func fp8RowScales(_ r: Int, _ tile: Int) -> UnsafePointer<Float> {
        scales!.assumingMemoryBound(to: Float.self) + (r / tile) * ((inFeatures + tile - 1) / tile)
    }

    /// out[t, o] = sum_i w[o, i] * x[t, i] (+ bias[o]) for `tokens` rows of x.
    ///
    /// `decodeOnceFrom`: the first row that takes the decode-once path (see `decodeOnceTokens`);
    /// the rows before it use the kernels that read the stored format per token. Default: all
    /// rows from `decodeOnceTokens` tokens on, none below. The two paths round differently, but
    /// a row's result depends only on that row and its path, so a batched step that gives each
    /// sequence's rows the path they would take alone reproduces that sequence bit for bit.
    public func apply(_ x: UnsafePointer<Float>, tokens: Int, bias: UnsafePointer<Float>? = nil, into out: UnsafeMutablePointer<Float>,
                      decodeOnceFrom: Int? = nil) {
        if transposed {
            applyTransposed(x, tokens: tokens, into: out)
        } else {
            let split = decodeOnceFrom ?? (tokens >= Self.decodeOnceTokens ? 0 : tokens)
            if split > 0 { applyRowsPerToken(x, tokens: split, into: out) }
            if split < tokens { applyRowsDecodedOnce(x + split * inFeatures, tokens: tokens - split, into: out + split * outFeatures) }
        }
        if let bias {
            for t in 0..<tokens { for o in 0..<outFeatures { out[t * outFeatures + o] += bias[o] } }
        }
    }

    /// From this many tokens on (a prefill chunk, a verify block), a quantized row is decoded
    /// to f32 once and then multiplied with every token, instead of decoding it per token; the
    /// GGML block types (q8_0, q4_0, q4_1) have multi-token kernels that unpack a block once for
    /// several tokens instead, which is faster.
    static let decodeOnceTokens = 4

    private func applyRowsDecodedOnce(_ x: UnsafePointer<Float>, tokens: Int, into out: UnsafeMutablePointer<Float>) {
        let n = inFeatures, outN = outFeatures
        // f32 rows need no decoding, and the GGML block types' kernels unpack each block once
        // for several tokens, which is faster than decoding rows to f32.
        switch format {
        case .plain(.f32), .plain(.q8_0), .plain(.q4_0), .plain(.q4_1): return applyRowsPerToken(x, tokens: tokens, into: out)
        default: break
        }
        Parallel.chunks(outN, work: outN * n * tokens) { rows in
            let row = UnsafeMutablePointer<Float>.allocate(capacity: n)
            defer { row.deallocate() }
            for r in rows {
                dequantizeRow(r, into: row)
                for t in 0..<tokens { out[t * outN + r] = DotKernels.f32(row, x + t * n, n) }
            }
        }
    }

    private func applyRowsPerToken(_ x: UnsafePointer<Float>, tokens: Int, into out: UnsafeMutablePointer<Float>) {
        let n = inFeatures, rowBytes = storedRowBytes, format = self.format, data = self.data, outN = outFeatures
        let scales = self.scales, groups = n / 32
        let pack = ActivationPack(x, tokens: tokens, columns: n, for: format)
        pack.values.withUnsafeBufferPointer { xs in
            pack.blockSums.withUnsafeBufferPointer { sums in
                let xp = xs.baseAddress!, sp = sums.baseAddress
                Parallel.chunks(outN, work: outN * n * tokens) { rows in
                    for r in rows {
                        let w = data + r * rowBytes
                        // Several tokens (a batched decode step): the same sums, each block
                        // unpacked once for several tokens.
                        if tokens > 1 {
                            switch format {
                            case .plain(.q8_0): DotKernels.q8_0(w, xp, n, tokens: tokens, out: out + r, outStride: outN); continue
                            case .plain(.q4_0): DotKernels.q4_0(w, xp, sp!, n, tokens: tokens, out: out + r, outStride: outN); continue
                            case .plain(.q4_1): DotKernels.q4_1(w, xp, sp!, n, tokens: tokens, out: out + r, outStride: outN); continue
                            default: break
                            }
                        }
                        for t in 0..<tokens {
                            let xt = xp + t * n
                            let v: Float
                            switch format {
                            case .plain(.f32): v = DotKernels.f32(w, xt, n)
                            case .plain(.bf16): v = DotKernels.bf16(w, xt, n)
                            case .plain(.f16): v = DotKernels.f16(w, xt, n)
                            case .plain(.q8_0): v = DotKernels.q8_0(w, xt, n)
                            case .plain(.q4_0): v = DotKernels.q4_0(w, xt, sp! + t * groups, n)
                            case .plain(.q4_1): v = DotKernels.q4_1(w, xt, sp! + t * groups, n)
                            case .plain(.mxfp4): v = PackedKernels.mxfp4GGUF(w, xt, n)
                            case .mxfp4: v = PackedKernels.mxfp4Split(w, scales! + r * groups, xt, n)
                            case .fp8(let tile): v = PackedKernels.fp8(w, fp8RowScales(r, tile), tile: tile, xt, n)
                            default: fatalError("unreachable: format checked at init")
                            }
                            out[t * outN + r] = v
                        }
                    }
                }
            }
        }
    }

    /// [in, out] storage: out[t, :] = sum_i x[t, i] * w[i, :], one stored row at a time.
    private func applyTransposed(_ x: UnsafePointer<Float>, tokens: Int, into out: UnsafeMutablePointer<Float>) {
        let outN = outFeatures, inN = inFeatures
        out.update(repeating: 0, count: tokens * outN)
        var row = [Float](repeating: 0, count: outN)
        row.withUnsafeMutableBufferPointer { rb in
            for i in 0..<inN {
                dequantizeRow(i, into: rb.baseAddress!)
                for t in 0..<tokens {
                    let a = x[t * inN + i]
                    let o = out + t * outN
                    for j in 0..<outN { o[j] += a * rb[j] }
                }
            }
        }
    }
}

extension TensorSource {
    /// A linear weight of one of this source's tensors, with errors that name the source.
    public func linearWeight(_ t: TensorView, transposed: Bool = false) throws -> LinearWeight {
        try namingSource { try LinearWeight(t, transposed: transposed) }
    }

    public func linearWeight(stacked t: TensorView, index: Int, transposed: Bool = false) throws -> LinearWeight {
        try namingSource { try LinearWeight(stacked: t, index: index, transposed: transposed) }
    }

    /// Runs `make`, prefixing errors that do not name a file with this source's path.
    func namingSource(_ make: () throws -> LinearWeight) throws -> LinearWeight {
        do {
            return try make()
        } catch let e as FulgurError where !e.message.hasPrefix(sourceDescription) {
            throw FulgurError(e.kind, "\(sourceDescription): \(e.message)")
        }
    }
}
