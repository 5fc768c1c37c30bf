import Foundation
import Testing
@testable import Fulgur

// Builders of small, deliberately broken inputs and checks on the errors they cause.

/// A fresh directory under the system's temporary directory.
func temporaryDirectory() throws -> String {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("fulgur-test-\(UUID())")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    return dir.path
}

/// Writes `bytes` to a file called `name` in a fresh temporary directory.
func temporaryFile(_ name: String, _ bytes: [UInt8]) throws -> String {
    let path = try temporaryDirectory() + "/" + name
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    return path
}

/// Expects `body` to throw a `FulgurError` whose message contains every fragment.
func expectError(_ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected an error mentioning \(fragments)", sourceLocation: sourceLocation)
    } catch let error as FulgurError {
        for fragment in fragments {
            #expect(error.message.contains(fragment), "\(error.message)", sourceLocation: sourceLocation)
        }
    } catch {
        Issue.record("expected a FulgurError, got \(type(of: error)): \(error)", sourceLocation: sourceLocation)
    }
}

// MARK: GGUF

enum GGUFTestValue {
    case string(String), strings([String]), uint32(UInt32), float32(Float)
}

struct GGUFTestTensor {
    var name: String
    /// ggml type id (0 F32, 1 F16, 8 Q8_0, ...).
    var type: UInt32
    /// Innermost dimension first, as GGUF stores them.
    var dims: [UInt64]
    var data: [UInt8]

    /// An f32 tensor of `dims` (innermost first) filled with `value`.
    static func f32(_ name: String, _ dims: [UInt64], value: Float = 0.01) -> GGUFTestTensor {
        let count = Int(dims.reduce(1, *))
        var data: [UInt8] = []
        data.reserveCapacity(4 * count)
        for _ in 0..<count { withUnsafeBytes(of: value.bitPattern.littleEndian) { data += $0 } }
        return GGUFTestTensor(name: name, type: 0, dims: dims, data: data)
    }
}

/// A GGUF file: header, metadata, tensor infos, then each tensor's data at a 32-byte aligned
/// offset. The last tensor's data ends the file, so any cut truncates something.
func gguf(_ metadata: [(String, GGUFTestValue)], tensors: [GGUFTestTensor] = [], version: UInt32 = 3) -> [UInt8] {
    let alignment = 32
    var out: [UInt8] = []
    func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
    func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { out += $0 } }
    func string(_ s: String) { u64(UInt64(s.utf8.count)); out += s.utf8 }
    func pad() { while out.count % alignment != 0 { out.append(0) } }
    u32(0x4655_4747)
    u32(version)
    u64(UInt64(tensors.count))
    u64(UInt64(metadata.count))
    for (key, value) in metadata {
        string(key)
        switch value {
        case .string(let s): u32(8); string(s)
        case .strings(let list): u32(9); u32(8); u64(UInt64(list.count)); list.forEach(string)
        case .uint32(let v): u32(4); u32(v)
        case .float32(let v): u32(6); u32(v.bitPattern)
        }
    }
    var offset = 0
    for t in tensors {
        string(t.name)
        u32(UInt32(t.dims.count))
        t.dims.forEach(u64)
        u32(t.type)
        u64(UInt64(offset))
        offset = (offset + t.data.count + alignment - 1) / alignment * alignment
    }
    pad()
    for (i, t) in tensors.enumerated() {
        out += t.data
        if i < tensors.count - 1 { pad() }
    }
    return out
}

/// A one-layer llama GGUF (hidden 32, 2 heads, feed-forward 64, vocabulary 8) that loads;
/// tests break one thing in it at a time.
enum TinyLlamaGGUF {
    static let metadata: [(String, GGUFTestValue)] = [
        ("general.architecture", .string("llama")),
        ("llama.embedding_length", .uint32(32)), ("llama.attention.head_count", .uint32(2)),
        ("llama.feed_forward_length", .uint32(64)), ("llama.block_count", .uint32(1)),
        ("llama.context_length", .uint32(64)),
    ]

    static var tensors: [GGUFTestTensor] {
        [
            .f32("token_embd.weight", [32, 8]), .f32("output_norm.weight", [32], value: 1),
            .f32("blk.0.attn_norm.weight", [32], value: 1), .f32("blk.0.ffn_norm.weight", [32], value: 1),
            .f32("blk.0.attn_q.weight", [32, 32]), .f32("blk.0.attn_k.weight", [32, 32]),
            .f32("blk.0.attn_v.weight", [32, 32]), .f32("blk.0.attn_output.weight", [32, 32]),
            .f32("blk.0.ffn_gate.weight", [32, 64]), .f32("blk.0.ffn_up.weight", [32, 64]),
            .f32("blk.0.ffn_down.weight", [64, 32]),
        ]
    }
}

// MARK: safetensors

struct SafetensorsTestTensor {
    var name: String
    var dtype: String
    var shape: [Int]
    var data: [UInt8]
}

/// A safetensors file: 8-byte header length, JSON header, tensor bytes in order.
func safetensors(_ tensors: [SafetensorsTestTensor]) -> [UInt8] {
    var entries: [String] = []
    var offset = 0
    for t in tensors {
        entries.append("\"\(t.name)\": {\"dtype\": \"\(t.dtype)\", \"shape\": \(t.shape), \"data_offsets\": [\(offset), \(offset + t.data.count)]}")
        offset += t.data.count
    }
    let header = Array(("{" + entries.joined(separator: ", ") + "}").utf8)
    var out: [UInt8] = []
    withUnsafeBytes(of: UInt64(header.count).littleEndian) { out += $0 }
    out += header
    for t in tensors { out += t.data }
    return out
}

/// Every tensor of a safetensors file, as the writer above takes them.
func safetensorsTensors(_ path: String) throws -> [SafetensorsTestTensor] {
    let file = try SafetensorsFile(path: path)
    let names: [DType: String] = [.f32: "F32", .f16: "F16", .bf16: "BF16", .i8: "I8", .u8: "U8", .i32: "I32", .i64: "I64",
                                  .fp8e4m3: "F8_E4M3", .e8m0: "F8_E8M0"]
    return try file.tensorNames.map { name in
        let t = try file.tensor(name)
        return SafetensorsTestTensor(name: name, dtype: names[t.dtype]!, shape: t.shape,
                                     data: Array(UnsafeRawBufferPointer(start: t.data, count: t.byteCount)))
    }
}

/// A copy of a committed tiny checkpoint (models/<name>) in a fresh temporary directory.
func copyOfFixtureModel(_ name: String) throws -> String {
    let dir = try temporaryDirectory() + "/" + name
    try FileManager.default.copyItem(atPath: Fixtures.path("models/\(name)"), toPath: dir)
    return dir
}
