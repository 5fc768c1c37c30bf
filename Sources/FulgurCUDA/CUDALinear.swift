import Foundation
import Fulgur

/// A residual add and RMSNorm that the kernel after it does for one token, in place of an
/// add_rmsnorm launch (CUDALinear.apply(norm:), CUDAMoE.run(norm:)): resid becomes resid + add
/// (add 0: unchanged) and h = weight * rmsnorm(resid + add), eps inside the root, as add_rmsnorm
/// leaves them. `arrivals`: an int of device memory, zero between launches (the kernel's last
/// block writes resid when every block has read it). Device addresses.
public struct ResidualNorm: Sendable {
    public let resid: UInt64, add: UInt64, weight: UInt64
    public let eps: Float
    public let h: UInt64, arrivals: UInt64
    public init(resid: UInt64, add: UInt64, weight: UInt64, eps: Float, h: UInt64, arrivals: UInt64) {
        (self.resid, self.add, self.weight, self.eps, self.h, self.arrivals) = (resid, add, weight, eps, h, arrivals)
    }
}

/// A linear weight (or several stacked by rows) copied to the GPU, applied by the kernels of
/// Kernels/gemv.cu to 1-16 tokens of f32 activations. MXFP4 with split E8M0 scales, FP8 E4M3
/// with f32 tile multipliers and BF16 stay as stored; every other format (f16, GGML blocks,
/// the [in, out] layout) is decoded to f32 once at upload, which is exact. Deferred random
/// weights (RandomModel.buildDeferred) are made in device memory, not uploaded.
public final class CUDALinear: @unchecked Sendable {
    public static let maxTokens = 16
    public enum Storage: Equatable { case mxfp4, fp8(tile: Int), bf16, f32 }

    public let name: String
    public let storage: Storage
    public let outFeatures: Int
    public let inFeatures: Int
    /// Bytes of weights and scales one product reads.
    public let weightBytes: Int
    let module: KernelModule
    /// The kernel for each token count (index tokens - 1); plain kernels come in bins 1, 2, 4, 8, 16.
    let kernels: [KernelModule.Function]
    let codes: DeviceBuffer
    let scales: DeviceBuffer?
    let bias: DeviceBuffer?

