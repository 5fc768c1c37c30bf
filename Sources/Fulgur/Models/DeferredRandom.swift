import Dispatch
import Foundation

/// A random matrix that is never stored: its codes and scales are a function of their
/// position, so whoever needs its bytes makes them where they are needed (a GPU fills its
/// shard of a 309B model in device memory with Kernels/random.cu; the CPU makes the same bytes
/// with `codes()`, `blockScales()`, `tileScales()`, `bf16()`). A slice (Plan.shard's rows of
/// a head or an expert's intermediate slice, an expert of a stacked tensor) is the whole
/// matrix's values at those positions, so a split model computes the same function as the
/// whole one of the same seed.
///
/// The values follow RandomMatrix's distribution exactly (the same 65536-entry tables of
/// FP8 codes and E2M1 pairs, the same power-of-two scales with jitter -1, 0, 0, +1) but not
/// its values: RandomMatrix draws from xoshiro256** streams in chunks, this hashes each
/// position (splitmix64's output function over a counter, so a value costs a few integer
/// multiplies wherever it is made). A deferred model and `RandomModel.build()` of the same
/// seed are different models; `fulgur random-model` exports the latter.
public struct DeferredRandomMatrix: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: Sendable, Equatable { case fp8, mxfp4 }
    /// The codes with their scales (FP8 with one f32 multiplier per 128x128 tile, MXFP4 with
    /// one E8M0 scale per 32 elements of a row), or the BF16 values they decode to (exact).
    public enum Form: Sendable, Equatable { case quantized, bf16 }
    public static let tile = 128

    public let kind: Kind
    public let form: Form
    /// The whole matrix: the tensor's seed (RandomFill.seed of its name), the batch (the
    /// expert of a stacked tensor), its shape, and the power-of-two exponent of its scales.
    public let seed: UInt64
    public let batch: Int
    public let wholeRows: Int
    public let wholeColumns: Int
    public let exponent: Int
    /// Row i of this matrix is whole row `rowStart + rowStride * i`; column j is whole column
    /// `columnStart + j`.
    public let rowStart: Int
    public let rowStride: Int
    public let rows: Int
    public let columnStart: Int
    public let columns: Int

    /// The whole matrix `batch` of `batches` that RandomModel would make for a tensor of seed
    /// `seed` and weights of about `std` (for checks of the device fill, and benchmarks).
    /// MXFP4 needs columns that are a multiple of 32.
    public init(_ kind: Kind, form: Form = .quantized, seed: UInt64, batches: Int = 1, batch: Int = 0, rows: Int, columns: Int, std: Float) {
        precondition(kind == .fp8 || columns % 32 == 0, "MXFP4 rows are whole 32-element blocks")
        precondition((0..<batches).contains(batch) && rows > 0 && columns > 0, "a batch of a non-empty matrix")
        self.init(RandomMatrix(kind == .fp8 ? .fp8 : .mxfp4, seed: seed, batches: batches, rows: rows, cols: columns, std: std), batch: batch, form: form)
    }

    /// The whole matrix `b` of `m` (an expert of a stacked tensor, or the only one).
    init(_ m: RandomMatrix, batch: Int = 0, form: Form) {
        kind = m.kind == .fp8 ? .fp8 : .mxfp4
        self.form = form
        seed = m.seed
        self.batch = batch
        wholeRows = m.rows
        wholeColumns = m.cols
        exponent = m.exponent
        rowStart = 0
        rowStride = 1
        rows = m.rows
        columnStart = 0
        columns = m.cols
    }

    init(_ m: DeferredRandomMatrix, rowStart: Int, rowStride: Int, rows: Int, columnStart: Int, columns: Int) {
        kind = m.kind
        form = m.form
        seed = m.seed
        batch = m.batch
        wholeRows = m.wholeRows
        wholeColumns = m.wholeColumns
        exponent = m.exponent
        self.rowStart = rowStart
        self.rowStride = rowStride
        self.rows = rows
        self.columnStart = columnStart
        self.columns = columns
    }

    public var description: String {
        "deferred random \(kind) \(form == .bf16 ? "as bf16 " : "")[\(rows), \(columns)] of [\(wholeRows), \(wholeColumns)] (seed \(String(seed, radix: 16)), batch \(batch), rows \(rowStart) + \(rowStride)i, columns from \(columnStart))"
    }

    /// How a LinearWeight holds it.
    public var format: LinearWeight.Format {
        switch (form, kind) {
        case (.bf16, _): return .plain(.bf16)
        case (.quantized, .fp8): return .fp8(tile: Self.tile)
        case (.quantized, .mxfp4): return .mxfp4
        }
    }

    /// RandomFill's tables as Kernels/random.cu reads them: 65536 FP8 E4M3 codes, 65536 E2M1
    /// pairs, then the 256 E4M3 and 16 E2M1 values as f32.
    public static let deviceTables: [UInt8] = {
        var bytes = RandomFill.e4m3Codes + RandomFill.e2m1Pairs
        for v in E4M3.values + E2M1.values { withUnsafeBytes(of: v.bitPattern.littleEndian) { bytes += $0 } }
        return bytes
    }()

    // MARK: Positions (Kernels/random.cu computes the same)

    /// Streams of a matrix: codes, E8M0 block scales, FP8 tile scales.
    public var codeKey: UInt64 { RandomFill.streamKey(seed, 1) }
    public var blockKey: UInt64 { RandomFill.streamKey(seed, 2) }
    public var tileKey: UInt64 { RandomFill.streamKey(seed, 3) }
    /// Code bytes in a whole row: one per FP8 element, one per pair of E2M1 elements.
    public var wholeRowBytes: Int { kind == .fp8 ? wholeColumns : wholeColumns / 2 }
    public var wholeBlocks: Int { wholeColumns / 32 }
    public var wholeTileRows: Int { (wholeRows + Self.tile - 1) / Self.tile }
    public var wholeTileColumns: Int { (wholeColumns + Self.tile - 1) / Self.tile }
    /// Row `i` of this matrix in the whole one.
    @inline(__always) public func wholeRow(_ i: Int) -> Int { rowStart + rowStride * i }

    /// The code byte at whole row `r`, byte `byte` of the row (an FP8 code, or E2M1 codes of
    /// columns 2 byte and 2 byte + 1 in the low and high nibble).
    @inline(__always) func codeByte(row r: Int, byte: Int, _ table: UnsafePointer<UInt8>) -> UInt8 {
        table[Int(truncatingIfNeeded: RandomFill.positional(codeKey, UInt64((batch * wholeRows + r) * wholeRowBytes + byte)) & 0xFFFF)]
    }

    /// The E8M0 scale of whole row `r`, block `block` (32 elements).
    @inline(__always) func blockScale(row r: Int, block: Int) -> UInt8 {
        UInt8(127 + exponent + RandomFill.jitter(RandomFill.positional(blockKey, UInt64((batch * wholeRows + r) * wholeBlocks + block))))
    }

    /// The multiplier of whole tile (`tileRow`, `tileColumn`) of an FP8 matrix.
    @inline(__always) func tileScale(tileRow: Int, tileColumn: Int) -> Float {
        let j = RandomFill.jitter(RandomFill.positional(tileKey, UInt64((batch * wholeTileRows + tileRow) * wholeTileColumns + tileColumn)))
        return Float(sign: .plus, exponent: exponent + j, significand: 1)
    }

    // MARK: Bytes on the host

    /// Tile rows and columns of this matrix's own grid (FP8).
    public var tileRows: Int { (rows + Self.tile - 1) / Self.tile }
    public var tileColumns: Int { (columns + Self.tile - 1) / Self.tile }
    /// Bytes of the codes (or BF16 values) and of the scales, as a LinearWeight stores them.
    public var byteCounts: (codes: Int, scales: Int) {
        switch (form, kind) {
        case (.bf16, _): return (2 * rows * columns, 0)
        case (.quantized, .fp8): return (rows * columns, 4 * tileRows * tileColumns)
        case (.quantized, .mxfp4): return (rows * columns / 2, rows * columns / 32)
        }
    }

    /// Runs `body` over row ranges, in parallel when the matrix is large.
    private func forRows(_ body: (Range<Int>) -> Void) {
        let per = max(1, (1 << 16) / max(columns, 1)), chunks = (rows + per - 1) / per
        if chunks <= 1 { return body(0..<rows) }
        DispatchQueue.concurrentPerform(iterations: chunks) { c in body((c * per)..<min(rows, (c + 1) * per)) }
    }

    /// The codes `[rows, columns]` (FP8) or `[rows, columns / 2]` (MXFP4), whatever the form.
    public func codes(into dst: UnsafeMutablePointer<UInt8>) {
        let rowBytes = kind == .fp8 ? columns : columns / 2, first = kind == .fp8 ? columnStart : columnStart / 2
        let table = kind == .fp8 ? RandomFill.e4m3Codes : RandomFill.e2m1Pairs
        table.withUnsafeBufferPointer { t in
            forRows { range in
                for i in range {
                    let r = wholeRow(i)
                    for j in 0..<rowBytes { dst[i * rowBytes + j] = codeByte(row: r, byte: first + j, t.baseAddress!) }
                }
            }
        }
    }

    /// MXFP4: the E8M0 scales `[rows, columns / 32]`.
    public func blockScales(into dst: UnsafeMutablePointer<UInt8>) {
        let blocks = columns / 32, first = columnStart / 32
        forRows { range in
            for i in range { for b in 0..<blocks { dst[i * blocks + b] = blockScale(row: wholeRow(i), block: first + b) } }
        }
    }

    /// FP8: the multipliers of this matrix's tiles `[tileRows, tileColumns]`; each of its
    /// tiles lies in one whole tile (`selecting` keeps FP8 only then).
    public func tileScales(into dst: UnsafeMutablePointer<Float>) {
        for ti in 0..<tileRows {
            for tj in 0..<tileColumns {
                dst[ti * tileColumns + tj] = tileScale(tileRow: wholeRow(ti * Self.tile) / Self.tile, tileColumn: (columnStart + tj * Self.tile) / Self.tile)
            }
        }
    }

    /// The values `[rows, columns]` as BF16 (exact: small codes times powers of two).
    public func bf16(into dst: UnsafeMutablePointer<UInt16>) {
        let table = kind == .fp8 ? RandomFill.e4m3Codes : RandomFill.e2m1Pairs
        table.withUnsafeBufferPointer { t in
            forRows { range in
                for i in range {
                    let r = wholeRow(i)
                    for j in 0..<columns {
                        let c = columnStart + j
                        let v: Float
                        if kind == .fp8 {
                            v = E4M3.decode(codeByte(row: r, byte: c, t.baseAddress!)) * tileScale(tileRow: r / Self.tile, tileColumn: c / Self.tile)
                        } else {
                            let pair = codeByte(row: r, byte: c / 2, t.baseAddress!)
                            v = E2M1.decode(c % 2 == 0 ? pair & 0xF : pair >> 4) * E8M0.decode(blockScale(row: r, block: c / 32))
                        }
                        dst[i * columns + j] = floatToBF16(v)
                    }
                }
            }
        }
    }

    /// The bytes a LinearWeight of this matrix reads: codes and scales, or BF16 values.
    func hostBytes() -> (codes: OwnedBytes, scales: OwnedBytes?) {
        let (codeBytes, scaleBytes) = byteCounts
        let codes = OwnedBytes(codeBytes)
        switch (form, kind) {
        case (.bf16, _):
            bf16(into: codes.pointer.assumingMemoryBound(to: UInt16.self))
            return (codes, nil)
        case (.quantized, .fp8):
            let scales = OwnedBytes(scaleBytes)
            self.codes(into: codes.pointer.assumingMemoryBound(to: UInt8.self))
            tileScales(into: scales.pointer.assumingMemoryBound(to: Float.self))
            return (codes, scales)
        case (.quantized, .mxfp4):
            let scales = OwnedBytes(scaleBytes)
            self.codes(into: codes.pointer.assumingMemoryBound(to: UInt8.self))
            blockScales(into: scales.pointer.assumingMemoryBound(to: UInt8.self))
            return (codes, scales)
        }
    }

    // MARK: Slices

    /// Rows `rows` (in order) and columns `columns` of this matrix, as a deferred matrix of its
    /// own when the rows are evenly spaced and the stored format survives the cut as
    /// LinearWeight.selecting keeps it (MXFP4: columns on 32-element blocks; FP8: each of the
    /// slice's 128x128 tiles inside one tile of the whole matrix); else nil.
    func selecting(rows selected: [Int], columns range: Range<Int>) -> DeferredRandomMatrix? {
        guard let first = selected.first, !range.isEmpty else { return nil }
        let step = selected.count > 1 ? selected[1] - first : 1
        guard step >= 1, selected.enumerated().allSatisfy({ $0.element == first + step * $0.offset }) else { return nil }
        let slice = DeferredRandomMatrix(self, rowStart: wholeRow(first), rowStride: rowStride * step, rows: selected.count,
                                         columnStart: columnStart + range.lowerBound, columns: range.count)
        switch (form, kind) {
        case (.bf16, _):
            return slice
        case (.quantized, .mxfp4):
            return slice.columnStart % 32 == 0 && slice.columns % 32 == 0 ? slice : nil
        case (.quantized, .fp8):
            let t = Self.tile
            for ti in 0..<slice.tileRows where slice.wholeRow(ti * t) / t != slice.wholeRow(min(slice.rows, (ti + 1) * t) - 1) / t { return nil }
            for tj in 0..<slice.tileColumns where (slice.columnStart + tj * t) / t != (slice.columnStart + min(slice.columns, (tj + 1) * t) - 1) / t { return nil }
            return slice
        }
    }
}

