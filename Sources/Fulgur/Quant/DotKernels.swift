/// Fused dequantize-and-dot kernels: one weight row (in its stored type) against f32
/// activations. These are the CPU executor's inner loops; decode time is spent here.
///
/// Quantized blocks are never expanded to memory. Nibbles and bytes are pulled out of
/// 32-bit words with shifts and masks, and turned into floats with the 2^23 trick
/// (`bits | 0x4B000000` is the float 2^23 + value), so that every step is one AVX2
/// instruction on 8 lanes. The lanes then hold the block's elements in a shuffled order;
/// instead of unshuffling each row, the activations are shuffled once per product
/// (`ActivationPack`) into the same order.
enum DotKernels {
    static let magic: Float = 8_388_608  // 2^23

    @inline(__always)
    static func lanes(_ bits: SIMD8<UInt32>) -> SIMD8<Float> {
        unsafeBitCast(bits | 0x4B00_0000, to: SIMD8<Float>.self)
    }

    @inline(__always)
    static func load8(_ p: UnsafeRawPointer, _ byteOffset: Int) -> SIMD8<Float> {
        p.loadUnaligned(fromByteOffset: byteOffset, as: SIMD8<Float>.self)
    }

    @inline(never)
    static func f32(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc0 = SIMD8<Float>(), acc1 = SIMD8<Float>()
        let xr = UnsafeRawPointer(x)
        var i = 0
        while i + 16 <= n {
            acc0.addProduct(load8(w, 4 * i), load8(xr, 4 * i))
            acc1.addProduct(load8(w, 4 * i + 32), load8(xr, 4 * i + 32))
            i += 16
        }
        var s = (acc0 + acc1).sum()
        let wf = w.assumingMemoryBound(to: Float.self)
        while i < n { s += wf[i] * x[i]; i += 1 }
        return s
    }

    /// bf16: each 32-bit word holds elements 2j (low half) and 2j+1 (high half); shifting
    /// or masking gives their f32 bits. `x` is packed per 16 elements as [evens, odds].
    @inline(never)
    static func bf16(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc0 = SIMD8<Float>(), acc1 = SIMD8<Float>()
        let xr = UnsafeRawPointer(x)
        var i = 0
        while i + 16 <= n {
            let words = w.loadUnaligned(fromByteOffset: 2 * i, as: SIMD8<UInt32>.self)
            acc0.addProduct(unsafeBitCast(words &<< 16, to: SIMD8<Float>.self), load8(xr, 4 * i))
            acc1.addProduct(unsafeBitCast(words & 0xFFFF_0000, to: SIMD8<Float>.self), load8(xr, 4 * i + 32))
            i += 16
        }
        var s = (acc0 + acc1).sum()
        while i < n { s += bf16ToFloat(w.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) * x[i]; i += 1 }
        return s
    }

    @inline(never)
    static func f16(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var s: Float = 0
        for i in 0..<n { s += f16ToFloat(w.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) * x[i] }
        return s
    }

    /// q8_0 (34-byte blocks: f16 d, 32 x i8). Shift 8k of word j gives element 4j + k; the
    /// sign is restored by xor 0x80 before the 2^23 trick and a bias of 128 after.
    @inline(never)
    static func q8_0(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD8<Float>()
        let xr = UnsafeRawPointer(x)
        for b in 0..<(n / 32) {
            let blk = w + b * 34
            let words = blk.loadUnaligned(fromByteOffset: 2, as: SIMD8<UInt32>.self) ^ 0x8080_8080
            let xb = 128 * b
            var a = SIMD8<Float>()
            a.addProduct(lanes(words & 0xFF) - (magic + 128), load8(xr, xb))
            a.addProduct(lanes((words &>> 8) & 0xFF) - (magic + 128), load8(xr, xb + 32))
            a.addProduct(lanes((words &>> 16) & 0xFF) - (magic + 128), load8(xr, xb + 64))
            a.addProduct(lanes(words &>> 24) - (magic + 128), load8(xr, xb + 96))
            acc.addProduct(SIMD8(repeating: f16ToFloat(blk.loadUnaligned(as: UInt16.self))), a)
        }
        return acc.sum()
    }

    // Kept out of line: inlined into the row loop, LLVM splits the 8-lane code into scalar
    // and 4-lane pieces and runs three times slower.
    @inline(never)
    static func q4_0(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int) -> Float {
        q4(w, x, xsum, n, blockBytes: 18, hasMin: false)
    }