    /// How MXFP4 and FP8 products are laid out on the GPU (Kernels/gemv.cu): `.rows`, version
    /// 2 (4 rows a block, x staged per block), or `.wide` (resident blocks stage x once and
    /// stream many rows each; for products of many rows, the LM head). `.wide` falls back to
    /// `.rows` for a token count whose x does not fit in shared memory.
    ///
    /// `.mma` (FP8 with tiles of a multiple of 64 and BF16, K a multiple of 64): tensor-core
    /// tiles of 64 rows with K split over a cluster of 8 blocks (gemv::mma_product), taken by
    /// default from `mmaMinTokens` tokens up; elsewhere `.rows` runs.
    public enum Layout: Sendable { case rows, wide, mma }
    public var layout: Layout
    /// Take `layout` at every token count it can take (checks and comparisons), not only where
    /// the defaults pick it.
    public var forceLayout = false
    /// Products that can take the tensor-core layout take it from this many tokens up
    /// (`FULGUR_GEMV_MMA_MIN`, e.g. 17 to turn it off for comparisons).
    public static let mmaMinTokens = ProcessInfo.processInfo.environment["FULGUR_GEMV_MMA_MIN"].flatMap { Int($0) } ?? 4
    /// gemv_mma_<format>_n1 and _n2 (up to 8 and 16 tokens); empty when the shape cannot take them.
    let mmaKernels: [KernelModule.Function]
    /// Products with at least this many rows take the wide layout by default, for 1-token
    /// steps only: at 4 and 8 tokens it ran at half the rows layout's speed (one row per warp,
    /// so each x value read from shared memory feeds one row; Kernels/NOTES.md). At one token
    /// its grid is resident at once, so every warp asks for its first weights before waiting
    /// for the previous kernel, where the rows layout's second wave (q/k/v of gpt-oss-20b: 1280
    /// blocks) cannot: in the replayed gpt-oss-20b step q/k/v went 11.3 -> 8.8 us and o_proj
    /// 7.7 -> 5.7 us, the step 2.430 -> 2.348 ms in one call (H100, 2026-11-28; the threshold was 32768, for
    /// LM heads only). `FULGUR_GEMV_LAYOUT=rows` turns it off and `FULGUR_GEMV_WIDE_ROWS=N`
    /// moves the threshold (for comparisons).
    public static let wideRows: Int = {
        let env = ProcessInfo.processInfo.environment
        if env["FULGUR_GEMV_LAYOUT"] == "rows" { return Int.max }
        return env["FULGUR_GEMV_WIDE_ROWS"].flatMap { Int($0) } ?? 2048
    }()
    public static let wideMaxTokens = 1
    /// Whether a plain (BF16/f32) product of `rows` rows asks L2 for its weights before waiting
    /// for the previous kernel (gemv::plain, `early`; the prefetches change no result). By
    /// default products of fewer than plainFewRows rows do (the default model's grids are then
    /// resident at once): on an H200 (2026-11-29) the default model's 1-token step went 0.864 ->
    /// 0.806 ms and its 2-token step 1.052 -> 0.893 ms with every plain product doing it, while
    /// the LM heads (many waves of blocks, where a later block's prefetch only doubles its own
    /// reads) got slower: the
    /// default model's 27.6 -> 30.9 us in the step, gpt-oss-20b's f32 head alone 509 -> 581 us.
    /// `FULGUR_PLAIN_EARLY=0`: none; `=1`: every plain product (for comparisons).
    public static func plainEarly(rows: Int) -> Bool {
        switch plainEarlyMode {
        case "0": false
        case "1": true
        default: rows < plainFewRows
        }
    }
    static let plainEarlyMode = ProcessInfo.processInfo.environment["FULGUR_PLAIN_EARLY"]
    /// Plain (BF16/f32) products of fewer rows never take several rows a warp: they need the
    /// warps more than the shared x reads (Kernels/gemv.cu, PlainRows). From 2 tokens they split
    /// each row over a block (plainSplit); with that off, one row a warp (`_r1`).
    public static let plainFewRows = 16384
    /// Whether a plain product of `rows` rows at token bin `bin` splits each row's sum over a
    /// block's four warps (gemv_<f32|bf16>_t<bin>_sk, gemv::plain_split) instead of one row a
    /// warp: by default products of fewer than plainFewRows rows at 2 or more tokens. On an H200
    /// (2026-11-29, the default model, all of whose products are plain f32 ones) the 2-, 4- and
    /// 8-token steps went 0.889 -> 0.810, 1.403 -> 1.120 and 2.146 -> 1.720 ms; at 1 token it
    /// was slower (0.801 -> 0.826 ms), so 1-token products keep one row a warp.
    /// `FULGUR_PLAIN_SPLIT=0`: never; `=all`: at every token count; any other value (or none):
    /// the default (for comparisons).
    public static func plainSplit(rows: Int, bin: Int) -> Bool {
        guard rows < plainFewRows else { return false }
        switch plainSplitMode {
        case "0": return false
        case "all": return true
        default: return bin > 1
        }
    }
    static let plainSplitMode = ProcessInfo.processInfo.environment["FULGUR_PLAIN_SPLIT"]
    let wideKernels: [KernelModule.Function]
    /// gemv_wide_norm_<format>_t1: the wide layout with the residual add and RMSNorm before it
    /// done in the product (`apply(norm:)`); nil for BF16 and f32 storage.
    let wideNormKernel: KernelModule.Function?
    /// Wide-layout and tensor-core grids found so far; executors sharing this product (server
    /// lanes) launch it from several threads.
    private var wideGrid: [Int: Int] = [:]
    private let wideGridLock = NSLock()

