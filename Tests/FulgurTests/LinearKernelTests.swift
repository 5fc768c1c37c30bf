import Foundation
import Testing
@testable import Fulgur

/// The fused dot kernels (shuffled lanes, 2^23 conversions) against the plain path:
/// dequantize each row with `Dequant.row`, then multiply in f64.
@Suite struct LinearKernelTests {
    static func randomWeights(_ dtype: DType, rows: Int, columns: Int, seed: UInt64) -> [UInt8] {
        var rng = SeededGenerator(seed: seed)
        var bytes = [UInt8](repeating: 0, count: rows * dtype.byteCount(elements: columns))
        for i in bytes.indices { bytes[i] = UInt8(truncatingIfNeeded: rng.next()) }
        let blockBytes = dtype.blockBytes
        func putF16(_ offset: Int, _ v: Float) {
            let b = floatToF16(v)
            bytes[offset] = UInt8(b & 0xFF); bytes[offset + 1] = UInt8(b >> 8)
        }
        func randomFloat() -> Float { Float(rng.nextUnit() * 2 - 1) }
        switch dtype {
        case .q8_0, .q4_0, .q4_1:
            for blk in 0..<(bytes.count / blockBytes) {
                putF16(blk * blockBytes, randomFloat() * 0.1)
                if dtype == .q4_1 { putF16(blk * blockBytes + 2, randomFloat() * 0.1) }
            }
        case .bf16:
            for i in 0..<(rows * columns) {
                let b = floatToBF16(randomFloat())
                bytes[2 * i] = UInt8(b & 0xFF); bytes[2 * i + 1] = UInt8(b >> 8)
            }
        case .f16:
            for i in 0..<(rows * columns) { putF16(2 * i, randomFloat()) }
        case .f32:
            bytes.withUnsafeMutableBytes { p in
                for i in 0..<(rows * columns) { p.storeBytes(of: randomFloat(), toByteOffset: 4 * i, as: Float.self) }
            }
        default: break
        }
        return bytes
    }

    @Test(arguments: [DType.f32, .bf16, .f16, .q8_0, .q4_0, .q4_1], [32, 64, 96, 576, 1536])
    func fusedKernelMatchesDequantizedProduct(_ dtype: DType, _ columns: Int) throws {
        let rows = 37, tokens = 3
        let bytes = Self.randomWeights(dtype, rows: rows, columns: columns, seed: UInt64(columns) * 31 + UInt64(dtype.blockBytes))
        var rng = SeededGenerator(seed: 7)
        let x = (0..<(tokens * columns)).map { _ in Float(rng.nextUnit() * 2 - 1) }
        try bytes.withUnsafeBytes { raw in
            let view = TensorView(name: "w", dtype: dtype, shape: [rows, columns], data: raw.baseAddress!,
                                  byteCount: raw.count, owner: nil)
            let w = try LinearWeight(view)
            var out = [Float](repeating: 0, count: tokens * rows)
            w.apply(x, tokens: tokens, into: &out)
            var row = [Float](repeating: 0, count: columns)
            for r in 0..<rows {
                row.withUnsafeMutableBufferPointer { Dequant.row(dtype, raw.baseAddress! + r * view.rowBytes, columns, $0.baseAddress!) }
                for t in 0..<tokens {
                    var want = 0.0, scale = 0.0
                    for i in 0..<columns {
                        want += Double(row[i]) * Double(x[t * columns + i])
                        scale += abs(Double(row[i]) * Double(x[t * columns + i]))
                    }
                    #expect(abs(Double(out[t * rows + r]) - want) <= 1e-5 * scale + 1e-6,
                            "\(dtype) row \(r) token \(t): \(out[t * rows + r]) vs \(want)")
                }
            }
        }
    }
}
