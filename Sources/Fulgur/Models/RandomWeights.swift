import Dispatch
import Foundation

/// The bytes of random checkpoints, made fast and reproducibly. Every value is a table lookup
/// on 16 random bits of xoshiro256** (four values per draw), so gigabytes cost about what it
/// takes to write them. A value depends only on the seed, the tensor's name and its position:
/// never on the thread count, and never on the storage format (see `RandomMatrix`).
enum RandomFill {
    /// Φ⁻¹((i + 0.5) / 65536): a standard normal sample from 16 uniform bits.
    static let normal: [Float] = (0..<65536).map { Float(inverseNormalCDF((Double($0) + 0.5) / 65536)) }

    /// Spread of the E2M1 codes before the block scale: a block of real MXFP4 weights has
    /// its largest element near 4-6 and the rest roughly normal below it.
    static let e2m1Sigma: Float = 2
    /// Two E2M1 codes per byte (element 2j in the low nibble), each E2M1(N(0, 2²)) drawn
    /// from 8 of the 16 bits.
    static let e2m1Pairs: [UInt8] = {
        let nibble = (0..<256).map { E2M1.encode(e2m1Sigma * Float(inverseNormalCDF((Double($0) + 0.5) / 256))) }
        return (0..<65536).map { nibble[$0 & 0xFF] | nibble[$0 >> 8] << 4 }
    }()
    /// Root mean square of the decoded codes.
    static let e2m1RMS: Float = {
        let values = (0..<256).map { E2M1.decode(E2M1.encode(e2m1Sigma * Float(inverseNormalCDF((Double($0) + 0.5) / 256)))) }
        return (values.map { $0 * $0 }.reduce(0, +) / 256).squareRoot()
    }()

    /// Spread of the FP8 codes before the tile scale: quantizers scale a tile so its largest
    /// element maps near 448; the largest of 65536 draws lands at 4.3 sigma, 415 here.
    static let e4m3Sigma: Float = 96
    static let e4m3Codes: [UInt8] = normal.map { E4M3.encode(e4m3Sigma * $0) }
    static let e4m3RMS: Float = (e4m3Codes.map { E4M3.decode($0) * E4M3.decode($0) }.reduce(0, +) / 65536).squareRoot()

    /// Block and tile scales are 2^(exponent + jitter), jitter -1, 0, 0 or +1 from two bits:
    /// scales differ between neighbours (a kernel that reads the wrong scale gives wrong
    /// results) and are powers of two (so every dequantized weight is exact in BF16). The
    /// jitter raises the root mean square by sqrt((1/4 + 1 + 1 + 4) / 4) = 1.25.
    static let jitter: [Int] = [-1, 0, 0, 1]
    static let jitterRMS: Float = 1.25

    /// The scale exponent that gives a weight of about `std` (within a factor of sqrt 2).
    static func exponent(std: Float, codeRMS: Float) -> Int {
        Int((log2(std / (codeRMS * jitterRMS))).rounded())
    }

    /// The stream of one chunk of one tensor. `stream` separates the tensor's codes from its
    /// scales, so each can be made without the other.
    static func generator(_ seed: UInt64, stream: UInt64, chunk: Int) -> SeededGenerator {
        SeededGenerator(seed: seed ^ (stream &* 0xD6E8_FEB8_6659_FD93) &+ UInt64(chunk) &* 0x9E37_79B9_7F4A_7C15)
    }