    /// The ranges of device memory this product's weights, scales and bias occupy (to warm L2).
    public var deviceRanges: [(address: UInt64, bytes: Int)] {
        [codes, scales, bias].compactMap { $0 }.map { ($0.address, $0.byteCount) }
    }

    /// How `w` is kept on the GPU.
    public static func storage(of w: LinearWeight) -> Storage {
        switch w.format {
        case .mxfp4: return .mxfp4
        case .fp8(let tile) where tile % 16 == 0 && w.inFeatures % 16 == 0: return .fp8(tile: tile)
        case .plain(.bf16) where !w.transposed: return .bf16
        default: return .f32
        }
    }

    public convenience init(_ w: LinearWeight, bias: [Float]? = nil, module: KernelModule) throws {
        try self.init(stacking: [w], biases: [bias], name: w.name, module: module)
    }

    /// Whether `parts` can be stacked by rows into one weight: the same storage and inputs,
    /// and FP8 parts whose rows end on a tile (the tile grid must continue across them).
    public static func canStack(_ parts: [LinearWeight]) -> Bool {
        guard let first = parts.first else { return false }
        let storage = Self.storage(of: first)
        for (i, p) in parts.enumerated() {
            guard Self.storage(of: p) == storage, p.inFeatures == first.inFeatures else { return false }
            if case .fp8(let tile) = storage, i < parts.count - 1, p.outFeatures % tile != 0 { return false }
        }
        return true
    }

    /// `parts` stacked by rows into one weight ([sum of out, in]; check `canStack` first), so
    /// one launch computes them all; `biases` per part (nil: none, zeros if others have one).
    public init(stacking parts: [LinearWeight], biases: [[Float]?], name: String, module: KernelModule) throws {
        precondition(Self.canStack(parts) && parts.count == biases.count, "CUDALinear: parts that cannot be stacked")
        let storage = Self.storage(of: parts[0]), k = parts[0].inFeatures
        let device = module.device
        let rows = parts.reduce(0) { $0 + $1.outFeatures }
        switch storage {
        case .mxfp4, .fp8, .bf16:
            (codes, scales) = try Self.deviceStorage(parts, scaled: storage != .bf16, module: module)
        case .f32:
            let values = Self.f32Rows(parts)
            codes = try values.withUnsafeBytes { try device.upload($0) }
            scales = nil
        }
        if biases.contains(where: { $0 != nil }) {
            let all = zip(parts, biases).flatMap { p, b in b ?? [Float](repeating: 0, count: p.outFeatures) }
            bias = try all.withUnsafeBytes { try device.upload($0) }
        } else {
            bias = nil
        }
        self.name = name
        self.storage = storage
        self.outFeatures = rows
        self.inFeatures = k
        self.weightBytes = switch storage {
        case .mxfp4: rows * k * 17 / 32
        case .fp8(let tile): rows * k + 4 * ((rows + tile - 1) / tile) * ((k + tile - 1) / tile)
        case .bf16: 2 * rows * k
        case .f32: 4 * rows * k
        }
        self.module = module
        switch storage {
        case .mxfp4, .fp8:
            let family = storage == .mxfp4 ? "gemv_mxfp4" : "gemv_fp8"
            kernels = try (1...Self.maxTokens).map { try module.function("\(family)_t\($0)") }
            for (i, f) in kernels.enumerated() { try module.allowSharedMemory(f, bytes: Self.plan(storage, tokens: i + 1).sharedBytes) }
            let wide = storage == .mxfp4 ? "gemv_wide_mxfp4" : "gemv_wide_fp8"
            wideKernels = try (1...Self.maxTokens).map { try module.function("\(wide)_t\($0)") }
            wideNormKernel = try module.function(storage == .mxfp4 ? "gemv_wide_norm_mxfp4_t1" : "gemv_wide_norm_fp8_t1")
        case .bf16, .f32:
            let family = storage == .bf16 ? "gemv_bf16" : "gemv_f32"
            let bins = [1, 2, 4, 8, 16], oneRow = rows < Self.plainFewRows
            let functions = try bins.map { bin in
                try module.function("\(family)_t\(bin)" + (Self.plainSplit(rows: rows, bin: bin) ? "_sk" : oneRow && bin > 1 ? "_r1" : ""))
            }
            kernels = (1...Self.maxTokens).map { t in functions[bins.firstIndex { $0 >= t }!] }
            wideKernels = []
            wideNormKernel = nil
        }
        let mmaFamily: String? = switch storage {
        case .fp8(let tile) where tile % 64 == 0 && k % 64 == 0: "gemv_mma_fp8"
        case .bf16 where k % 64 == 0: "gemv_mma_bf16"
        default: nil
        }
        mmaKernels = try mmaFamily.map { f in try [1, 2].map { try module.function("\(f)_n\($0)") } } ?? []
        layout = rows >= Self.wideRows ? .wide : .rows
    }

