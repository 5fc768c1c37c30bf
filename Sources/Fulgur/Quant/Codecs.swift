/// The narrow float formats of quantized checkpoints: E2M1 (FP4) elements and E8M0 scales
/// of OCP Microscaling v1.0, and FP8 E4M3FN. Encoding matches the casts from float32 of
/// `ml_dtypes` (float4_e2m1fn, float8_e8m0fnu, float8_e4m3fn) bit for bit, because the
/// checkpoints we compare against were written with them; where ml_dtypes departs from
/// plain round-to-nearest-even the departure is copied and noted.
///
/// Encoders work on the f32 bit pattern with compares, adds and selects only, so that the
/// quantizer's loops over billions of values vectorize; decoders are tables or bit moves.

/// FP4 E2M1: codes 0-7 are +{0, 0.5, 1, 1.5, 2, 3, 4, 6}, 8-15 the same negated.
public enum E2M1 {
    public static let values: [Float] = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]

    @inline(__always) public static func decode(_ code: UInt8) -> Float { values[Int(code & 0xF)] }

    /// Round to nearest even, saturating at ±6 (±inf included). NaN becomes a zero of the
    /// opposite sign: ml_dtypes casts NaN to the format's "quiet NaN", which for a format
    /// without NaN is the bit pattern 0x8 (-0), and then applies the input's sign by negation.
    @inline(__always) public static func encode(_ x: Float) -> UInt8 {
        let b = x.bitPattern, a = b & 0x7FFF_FFFF, sign = b >> 31
        // The magnitude code counts the midpoints between neighbouring values that |x| lies
        // above; at a midpoint the even code wins, so odd codes need |x| strictly above it.
        var code: UInt32 = a > 0x3E80_0000 ? 1 : 0   // 0.25
        code += a >= 0x3F40_0000 ? 1 : 0             // 0.75
        code += a > 0x3FA0_0000 ? 1 : 0              // 1.25
        code += a >= 0x3FE0_0000 ? 1 : 0             // 1.75
        code += a > 0x4020_0000 ? 1 : 0              // 2.5
        code += a >= 0x4060_0000 ? 1 : 0             // 3.5
        code += a > 0x40A0_0000 ? 1 : 0              // 5
        let out = a > 0x7F80_0000 ? (sign ^ 1) << 3 : code | sign << 3
        return UInt8(truncatingIfNeeded: out)
    }
}

/// E8M0 shared scale: code e is 2^(e-127), 0xFF is NaN; no sign, no zero.
public enum E8M0 {
    /// Code 0 is 2^-127, an f32 subnormal; the others are an f32 exponent field as is.
    @inline(__always) public static func decode(_ code: UInt8) -> Float {
        let bits: UInt32 = code == 0 ? 0x0040_0000 : code == 0xFF ? 0x7FC0_0000 : UInt32(code) << 23
        return Float(bitPattern: bits)
    }

    /// ml_dtypes' rounding here is not round-to-nearest-even: a normal f32 rounds half up
    /// (1.5 -> 2, 3 -> 4, 1.5 * 2^127 -> NaN), and an f32 subnormal goes to 2^-127 up to and
    /// including 2^-127 itself but to 2^-126 for anything above it. Zero, negatives (-0
    /// included), inf and NaN all give NaN.
    @inline(__always) public static func encode(_ x: Float) -> UInt8 {
        let b = x.bitPattern
        let normal = min((b &+ 0x40_0000) >> 23, 0xFF)
        let subnormal: UInt32 = b > 0x40_0000 ? 1 : 0
        let code = b == 0 || b >= 0x7F80_0000 ? 0xFF : b >= 0x80_0000 ? normal : subnormal
        return UInt8(truncatingIfNeeded: code)
    }
}

/// FP8 E4M3FN: bias 7, no infinities, S.1111.111 is NaN, largest finite 448.
public enum E4M3 {
    public static let values: [Float] = (0..<256).map { code in
        let e = (code >> 3) & 0xF, m = code & 7
        let magnitude: Float
        if e == 0xF && m == 7 {
            magnitude = .nan
        } else if e == 0 {
            magnitude = Float(m) / 512
        } else {
            magnitude = Float(8 + m) * Float(sign: .plus, exponent: e - 10, significand: 1)
        }
        return code & 0x80 != 0 ? -magnitude : magnitude
    }

    @inline(__always) public static func decode(_ code: UInt8) -> Float { values[Int(code)] }

    /// Round to nearest even. Anything that rounds above 448, and ±inf, becomes NaN (0x7F
    /// with the input's sign): ml_dtypes does not saturate this format.
    @inline(__always) public static func encode(_ x: Float) -> UInt8 {
        let b = x.bitPattern, a = b & 0x7FFF_FFFF
        // Normal range: drop 20 mantissa bits with round-to-nearest-even, rebias 127 -> 7.
        let normal = ((a &+ 0x7FFFF &+ ((a >> 20) & 1)) >> 20) &- (120 << 3)
        // Below 2^-6 the step is 2^-9, the ulp of 2^14: adding 2^14 lets the FPU round.
        let subnormal = (Float(bitPattern: a) + 16384).bitPattern &- 0x4680_0000
        let code = a >= 0x3C80_0000 ? min(normal, 0x7F) : subnormal
        return UInt8(truncatingIfNeeded: code | (b >> 24) & 0x80)
    }
}
