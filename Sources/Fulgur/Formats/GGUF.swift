/// GGUF v2/v3, llama.cpp's single-file container: metadata key/values (architecture,
/// hyper-parameters, tokenizer, chat template), then tensor infos, then aligned tensor data.
/// Tensors are used in place from the memory map.
public enum GGUFValue: Sendable, Equatable {
    case int(Int64)
    case uint(UInt64)
    case float(Double)
    case bool(Bool)
    case string(String)
    case array([GGUFValue])

    public var int: Int? {
        switch self {
        case .int(let v): return Int(v)
        case .uint(let v): return v <= UInt64(Int.max) ? Int(v) : nil
        default: return nil
        }
    }
    public var double: Double? {
        switch self {
        case .float(let v): return v
        case .int(let v): return Double(v)
        case .uint(let v): return Double(v)
        default: return nil
        }
    }
    public var string: String? { if case .string(let s) = self { return s }; return nil }
    public var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var array: [GGUFValue]? { if case .array(let a) = self { return a }; return nil }
    public var strings: [String]? { array?.compactMap(\.string) }
}

public final class GGUFFile: TensorSource {
    public let path: String
    public let version: UInt32
    public let metadata: [String: GGUFValue]
    /// Metadata keys in file order, for `inspect`.
    public let metadataKeys: [String]
    private let file: MappedFile
    private var tensors: [String: TensorView] = [:]
    public private(set) var tensorNames: [String] = []

    public var sourceDescription: String { path }

    /// ggml type ids this reader understands.
    static func dtype(ggmlType t: UInt32) -> DType? {
        switch t {
        case 0: return .f32
        case 1: return .f16
        case 2: return .q4_0
        case 3: return .q4_1
        case 8: return .q8_0
        case 24: return .i8
        case 26: return .i32
        case 27: return .i64
        case 30: return .bf16
        case 39: return .mxfp4
        default: return nil
        }
    }

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        var r = ByteReader(base: file.base, size: file.size, file: path)
        let magic = try r.read(UInt32.self, "magic")
        guard magic == 0x4655_4747 else {  // "GGUF"
            throw FulgurError.format(path, "not a GGUF file (magic bytes are not 'GGUF')")
        }
        version = try r.read(UInt32.self, "version")
        guard version == 2 || version == 3 else {
            throw FulgurError.format(path, "GGUF version \(version) is not supported (expected 2 or 3)")
        }
        let tensorCount = try r.read(UInt64.self, "tensor count")
        let kvCount = try r.read(UInt64.self, "metadata count")
        // Each entry takes at least a few bytes: reject counts the file cannot hold.
        guard tensorCount < UInt64(file.size), kvCount < UInt64(file.size) else {
            throw FulgurError.format(path, "header claims \(tensorCount) tensors and \(kvCount) metadata entries, more than the file can hold")
        }
        var meta: [String: GGUFValue] = [:]
        var keys: [String] = []
        for i in 0..<Int(kvCount) {
            let key = try Self.readString(&r, "metadata key #\(i)")
            let type = try r.read(UInt32.self, "type of '\(key)'")
            meta[key] = try Self.readValue(&r, type: type, key: key, depth: 0)
            keys.append(key)
        }
        metadata = meta
        metadataKeys = keys