extension RandomFill {
    /// Output `index` of splitmix64 started at `key`: a counter-based generator, so any value
    /// is made alone, on any device, in any order. Kernels/random.cu has the same function.
    @inline(__always)
    static func positional(_ key: UInt64, _ index: UInt64) -> UInt64 {
        var z = key &+ (index &+ 1) &* 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// The key of stream `stream` of the tensor of seed `seed` (a hash, so the counters of
    /// different streams and tensors start far apart).
    static func streamKey(_ seed: UInt64, _ stream: UInt64) -> UInt64 { positional(seed, stream) }

    /// The scale exponent jitter (-1, 0, 0, +1) from a hash's two low bits.
    @inline(__always) static func jitter(_ h: UInt64) -> Int { jitter[Int(truncatingIfNeeded: h & 3)] }
}

/// The tensors of a deferred random model (`RandomModel.buildDeferred`): the small ones
/// (embedding, norms, biases, sinks, routers, LM head) made in memory as RandomModel makes
/// them, the matrices (`RandomMatrix`: experts and linear layers) as DeferredRandomMatrix
/// descriptions that PlanBuilder turns into deferred LinearWeights (`deferredWeight`).
final class DeferredRandomTensors: TensorSource {
    let sourceDescription: String
    private let host: RandomTensors
    private var matrices: [String: (matrix: RandomMatrix, form: DeferredRandomMatrix.Form)] = [:]

