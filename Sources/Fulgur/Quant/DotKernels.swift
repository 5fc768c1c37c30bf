/// Fused dequantize-and-dot kernels: one weight row (in its stored type) against f32
/// activations. These are the CPU executor's inner loops; decode time is spent here.
/// Quantized rows are never expanded to memory: each 32-element block is converted in SIMD
/// registers and multiplied at once.
enum DotKernels {
    @inline(__always)
    static func loadX(_ x: UnsafePointer<Float>, _ i: Int) -> SIMD16<Float> {
        UnsafeRawPointer(x + i).loadUnaligned(as: SIMD16<Float>.self)
    }

    static func f32(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        let wf = w.assumingMemoryBound(to: Float.self)
        var acc = SIMD16<Float>()
        var i = 0
        while i + 16 <= n {
            acc.addProduct(UnsafeRawPointer(wf + i).loadUnaligned(as: SIMD16<Float>.self), loadX(x, i))
            i += 16
        }
        var s = acc.sum()
        while i < n { s += wf[i] * x[i]; i += 1 }
        return s
    }

    static func bf16(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>()
        var i = 0
        while i + 16 <= n {
            let bits = SIMD16<UInt32>(truncatingIfNeeded: w.loadUnaligned(fromByteOffset: 2 * i, as: SIMD16<UInt16>.self)) &<< 16
            acc.addProduct(unsafeBitCast(bits, to: SIMD16<Float>.self), loadX(x, i))
            i += 16
        }
        var s = acc.sum()
        while i < n { s += bf16ToFloat(w.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) * x[i]; i += 1 }
        return s
    }

    static func f16(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>()
        var i = 0
        while i + 16 <= n {
            let h = unsafeBitCast(w.loadUnaligned(fromByteOffset: 2 * i, as: SIMD16<UInt16>.self), to: SIMD16<Float16>.self)
            acc.addProduct(SIMD16<Float>(h), loadX(x, i))
            i += 16
        }
        var s = acc.sum()
        while i < n { s += f16ToFloat(w.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) * x[i]; i += 1 }
        return s
    }

    /// q8_0: value = d * q.
    static func q8_0(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>()
        for b in 0..<(n / 32) {
            let blk = w + b * 34
            let d = f16ToFloat(blk.loadUnaligned(as: UInt16.self))
            let q0 = SIMD16<Float>(blk.loadUnaligned(fromByteOffset: 2, as: SIMD16<Int8>.self))
            let q1 = SIMD16<Float>(blk.loadUnaligned(fromByteOffset: 18, as: SIMD16<Int8>.self))
            acc.addProduct(SIMD16(repeating: d), q0 * loadX(x, 32 * b) + q1 * loadX(x, 32 * b + 16))
        }
        return acc.sum()
    }

    /// q4_0: value = d * (q - 8) = d * q - 8 d; the -8 d term uses the block sums of x.
    static func q4_0(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>()
        var offset: Float = 0
        for b in 0..<(n / 32) {
            let blk = w + b * 18
            let d = f16ToFloat(blk.loadUnaligned(as: UInt16.self))
            let qs = blk.loadUnaligned(fromByteOffset: 2, as: SIMD16<UInt8>.self)
            let lo = SIMD16<Float>(qs & 0x0F), hi = SIMD16<Float>(qs &>> 4)
            acc.addProduct(SIMD16(repeating: d), lo * loadX(x, 32 * b) + hi * loadX(x, 32 * b + 16))
            offset += d * xsum[b]
        }
        return acc.sum() - 8 * offset
    }

    /// q4_1: value = d * q + m; the m term uses the block sums of x.
    static func q4_1(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>()
        var offset: Float = 0
        for b in 0..<(n / 32) {
            let blk = w + b * 20
            let dm = blk.loadUnaligned(as: SIMD2<UInt16>.self)
            let d = f16ToFloat(dm[0]), m = f16ToFloat(dm[1])
            let qs = blk.loadUnaligned(fromByteOffset: 4, as: SIMD16<UInt8>.self)
            let lo = SIMD16<Float>(qs & 0x0F), hi = SIMD16<Float>(qs &>> 4)
            acc.addProduct(SIMD16(repeating: d), lo * loadX(x, 32 * b) + hi * loadX(x, 32 * b + 16))
            offset += m * xsum[b]
        }
        return acc.sum() + offset
    }
}
