import Foundation
import Fulgur

/// The kernels of Kernels/*.cu, compiled by scripts/build-kernels into one fatbin and loaded
/// from `$FULGUR_KERNELS` or `fulgur.fatbin` next to the executable. A fatbin built from other
/// sources than this binary's is refused: its kernels could take other arguments
/// (`FULGUR_KERNELS_UNCHECKED=1` loads it anyway, for same-run timings of kernel versions).
public final class KernelModule: @unchecked Sendable {
    public let device: CUDADevice
    public let path: String
    let handle: OpaquePointer?
    /// Kernels/random.cu's tables and stream on this GPU, made when a deferred random weight
    /// first needs them (`randomFiller()`).
    private var filler: RandomFiller?
    private let fillerLock = NSLock()

    /// `$FULGUR_KERNELS`, else `fulgur.fatbin` next to the executable, else the checkout's
    /// `Kernels/build/fulgur.fatbin` when the executable is a `swift build` product in it.
    public static func defaultPath() -> String {
        if let p = ProcessInfo.processInfo.environment["FULGUR_KERNELS"], !p.isEmpty { return p }
        let dir = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        let beside = dir.appendingPathComponent("fulgur.fatbin").path
        // .build/<triple>/release/fulgur -> the checkout is three levels up.
        let checkout = dir.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Kernels/build/fulgur.fatbin").path
        return FileManager.default.fileExists(atPath: beside) || !FileManager.default.fileExists(atPath: checkout) ? beside : checkout
    }

    public init(device: CUDADevice, path: String = KernelModule.defaultPath()) throws {
        guard let image = FileManager.default.contents(atPath: path) else {
            throw CUDAError(operation: "load kernels", code: nil,
                            message: "no kernel fatbin at \(path): build it with scripts/build-kernels and put it next to the executable or name it in FULGUR_KERNELS")
        }
        let d = device.driver
        var module: OpaquePointer?
        try image.withUnsafeBytes { try d.check(d.cuModuleLoadData(&module, $0.baseAddress!), "cuModuleLoadData(\(path))") }
        var global: CUdeviceptr = 0, size = 0
        try d.check(d.cuModuleGetGlobal(&global, &size, module, "fulgur_source_hash"), "find fulgur_source_hash in \(path)")
        var hash: UInt64 = 0
        try d.check(d.cuMemcpyDtoH(&hash, global, 8), "read fulgur_source_hash of \(path)")
        // FULGUR_KERNELS_UNCHECKED=1 loads a fatbin of other sources anyway, with a warning: for
        // timing an earlier version of a kernel against this one in the same run, when only the
        // kernels' insides changed (their names and arguments must be the same).
        let unchecked = ProcessInfo.processInfo.environment["FULGUR_KERNELS_UNCHECKED"] == "1"
        if hash != kernelSourceHash && unchecked {
            FileHandle.standardError.write(Data("warning: FULGUR_KERNELS_UNCHECKED=1: \(path) was built from other kernel sources (hash \(String(hash, radix: 16)), this binary expects \(String(kernelSourceHash, radix: 16))); loading it anyway\n".utf8))
        }
        guard hash == kernelSourceHash || unchecked else {
            throw CUDAError(operation: "load kernels", code: nil,
                            message: "\(path) was built from other kernel sources (hash \(String(hash, radix: 16)), this binary expects \(String(kernelSourceHash, radix: 16))): rebuild it with scripts/build-kernels from this checkout")
        }
        self.device = device
        self.path = path
        self.handle = module
    }

    /// The filler of deferred random weights on this module's GPU (one per module).
    func randomFiller() throws -> RandomFiller {
        fillerLock.lock()
        defer { fillerLock.unlock() }
        if let filler { return filler }
        let made = try RandomFiller(module: self)
        filler = made
        return made
    }

    /// Called with each kernel's name as it is launched (or captured into a graph) while set;
    /// the timeline uses it to name a captured step's kernels. One thread at a time.
    public var launchObserver: ((String) -> Void)?