    @inline(never)
    static func q4_1(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int) -> Float {
        q4(w, x, xsum, n, blockBytes: 20, hasMin: true)
    }

    /// q4_0 / q4_1 (18- or 20-byte blocks), two blocks per step: lanes 0-3 hold words of
    /// block b, lanes 4-7 of block b+1; shift 4k gives element (k odd ? 16 : 0) + 4j + k/2.
    /// q4_1: value = d q + m, the m term from the block sums of x.
    /// q4_0: value = d (q - 8), the -8 folded into the 2^23 bias.
    @inline(__always)
    static func q4(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int,
                   blockBytes: Int, hasMin: Bool) -> Float {
        let blocks = n / 32, qOffset = hasMin ? 4 : 2
        let bias: Float = hasMin ? magic : magic + 8
        var acc = SIMD8<Float>()
        var offset: Float = 0
        let xr = UnsafeRawPointer(x)
        var b = 0
        @inline(__always) func pair(_ b: Int) -> (SIMD8<Float>, SIMD8<Float>) {
            let b0 = w + b * blockBytes, b1 = b0 + blockBytes
            let words = SIMD8(lowHalf: b0.loadUnaligned(fromByteOffset: qOffset, as: SIMD4<UInt32>.self),
                              highHalf: b1.loadUnaligned(fromByteOffset: qOffset, as: SIMD4<UInt32>.self))
            let xb = xr + 128 * b
            var a = SIMD8<Float>()
            for k in 0..<8 {
                a.addProduct(lanes((words &>> UInt32(4 * k)) & 0xF) - bias, load8(xb, 32 * k))
            }
            let d0 = f16ToFloat(b0.loadUnaligned(as: UInt16.self)), d1 = f16ToFloat(b1.loadUnaligned(as: UInt16.self))
            if hasMin {
                offset += f16ToFloat(b0.loadUnaligned(fromByteOffset: 2, as: UInt16.self)) * xsum[b]
                offset += f16ToFloat(b1.loadUnaligned(fromByteOffset: 2, as: UInt16.self)) * xsum[b + 1]
            }
            return (a, SIMD8(d0, d0, d0, d0, d1, d1, d1, d1))
        }
        // Two pairs per step: two independent FMA chains keep both FMA ports busy.
        var acc2 = SIMD8<Float>()
        while b + 4 <= blocks {
            let (a0, d0) = pair(b), (a1, d1) = pair(b + 2)
            acc.addProduct(d0, a0)
            acc2.addProduct(d1, a1)
            b += 4
        }
        if b + 2 <= blocks {
            let (a0, d0) = pair(b)
            acc.addProduct(d0, a0)
            b += 2
        }
        acc += acc2
        var s = acc.sum() + offset
        if b < blocks { s += q4OddBlock(w + b * blockBytes, x + 32 * b, xsum[b], hasMin: hasMin) }
        return s
    }

    /// A q4 row's odd last block, packed in natural order: d * sum(q x) + m * (its x sum).
    @inline(__always)
    static func q4OddBlock(_ blk: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: Float, hasMin: Bool) -> Float {
        let qOffset = hasMin ? 4 : 2
        let d = f16ToFloat(blk.loadUnaligned(as: UInt16.self))
        let m = hasMin ? f16ToFloat(blk.loadUnaligned(fromByteOffset: 2, as: UInt16.self)) : 0
        var t: Float = 0
        for j in 0..<16 {
            let q = blk.load(fromByteOffset: qOffset + j, as: UInt8.self)
            t += (Float(q & 0xF) - (hasMin ? 0 : 8)) * x[j] + (Float(q >> 4) - (hasMin ? 0 : 8)) * x[j + 16]
        }
        return d * t + m * xsum
    }
}

// MARK: Several tokens against one row (a batched decode step)