        struct Info { let name: String; let dims: [Int]; let type: UInt32; let offset: UInt64 }
        var infos: [Info] = []
        for i in 0..<Int(tensorCount) {
            let name = try Self.readString(&r, "name of tensor #\(i)")
            let nDims = try r.read(UInt32.self, "dimension count of '\(name)'")
            guard nDims >= 1, nDims <= 4 else {
                throw FulgurError.format(path, "tensor '\(name)' has \(nDims) dimensions, expected 1 to 4")
            }
            var dims: [Int] = []
            for _ in 0..<nDims {
                let d = try r.read(UInt64.self, "shape of '\(name)'")
                guard d > 0, d < (1 << 40) else { throw FulgurError.format(path, "tensor '\(name)' has dimension \(d)") }
                dims.append(Int(d))
            }
            let type = try r.read(UInt32.self, "type of '\(name)'")
            let offset = try r.read(UInt64.self, "offset of '\(name)'")
            infos.append(Info(name: name, dims: dims, type: type, offset: offset))
        }
        let alignment = meta["general.alignment"]?.int ?? 32
        guard alignment > 0, alignment & (alignment - 1) == 0 else {
            throw FulgurError.format(path, "general.alignment is \(alignment), expected a power of two")
        }
        let dataStart = (r.offset + alignment - 1) / alignment * alignment
        for info in infos {
            guard let dtype = Self.dtype(ggmlType: info.type) else {
                throw FulgurError(.unsupported, "\(path): tensor '\(info.name)' has ggml type \(info.type), which Fulgur does not read (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, MXFP4, I8, I32, I64)")
            }
            // ggml lists dimensions innermost first; Fulgur keeps outermost first.
            let shape = Array(info.dims.reversed())
            guard shape.last! % dtype.blockElements == 0 else {
                throw FulgurError.format(path, "tensor '\(info.name)' has row length \(shape.last!), not a multiple of the \(dtype) block size \(dtype.blockElements)")
            }
            guard let bytes = dtype.byteCount(shape: shape) else {
                throw FulgurError.format(path, "tensor '\(info.name)' has shape \(shape), too large to address: the file is corrupt")
            }
            let start = UInt64(dataStart) + info.offset
            guard info.offset <= UInt64(file.size), start + UInt64(bytes) <= UInt64(file.size) else {
                throw FulgurError.format(path, "tensor '\(info.name)' (\(bytes) bytes at offset \(start)) runs past the end of the file (\(file.size) bytes): the file is truncated or corrupt")
            }
            tensors[info.name] = TensorView(name: info.name, dtype: dtype, shape: shape,
                                            data: file.base + Int(start), byteCount: bytes, owner: file)
            tensorNames.append(info.name)
        }
    }

    public func tensorIfPresent(_ name: String) -> TensorView? { tensors[name] }

    private static func readString(_ r: inout ByteReader, _ what: String) throws -> String {
        let n = try r.read(UInt64.self, "length of \(what)")
        guard n <= UInt64(r.size) else { throw FulgurError.format(r.file, "\(what) claims \(n) bytes, more than the file holds") }
        let bytes = try r.readBytes(Int(n), what)
        return String(decoding: bytes, as: UTF8.self)
    }

    private static func readValue(_ r: inout ByteReader, type: UInt32, key: String, depth: Int) throws -> GGUFValue {
        switch type {
        case 0: return .uint(UInt64(try r.read(UInt8.self, key)))
        case 1: return .int(Int64(try r.read(Int8.self, key)))
        case 2: return .uint(UInt64(try r.read(UInt16.self, key)))
        case 3: return .int(Int64(try r.read(Int16.self, key)))
        case 4: return .uint(UInt64(try r.read(UInt32.self, key)))
        case 5: return .int(Int64(try r.read(Int32.self, key)))
        case 6: return .float(Double(Float(bitPattern: try r.read(UInt32.self, key))))
        case 7: return .bool(try r.read(UInt8.self, key) != 0)
        case 8: return .string(try readString(&r, "value of '\(key)'"))
        case 9:
            guard depth < 4 else { throw FulgurError.format(r.file, "metadata '\(key)' nests arrays too deeply") }
            let elemType = try r.read(UInt32.self, "array type of '\(key)'")
            let count = try r.read(UInt64.self, "array length of '\(key)'")
            guard count <= UInt64(r.size) else {
                throw FulgurError.format(r.file, "metadata '\(key)' claims \(count) elements, more than the file holds")
            }
            var items: [GGUFValue] = []
            items.reserveCapacity(Int(count))
            for _ in 0..<Int(count) { items.append(try readValue(&r, type: elemType, key: key, depth: depth + 1)) }
            return .array(items)
        case 10: return .uint(try r.read(UInt64.self, key))
        case 11: return .int(try r.read(Int64.self, key))
        case 12: return .float(Double(bitPattern: try r.read(UInt64.self, key)))
        default:
            throw FulgurError.format(r.file, "metadata '\(key)' has unknown value type \(type)")
        }
    }
}
