/// Quantizers from f32 to the block formats of quantized checkpoints. Both are plain
/// reference algorithms, reproduced bit for bit by recipes/fixtures/make_codec_fixtures.py
/// in numpy with ml_dtypes casts.
public enum Quantize {
    /// MXFP4 per OCP Microscaling v1.0, written in the GGUF layout of `DType.mxfp4`: per 32
    /// values one E8M0 scale byte, then 16 bytes whose low nibble is element j and high
    /// nibble element j + 16. `count` must be a multiple of 32.
    ///
    /// The shared exponent is floor(log2(max |x|)) - 2 (2 being E2M1's largest exponent),
    /// clamped to E8M0's smallest, 2^-127, which an all-zero block also gets; elements are
    /// x / 2^exponent cast to E2M1 (round to nearest even, saturating at ±6). A block with
    /// inf or NaN gets the NaN scale 0xFF, which makes the whole block NaN, and zero codes.
    public static func mxfp4Row(_ src: UnsafePointer<Float>, _ count: Int, into dst: UnsafeMutableRawPointer) {
        precondition(count % 32 == 0, "MXFP4 rows hold whole blocks of 32 values, got \(count)")
        for b in 0..<(count / 32) {
            let x = src + 32 * b, out = dst + 17 * b
            let (scale, inverse) = mxfp4Scale(x)
            out.storeBytes(of: scale, as: UInt8.self)
            if scale == 0xFF {
                (out + 1).initializeMemory(as: UInt8.self, repeating: 0, count: 16)
                continue
            }
            for j in 0..<16 {
                let low = E2M1.encode(x[j] * inverse), high = E2M1.encode(x[j + 16] * inverse)
                out.storeBytes(of: low | high << 4, toByteOffset: 1 + j, as: UInt8.self)
            }
        }
    }

    /// The same quantizer in the layout of gpt-oss and MiMo checkpoints: `codes` gets 16 bytes
    /// per block of 32 with the even element in the low nibble, `scales` one E8M0 byte per block.
    public static func mxfp4Split(_ src: UnsafePointer<Float>, _ count: Int,
                                  codes: UnsafeMutablePointer<UInt8>, scales: UnsafeMutablePointer<UInt8>) {
        precondition(count % 32 == 0, "MXFP4 rows hold whole blocks of 32 values, got \(count)")
        for b in 0..<(count / 32) {
            let x = src + 32 * b, out = codes + 16 * b
            let (scale, inverse) = mxfp4Scale(x)
            scales[b] = scale
            if scale == 0xFF {
                out.initialize(repeating: 0, count: 16)
                continue
            }
            for j in 0..<16 {
                out[j] = E2M1.encode(x[2 * j] * inverse) | E2M1.encode(x[2 * j + 1] * inverse) << 4
            }
        }
    }

    /// The E8M0 scale of one block of 32 and the multiplier that maps the block onto E2M1's
    /// range; a block with inf or NaN gets the NaN scale 0xFF (never a finite block's: their
    /// scales stop at 252), for which the callers write zero codes.
    @inline(__always)
    static func mxfp4Scale(_ x: UnsafePointer<Float>) -> (code: UInt8, inverse: Float) {
        // Magnitudes compare as integers; NaN bit patterns sort above inf.
        var amax: UInt32 = 0
        for j in 0..<32 { amax = max(amax, x[j].bitPattern & 0x7FFF_FFFF) }
        if amax >= 0x7F80_0000 { return (0xFF, 1) }
        // floor(log2(amax)) is amax's f32 exponent field minus 127 (f32 subnormals land
        // on the clamp anyway), so the biased shared exponent is that field minus 2.
        let scale = max(Int(amax >> 23) - 2, 0)
        // Multiplying by the exact reciprocal 2^(127 - scale) rounds like dividing.
        return (UInt8(scale), Float(bitPattern: UInt32(254 - scale) << 23))
    }

    /// FP8 E4M3 with one f32 scale per 128x128 tile of a row-major `[rows, columns]` weight
    /// (edge tiles may be smaller), as DeepSeek-style checkpoints store it: scale = amax / 448,
    /// kept as the multiplier those checkpoints call `weight_scale_inv`, and codes = x / scale.
    /// `scales` is row-major `[ceil(rows / 128), ceil(columns / 128)]`.
    ///
    /// A tile whose scale underflows to zero (all zeros, or nothing above 448 times the
    /// smallest f32 subnormal) gets scale 1; a tile with inf or NaN gets a NaN scale and NaN codes.
    public static func fp8Blocks(_ src: UnsafePointer<Float>, rows: Int, columns: Int,
                                 codes: UnsafeMutablePointer<UInt8>, scales: UnsafeMutablePointer<Float>) {
        let tile = 128, tileColumns = (columns + tile - 1) / tile
        for r0 in stride(from: 0, to: rows, by: tile) {
            let rowRange = r0..<min(r0 + tile, rows)
            for c0 in stride(from: 0, to: columns, by: tile) {
                let columnRange = c0..<min(c0 + tile, columns)
                var amax: UInt32 = 0
                for r in rowRange {
                    for c in columnRange { amax = max(amax, src[r * columns + c].bitPattern & 0x7FFF_FFFF) }
                }
                var scale: Float = amax >= 0x7F80_0000 ? .nan : Float(bitPattern: amax) / 448
                if scale == 0 { scale = 1 }
                scales[(r0 / tile) * tileColumns + c0 / tile] = scale
                for r in rowRange {
                    for c in columnRange { codes[r * columns + c] = E4M3.encode(src[r * columns + c] / scale) }
                }
            }
        }
    }
}
