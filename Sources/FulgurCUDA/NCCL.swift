import Foundation

/// A failed NCCL call, or no usable libnccl: the operation, NCCL's error string and, where
/// NCCL has one, its last detailed message.
public struct NCCLError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// libnccl.so.2, opened at run time (Fulgur links no CUDA library): the GPU machines carry it
/// in their Python environment's nvidia-nccl wheel, not on the library path.
final class NCCLLibrary: @unchecked Sendable {
    let path: String
    /// NCCL's version code: 22703 for 2.27.3 (major * 10000 + minor * 100 + patch).
    let version: Int32

    let ncclGetVersion: @convention(c) (UnsafeMutablePointer<Int32>) -> Int32
    let ncclGetErrorString: @convention(c) (Int32) -> UnsafePointer<CChar>?
    /// NCCL 2.13 and later.
    let ncclGetLastError: (@convention(c) (OpaquePointer?) -> UnsafePointer<CChar>?)?
    let ncclCommInitAll: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, Int32, UnsafePointer<Int32>) -> Int32
    let ncclCommDestroy: @convention(c) (OpaquePointer?) -> Int32
    let ncclGroupStart: @convention(c) () -> Int32
    let ncclGroupEnd: @convention(c) () -> Int32
    let ncclAllReduce: @convention(c) (UnsafeRawPointer?, UnsafeMutableRawPointer?, Int, Int32, Int32, OpaquePointer?, OpaquePointer?) -> Int32

    static let shared: Result<NCCLLibrary, NCCLError> = Result { try NCCLLibrary() }.mapError { $0 as! NCCLError }

    /// Where libnccl.so.2 is looked for, in order: `$FULGUR_NCCL` (the file, or a folder
    /// holding it), the dynamic linker's search (LD_LIBRARY_PATH, ld.so.cache), then the
    /// nvidia-nccl wheel (`nvidia/nccl/lib`) in the usual Python environments.
    static func candidates() -> (named: [String], patterns: [String]) {
        let env = ProcessInfo.processInfo.environment
        var named: [String] = []
        if let p = env["FULGUR_NCCL"], !p.isEmpty {
            var isFolder: ObjCBool = false
            named.append(FileManager.default.fileExists(atPath: p, isDirectory: &isFolder) && isFolder.boolValue ? p + "/libnccl.so.2" : p)
        }
        named.append("libnccl.so.2")
        var prefixes = ["/usr/local/lib/python3*/dist-packages", "/usr/local/lib/python3*/site-packages",
                        "/usr/lib/python3*/dist-packages", "/usr/lib/python3*/site-packages",
                        "/opt/conda/lib/python3*/site-packages", "/opt/*/lib/python3*/site-packages",
                        "/opt/*/*/lib/python3*/site-packages"]
        for variable in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
            if let p = env[variable], !p.isEmpty { prefixes.insert(p + "/lib/python3*/site-packages", at: 0) }
        }
        if let home = env["HOME"], !home.isEmpty { prefixes.append(home + "/.local/lib/python3*/site-packages") }
        return (named, prefixes.map { $0 + "/nvidia/nccl/lib/libnccl.so.2" } + ["/opt/conda/lib/libnccl.so.2"])
    }

    private init() throws {
        // Before NCCL reads its environment (at the first communicator): no NVLink SHARP. It
        // needs multicast objects, which can put a shared host's GPUs out of service.
        setenv("NCCL_NVLS_ENABLE", "0", 0)
        let (named, patterns) = Self.candidates()
        var tried: [String] = []
        var handle: UnsafeMutableRawPointer?
        var path = ""
        for candidate in named + patterns.flatMap(Self.glob) {
            if let h = dlopen(candidate, RTLD_NOW | RTLD_LOCAL) {
                handle = h
                path = candidate
                break
            }
            tried.append("\(candidate): \(dlerror().map { String(cString: $0) } ?? "not loadable")")
        }
        guard let handle else {
            throw NCCLError(message: "NCCL is not available: no loadable libnccl.so.2. Tried \(tried.joined(separator: "; ")); and found nothing matching \(patterns.joined(separator: ", ")). Set FULGUR_NCCL to the library (pip's nvidia-nccl-cu13 puts it in site-packages/nvidia/nccl/lib).")
        }
        func symbol<F>(_ name: String) throws -> F {
            guard let p = dlsym(handle, name) else {
                throw NCCLError(message: "\(path) has no \(name): not an NCCL 2 library")
            }
            return unsafeBitCast(p, to: F.self)
        }
        self.path = path
        ncclGetVersion = try symbol("ncclGetVersion")
        ncclGetErrorString = try symbol("ncclGetErrorString")
        ncclGetLastError = dlsym(handle, "ncclGetLastError").map { unsafeBitCast($0, to: (@convention(c) (OpaquePointer?) -> UnsafePointer<CChar>?).self) }
        ncclCommInitAll = try symbol("ncclCommInitAll")
        ncclCommDestroy = try symbol("ncclCommDestroy")
        ncclGroupStart = try symbol("ncclGroupStart")
        ncclGroupEnd = try symbol("ncclGroupEnd")
        ncclAllReduce = try symbol("ncclAllReduce")
        var v: Int32 = 0
        let result = ncclGetVersion(&v)
        guard result == 0 else {
            throw NCCLError(message: "ncclGetVersion failed in \(path): \(ncclGetErrorString(result).map { String(cString: $0) } ?? "NCCL error \(result)")")
        }
        version = v
    }

    static func glob(_ pattern: String) -> [String] {
        var g = glob_t()
        defer { globfree(&g) }
        guard Glibc.glob(pattern, 0, nil, &g) == 0 else { return [] }
        return (0..<Int(g.gl_pathc)).compactMap { g.gl_pathv[$0].map { String(cString: $0) } }
    }

    /// Throws unless `result` is ncclSuccess, naming the operation, NCCL's error string and
    /// its last message (which says what NCCL was doing).
    func check(_ result: Int32, _ operation: @autoclosure () -> String, comm: OpaquePointer? = nil) throws {
        guard result != 0 else { return }
        let name = ncclGetErrorString(result).map { String(cString: $0) } ?? "unknown ncclResult_t"
        let last = ncclGetLastError?(comm).map { String(cString: $0) } ?? ""
        throw NCCLError(message: "NCCL error in \(operation()): \(name) (\(result))" + (last.isEmpty ? "" : ": \(last)"))
    }
}

