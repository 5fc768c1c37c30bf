/// Dot kernels for the seed's quantized formats: MXFP4 (E2M1 values, one E8M0 scale per 32)
/// and FP8 E4M3 with one f32 multiplier per 128x128 tile. As in `DotKernels`, codes are
/// pulled from 32-bit words with shifts and turned into floats with integer bit tricks in
/// 8 lanes; activations arrive shuffled to the lane order (`ActivationPack`).
enum PackedKernels {
    /// All ones in lanes where `x` is 0, else 0, from lane-wise integer ops only: Swift's
    /// SIMD comparisons and `replacing(with:where:)` build their masks lane by lane through
    /// memory, which made these kernels 20 times slower.
    @inline(__always)
    static func zeroMask(_ x: SIMD8<UInt32>) -> SIMD8<UInt32> {
        0 &- ((x &- 1) &>> 31 & (~x &>> 31))
    }

    /// E2M1 code (0...15, one per lane) to its value: for magnitudes 2...7 the float's
    /// exponent and top mantissa bit are the code's own bits shifted into place (bias
    /// 126); 1 is 0.5 and 0 is 0, chosen by a mask; bit 3 is the sign.
    @inline(__always)
    static func e2m1(_ code: SIMD8<UInt32>) -> SIMD8<Float> {
        let mag = code & 7
        let normal = (mag &<< 22) &+ (126 << 23)
        let small = (0 &- (mag & 1)) & 0x3F00_0000
        let isSmall = zeroMask(mag &>> 1)
        let bits = (normal & ~isSmall) | (small & isSmall) | ((code & 8) &<< 28)
        return unsafeBitCast(bits, to: SIMD8<Float>.self)
    }

    /// E4M3 byte (one per lane) to its value: normals rebias the exponent (7 -> 127);
    /// subnormals (exponent field 0) are mantissa * 2^-9.
    @inline(__always)
    static func e4m3(_ byte: SIMD8<UInt32>) -> SIMD8<Float> {
        let mag = byte & 0x7F
        let normal = (mag &<< 20) &+ (120 << 23)
        let subnormal = unsafeBitCast((DotKernels.lanes(mag) - DotKernels.magic) * 0x1p-9, to: SIMD8<UInt32>.self)
        let isSubnormal = zeroMask(mag &>> 3)
        let bits = (normal & ~isSubnormal) | (subnormal & isSubnormal) | ((byte & 0x80) &<< 24)
        return unsafeBitCast(bits, to: SIMD8<Float>.self)
    }

    /// MXFP4 with the scales in their own tensor (gpt-oss, MiMo): 16 bytes per block, the
    /// low nibble holding the even element. Two blocks per step, lanes 0-3 and 4-7; shift
    /// 4k of word j gives element 8j + k.
    @inline(never)
    static func mxfp4Split(_ w: UnsafeRawPointer, _ scales: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        let blocks = n / 32
        var acc = SIMD8<Float>()
        let xr = UnsafeRawPointer(x)
        var b = 0
        while b + 2 <= blocks {
            let words = w.loadUnaligned(fromByteOffset: 16 * b, as: SIMD8<UInt32>.self)
            let xb = xr + 128 * b
            var a = SIMD8<Float>()
            for k in 0..<8 { a.addProduct(e2m1((words &>> UInt32(4 * k)) & 0xF), DotKernels.load8(xb, 32 * k)) }
            let s0 = E8M0.decode(scales.load(fromByteOffset: b, as: UInt8.self))
            let s1 = E8M0.decode(scales.load(fromByteOffset: b + 1, as: UInt8.self))
            acc.addProduct(SIMD8(s0, s0, s0, s0, s1, s1, s1, s1), a)
            b += 2
        }
        var s = acc.sum()
        if b < blocks {  // odd last block, natural order
            var t: Float = 0
            for j in 0..<16 {
                let q = w.load(fromByteOffset: 16 * b + j, as: UInt8.self)
                t += E2M1.decode(q & 0xF) * x[32 * b + 2 * j] + E2M1.decode(q >> 4) * x[32 * b + 2 * j + 1]
            }
            s += t * E8M0.decode(scales.load(fromByteOffset: b, as: UInt8.self))
        }
        return s
    }

    /// MXFP4 in GGUF's 17-byte blocks (E8M0 scale, then 16 bytes: low nibbles are elements
    /// 0-15, high nibbles 16-31); lanes as for q4_0.
    @inline(never)
    static func mxfp4GGUF(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        let blocks = n / 32
        var acc = SIMD8<Float>()
        let xr = UnsafeRawPointer(x)
        var b = 0
        while b + 2 <= blocks {
            let b0 = w + 17 * b, b1 = b0 + 17
            let words = SIMD8(lowHalf: b0.loadUnaligned(fromByteOffset: 1, as: SIMD4<UInt32>.self),
                              highHalf: b1.loadUnaligned(fromByteOffset: 1, as: SIMD4<UInt32>.self))
            let xb = xr + 128 * b
            var a = SIMD8<Float>()
            for k in 0..<8 { a.addProduct(e2m1((words &>> UInt32(4 * k)) & 0xF), DotKernels.load8(xb, 32 * k)) }
            let s0 = E8M0.decode(b0.load(as: UInt8.self)), s1 = E8M0.decode(b1.load(as: UInt8.self))
            acc.addProduct(SIMD8(s0, s0, s0, s0, s1, s1, s1, s1), a)
            b += 2
        }
        var s = acc.sum()
        if b < blocks {
            let blk = w + 17 * b
            var t: Float = 0
            for j in 0..<16 {
                let q = blk.load(fromByteOffset: 1 + j, as: UInt8.self)
                t += E2M1.decode(q & 0xF) * x[32 * b + j] + E2M1.decode(q >> 4) * x[32 * b + j + 16]
            }
            s += t * E8M0.decode(blk.load(as: UInt8.self))
        }
        return s
    }

    /// FP8 E4M3 row against x, one multiplier per `tile` columns (`rowScales[c]`). Lanes
    /// as for q8_0: shift 8k of word j gives element 4j + k within each 32.
    @inline(never)
    static func fp8(_ w: UnsafeRawPointer, _ rowScales: UnsafePointer<Float>, tile: Int, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var total: Float = 0
        let xr = UnsafeRawPointer(x)
        var c = 0
        var start = 0
        while start < n {
            let end = min(start + tile, n)
            var a = SIMD8<Float>()
            var g = start
            while g + 32 <= end {
                let words = w.loadUnaligned(fromByteOffset: g, as: SIMD8<UInt32>.self)
                let xb = xr + 4 * g
                a.addProduct(e4m3(words & 0xFF), DotKernels.load8(xb, 0))
                a.addProduct(e4m3((words &>> 8) & 0xFF), DotKernels.load8(xb, 32))
                a.addProduct(e4m3((words &>> 16) & 0xFF), DotKernels.load8(xb, 64))
                a.addProduct(e4m3(words &>> 24), DotKernels.load8(xb, 96))
                g += 32
            }
            var t = a.sum()
            while g < end { t += E4M3.decode(w.load(fromByteOffset: g, as: UInt8.self)) * x[g]; g += 1 }
            total += t * rowScales[c]
            c += 1
            start = end
        }
        return total
    }
}
