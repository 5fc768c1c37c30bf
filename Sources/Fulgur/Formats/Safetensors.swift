import Foundation

/// Hugging Face safetensors: an 8-byte little-endian header length, a JSON header mapping
/// tensor names to dtype, shape and byte range, then the raw tensor bytes. A checkpoint is
/// one file or several shards listed by `model.safetensors.index.json`.
public final class SafetensorsFile: TensorSource {
    public let path: String
    public let metadata: [String: String]
    private let file: MappedFile
    private var tensors: [String: TensorView] = [:]
    public private(set) var tensorNames: [String] = []
    public var sourceDescription: String { path }

    /// Safetensors' dtype names for the types Fulgur reads and writes.
    static let dtypeNames: [(name: String, dtype: DType)] = [
        ("F32", .f32), ("F16", .f16), ("BF16", .bf16), ("I8", .i8), ("U8", .u8), ("I32", .i32), ("I64", .i64),
        ("F8_E4M3", .fp8e4m3), ("F8_E8M0", .e8m0),
    ]

    static func dtype(_ name: String) -> DType? { dtypeNames.first { $0.name == name }?.dtype }

    static func name(_ dtype: DType) -> String? { dtypeNames.first { $0.dtype == dtype }?.name }

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        var r = ByteReader(base: file.base, size: file.size, file: path)
        let headerLength = try r.read(UInt64.self, "header length")
        guard headerLength >= 2, headerLength <= UInt64(file.size - 8), headerLength < 100_000_000 else {
            throw FulgurError.format(path, "header length \(headerLength) does not fit the file (\(file.size) bytes): not a safetensors file, or truncated")
        }
        let headerBytes = try r.readBytes(Int(headerLength), "header")
        let header: [String: Any]
        do {
            guard let h = try JSONSerialization.jsonObject(with: Data(headerBytes)) as? [String: Any] else {
                throw FulgurError.format(path, "header is not a JSON object")
            }
            header = h
        } catch let e as FulgurError {
            throw e
        } catch {
            throw FulgurError.format(path, "header is not valid JSON (\(error.localizedDescription))")
        }
        metadata = (header["__metadata__"] as? [String: String]) ?? [:]
        let dataStart = 8 + Int(headerLength)
        let dataSize = file.size - dataStart
        for (name, value) in header where name != "__metadata__" {
            guard let entry = value as? [String: Any],
                  let dtypeName = entry["dtype"] as? String,
                  let shapeAny = entry["shape"] as? [Any],
                  let offsets = entry["data_offsets"] as? [Any], offsets.count == 2 else {
                throw FulgurError.format(path, "header entry for tensor '\(name)' lacks dtype, shape or data_offsets")
            }
            guard let dtype = Self.dtype(dtypeName) else {
                throw FulgurError(.unsupported, "\(path): tensor '\(name)' has dtype \(dtypeName), which Fulgur does not read (supported: F32, F16, BF16, I8, U8, I32, I64, F8_E4M3, F8_E8M0)")
            }
            let shape = shapeAny.compactMap { ($0 as? NSNumber)?.intValue }
            guard shape.count == shapeAny.count, shape.allSatisfy({ $0 >= 0 }) else {
                throw FulgurError.format(path, "tensor '\(name)' has an invalid shape \(shapeAny)")
            }
            guard let begin = (offsets[0] as? NSNumber)?.intValue, let end = (offsets[1] as? NSNumber)?.intValue,
                  begin >= 0, end >= begin, end <= dataSize else {
                throw FulgurError.format(path, "tensor '\(name)' has data offsets \(offsets) outside the data section (\(dataSize) bytes): the file is truncated or corrupt")
            }
            guard let expected = dtype.byteCount(shape: shape) else {
                throw FulgurError.format(path, "tensor '\(name)' has shape \(shape), too large to address: the file is corrupt")
            }
            guard end - begin == expected else {
                throw FulgurError.format(path, "tensor '\(name)' (\(dtypeName) \(shape)) should take \(expected) bytes but its data offsets span \(end - begin)")
            }
            tensors[name] = TensorView(name: name, dtype: dtype, shape: shape, data: file.base + dataStart + begin,
                                       byteCount: expected, owner: file)
        }
        tensorNames = tensors.keys.sorted()
    }

    public func tensorIfPresent(_ name: String) -> TensorView? { tensors[name] }
}

/// All safetensors shards of a checkpoint directory, seen as one source.
public final class SafetensorsCheckpoint: TensorSource {
    public let directory: String
    public let shards: [SafetensorsFile]
    private var index: [String: SafetensorsFile] = [:]
    public private(set) var tensorNames: [String] = []
    public var sourceDescription: String { directory }

    public init(directory: String) throws {
        self.directory = directory
        let fm = FileManager.default
        let indexPath = directory + "/model.safetensors.index.json"
        var shardNames: [String]
        if fm.fileExists(atPath: indexPath) {
            let data = try Data(contentsOf: URL(fileURLWithPath: indexPath))
            guard let json = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
                  let weightMap = json["weight_map"] as? [String: String] else {
                throw FulgurError.format(indexPath, "expected a JSON object with a 'weight_map' of tensor name to shard file")
            }
            shardNames = Array(Set(weightMap.values)).sorted()
            for s in shardNames where s.contains("/") || s.hasPrefix(".") {
                throw FulgurError.format(indexPath, "shard name '\(s)' must be a plain file name in the checkpoint directory")
            }
            var byName: [String: SafetensorsFile] = [:]
            for s in shardNames {
                let p = directory + "/" + s
                guard fm.fileExists(atPath: p) else {
                    throw FulgurError(.io, "\(indexPath) lists shard '\(s)', which is missing from \(directory)")
                }
                byName[s] = try SafetensorsFile(path: p)
            }
            shards = shardNames.map { byName[$0]! }
            for (tensor, shard) in weightMap {
                guard byName[shard]!.tensorIfPresent(tensor) != nil else {
                    throw FulgurError.format(directory + "/" + shard, "tensor '\(tensor)' is listed in the index but not in the shard")
                }
                index[tensor] = byName[shard]!
            }
        } else {
            let single = directory + "/model.safetensors"
            if fm.fileExists(atPath: single) {
                shardNames = ["model.safetensors"]
            } else {
                shardNames = ((try? fm.contentsOfDirectory(atPath: directory)) ?? []).filter { $0.hasSuffix(".safetensors") }.sorted()
            }
            guard !shardNames.isEmpty else {
                throw FulgurError(.io, "\(directory): no model.safetensors, model.safetensors.index.json or *.safetensors file")
            }
            shards = try shardNames.map { try SafetensorsFile(path: directory + "/" + $0) }
            for s in shards {
                for t in s.tensorNames {
                    if index[t] != nil { throw FulgurError.format(s.path, "tensor '\(t)' also appears in another shard") }
                    index[t] = s
                }
            }
        }
        tensorNames = index.keys.sorted()
    }

    public func tensorIfPresent(_ name: String) -> TensorView? { index[name]?.tensorIfPresent(name) }
}
