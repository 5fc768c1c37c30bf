/// A tensor as stored in a checkpoint: its type, its shape (outermost dimension first, so a
/// linear layer's weight is `[out, in]` whatever the file's own convention) and its bytes,
/// which live in a memory-mapped file kept alive by `owner`.
public struct TensorView: @unchecked Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let data: UnsafeRawPointer
    public let byteCount: Int
    public let owner: AnyObject?

    public init(name: String, dtype: DType, shape: [Int], data: UnsafeRawPointer, byteCount: Int, owner: AnyObject?) {
        self.name = name
        self.dtype = dtype
        self.shape = shape
        self.data = data
        self.byteCount = byteCount
        self.owner = owner
    }

    public var elementCount: Int { shape.reduce(1, *) }
    /// Rows of a 2-D (or higher, flattened) tensor and the length of its innermost dimension.
    public var rows: Int { shape.count <= 1 ? 1 : shape.dropLast().reduce(1, *) }
    public var columns: Int { shape.last ?? 1 }
    public var rowBytes: Int { dtype.byteCount(elements: columns) }

    /// The tensor's values converted to f32 (for small tensors: norms, biases, sinks).
    public func floats() -> [Float] {
        var out = [Float](repeating: 0, count: elementCount)
        out.withUnsafeMutableBufferPointer { o in
            for r in 0..<rows {
                Dequant.row(dtype, data + r * rowBytes, columns, o.baseAddress! + r * columns)
            }
        }
        return out
    }
}

/// Anything that holds named tensors: one GGUF file, a set of safetensors shards.
public protocol TensorSource: AnyObject {
    var tensorNames: [String] { get }
    func tensorIfPresent(_ name: String) -> TensorView?
    var sourceDescription: String { get }
    /// A weight that is not stored but defined by its positions (a deferred random matrix,
    /// RandomModel.buildDeferred), made where it is used; `expert` picks one of a stacked
    /// tensor. Nil for everything a file holds.
    func deferredWeight(_ name: String, expert: Int?) -> LinearWeight?
}

extension TensorSource {
    public func deferredWeight(_ name: String, expert: Int?) -> LinearWeight? { nil }

    public func tensor(_ name: String) throws -> TensorView {
        guard let t = tensorIfPresent(name) else {
            throw FulgurError(.format, "\(sourceDescription): tensor '\(name)' is missing")
        }
        return t
    }

    /// The tensor, checked to have exactly `shape`.
    public func tensor(_ name: String, shape: [Int]) throws -> TensorView {
        let t = try tensor(name)
        guard t.shape == shape else {
            throw FulgurError(.shape, "\(sourceDescription): tensor '\(name)' has shape \(t.shape), expected \(shape)")
        }
        return t
    }

    /// The values of a small tensor of exactly `shape` (a norm, a bias) as f32.
    public func floats(_ name: String, shape: [Int]) throws -> [Float] {
        let t = try tensor(name, shape: shape)
        try checkConvertible(t)
        return t.floats()
    }

    /// Throws unless the tensor's dtype converts to f32 (embedding rows, norms, biases do).
    public func checkConvertible(_ t: TensorView) throws {
        guard Dequant.converts(t.dtype) else {
            throw FulgurError(.unsupported, "\(sourceDescription): tensor '\(t.name)' has dtype \(t.dtype), which Fulgur cannot convert to f32 (expected f32, f16, bf16, q8_0, q4_0 or q4_1)")
        }
    }
}
