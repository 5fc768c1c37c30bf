/// Dequantization and dot products for the stored weight types the CPU executor reads.
/// Kernels work on one row at a time and never expand a whole tensor: a linear layer's
/// product reads each weight row in its stored type and converts it in registers.
///
/// GGML block layouts (32 elements per block, nibbles: low half = elements 0..15, high
/// half = elements 16..31):
///   q4_0: f16 d, 16 B nibbles        value = d * (q - 8)
///   q4_1: f16 d, f16 m, 16 B nibbles value = d * q + m
///   q8_0: f16 d, 32 x i8             value = d * q
///   mxfp4: e8m0 d, 16 B nibbles      value = d * e2m1(q)
/// fp8e4m3 and e8m0 are plain element types here; FP8's per-tile scales are applied by the
/// caller, which knows the tile shape.
public enum Dequant {
    /// Whether `row` converts this dtype; loaders check it so a model never reaches the trap below.
    public static func converts(_ dtype: DType) -> Bool {
        switch dtype {
        case .fp8e4m3, .e8m0, .mxfp4: return false
        default: return true
        }
    }

    /// Convert `count` elements starting at `src` (a whole number of blocks) to f32.
    public static func row(_ dtype: DType, _ src: UnsafeRawPointer, _ count: Int, _ dst: UnsafeMutablePointer<Float>) {
        switch dtype {
        case .f32:
            dst.update(from: src.assumingMemoryBound(to: Float.self), count: count)
        case .f16:
            for i in 0..<count { dst[i] = f16ToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .bf16:
            for i in 0..<count { dst[i] = bf16ToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .q8_0:
            for b in 0..<(count / 32) {
                let blk = src + b * 34
                let d = f16ToFloat(blk.loadUnaligned(as: UInt16.self))
                for j in 0..<32 { dst[b * 32 + j] = d * Float(blk.load(fromByteOffset: 2 + j, as: Int8.self)) }
            }
        case .q4_0:
            for b in 0..<(count / 32) {
                let blk = src + b * 18
                let d = f16ToFloat(blk.loadUnaligned(as: UInt16.self))
                for j in 0..<16 {
                    let q = blk.load(fromByteOffset: 2 + j, as: UInt8.self)
                    dst[b * 32 + j] = d * Float(Int(q & 0xF) - 8)
                    dst[b * 32 + j + 16] = d * Float(Int(q >> 4) - 8)
                }
            }
        case .q4_1:
            for b in 0..<(count / 32) {
                let blk = src + b * 20
                let d = f16ToFloat(blk.loadUnaligned(as: UInt16.self))
                let m = f16ToFloat(blk.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
                for j in 0..<16 {
                    let q = blk.load(fromByteOffset: 4 + j, as: UInt8.self)
                    dst[b * 32 + j] = d * Float(q & 0xF) + m
                    dst[b * 32 + j + 16] = d * Float(q >> 4) + m
                }
            }
        case .i8:
            for i in 0..<count { dst[i] = Float(src.load(fromByteOffset: i, as: Int8.self)) }
        case .u8:
            for i in 0..<count { dst[i] = Float(src.load(fromByteOffset: i, as: UInt8.self)) }
        case .i32:
            for i in 0..<count { dst[i] = Float(src.loadUnaligned(fromByteOffset: 4 * i, as: Int32.self)) }
        case .i64:
            for i in 0..<count { dst[i] = Float(src.loadUnaligned(fromByteOffset: 8 * i, as: Int64.self)) }
        case .fp8e4m3:
            E4M3.values.withUnsafeBufferPointer { table in
                for i in 0..<count { dst[i] = table[Int(src.load(fromByteOffset: i, as: UInt8.self))] }
            }
        case .e8m0:
            for i in 0..<count { dst[i] = E8M0.decode(src.load(fromByteOffset: i, as: UInt8.self)) }
        case .mxfp4:
            E2M1.values.withUnsafeBufferPointer { table in
                for b in 0..<(count / 32) {
                    let blk = src + b * 17
                    let d = E8M0.decode(blk.load(as: UInt8.self))
                    for j in 0..<16 {
                        let q = blk.load(fromByteOffset: 1 + j, as: UInt8.self)
                        dst[b * 32 + j] = d * table[Int(q & 0xF)]
                        dst[b * 32 + j + 16] = d * table[Int(q >> 4)]
                    }
                }
            }
        }
    }
}