    init(description: String) {
        sourceDescription = description
        host = RandomTensors(description: description)
    }

    var tensorNames: [String] { host.tensorNames }
    func tensorIfPresent(_ name: String) -> TensorView? { host.tensorIfPresent(name) }
    func add(_ entry: SafetensorsWriter.Entry, _ buffer: HostAllocation) { host.add(entry, buffer) }
    func add(matrix: RandomMatrix, named name: String, form: DeferredRandomMatrix.Form) { matrices[name] = (matrix, form) }

    func deferredWeight(_ name: String, expert: Int?) -> LinearWeight? {
        guard let (m, form) = matrices[name], (expert ?? 0) < m.batches else { return nil }
        let suffix = expert.map { "[\($0)]" } ?? ""
        return LinearWeight(deferred: DeferredRandomMatrix(m, batch: expert ?? 0, form: form), name: name + suffix)
    }
}

extension RandomModel {
    /// Bytes of the weights made in host memory: all of them (`build`), or only the small
    /// tensors (`buildDeferred`). No weights are made.
    public func byteCount(deferringMatrices: Bool) throws -> Int {
        try tensorGroups(spec()).joined().reduce(0) { $0 + (deferringMatrices && $1.matrix != nil ? 0 : $1.byteCount) }
    }

    /// The model with its matrices deferred (DeferredRandomMatrix): only the small tensors
    /// are made in memory; executors make each matrix where they use it (the CUDA executor
    /// fills device memory with a kernel, shard by shard; the CPU executor makes the bytes
    /// of a weight when it first reads it). Same shapes and distributions as `build()`, other
    /// values. `progress` gets (steps done, steps): the embedding, each layer, the head.
    public func buildDeferred(progress: ((Int, Int) -> Void)? = nil) throws -> Model {
        let spec = try spec()
        let groups = try tensorGroups(spec)
        let source = DeferredRandomTensors(description: "random \(description), deferred matrices")
        for (g, group) in groups.enumerated() {
            // The scales' tensors come with their codes: one description per matrix.
            for t in group { if let d = t.matrix, let form = d.form { source.add(matrix: d.matrix, named: d.name, form: form) } }
            let small = group.filter { $0.matrix == nil }
            for (t, buffer) in zip(small, Self.make(small)) { source.add(t.entry, buffer) }
            progress?(g + 1, groups.count)
        }
        return try Model(spec: spec, tensors: source)
    }
}

/// The host bytes of a deferred weight, made on first use (by any thread; once).
final class DeferredBytes: @unchecked Sendable {
    let matrix: DeferredRandomMatrix
    private let lock = NSLock()
    private var made: (codes: OwnedBytes, scales: OwnedBytes?)?

    init(_ matrix: DeferredRandomMatrix) { self.matrix = matrix }

    var pointers: (data: UnsafeRawPointer, scales: UnsafeRawPointer?) {
        lock.lock()
        defer { lock.unlock() }
        if made == nil { made = matrix.hostBytes() }
        return (UnsafeRawPointer(made!.codes.pointer), made!.scales.map { UnsafeRawPointer($0.pointer) })
    }
}