extension DotKernels {
    /// `q8_0` for `tokens` rows of x (row t at x + t * n), row t's result to
    /// out[t * outStride]. The row is unpacked once, into lanes on the stack, and every token's
    /// multiply-adds are those of `q8_0` in the same order, so each result is bit-identical to
    /// `q8_0` alone: a batched step keeps every sequence's numbers, and its work per token
    /// drops to the multiply-adds.
    @inline(never)
    static func q8_0(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ n: Int, tokens: Int,
                     out: UnsafeMutablePointer<Float>, outStride: Int) {
        let blocks = n / 32
        withUnsafeTemporaryAllocation(of: SIMD8<Float>.self, capacity: 5 * blocks) { buffer in
            let q = buffer.baseAddress!, d = q + 4 * blocks
            for b in 0..<blocks {
                let blk = w + b * 34
                let words = blk.loadUnaligned(fromByteOffset: 2, as: SIMD8<UInt32>.self) ^ 0x8080_8080
                q[4 * b] = lanes(words & 0xFF) - (magic + 128)
                q[4 * b + 1] = lanes((words &>> 8) & 0xFF) - (magic + 128)
                q[4 * b + 2] = lanes((words &>> 16) & 0xFF) - (magic + 128)
                q[4 * b + 3] = lanes(words &>> 24) - (magic + 128)
                d[b] = SIMD8(repeating: f16ToFloat(blk.loadUnaligned(as: UInt16.self)))
            }
            for t in 0..<tokens {
                let xr = UnsafeRawPointer(x + t * n)
                var acc = SIMD8<Float>()
                for b in 0..<blocks {
                    let xb = 128 * b
                    var a = SIMD8<Float>()
                    a.addProduct(q[4 * b], load8(xr, xb))
                    a.addProduct(q[4 * b + 1], load8(xr, xb + 32))
                    a.addProduct(q[4 * b + 2], load8(xr, xb + 64))
                    a.addProduct(q[4 * b + 3], load8(xr, xb + 96))
                    acc.addProduct(d[b], a)
                }
                out[t * outStride] = acc.sum()
            }
        }
    }

    @inline(never)
    static func q4_0(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int, tokens: Int,
                     out: UnsafeMutablePointer<Float>, outStride: Int) {
        q4(w, x, xsum, n, tokens: tokens, blockBytes: 18, hasMin: false, out: out, outStride: outStride)
    }

    @inline(never)
    static func q4_1(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int, tokens: Int,
                     out: UnsafeMutablePointer<Float>, outStride: Int) {
        q4(w, x, xsum, n, tokens: tokens, blockBytes: 20, hasMin: true, out: out, outStride: outStride)
    }

    /// `q4` for `tokens` rows of x (row t at x + t * n, its block sums at xsum + t * n / 32):
    /// the row's block pairs unpacked once, then every token's arithmetic that of `q4`, in the
    /// same order (see `q8_0(_:_:_:tokens:out:outStride:)`).
    @inline(__always)
    static func q4(_ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ xsum: UnsafePointer<Float>, _ n: Int, tokens: Int,
                   blockBytes: Int, hasMin: Bool, out: UnsafeMutablePointer<Float>, outStride: Int) {
        let blocks = n / 32, pairs = blocks / 2, qOffset = hasMin ? 4 : 2
        let bias: Float = hasMin ? magic : magic + 8
        withUnsafeTemporaryAllocation(of: SIMD8<Float>.self, capacity: 9 * pairs + 1) { buffer in
          withUnsafeTemporaryAllocation(of: Float.self, capacity: blocks + 1) { minimums in
            // Pair p (blocks 2p, 2p+1): its 8 lane vectors at q[8p...], its scales at d[p].
            let q = buffer.baseAddress!, d = q + 8 * pairs, mins = minimums.baseAddress!
            for p in 0..<pairs {
                let b0 = w + 2 * p * blockBytes, b1 = b0 + blockBytes
                let words = SIMD8(lowHalf: b0.loadUnaligned(fromByteOffset: qOffset, as: SIMD4<UInt32>.self),
                                  highHalf: b1.loadUnaligned(fromByteOffset: qOffset, as: SIMD4<UInt32>.self))
                for k in 0..<8 { q[8 * p + k] = lanes((words &>> UInt32(4 * k)) & 0xF) - bias }
                let d0 = f16ToFloat(b0.loadUnaligned(as: UInt16.self)), d1 = f16ToFloat(b1.loadUnaligned(as: UInt16.self))
                d[p] = SIMD8(d0, d0, d0, d0, d1, d1, d1, d1)
                if hasMin {
                    mins[2 * p] = f16ToFloat(b0.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
                    mins[2 * p + 1] = f16ToFloat(b1.loadUnaligned(fromByteOffset: 2, as: UInt16.self))
                }
            }
            for t in 0..<tokens {
                let xt = x + t * n, xr = UnsafeRawPointer(xt), xs = xsum + t * blocks
                var offset: Float = 0
                /// `q4`'s pair(b) for this token.
                @inline(__always) func pair(_ b: Int) -> SIMD8<Float> {
                    let xb = xr + 128 * b, qp = q + 4 * b
                    var a = SIMD8<Float>()
                    for k in 0..<8 { a.addProduct(qp[k], load8(xb, 32 * k)) }
                    if hasMin {
                        offset += mins[b] * xs[b]
                        offset += mins[b + 1] * xs[b + 1]
                    }
                    return a
                }
                var acc = SIMD8<Float>(), acc2 = SIMD8<Float>()
                var b = 0
                while b + 4 <= blocks {
                    let a0 = pair(b), a1 = pair(b + 2)
                    acc.addProduct(d[b / 2], a0)
                    acc2.addProduct(d[b / 2 + 1], a1)
                    b += 4
                }
                if b + 2 <= blocks {
                    let a0 = pair(b)
                    acc.addProduct(d[b / 2], a0)
                    b += 2
                }
                acc += acc2
                var s = acc.sum() + offset
                if b < blocks { s += q4OddBlock(w + b * blockBytes, xt + 32 * b, xs[b], hasMin: hasMin) }
                out[t * outStride] = s
            }
          }
        }
    }
}

/// Activations rearranged for one weight format's kernel, once per product, plus the block
/// sums the q4 kernels need. Each kernel documents the lane order it expects.
struct ActivationPack {
    var values: [Float]
    var blockSums: [Float]

