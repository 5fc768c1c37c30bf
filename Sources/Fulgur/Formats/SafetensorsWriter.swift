import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes a safetensors checkpoint without holding it in memory: every tensor's name, type
/// and shape is declared up front, so each shard's header is written first and the bytes are
/// then appended in declaration order, a tensor (or part of one) at a time. Above
/// `shardBytes` the checkpoint is split into `model-0000i-of-0000n.safetensors` shards with
/// a `model.safetensors.index.json`, as Hugging Face does.
public final class SafetensorsWriter {
    public struct Entry: Equatable, Sendable {
        public let name: String
        public let dtype: DType
        public let shape: [Int]
        public var byteCount: Int { dtype.byteCount(elements: shape.reduce(1, *)) }

        public init(name: String, dtype: DType, shape: [Int]) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
        }
    }

    public let directory: String
    /// Shard file names, in order.
    public let files: [String]
    private let entries: [Entry]
    private let shardOf: [Int]
    private var current = 0
    private var writtenInCurrent = 0
    private var openShard = -1
    private var fd: Int32 = -1

    public init(directory: String, entries: [Entry], shardBytes: Int = 5_000_000_000) throws {
        for e in entries where SafetensorsFile.name(e.dtype) == nil {
            throw FulgurError(.unsupported, "tensor '\(e.name)' is \(e.dtype), which safetensors cannot store")
        }
        var shardOf: [Int] = [], shard = 0, size = 0
        for e in entries {
            if size > 0 && size + e.byteCount > shardBytes { shard += 1; size = 0 }
            shardOf.append(shard)
            size += e.byteCount
        }
        let count = shard + 1
        self.directory = directory
        self.entries = entries
        self.shardOf = shardOf
        files = count == 1 ? ["model.safetensors"]
            : (1...count).map { String(format: "model-%05d-of-%05d.safetensors", $0, count) }
    }

    deinit { if fd >= 0 { close(fd) } }

    /// Appends bytes of the tensors in declaration order; a call may end inside a tensor or
    /// span several.
    public func append(_ bytes: UnsafeRawBufferPointer) throws {
        var offset = 0
        while true {
            try skipFilled()
            guard offset < bytes.count else { return }
            guard current < entries.count else {
                throw FulgurError(.io, "\(directory): \(bytes.count - offset) bytes written past the last declared tensor")
            }
            try openShardOfCurrent()
            let n = min(bytes.count - offset, entries[current].byteCount - writtenInCurrent)
            try writeAll(bytes.baseAddress! + offset, n)
            offset += n
            writtenInCurrent += n
        }
    }

    public func append<T>(_ values: [T]) throws {
        try values.withUnsafeBytes { try append($0) }
    }

    /// Checks that every declared tensor was written, closes the last shard and writes the index.
    public func finish() throws {
        try skipFilled()
        guard current == entries.count else {
            throw FulgurError(.io, "\(directory): tensor '\(entries[current].name)' was declared but not (fully) written")
        }
        if fd >= 0 { close(fd); fd = -1 }
        guard files.count > 1 else { return }
        var weightMap = JSONObject()
        for (i, e) in entries.enumerated().sorted(by: { $0.element.name < $1.element.name }) {
            weightMap[e.name] = .string(files[shardOf[i]])
        }
        let total = entries.reduce(0) { $0 + $1.byteCount }
        let index: JSONValue = ["metadata": ["total_size": .int(total)], "weight_map": .object(weightMap)]
        let path = directory + "/model.safetensors.index.json"
        guard FileManager.default.createFile(atPath: path, contents: Data((index.serialized(indent: "  ") + "\n").utf8)) else {
            throw FulgurError(.io, "\(path): cannot write")
        }
    }

    /// Moves past tensors already complete (and past empty ones, opening their shard so that
    /// its header is written).
    private func skipFilled() throws {
        while current < entries.count && writtenInCurrent == entries[current].byteCount {
            try openShardOfCurrent()
            current += 1
            writtenInCurrent = 0
        }
    }

    private func openShardOfCurrent() throws {
        let shard = shardOf[current]
        guard shard != openShard else { return }
        if fd >= 0 { close(fd) }
        let path = directory + "/" + files[shard]
        fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { throw FulgurError(.io, "\(path): cannot create (\(String(cString: strerror(errno))))") }
        openShard = shard
        var header = JSONObject()
        header["__metadata__"] = ["format": "pt"]
        var offset = 0
        for (i, e) in entries.enumerated() where shardOf[i] == shard {
            header[e.name] = ["dtype": .string(SafetensorsFile.name(e.dtype)!), "shape": .array(e.shape.map { .int($0) }),
                              "data_offsets": [.int(offset), .int(offset + e.byteCount)]]
            offset += e.byteCount
        }
        // Readers that map the file expect the data section to start 8-byte aligned; the
        // format allows trailing spaces in the header for that.
        var json = Array(JSONValue.object(header).serialized(separators: (",", ":")).utf8)
        json += Array(repeating: UInt8(ascii: " "), count: (8 - json.count % 8) % 8)
        var length = UInt64(json.count).littleEndian
        try withUnsafeBytes(of: &length) { try writeAll($0.baseAddress!, 8) }
        try json.withUnsafeBytes { try writeAll($0.baseAddress!, json.count) }
    }

    private func writeAll(_ p: UnsafeRawPointer, _ count: Int) throws {
        var done = 0
        while done < count {
            let n = write(fd, p + done, count - done)
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else {
                throw FulgurError(.io, "\(directory)/\(files[openShard]): write failed (\(String(cString: strerror(errno))))")
            }
            done += n
        }
    }
}

