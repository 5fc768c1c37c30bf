/// Storage types of weights and activations. Quantized types are stored in blocks along the
/// innermost (contiguous) dimension: `blockElements` values take `blockBytes` bytes.
public enum DType: String, Sendable, CaseIterable {
    case f32, f16, bf16
    case i8, u8, i32, i64
    case q8_0, q4_0, q4_1
    case fp8e4m3, e8m0, mxfp4

    public var blockElements: Int {
        switch self {
        case .q8_0, .q4_0, .q4_1, .mxfp4: return 32
        default: return 1
        }
    }

    public var blockBytes: Int {
        switch self {
        case .f32, .i32: return 4
        case .f16, .bf16: return 2
        case .i8, .u8, .fp8e4m3, .e8m0: return 1
        case .i64: return 8
        case .q8_0: return 34   // f16 scale + 32 x i8
        case .q4_0: return 18   // f16 scale + 16 bytes of nibbles
        case .q4_1: return 20   // f16 scale + f16 min + 16 bytes of nibbles
        case .mxfp4: return 17  // e8m0 scale + 16 bytes of nibbles (GGUF layout)
        }
    }

    /// Bytes taken by `count` elements; `count` must be a whole number of blocks.
    public func byteCount(elements count: Int) -> Int {
        (count / blockElements) * blockBytes
    }

    /// Bytes taken by a tensor of `shape`, or nil when the size overflows (a corrupt header).
    public func byteCount(shape: [Int]) -> Int? {
        var count = 1
        for d in shape {
            let (product, overflow) = count.multipliedReportingOverflow(by: d)
            guard !overflow else { return nil }
            count = product
        }
        let (bytes, overflow) = (count / blockElements).multipliedReportingOverflow(by: blockBytes)
        return overflow ? nil : bytes
    }

    public var isQuantized: Bool { blockElements > 1 }
}