    /// The parts' stored codes (or BF16 values) and scales, each concatenated by rows in
    /// device memory: copied from the host, or made on the GPU for deferred random parts
    /// (RandomFiller), which never exist on the host.
    static func deviceStorage(_ parts: [LinearWeight], scaled: Bool, module: KernelModule) throws -> (codes: DeviceBuffer, scales: DeviceBuffer?) {
        let device = module.device, counts = parts.map(\.storageByteCounts)
        let codes = try device.allocate(counts.reduce(0) { $0 + $1.codes })
        let scales = scaled ? try device.allocate(counts.reduce(0) { $0 + $1.scales }) : nil
        var filler: RandomFiller? = nil, codeOffset = 0, scaleOffset = 0
        for (p, n) in zip(parts, counts) {
            if let m = p.deferred {
                let f = try filler ?? module.randomFiller()
                filler = f
                try f.fill(m, codes: codes.address + UInt64(codeOffset), scales: scales.map { $0.address + UInt64(scaleOffset) })
            } else {
                let stored = p.storage
                try codes.upload(stored.codes, offset: codeOffset)
                if let scales { try scales.upload(stored.scales!, offset: scaleOffset) }
            }
            codeOffset += n.codes
            scaleOffset += n.scales
        }
        try filler?.finish()
        return (codes, scales)
    }

    /// The device bytes of the weight (codes or plain values) and scales as stored, for checks.
    public func deviceBytes() throws -> (codes: [UInt8], scales: [UInt8]?) {
        (try codes.bytes(), try scales?.bytes())
    }

    /// Shared memory of the wide layout at `tokens` (x for the whole K, padded as gemv::stage).
    static func wideSharedBytes(_ storage: Storage, inFeatures k: Int, tokens: Int) -> Int {
        let elements = storage == .mxfp4 ? 32 : 16
        return tokens * (k / elements) * (elements + 4) * 4
    }

    /// Blocks of the wide kernel for `tokens`: all resident at once, at most one per 8 rows;
    /// nil when its x does not fit in shared memory (the rows layout runs instead).
    /// `norm`: of gemv_wide_norm_*_t1 (tokens 1; its grid is kept under key 0).
    private func wideBlocks(_ tokens: Int, norm: Bool = false) throws -> Int? {
        wideGridLock.lock()
        defer { wideGridLock.unlock() }
        let key = norm ? 0 : tokens
        if let g = wideGrid[key] { return g > 0 ? g : nil }
        let device = module.device, shared = Self.wideSharedBytes(storage, inFeatures: inFeatures, tokens: tokens) + (norm ? 4 * inFeatures : 0)
        var grid = 0
        if shared <= device.maxSharedMemoryPerBlock, !norm || wideNormKernel != nil {
            let f = norm ? wideNormKernel! : wideKernels[tokens - 1]
            try module.allowSharedMemory(f, bytes: shared)
            let perSM = try module.residentBlocksPerMultiprocessor(f, threads: 256, sharedBytes: shared)
            grid = min((outFeatures + 7) / 8, perSM * device.multiprocessors)
        }
        wideGrid[key] = grid
        return grid > 0 ? grid : nil
    }

