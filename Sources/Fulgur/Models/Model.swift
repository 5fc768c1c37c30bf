import Foundation

/// A checkpoint opened for inference: its spec, its tensors (memory-mapped) and the plan
/// that runs it. Accepts a `.gguf` file or a Hugging Face checkpoint directory.
public final class Model {
    public let path: String
    public let spec: ModelSpec
    public let tensors: TensorSource
    public let plan: Plan
    /// GGUF metadata when loaded from GGUF (tokenizer and chat template live there).
    public let gguf: GGUFFile?

    public init(path: String, progress: ((Int, Int) -> Void)? = nil) throws {
        self.path = path
        var isDir: ObjCBool = false
        guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
            throw FulgurError(.io, "\(path): no such file or directory")
        }
        if isDir.boolValue {
            spec = try Architectures.spec(directory: path)
            tensors = try SafetensorsCheckpoint(directory: path)
            gguf = nil
        } else {
            let g = try GGUFFile(path: path)
            guard let arch = g.metadata["general.architecture"]?.string else {
                throw FulgurError(.config, "\(path): metadata 'general.architecture' is missing")
            }
            guard arch == "llama" else {
                throw FulgurError(.unsupported, "\(path): GGUF architecture '\(arch)' is not supported (supported: llama; other architectures load from Hugging Face safetensors directories)")
            }
            spec = try Llama.spec(gguf: g)
            tensors = g
            gguf = g
        }
        plan = try PlanBuilder.build(spec: spec, tensors: tensors, progress: progress)
    }

    /// A model whose tensors are already at hand (a `RandomModel` built in memory);
    /// `path` is the source's description.
    public init(spec: ModelSpec, tensors: TensorSource, progress: ((Int, Int) -> Void)? = nil) throws {
        path = tensors.sourceDescription
        self.spec = spec
        self.tensors = tensors
        gguf = nil
        plan = try PlanBuilder.build(spec: spec, tensors: tensors, progress: progress)
    }

    private var prefaultChecksum: UInt8 = 0

    /// Reads one byte of every page of every tensor, so the whole checkpoint is resident
    /// before the first token (the first decode steps then pay no page faults). Returns the
    /// bytes touched.
    @discardableResult
    public func prefault() -> Int {
        var total = 0
        var sink: UInt8 = 0
        for name in tensors.tensorNames {
            guard let t = tensors.tensorIfPresent(name) else { continue }
            for offset in stride(from: 0, to: t.byteCount, by: 4096) { sink &+= t.data.load(fromByteOffset: offset, as: UInt8.self) }
            total += t.byteCount
        }
        prefaultChecksum = sink  // an observable result, so the reads are not optimized away
        return total
    }

    /// Parameters counted from the tensors the plan uses.
    public var parameterCount: Int {
        tensors.tensorNames.reduce(0) { $0 + (tensors.tensorIfPresent($1)?.elementCount ?? 0) }
    }

    /// Bytes of all tensors as stored.
    public var weightBytes: Int {
        tensors.tensorNames.reduce(0) { $0 + (tensors.tensorIfPresent($1)?.byteCount ?? 0) }
    }
}
