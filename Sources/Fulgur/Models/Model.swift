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

    /// Parameters counted from the tensors the plan uses.
    public var parameterCount: Int {
        tensors.tensorNames.reduce(0) { $0 + (tensors.tensorIfPresent($1)?.elementCount ?? 0) }
    }

    /// Bytes of all tensors as stored.
    public var weightBytes: Int {
        tensors.tensorNames.reduce(0) { $0 + (tensors.tensorIfPresent($1)?.byteCount ?? 0) }
    }
}
