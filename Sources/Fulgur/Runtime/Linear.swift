/// A linear layer's weight as stored: `[out, in]` rows in any supported dtype, or `[in, out]`
/// (`transposed`, as gpt-oss stores its unquantized experts) in f32/bf16/f16. A view may
/// select one expert of a stacked `[E, ...]` tensor without copying.
public struct LinearWeight: @unchecked Sendable {
    public let name: String
    public let dtype: DType
    public let outFeatures: Int
    public let inFeatures: Int
    public let transposed: Bool
    let data: UnsafeRawPointer
    let owner: AnyObject?

    public init(_ t: TensorView, transposed: Bool = false) throws {
        guard t.shape.count == 2 else {
            throw FulgurError(.shape, "tensor '\(t.name)' has shape \(t.shape), expected a 2-D weight")
        }
        try self.init(name: t.name, dtype: t.dtype, rows: t.shape[0], columns: t.shape[1], data: t.data, owner: t.owner, transposed: transposed)
    }

    /// Expert `index` of a stacked 3-D tensor `[E, rows, columns]`.
    public init(stacked t: TensorView, index: Int, transposed: Bool = false) throws {
        guard t.shape.count == 3, index < t.shape[0] else {
            throw FulgurError(.shape, "tensor '\(t.name)' has shape \(t.shape), expected [experts, rows, columns] with more than \(index) experts")
        }
        let bytes = t.dtype.byteCount(elements: t.shape[1] * t.shape[2])
        try self.init(name: "\(t.name)[\(index)]", dtype: t.dtype, rows: t.shape[1], columns: t.shape[2],
                      data: t.data + index * bytes, owner: t.owner, transposed: transposed)
    }

    init(name: String, dtype: DType, rows: Int, columns: Int, data: UnsafeRawPointer, owner: AnyObject?, transposed: Bool) throws {
        switch dtype {
        case .f32, .f16, .bf16: break
        case .q8_0, .q4_0, .q4_1 where !transposed: break
        default:
            throw FulgurError(.unsupported, "tensor '\(name)' has dtype \(dtype), which the CPU executor cannot use as a linear weight\(transposed ? " in [in, out] layout (expected f32, f16 or bf16)" : " (expected f32, f16, bf16, q8_0, q4_0 or q4_1)")")
        }
        self.name = name
        self.dtype = dtype
        self.transposed = transposed
        self.outFeatures = transposed ? columns : rows
        self.inFeatures = transposed ? rows : columns
        self.data = data
        self.owner = owner
    }

    var storedRowBytes: Int { dtype.byteCount(elements: transposed ? outFeatures : inFeatures) }
    public var byteCount: Int { dtype.byteCount(elements: outFeatures * inFeatures) }

    /// out[t, o] = sum_i w[o, i] * x[t, i] (+ bias[o]) for `tokens` rows of x.
    public func apply(_ x: UnsafePointer<Float>, tokens: Int, bias: UnsafePointer<Float>? = nil, into out: UnsafeMutablePointer<Float>) {
        if transposed {
            applyTransposed(x, tokens: tokens, into: out)
        } else {
            applyRows(x, tokens: tokens, into: out)
        }
        if let bias {
            for t in 0..<tokens { for o in 0..<outFeatures { out[t * outFeatures + o] += bias[o] } }
        }
    }

    private func applyRows(_ x: UnsafePointer<Float>, tokens: Int, into out: UnsafeMutablePointer<Float>) {
        let n = inFeatures, rowBytes = storedRowBytes, dtype = self.dtype, data = self.data, outN = outFeatures
        let pack = ActivationPack(x, tokens: tokens, columns: n, for: dtype)
        pack.values.withUnsafeBufferPointer { xs in
            pack.blockSums.withUnsafeBufferPointer { sums in
                let xp = xs.baseAddress!, sp = sums.baseAddress, blocks = n / 32
                Parallel.chunks(outN, work: outN * n * tokens) { rows in
                    for r in rows {
                        let w = data + r * rowBytes
                        for t in 0..<tokens {
                            let xt = xp + t * n
                            let v: Float
                            switch dtype {
                            case .f32: v = DotKernels.f32(w, xt, n)
                            case .bf16: v = DotKernels.bf16(w, xt, n)
                            case .f16: v = DotKernels.f16(w, xt, n)
                            case .q8_0: v = DotKernels.q8_0(w, xt, n)
                            case .q4_0: v = DotKernels.q4_0(w, xt, sp! + t * blocks, n)
                            case .q4_1: v = DotKernels.q4_1(w, xt, sp! + t * blocks, n)
                            default: fatalError("unreachable: dtype checked at init")
                            }
                            out[t * outN + r] = v
                        }
                    }
                }
            }
        }
    }

    /// [in, out] storage: out[t, :] = sum_i x[t, i] * w[i, :], one stored row at a time.
    private func applyTransposed(_ x: UnsafePointer<Float>, tokens: Int, into out: UnsafeMutablePointer<Float>) {
        let outN = outFeatures, inN = inFeatures, rowBytes = storedRowBytes
        out.update(repeating: 0, count: tokens * outN)
        var row = [Float](repeating: 0, count: outN)
        row.withUnsafeMutableBufferPointer { rb in
            for i in 0..<inN {
                Dequant.row(dtype, data + i * rowBytes, outN, rb.baseAddress!)
                for t in 0..<tokens {
                    let a = x[t * inN + i]
                    let o = out + t * outN
                    for j in 0..<outN { o[j] += a * rb[j] }
                }
            }
        }
    }
}

extension TensorSource {
    /// A linear weight of one of this source's tensors, with errors that name the source.
    public func linearWeight(_ t: TensorView, transposed: Bool = false) throws -> LinearWeight {
        try namingSource { try LinearWeight(t, transposed: transposed) }
    }

    public func linearWeight(stacked t: TensorView, index: Int, transposed: Bool = false) throws -> LinearWeight {
        try namingSource { try LinearWeight(stacked: t, index: index, transposed: transposed) }
    }

    private func namingSource(_ make: () throws -> LinearWeight) throws -> LinearWeight {
        do {
            return try make()
        } catch let e as FulgurError {
            throw FulgurError(e.kind, "\(sourceDescription): \(e.message)")
        }
    }
}