    /// The seed of the tensor called `name`: models of one seed and fewer layers share their
    /// first layers' weights.
    static func seed(_ base: UInt64, _ name: String) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a
        for b in name.utf8 { h = (h ^ UInt64(b)) &* 0x100_0000_01B3 }
        return h ^ (base &* 0x9E37_79B9_7F4A_7C15)
    }

    /// `count` entries of `table` picked by consecutive 16-bit draws.
    @inline(__always)
    static func draw<T>(_ table: UnsafeBufferPointer<T>, into dst: UnsafeMutablePointer<T>, count: Int, _ rng: inout SeededGenerator) {
        var i = 0
        while i + 4 <= count {
            let r = rng.next()
            dst[i] = table[Int(truncatingIfNeeded: r & 0xFFFF)]
            dst[i + 1] = table[Int(truncatingIfNeeded: (r >> 16) & 0xFFFF)]
            dst[i + 2] = table[Int(truncatingIfNeeded: (r >> 32) & 0xFFFF)]
            dst[i + 3] = table[Int(truncatingIfNeeded: r >> 48)]
            i += 4
        }
        if i < count {
            let r = rng.next()
            for j in 0..<(count - i) { dst[i + j] = table[Int(truncatingIfNeeded: (r >> (16 * UInt64(j))) & 0xFFFF)] }
        }
    }

    /// `count` jitters (indices into `jitter`) from 2-bit draws.
    @inline(__always)
    static func drawJitter(count: Int, _ rng: inout SeededGenerator, _ body: (Int, Int) -> Void) {
        var i = 0
        while i < count {
            let r = rng.next()
            for j in 0..<min(32, count - i) { body(i + j, jitter[Int(truncatingIfNeeded: (r >> (2 * UInt64(j))) & 3)]) }
            i += 32
        }
    }

    /// Acklam's rational approximation of the normal quantile (relative error < 1.2e-9).
    static func inverseNormalCDF(_ p: Double) -> Double {
        let a = [-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
                 -3.066479806614716e+01, 2.506628277459239e+00]
        let b = [-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
                 -1.328068155288572e+01]
        let c = [-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
                 4.374664141464968e+00, 2.938163982698783e+00]
        let d = [7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00]
        func tail(_ q: Double) -> Double {
            (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1)
        }
        if p < 0.02425 { return tail((-2 * log(p)).squareRoot()) }
        if p > 1 - 0.02425 { return -tail((-2 * log(1 - p)).squareRoot()) }
        let q = p - 0.5, r = q * q
        return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
            / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1)
    }
}

/// A random weight matrix defined by its quantized form: `batches` matrices (experts) of
/// `rows` x `cols`, as FP8 E4M3 codes with one power-of-two scale per 128x128 tile, or as
/// MXFP4 codes with one E8M0 scale per 32 elements of a row. Its BF16 form holds exactly the
/// dequantized values, so a model computes the same function in every storage format.
///
/// Rows are made in chunks of about a million elements, each chunk of each batch from its
/// own streams (codes, block scales), so any part can be made alone and in parallel.
struct RandomMatrix: Sendable {
    enum Kind: Sendable { case fp8, mxfp4 }
    static let tile = 128

    let kind: Kind
    let seed: UInt64
    let batches: Int
    let rows: Int
    let cols: Int
    let exponent: Int

    init(_ kind: Kind, seed: UInt64, batches: Int = 1, rows: Int, cols: Int, std: Float) {
        self.kind = kind
        self.seed = seed
        self.batches = batches
        self.rows = rows
        self.cols = cols
        exponent = RandomFill.exponent(std: std, codeRMS: kind == .fp8 ? RandomFill.e4m3RMS : RandomFill.e2m1RMS)
    }

    var chunkRows: Int { max(1, min(rows, (1 << 20) / max(cols, 1))) }
    var chunksPerBatch: Int { (rows + chunkRows - 1) / chunkRows }
    var chunks: Int { batches * chunksPerBatch }
    /// Rows of chunk `c` (an index over all batches) within its batch.
    func rowRange(_ c: Int) -> Range<Int> {
        let first = (c % chunksPerBatch) * chunkRows
        return first..<min(rows, first + chunkRows)
    }
    var codeRowBytes: Int { kind == .fp8 ? cols : cols / 2 }
    var tileRows: Int { (rows + Self.tile - 1) / Self.tile }
    var tileCols: Int { (cols + Self.tile - 1) / Self.tile }

    /// Codes of chunk `c`: FP8 bytes `[rows, cols]` or MXFP4 nibble pairs `[rows, cols/2]`.
    func codes(chunk c: Int, into dst: UnsafeMutablePointer<UInt8>) {
        var rng = RandomFill.generator(seed, stream: 1, chunk: c)
        let table = kind == .fp8 ? RandomFill.e4m3Codes : RandomFill.e2m1Pairs
        table.withUnsafeBufferPointer { RandomFill.draw($0, into: dst, count: rowRange(c).count * codeRowBytes, &rng) }
    }

    /// MXFP4 only: the E8M0 scales of chunk `c`, `[rows, cols/32]`.
    func blockScales(chunk c: Int, into dst: UnsafeMutablePointer<UInt8>) {
        var rng = RandomFill.generator(seed, stream: 2, chunk: c)
        RandomFill.drawJitter(count: rowRange(c).count * cols / 32, &rng) { i, j in dst[i] = UInt8(127 + exponent + j) }
    }

    /// FP8 only: the multipliers of batch `b`'s tiles, `[ceil(rows/128), ceil(cols/128)]`.
    func tileScales(batch b: Int) -> [Float] {
        var rng = RandomFill.generator(seed, stream: 3, chunk: b)
        var out = [Float](repeating: 0, count: tileRows * tileCols)
        RandomFill.drawJitter(count: out.count, &rng) { i, j in out[i] = Float(sign: .plus, exponent: exponent + j, significand: 1) }
        return out
    }