    enum Order {
        case natural
        case bf16Pairs       // per 16: evens, then odds
        case bytes32         // per 32: element 4j + k at 8k + j (q8_0, fp8)
        case nibbleHalves    // per 64 (two blocks): (k odd ? 16 : 0) + 4(j % 4) + k/2 of block j/4 at 8k + j
        case nibblePairs     // per 64 (two blocks): 8(j % 4) + k of block j/4 at 8k + j (mxfp4 split)
    }

    static func order(for format: LinearWeight.Format) -> Order {
        switch format {
        case .plain(.bf16): return .bf16Pairs
        case .plain(.q8_0), .fp8: return .bytes32
        case .plain(.q4_0), .plain(.q4_1), .plain(.mxfp4): return .nibbleHalves
        case .mxfp4: return .nibblePairs
        default: return .natural
        }
    }

    init(_ x: UnsafePointer<Float>, tokens: Int, columns n: Int, for format: LinearWeight.Format) {
        let order = Self.order(for: format)
        values = [Float](repeating: 0, count: tokens * n)
        blockSums = []
        values.withUnsafeMutableBufferPointer { out in
            for t in 0..<tokens {
                let src = x + t * n, dst = out.baseAddress! + t * n
                dst.update(from: src, count: n)  // tails stay in natural order
                switch order {
                case .natural:
                    break
                case .bf16Pairs:
                    for c in stride(from: 0, to: n / 16 * 16, by: 16) {
                        for j in 0..<8 { dst[c + j] = src[c + 2 * j]; dst[c + 8 + j] = src[c + 2 * j + 1] }
                    }
                case .bytes32:
                    for b in 0..<(n / 32) {
                        for k in 0..<4 { for j in 0..<8 { dst[32 * b + 8 * k + j] = src[32 * b + 4 * j + k] } }
                    }
                case .nibbleHalves, .nibblePairs:
                    let halves = order == .nibbleHalves
                    for p in stride(from: 0, to: n / 32 - 1, by: 2) {
                        for k in 0..<8 {
                            for j in 0..<8 {
                                let within = halves ? (k & 1 == 1 ? 16 : 0) + 4 * (j % 4) + k / 2 : 8 * (j % 4) + k
                                dst[32 * p + 8 * k + j] = src[32 * (p + j / 4) + within]
                            }
                        }
                    }
                }
            }
        }
        if format == .plain(.q4_0) || format == .plain(.q4_1) {
            let blocks = n / 32
            blockSums = [Float](repeating: 0, count: tokens * blocks)
            for t in 0..<tokens {
                for b in 0..<blocks {
                    var s: Float = 0
                    for j in 0..<32 { s += x[t * n + 32 * b + j] }
                    blockSums[t * blocks + b] = s
                }
            }
        }
    }
}