    /// At most this many 64-row blocks a cluster of a tensor-core product (gemv::kMmaRowBlocks = 4;
    /// `FULGUR_GEMV_MMA_ROWS=1...4` lowers it, for measuring: fewer a block means more clusters,
    /// in more than one wave).
    static let mmaMaxRowBlocks = min(4, max(1, ProcessInfo.processInfo.environment["FULGUR_GEMV_MMA_ROWS"].flatMap { Int($0) } ?? 4))

    /// The share of the clusters that fit at once a product sizes its grid to
    /// (`FULGUR_GEMV_MMA_FILL`, 0.1-1, default 1), for measuring grids that leave room to
    /// the kernels resident beside them.
    static let mmaFill = min(1, max(0.1, ProcessInfo.processInfo.environment["FULGUR_GEMV_MMA_FILL"].flatMap { Double($0) } ?? 1))

    /// Clusters (grid.x) of a tensor-core product: as many as fit on the GPU at once, each
    /// taking an equal number (at most gemv::kMmaRowBlocks = 4) of the 64-row blocks.
    private var mmaGrid: [Int: Int] = [:]
    private func mmaClusters(_ f: KernelModule.Function, _ index: Int) throws -> Int {
        wideGridLock.lock()
        defer { wideGridLock.unlock() }
        if let g = mmaGrid[index] { return g }
        let rowBlocks = (outFeatures + 63) / 64
        let fits = try module.residentBlocksPerMultiprocessor(f, threads: 128, sharedBytes: 0) * module.device.multiprocessors / 8
        let resident = max(1, Int(Double(fits) * Self.mmaFill))
        let perCluster = min(Self.mmaMaxRowBlocks, (rowBlocks + resident - 1) / resident)
        let g = (rowBlocks + perCluster - 1) / perCluster
        mmaGrid[index] = g
        return g
    }

    /// `parts` decoded to f32 and stacked as `[sum of out, in]` rows (the [in, out] layout
    /// transposed); exact for every stored format.
    static func f32Rows(_ parts: [LinearWeight]) -> [Float] {
        let k = parts[0].inFeatures
        var values = [Float](repeating: 0, count: parts.reduce(0) { $0 + $1.outFeatures } * k)
        var row0 = 0
        values.withUnsafeMutableBufferPointer { v in
            for p in parts {
                if p.transposed {
                    var stored = [Float](repeating: 0, count: p.outFeatures)
                    for i in 0..<k {
                        stored.withUnsafeMutableBufferPointer { p.dequantizeRow(i, into: $0.baseAddress!) }
                        for o in 0..<p.outFeatures { v[(row0 + o) * k + i] = stored[o] }
                    }
                } else {
                    for o in 0..<p.outFeatures { p.dequantizeRow(o, into: v.baseAddress! + (row0 + o) * k) }
                }
                row0 += p.outFeatures
            }
        }
        return values
    }

    /// Launch shape of gemv_<format>_t<tokens>; mirrors gemv::Plan and kWarps in Kernels/gemv.cu:
    /// 4 warps of `rows` rows each, x staged in tiles of 32 * unroll chunks of `elements`
    /// (padded by 4 floats each) per token. Plain kernels: rows a warp by token bin (PlainRows), or
    /// a block per row (plainSplit, 4 x bin floats of static shared memory); no dynamic shared memory.
    static func plan(_ storage: Storage, tokens: Int, rows: Int = .max) -> (rowsPerBlock: Int, sharedBytes: Int) {
        switch storage {
        case .bf16, .f32:
            // Mirrors gemv::PlainRows: a warp owns bin rows (4 from bin 4 up), bins 1, 2, 4, 8,
            // 16; one row at every T in a product of fewer than plainFewRows rows (`_r1`).
            // One row a block where the row's sum is split over the block's warps (`_sk`).
            let bin = [1, 2, 4, 8, 16].first { $0 >= tokens }!
            if plainSplit(rows: rows, bin: bin) { return (1, 0) }
            return (rows < plainFewRows ? 4 : 4 * min(bin, 4), 0)
        case .mxfp4, .fp8:
            let rows = tokens == 1 ? 1 : tokens == 2 ? 2 : 4
            let unroll = tokens == 1 ? 4 : tokens < 8 ? 2 : 1
            let elements = storage == .mxfp4 ? 32 : 16
            return (4 * rows, tokens * 32 * unroll * (elements + 4) * 4)
        }
    }