    /// Names the buffer that a timeline build's kernels append their block records to (0: none;
    /// Kernels/common.cuh's TraceBuffer). A fatbin built without `--trace` has no such buffer.
    public func setTrace(_ address: UInt64) throws {
        let d = device.driver
        var global: CUdeviceptr = 0, size = 0
        guard d.cuModuleGetGlobal(&global, &size, handle, "fulgur_trace") == 0 else {
            throw FulgurError(.usage, "\(path) records no timeline: build it with scripts/build-kernels --trace and name Kernels/build/fulgur-trace.fatbin in FULGUR_KERNELS")
        }
        var a = address
        try d.check(d.cuMemcpyHtoD(global, &a, 8), "set fulgur_trace in \(path)")
    }

    /// `count` ints of the module's `__device__ const int name[count]` (a table the kernels
    /// export so that the host sizes their launches to whichever fatbin is loaded).
    public func int32Global(_ name: String, count: Int) throws -> [Int32] {
        let d = device.driver
        var global: CUdeviceptr = 0, size = 0
        try d.check(d.cuModuleGetGlobal(&global, &size, handle, name), "find \(name) in \(path)")
        guard size == 4 * count else {
            throw CUDAError(operation: "read \(name)", code: nil, message: "\(name) in \(path) is \(size) bytes; expected \(count) ints")
        }
        var values = [Int32](repeating: 0, count: count)
        try values.withUnsafeMutableBytes { try d.check(d.cuMemcpyDtoH($0.baseAddress!, global, size), "read \(name) of \(path)") }
        return values
    }

    /// A kernel of the module; look it up once, not per launch.
    public struct Function: @unchecked Sendable {
        public let name: String
        let handle: OpaquePointer
    }

    public func function(_ name: String) throws -> Function {
        var f: OpaquePointer?
        try device.driver.check(device.driver.cuModuleGetFunction(&f, handle, name), "cuModuleGetFunction(\(name)) in \(path)")
        return Function(name: name, handle: f!)
    }