    /// The values of chunk `c` as f32, `[rows, cols]`: exactly what the codes and scales decode to.
    func values(chunk c: Int, into dst: UnsafeMutablePointer<Float>) {
        let range = rowRange(c), count = range.count * cols
        let codes = UnsafeMutablePointer<UInt8>.allocate(capacity: range.count * codeRowBytes)
        defer { codes.deallocate() }
        self.codes(chunk: c, into: codes)
        switch kind {
        case .fp8:
            let scales = tileScales(batch: c / chunksPerBatch)
            E4M3.values.withUnsafeBufferPointer { decode in
                for i in 0..<range.count {
                    let rowScales = ((range.lowerBound + i) / Self.tile) * tileCols, row = i * cols
                    for tile in 0..<tileCols {
                        let scale = scales[rowScales + tile]
                        for j in (tile * Self.tile)..<min(cols, (tile + 1) * Self.tile) { dst[row + j] = decode[Int(codes[row + j])] * scale }
                    }
                }
            }
        case .mxfp4:
            let scales = UnsafeMutablePointer<UInt8>.allocate(capacity: count / 32)
            defer { scales.deallocate() }
            blockScales(chunk: c, into: scales)
            E2M1.values.withUnsafeBufferPointer { decode in
                for block in 0..<(count / 32) {
                    let s = E8M0.decode(scales[block])
                    for j in 0..<16 {
                        let pair = codes[block * 16 + j]
                        dst[block * 32 + 2 * j] = decode[Int(pair & 0xF)] * s
                        dst[block * 32 + 2 * j + 1] = decode[Int(pair >> 4)] * s
                    }
                }
            }
        }
    }
}

/// One tensor of a random checkpoint: its name, type and shape, and how to make its bytes as
/// `pieces` consecutive byte ranges that can be made independently (in parallel, or one at a
/// time while streaming to a file).
struct RandomTensor {
    let entry: SafetensorsWriter.Entry
    let pieces: Int
    /// Byte offset of piece `i` (0...pieces; `pieceOffset(pieces)` is the tensor's size).
    let pieceOffset: (Int) -> Int
    /// Fills piece `i`; `dst` points at the piece's first byte.
    let fill: (Int, UnsafeMutableRawPointer) -> Void
    /// The matrix whose codes, scales or BF16 values this tensor holds (nil for the small
    /// tensors), for models that defer their matrices (`RandomModel.buildDeferred`).
    var matrix: MatrixPart? = nil

    struct MatrixPart {
        /// The name PlanBuilder asks for (the weight's, or a stacked tensor's base name).
        let name: String
        let matrix: RandomMatrix
        /// How the weight holds it; nil for the scales, which come with the codes.
        let form: DeferredRandomMatrix.Form?
    }

    /// This tensor, marked as holding part of `m`.
    func part(of m: RandomMatrix, named name: String, form: DeferredRandomMatrix.Form?) -> RandomTensor {
        var t = self
        t.matrix = MatrixPart(name: name, matrix: m, form: form)
        return t
    }

    var name: String { entry.name }
    var byteCount: Int { entry.byteCount }

    /// BF16 N(0, std²), in pieces of 2^20 elements.
    static func normal(_ name: String, _ shape: [Int], std: Float, seed: UInt64) -> RandomTensor {
        let count = shape.reduce(1, *), per = 1 << 20, s = RandomFill.seed(seed, name)
        return RandomTensor(
            entry: .init(name: name, dtype: .bf16, shape: shape), pieces: (count + per - 1) / per,
            pieceOffset: { 2 * min(count, $0 * per) },
            fill: { i, dst in
                // The table costs 6% of a full piece's draws, and nothing until a piece is made.
                let table = RandomFill.normal.map { floatToBF16(std * $0) }
                var rng = RandomFill.generator(s, stream: 0, chunk: i)
                table.withUnsafeBufferPointer {
                    RandomFill.draw($0, into: dst.assumingMemoryBound(to: UInt16.self), count: min(per, count - i * per), &rng)
                }
            })
    }

    /// A small tensor of mean + N(0, std²) values (a norm weight, a bias, sinks), BF16 or F32.
    static func vector(_ name: String, _ shape: [Int], dtype: DType = .bf16, mean: Float, std: Float, seed: UInt64) -> RandomTensor {
        let count = shape.reduce(1, *), s = RandomFill.seed(seed, name)
        return RandomTensor(
            entry: .init(name: name, dtype: dtype, shape: shape), pieces: 1,
            pieceOffset: { $0 == 0 ? 0 : dtype.byteCount(elements: count) },
            fill: { _, dst in
                var rng = RandomFill.generator(s, stream: 0, chunk: 0)
                for i in 0..<count {
                    let v = mean + std * RandomFill.normal[Int(truncatingIfNeeded: rng.next() & 0xFFFF)]
                    if dtype == .f32 { dst.storeBytes(of: v, toByteOffset: 4 * i, as: Float.self) }
                    else { dst.storeBytes(of: floatToBF16(v), toByteOffset: 2 * i, as: UInt16.self) }
                }
            })
    }