    /// out[t * outStride + o] = sum_i w[o, i] * x[t * xStride + g * in + i] (+ bias[o]) for
    /// `tokens` rows of f32 x, where g = o / groupRows (one matrix: groupRows = out; quantized
    /// storage takes only xStride = in and one group), enqueued on `stream`. With
    /// `overlapPrevious` the kernel starts streaming its weights while the previous kernel in
    /// the stream still runs, and waits for that kernel before it reads x or writes out.
    public func apply(x: UInt64, tokens: Int, out: UInt64, outStride: Int? = nil, xStride: Int? = nil, groupRows: Int? = nil,
                      stream: CUDAStream, overlapPrevious: Bool = true) throws {
        precondition((1...Self.maxTokens).contains(tokens), "CUDALinear takes 1 to \(Self.maxTokens) tokens")
        let plan = Self.plan(storage, tokens: tokens, rows: outFeatures)
        let grid = ((outFeatures + plan.rowsPerBlock - 1) / plan.rowsPerBlock, 1, 1)
        let n = Int32(outFeatures), k = Int32(inFeatures), os = Int32(outStride ?? outFeatures)
        let biasArg = KernelModule.Argument.pointer(bias?.address ?? 0)
        let mmaFits = !mmaKernels.isEmpty && (xStride ?? inFeatures) == inFeatures && (groupRows ?? outFeatures) == outFeatures
        if mmaFits, forceLayout ? layout == .mma : tokens >= Self.mmaMinTokens {
            var tile: Int32 = 0
            if case .fp8(let t) = storage { tile = Int32(t) }
            let index = tokens <= 8 ? 0 : 1, f = mmaKernels[index]
            try module.launch(f, grid: (try mmaClusters(f, index), 8, 1), block: (128, 1, 1), stream: stream,
                              overlapPrevious: overlapPrevious,
                              [.pointer(codes.address), .pointer(scales?.address ?? 0), biasArg, .pointer(x), .pointer(out), .int32(n), .int32(k), .int32(os),
                               .int32(tile), .int32(Int32(tokens))])
            return
        }
        if layout == .wide, tokens <= Self.wideMaxTokens || forceLayout, storage != .bf16, storage != .f32, let blocks = try wideBlocks(tokens) {
            precondition(xStride == nil && groupRows == nil, "quantized products take contiguous x")
            var args: [KernelModule.Argument] = [.pointer(codes.address), .pointer(scales!.address), biasArg, .pointer(x), .pointer(out), .int32(n), .int32(k), .int32(os)]
            if case .fp8(let tile) = storage { args.append(.int32(Int32(tile))) }
            try module.launch(wideKernels[tokens - 1], grid: (blocks, 1, 1), block: (256, 1, 1),
                              sharedBytes: Self.wideSharedBytes(storage, inFeatures: inFeatures, tokens: tokens), stream: stream, overlapPrevious: overlapPrevious, args)
            return
        }
        switch storage {
        case .mxfp4:
            precondition(xStride == nil && groupRows == nil, "MXFP4 products take contiguous x")
            try module.launch(kernels[tokens - 1], grid: grid, block: (128, 1, 1), sharedBytes: plan.sharedBytes, stream: stream, overlapPrevious: overlapPrevious,
                              [.pointer(codes.address), .pointer(scales!.address), biasArg, .pointer(x), .pointer(out), .int32(n), .int32(k), .int32(os)])
        case .fp8(let tile):
            precondition(xStride == nil && groupRows == nil, "FP8 products take contiguous x")
            try module.launch(kernels[tokens - 1], grid: grid, block: (128, 1, 1), sharedBytes: plan.sharedBytes, stream: stream, overlapPrevious: overlapPrevious,
                              [.pointer(codes.address), .pointer(scales!.address), biasArg, .pointer(x), .pointer(out), .int32(n), .int32(k), .int32(os), .int32(Int32(tile))])
        case .bf16, .f32:
            try module.launch(kernels[tokens - 1], grid: grid, block: (128, 1, 1), stream: stream, overlapPrevious: overlapPrevious,
                              [.pointer(codes.address), biasArg, .pointer(x), .pointer(out), .int32(n), .int32(k), .int32(k), .int32(Int32(tokens)),
                               .int32(Int32(xStride ?? inFeatures)), .int32(Int32(groupRows ?? outFeatures)), .int32(os),
                               .int32(Self.plainEarly(rows: outFeatures) ? 1 : 0)])
        }
    }