/// NCCL communicators over the GPUs of a DeviceGroup, one process driving all of them
/// (ncclCommInitAll). Collectives go through `allReduceSum`, one grouped call for every rank,
/// and can be captured in graphs (DeviceGroup.capture).
public final class NCCL: @unchecked Sendable {
    public let group: DeviceGroup
    let library: NCCLLibrary
    let comms: [OpaquePointer?]

    /// The loaded library's path and version ("2.27.3"), or why NCCL cannot be used.
    public static func describe() throws -> (path: String, version: String) {
        let l = try NCCLLibrary.shared.get()
        let v = Int(l.version)
        // Codes below 2.9 were major * 1000 + minor * 100 + patch.
        let (major, minor, patch) = v >= 10000 ? (v / 10000, v / 100 % 100, v % 100) : (v / 1000, v / 100 % 10, v % 100)
        return (l.path, "\(major).\(minor).\(patch)")
    }

    public init(group: DeviceGroup) throws {
        let l = try NCCLLibrary.shared.get()
        var comms = [OpaquePointer?](repeating: nil, count: group.count)
        let ordinals = group.devices.map(\.ordinal)
        try l.check(l.ncclCommInitAll(&comms, Int32(group.count), ordinals), "ncclCommInitAll(GPUs \(ordinals))")
        self.group = group
        self.library = l
        self.comms = comms
    }

    deinit {
        for c in comms { _ = library.ncclCommDestroy(c) }
    }

    /// outputs[r][0, count) = the sum over ranks of inputs[r][0, count), f32, on streams[r]
    /// (rank r's); in place where an input is its output. Enqueues only.
    public func allReduceSum(inputs: [DeviceBuffer], outputs: [DeviceBuffer], count: Int, streams: [CUDAStream]) throws {
        let n = group.count
        precondition(inputs.count == n && outputs.count == n && streams.count == n, "one input, output and stream per rank")
        precondition(inputs.allSatisfy { $0.byteCount >= 4 * count } && outputs.allSatisfy { $0.byteCount >= 4 * count },
                     "all-reduce of \(count) floats past the end of a buffer")
        let l = library
        try l.check(l.ncclGroupStart(), "ncclGroupStart")
        var failure: Error?
        for r in 0..<n {
            // ncclFloat32 = 7, ncclSum = 0
            let result = l.ncclAllReduce(UnsafeRawPointer(bitPattern: UInt(inputs[r].address)),
                                         UnsafeMutableRawPointer(bitPattern: UInt(outputs[r].address)),
                                         count, 7, 0, comms[r], streams[r].handle)
            do {
                try l.check(result, "ncclAllReduce(\(count) floats, rank \(r) of \(n))", comm: comms[r])
            } catch {
                failure = error
                break
            }
        }
        // The group is closed even after a failed call, so NCCL is not left inside it.
        let end = l.ncclGroupEnd()
        if let failure { throw failure }
        try l.check(end, "ncclGroupEnd after \(n) all-reduces of \(count) floats")
    }
}