    /// Lets `f` launch with up to `bytes` of dynamic shared memory; a launch asking for more
    /// than 48 KiB fails without this. The limit belongs to the function, not to the caller, so
    /// it only ever rises: two products of one kernel with different shared sizes (the wide
    /// layout's x is K-sized) must not lower it under each other (MiMo-V2-Flash's wide q/k/v
    /// launch failed with CUDA_ERROR_INVALID_VALUE after a smaller product set it).
    public func allowSharedMemory(_ f: Function, bytes: Int) throws {
        sharedLock.lock()
        defer { sharedLock.unlock() }
        guard bytes > (sharedAllowed[f.name] ?? 0) else { return }
        let maxDynamicSharedSizeBytes: Int32 = 8  // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        try device.driver.check(device.driver.cuFuncSetAttribute(f.handle, maxDynamicSharedSizeBytes, Int32(bytes)),
                                "cuFuncSetAttribute(\(f.name), max dynamic shared memory \(bytes))")
        sharedAllowed[f.name] = bytes
    }
    /// The dynamic shared memory each function has been allowed so far (allowSharedMemory).
    private var sharedAllowed: [String: Int] = [:]
    private let sharedLock = NSLock()

    /// Bytes of statically declared shared memory `f` uses (its dynamic shared memory comes on top).
    public func staticSharedBytes(_ f: Function) throws -> Int {
        let sharedSizeBytes: Int32 = 1  // CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES
        var bytes: Int32 = 0
        try device.driver.check(device.driver.cuFuncGetAttribute(&bytes, sharedSizeBytes, f.handle), "cuFuncGetAttribute(\(f.name), shared size)")
        return Int(bytes)
    }

    /// How many blocks of `f` (`threads` threads, `sharedBytes` of dynamic shared memory) one
    /// multiprocessor holds at once, by the driver's occupancy calculation.
    public func residentBlocksPerMultiprocessor(_ f: Function, threads: Int, sharedBytes: Int) throws -> Int {
        var blocks: Int32 = 0
        try device.driver.check(device.driver.cuOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, f.handle, Int32(threads), sharedBytes),
                                "cuOccupancyMaxActiveBlocksPerMultiprocessor(\(f.name), \(threads) threads, \(sharedBytes) bytes shared)")
        return Int(blocks)
    }

    /// A kernel argument as the kernel declares it.
    public enum Argument {
        case pointer(UInt64), int32(Int32), uint64(UInt64), float(Float), double(Double)
    }

    /// Kernels launched without programmatic overlap whatever their caller asks
    /// (`FULGUR_SERIAL_KERNELS=name,name`): for measuring what a kernel's early residency costs
    /// the one before it (Kernels/NOTES.md). Correct either way; slower in every case measured.
    static let serialKernels = Set((ProcessInfo.processInfo.environment["FULGUR_SERIAL_KERNELS"] ?? "").split(separator: ",").map(String.init))

    /// Enqueues `f` on `stream`. With `overlapPrevious` the kernel may start while the
    /// previous kernel in the stream is still running (programmatic dependent launch, sm_90):
    /// only for kernels that execute `griddepcontrol.wait` before they touch memory that
    /// kernel writes, or that they read.
    public func launch(_ f: Function, grid: (Int, Int, Int), block: (Int, Int, Int), sharedBytes: Int = 0,
                       stream: CUDAStream, overlapPrevious: Bool = false, _ arguments: [Argument]) throws {
        // Each argument in its own 8-byte slot; the driver reads as many bytes as the
        // kernel's parameter has.
        var slots = [UInt64](repeating: 0, count: arguments.count)
        for (i, a) in arguments.enumerated() {
            switch a {
            case .pointer(let p): slots[i] = p
            case .int32(let v): slots[i] = UInt64(UInt32(bitPattern: v))
            case .uint64(let v): slots[i] = v
            case .float(let v): slots[i] = UInt64(v.bitPattern)
            case .double(let v): slots[i] = v.bitPattern
            }
        }
        launchObserver?(f.name)
        let d = device.driver
        // Built only on failure: formatting it per launch cost the host microseconds.
        func what() -> String { "launch \(f.name), grid \(grid), block \(block), \(sharedBytes) bytes shared" }
        try slots.withUnsafeMutableBufferPointer { s in
            var params = (0..<s.count).map { UnsafeMutableRawPointer(s.baseAddress! + $0) as UnsafeMutableRawPointer? }
            try params.withUnsafeMutableBufferPointer { p in
                guard overlapPrevious && (Self.serialKernels.isEmpty || !Self.serialKernels.contains(f.name)) else {
                    try d.check(d.cuLaunchKernel(f.handle, UInt32(grid.0), UInt32(grid.1), UInt32(grid.2),
                                                 UInt32(block.0), UInt32(block.1), UInt32(block.2), UInt32(sharedBytes),
                                                 stream.handle, p.baseAddress, nil), "cuLaunchKernel: \(what())")
                    return
                }
                // CUlaunchAttribute (cuda.h): a 4-byte id, 4 bytes of padding, a 64-byte value;
                // id 6 is CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value an int.
                var attribute = [UInt8](repeating: 0, count: 72)
                attribute.withUnsafeMutableBytes {
                    $0.storeBytes(of: Int32(6), toByteOffset: 0, as: Int32.self)
                    $0.storeBytes(of: Int32(1), toByteOffset: 8, as: Int32.self)
                }
                try attribute.withUnsafeMutableBytes { attr in
                    // CUlaunchConfig: seven unsigned ints, the stream at offset 32, the
                    // attribute pointer at 40, their count at 48; 56 bytes.
                    var config = [UInt8](repeating: 0, count: 56)
                    config.withUnsafeMutableBytes { c in
                        for (i, v) in [grid.0, grid.1, grid.2, block.0, block.1, block.2, sharedBytes].enumerated() {
                            c.storeBytes(of: UInt32(v), toByteOffset: 4 * i, as: UInt32.self)
                        }
                        c.storeBytes(of: UInt(bitPattern: stream.handle), toByteOffset: 32, as: UInt.self)
                        c.storeBytes(of: UInt(bitPattern: attr.baseAddress), toByteOffset: 40, as: UInt.self)
                        c.storeBytes(of: UInt32(1), toByteOffset: 48, as: UInt32.self)
                    }
                    try config.withUnsafeBytes { c in
                        try d.check(d.cuLaunchKernelEx(c.baseAddress!, f.handle, p.baseAddress, nil), "cuLaunchKernelEx: \(what()), overlapping the previous kernel")
                    }
                }
            }
        }
    }
}