    /// Whether `apply(norm:)` can run this product at `tokens`: one token, in the wide layout
    /// (MXFP4 or FP8 of at least `wideRows` rows, x fitting in shared memory), K <= 4096
    /// (gemv::norm_stage holds a thread's share in registers).
    public func takesNorm(tokens: Int) throws -> Bool {
        guard tokens == 1, layout == .wide, wideNormKernel != nil, inFeatures <= 4096 else { return false }
        return try wideBlocks(1, norm: true) != nil
    }

    /// The residual add and RMSNorm before this product, done in it for one token
    /// (gemv_wide_norm_*_t1; `takesNorm(tokens: 1)` must hold): out = W . h with
    /// h = weight * rmsnorm(resid + add), and h and resid written as an add_rmsnorm launch
    /// would have left them (`ResidualNorm`).
    public func apply(norm n: ResidualNorm, out: UInt64, outStride: Int? = nil, stream: CUDAStream, overlapPrevious: Bool = true) throws {
        guard let f = wideNormKernel, let blocks = try wideBlocks(1, norm: true) else {
            preconditionFailure("apply(norm:) on a product that does not take it (takesNorm)")
        }
        var args: [KernelModule.Argument] = [.pointer(codes.address), .pointer(scales!.address), .pointer(bias?.address ?? 0), .pointer(n.h), .pointer(out),
                                             .int32(Int32(outFeatures)), .int32(Int32(inFeatures)), .int32(Int32(outStride ?? outFeatures))]
        if case .fp8(let tile) = storage { args.append(.int32(Int32(tile))) }
        args += [.pointer(n.resid), .pointer(n.add), .pointer(n.weight), .float(n.eps), .pointer(n.arrivals)]
        try module.launch(f, grid: (blocks, 1, 1), block: (256, 1, 1), sharedBytes: Self.wideSharedBytes(storage, inFeatures: inFeatures, tokens: 1) + 4 * inFeatures,
                          stream: stream, overlapPrevious: overlapPrevious, args)
    }

    /// out[t, o] = sum_i w[o, i] * x[t, i] for `tokens` rows of f32 `x` ([tokens, in]) into
    /// f32 `out` ([tokens, out]).
    public func apply(_ x: DeviceBuffer, tokens: Int, into out: DeviceBuffer, stream: CUDAStream, overlapPrevious: Bool = true) throws {
        precondition(x.byteCount >= 4 * tokens * inFeatures && out.byteCount >= 4 * tokens * outFeatures,
                     "activation buffers too small for \(tokens) tokens of '\(name)'")
        try apply(x: x.address, tokens: tokens, out: out.address, stream: stream, overlapPrevious: overlapPrevious)
    }
}