    /// A matrix's codes, in the layout `shape` gives them (batch-major, rows, then the row's bytes).
    static func codes(_ name: String, _ m: RandomMatrix, dtype: DType, shape: [Int]) -> RandomTensor {
        RandomTensor(entry: .init(name: name, dtype: dtype, shape: shape), pieces: m.chunks,
                     pieceOffset: { m.chunkOffset($0, rowBytes: m.codeRowBytes) },
                     fill: { m.codes(chunk: $0, into: $1.assumingMemoryBound(to: UInt8.self)) })
    }

    /// An MXFP4 matrix's E8M0 block scales, `[(batches,) rows, cols/32]` as U8.
    static func blockScales(_ name: String, _ m: RandomMatrix, shape: [Int]) -> RandomTensor {
        RandomTensor(entry: .init(name: name, dtype: .u8, shape: shape), pieces: m.chunks,
                     pieceOffset: { m.chunkOffset($0, rowBytes: m.cols / 32) },
                     fill: { m.blockScales(chunk: $0, into: $1.assumingMemoryBound(to: UInt8.self)) })
    }

    /// An FP8 matrix's tile multipliers (`weight_scale_inv`), F32 `[ceil(rows/128), ceil(cols/128)]`.
    static func tileScales(_ name: String, _ m: RandomMatrix) -> RandomTensor {
        let count = m.tileRows * m.tileCols
        return RandomTensor(entry: .init(name: name, dtype: .f32, shape: [m.tileRows, m.tileCols]), pieces: 1,
                            pieceOffset: { $0 == 0 ? 0 : 4 * count },
                            fill: { _, dst in m.tileScales(batch: 0).withUnsafeBytes { dst.copyMemory(from: $0.baseAddress!, byteCount: 4 * count) } })
    }

    /// A matrix's values in BF16, `[(batches,) rows, cols]`.
    static func bf16(_ name: String, _ m: RandomMatrix, shape: [Int]) -> RandomTensor {
        RandomTensor(entry: .init(name: name, dtype: .bf16, shape: shape), pieces: m.chunks,
                     pieceOffset: { m.chunkOffset($0, rowBytes: 2 * m.cols) },
                     fill: { c, dst in
                         let n = m.rowRange(c).count * m.cols
                         let values = UnsafeMutablePointer<Float>.allocate(capacity: n)
                         defer { values.deallocate() }
                         m.values(chunk: c, into: values)
                         let out = dst.assumingMemoryBound(to: UInt16.self)
                         for i in 0..<n { out[i] = floatToBF16(values[i]) }
                     })
    }

    /// A matrix's values in BF16, each batch transposed: `[batches, cols, rows]` (gpt-oss's
    /// unquantized experts are stored [in, out]). One piece per batch.
    static func bf16Transposed(_ name: String, _ m: RandomMatrix) -> RandomTensor {
        RandomTensor(entry: .init(name: name, dtype: .bf16, shape: [m.batches, m.cols, m.rows]), pieces: m.batches,
                     pieceOffset: { 2 * $0 * m.rows * m.cols },
                     fill: { b, dst in
                         let out = dst.assumingMemoryBound(to: UInt16.self)
                         let values = UnsafeMutablePointer<Float>.allocate(capacity: m.chunkRows * m.cols)
                         defer { values.deallocate() }
                         for c in (b * m.chunksPerBatch)..<((b + 1) * m.chunksPerBatch) {
                             let first = m.rowRange(c).lowerBound, count = m.rowRange(c).count
                             m.values(chunk: c, into: values)
                             for j in 0..<m.cols {
                                 let column = out + j * m.rows + first
                                 for i in 0..<count { column[i] = floatToBF16(values[i * m.cols + j]) }
                             }
                         }
                     })
    }
}

extension RandomMatrix {
    /// Byte offset of chunk `c` (or the end, for `c == chunks`) in a tensor of `rowBytes` per row.
    func chunkOffset(_ c: Int, rowBytes: Int) -> Int {
        guard c < chunks else { return batches * rows * rowBytes }
        return ((c / chunksPerBatch) * rows + rowRange(c).lowerBound) * rowBytes
    }
}
