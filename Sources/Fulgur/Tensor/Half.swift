/// Conversions between f32 and the 16-bit float types checkpoints use.
@inline(__always) public func bf16ToFloat(_ bits: UInt16) -> Float {
    Float(bitPattern: UInt32(bits) << 16)
}

/// Round to nearest even (overflowing to inf), as ml_dtypes.bfloat16 casts. NaN becomes the
/// canonical quiet NaN with the input's sign and no payload, also as ml_dtypes does.
@inline(__always) public func floatToBF16(_ x: Float) -> UInt16 {
    let b = x.bitPattern
    if x.isNaN { return UInt16(truncatingIfNeeded: b >> 16) & 0x8000 | 0x7FC0 }
    let rounding = 0x7FFF + ((b >> 16) & 1)
    return UInt16(truncatingIfNeeded: (b &+ rounding) >> 16)
}

@inline(__always) public func f16ToFloat(_ bits: UInt16) -> Float {
    Float(Float16(bitPattern: bits))
}

@inline(__always) public func floatToF16(_ x: Float) -> UInt16 {
    Float16(x).bitPattern
}
