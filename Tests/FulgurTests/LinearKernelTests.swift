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

    /// 3 tokens run the fused kernels; 6 the decode-once path of prefill chunks.
    @Test(arguments: [DType.f32, .bf16, .f16, .q8_0, .q4_0, .q4_1], [32, 64, 96, 576, 1536])
    func fusedKernelMatchesDequantizedProduct(_ dtype: DType, _ columns: Int) throws {
        for tokens in [3, 6] { try checkProduct(dtype, columns, tokens: tokens) }
    }

    /// A batched decode step runs the per-token kernels over several tokens at once (for the
    /// GGML block types, one unpacking of each block for several tokens): every token's result
    /// must be bit-identical to that token run alone.
    @Test(arguments: [DType.f32, .bf16, .f16, .q8_0, .q4_0, .q4_1], [32, 64, 96, 576, 1536])
    func perTokenKernelsOverSeveralTokensMatchEachTokenAlone(_ dtype: DType, _ columns: Int) throws {
        let rows = 13, tokens = 19
        let bytes = Self.randomWeights(dtype, rows: rows, columns: columns, seed: UInt64(columns) * 7 + UInt64(dtype.blockBytes))
        var rng = SeededGenerator(seed: 11)
        let x = (0..<(tokens * columns)).map { _ in Float(rng.nextUnit() * 2 - 1) }
        try bytes.withUnsafeBytes { raw in
            let w = try LinearWeight(TensorView(name: "w", dtype: dtype, shape: [rows, columns], data: raw.baseAddress!,
                                                byteCount: raw.count, owner: nil))
            for count in [2, 3, 8, 9, 19] {
                var together = [Float](repeating: 0, count: count * rows)
                w.apply(x, tokens: count, into: &together, decodeOnceFrom: count)
                for t in 0..<count {
                    var alone = [Float](repeating: 0, count: rows)
                    Array(x[(t * columns)..<((t + 1) * columns)]).withUnsafeBufferPointer { w.apply($0.baseAddress!, tokens: 1, into: &alone) }
                    #expect(Array(together[(t * rows)..<((t + 1) * rows)]) == alone, "\(dtype) \(columns) columns: token \(t) of \(count)")
                }
            }
        }
    }

    func checkProduct(_ dtype: DType, _ columns: Int, tokens: Int) throws {
        let rows = 37
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

/// MXFP4 and FP8 block-scaled products against row-by-row dequantization with the scalar
/// codecs (`LinearWeight.dequantizeRow`), on random codes and scales.
@Suite struct PackedKernelTests {
    static func check(_ w: LinearWeight, seed: UInt64 = 11) {
        for tokens in [3, 6] { check(w, tokens: tokens, seed: seed) }
    }

    static func check(_ w: LinearWeight, tokens: Int, seed: UInt64) {
        var rng = SeededGenerator(seed: seed)
        let n = w.inFeatures
        let x = (0..<(tokens * n)).map { _ in Float(rng.nextUnit() * 2 - 1) }
        var out = [Float](repeating: 0, count: tokens * w.outFeatures)
        w.apply(x, tokens: tokens, into: &out)
        var row = [Float](repeating: 0, count: n)
        for r in 0..<w.outFeatures {
            row.withUnsafeMutableBufferPointer { w.dequantizeRow(r, into: $0.baseAddress!) }
            for t in 0..<tokens {
                var want = 0.0, scale = 0.0
                for i in 0..<n {
                    want += Double(row[i]) * Double(x[t * n + i]); scale += abs(Double(row[i]) * Double(x[t * n + i]))
                }
                #expect(abs(Double(out[t * w.outFeatures + r]) - want) <= 1e-5 * scale + 1e-6,
                        "\(w.format) n=\(n) row \(r) token \(t): \(out[t * w.outFeatures + r]) vs \(want)")
            }
        }
    }

    static func bytes(_ count: Int, _ rng: inout SeededGenerator, _ map: (UInt8) -> UInt8 = { $0 }) -> [UInt8] {
        (0..<count).map { _ in map(UInt8(truncatingIfNeeded: rng.next())) }
    }

    @Test(arguments: [32, 64, 96, 576, 2880])
    func mxfp4SplitMatchesDequantizedRows(_ columns: Int) throws {
        var rng = SeededGenerator(seed: UInt64(columns))
        let rows = 21, experts = 2
        let codes = Self.bytes(experts * rows * columns / 2, &rng)
        let scales = Self.bytes(experts * rows * columns / 32, &rng) { 118 + $0 % 16 }
        try codes.withUnsafeBytes { c in
            try scales.withUnsafeBytes { s in
                let cv = TensorView(name: "blocks", dtype: .u8, shape: [experts, rows, columns / 32, 16], data: c.baseAddress!, byteCount: c.count, owner: nil)
                let sv = TensorView(name: "scales", dtype: .u8, shape: [experts, rows, columns / 32], data: s.baseAddress!, byteCount: s.count, owner: nil)
                for e in 0..<experts { Self.check(try LinearWeight(mxfp4: cv, scales: sv, expert: e)) }
            }
        }
    }

    @Test(arguments: [32, 64, 96, 576])
    func mxfp4GGUFBlocksMatchDequantizedRows(_ columns: Int) throws {
        var rng = SeededGenerator(seed: UInt64(columns) + 5)
        let rows = 19
        var data = Self.bytes(rows * columns / 32 * 17, &rng)
        for b in 0..<(rows * columns / 32) { data[17 * b] = 118 + data[17 * b] % 16 }
        try data.withUnsafeBytes { d in
            Self.check(try LinearWeight(TensorView(name: "w", dtype: .mxfp4, shape: [rows, columns], data: d.baseAddress!, byteCount: d.count, owner: nil)))
        }
    }

    @Test(arguments: [(64, 128), (200, 128), (576, 128), (576, 32)])
    func fp8BlockScaledMatchesDequantizedRows(_ columns: Int, _ tile: Int) throws {
        var rng = SeededGenerator(seed: UInt64(columns * tile))
        let rows = 150
        let codes = Self.bytes(rows * columns, &rng) { $0 & 0x7F == 0x7F ? $0 ^ 1 : $0 }  // no NaN codes
        let tiles = [(rows + tile - 1) / tile, (columns + tile - 1) / tile]
        let scales = (0..<(tiles[0] * tiles[1])).map { _ in Float(rng.nextUnit() * 0.01 + 0.001) }
        try codes.withUnsafeBytes { c in
            try scales.withUnsafeBytes { s in
                let w = try LinearWeight(
                    fp8: TensorView(name: "w", dtype: .fp8e4m3, shape: [rows, columns], data: c.baseAddress!, byteCount: c.count, owner: nil),
                    scaleInv: TensorView(name: "w.scale", dtype: .f32, shape: tiles, data: s.baseAddress!, byteCount: s.count, owner: nil),
                    tile: tile)
                Self.check(w)
            }
        }
    }

    @Test func e2m1AndE4M3LaneConversionsCoverEveryCode() {
        for code in 0..<16 {
            let v = PackedKernels.e2m1(SIMD8(repeating: UInt32(code)))[0]
            #expect(v == E2M1.decode(UInt8(code)) || (v == 0 && E2M1.decode(UInt8(code)) == 0), "e2m1 code \(code)")
        }
        for code in 0..<256 where code & 0x7F != 0x7F {
            let v = PackedKernels.e4m3(SIMD8(repeating: UInt32(code)))[0]
            #expect(v.bitPattern == E4M3.decode(UInt8(code)).bitPattern, "e4m3 code \(code)")
        }
    }
}
