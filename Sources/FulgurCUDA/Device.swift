import Foundation

/// One GPU and its primary context, made current on the thread that opens it (call
/// `makeCurrent` before using the device from another thread).
public final class CUDADevice: @unchecked Sendable {
    public let ordinal: Int32
    public let name: String
    public let multiprocessors: Int
    /// The most shared memory one block may use (static plus dynamic, after opting in).
    public let maxSharedMemoryPerBlock: Int
    /// Shared memory of one multiprocessor, and what the driver reserves of it for each
    /// resident block (1 KB on sm_80 and later): how many blocks of a size fit at once.
    public let sharedMemoryPerMultiprocessor: Int, reservedSharedMemoryPerBlock: Int
    public let totalMemory: Int
    public let pool: DevicePool
    let driver: Driver
    let context: OpaquePointer?

    public init(ordinal: Int32 = 0) throws {
        let d = try Driver.get()
        var count: Int32 = 0
        try d.check(d.cuDeviceGetCount(&count), "cuDeviceGetCount")
        guard ordinal < count else {
            throw CUDAError(operation: "open GPU \(ordinal)", code: nil,
                            message: "GPU \(ordinal) does not exist: the driver sees \(count) GPU\(count == 1 ? "" : "s")")
        }
        var device: Int32 = 0, sms: Int32 = 0, shared: Int32 = 0, memory = 0
        try d.check(d.cuDeviceGet(&device, ordinal), "cuDeviceGet(\(ordinal))")
        var nameBytes = [CChar](repeating: 0, count: 256)
        try d.check(d.cuDeviceGetName(&nameBytes, 256, device), "cuDeviceGetName")
        let multiprocessorCount: Int32 = 16  // CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        try d.check(d.cuDeviceGetAttribute(&sms, multiprocessorCount, device), "cuDeviceGetAttribute(multiprocessor count)")
        let sharedOptIn: Int32 = 97  // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        try d.check(d.cuDeviceGetAttribute(&shared, sharedOptIn, device), "cuDeviceGetAttribute(max shared memory per block, opt-in)")
        var perSM: Int32 = 0, reserved: Int32 = 0
        let sharedPerSM: Int32 = 81  // CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        try d.check(d.cuDeviceGetAttribute(&perSM, sharedPerSM, device), "cuDeviceGetAttribute(max shared memory per multiprocessor)")
        let reservedPerBlock: Int32 = 111  // CU_DEVICE_ATTRIBUTE_RESERVED_SHARED_MEMORY_PER_BLOCK
        try d.check(d.cuDeviceGetAttribute(&reserved, reservedPerBlock, device), "cuDeviceGetAttribute(reserved shared memory per block)")
        try d.check(d.cuDeviceTotalMem(&memory, device), "cuDeviceTotalMem")
        var ctx: OpaquePointer?
        try d.check(d.cuDevicePrimaryCtxRetain(&ctx, device), "cuDevicePrimaryCtxRetain")
        try d.check(d.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        self.ordinal = ordinal
        self.name = String(decoding: nameBytes.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        self.multiprocessors = Int(sms)
        self.maxSharedMemoryPerBlock = Int(shared)
        self.sharedMemoryPerMultiprocessor = Int(perSM)
        self.reservedSharedMemoryPerBlock = Int(reserved)
        self.totalMemory = memory
        self.driver = d
        self.context = ctx
        self.pool = DevicePool(driver: d)
    }

    public func makeCurrent() throws {
        try driver.check(driver.cuCtxSetCurrent(context), "cuCtxSetCurrent")
    }

    public func synchronize() throws {
        try driver.check(driver.cuCtxSynchronize(), "cuCtxSynchronize")
    }

    public func makeStream() throws -> CUDAStream { try CUDAStream(driver) }
    public func makeEvent() throws -> CUDAEvent { try CUDAEvent(driver) }
    /// An event for ordering only (no timestamps): forks and joins of streams.
    public func makeMarker() throws -> CUDAEvent { try CUDAEvent(driver, timing: false) }

    /// A buffer of at least `bytes` from the pool; returned to it when released.
    public func allocate(_ bytes: Int) throws -> DeviceBuffer { try pool.allocate(bytes) }

    /// A device copy of `bytes`.
    public func upload(_ bytes: UnsafeRawBufferPointer) throws -> DeviceBuffer {
        let b = try allocate(bytes.count)
        try b.upload(bytes)
        return b
    }
}

/// Device memory recycled by size: cuMemAlloc and cuMemFree synchronize the device, so a
/// decode loop must not call them per step. Sizes round up (to 512 bytes, and to 2 MiB from
/// 2 MiB on) so that buffers of nearly equal sizes share a free list.
public final class DevicePool: @unchecked Sendable {
    let driver: Driver
    private let lock = NSLock()
    private var free: [Int: [CUdeviceptr]] = [:]
    public private(set) var bytesInUse = 0
    public private(set) var bytesCached = 0

    init(driver: Driver) { self.driver = driver }

    static func capacity(for bytes: Int) -> Int {
        let granule = bytes >= 2 << 20 ? 2 << 20 : 512
        return max(granule, (bytes + granule - 1) / granule * granule)
    }

    func allocate(_ bytes: Int) throws -> DeviceBuffer {
        let capacity = Self.capacity(for: bytes)
        lock.lock()
        if let p = free[capacity]?.popLast() {
            bytesCached -= capacity
            bytesInUse += capacity
            lock.unlock()
            return DeviceBuffer(address: p, byteCount: bytes, capacity: capacity, pool: self)
        }
        lock.unlock()
        var p: CUdeviceptr = 0
        var result = driver.cuMemAlloc(&p, capacity)
        if result == 2 {  // CUDA_ERROR_OUT_OF_MEMORY: give the cached buffers back and retry once
            try trim()
            result = driver.cuMemAlloc(&p, capacity)
        }
        try driver.check(result, "cuMemAlloc(\(capacity) bytes; \(bytesInUse) in use)")
        lock.lock(); bytesInUse += capacity; lock.unlock()
        return DeviceBuffer(address: p, byteCount: bytes, capacity: capacity, pool: self)
    }

    func recycle(_ p: CUdeviceptr, capacity: Int) {
        lock.lock(); defer { lock.unlock() }
        free[capacity, default: []].append(p)
        bytesInUse -= capacity
        bytesCached += capacity
    }

    /// Frees every cached buffer.
    public func trim() throws {
        lock.lock()
        let all = free.values.flatMap { $0 }
        free = [:]
        bytesCached = 0
        lock.unlock()
        for p in all { try driver.check(driver.cuMemFree(p), "cuMemFree") }
    }
}

/// Device memory; goes back to its pool when the last reference goes.
public final class DeviceBuffer: @unchecked Sendable {
    public let address: UInt64
    public let byteCount: Int
    let capacity: Int
    let pool: DevicePool

    init(address: CUdeviceptr, byteCount: Int, capacity: Int, pool: DevicePool) {
        self.address = address
        self.byteCount = byteCount
        self.capacity = capacity
        self.pool = pool
    }

    deinit { pool.recycle(address, capacity: capacity) }

    /// Copies `bytes` to offset `offset`, synchronously.
    public func upload(_ bytes: UnsafeRawBufferPointer, offset: Int = 0) throws {
        precondition(offset + bytes.count <= byteCount, "upload past the end of a device buffer")
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        try pool.driver.check(pool.driver.cuMemcpyHtoD(address + UInt64(offset), base, bytes.count), "cuMemcpyHtoD(\(bytes.count) bytes)")
    }

    /// Copies the first `bytes.count` bytes back, synchronously (after all prior work on the
    /// legacy default stream).
    public func download(into bytes: UnsafeMutableRawBufferPointer) throws {
        precondition(bytes.count <= byteCount, "download past the end of a device buffer")
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        try pool.driver.check(pool.driver.cuMemcpyDtoH(base, address, bytes.count), "cuMemcpyDtoH(\(bytes.count) bytes)")
    }

    /// The whole buffer copied back, synchronously (as `download`).
    public func bytes() throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: byteCount)
        try b.withUnsafeMutableBytes { try download(into: $0) }
        return b
    }

    public func fill(byte: UInt8, stream: CUDAStream) throws {
        try pool.driver.check(pool.driver.cuMemsetD8Async(address, byte, byteCount, stream.handle), "cuMemsetD8Async(\(byteCount) bytes)")
    }

    /// Copies `bytes` bytes from `source` on `stream`.
    public func copy(from source: DeviceBuffer, bytes: Int, stream: CUDAStream) throws {
        precondition(bytes <= byteCount && bytes <= source.byteCount, "device copy past the end of a buffer")
        try pool.driver.check(pool.driver.cuMemcpyDtoDAsync(address, source.address, bytes, stream.handle), "cuMemcpyDtoDAsync(\(bytes) bytes)")
    }
}

public final class CUDAStream: @unchecked Sendable {
    let driver: Driver
    let handle: OpaquePointer?

    init(_ driver: Driver) throws {
        var s: OpaquePointer?
        // CU_STREAM_NON_BLOCKING: no implicit ordering with the legacy default stream.
        try driver.check(driver.cuStreamCreate(&s, 1), "cuStreamCreate")
        self.driver = driver
        self.handle = s
    }

    deinit { _ = driver.cuStreamDestroy(handle) }

    public func synchronize() throws {
        try driver.check(driver.cuStreamSynchronize(handle), "cuStreamSynchronize")
    }

    /// Work enqueued after this waits for `event`'s last record (in a capture: a graph edge).
    public func wait(for event: CUDAEvent) throws {
        try driver.check(driver.cuStreamWaitEvent(handle, event.handle, 0), "cuStreamWaitEvent")
    }
}

public final class CUDAEvent: @unchecked Sendable {
    let driver: Driver
    let handle: OpaquePointer?

    init(_ driver: Driver, timing: Bool = true) throws {
        var e: OpaquePointer?
        // CU_EVENT_DISABLE_TIMING = 2
        try driver.check(driver.cuEventCreate(&e, timing ? 0 : 2), "cuEventCreate")
        self.driver = driver
        self.handle = e
    }

    deinit { _ = driver.cuEventDestroy(handle) }

    public func record(_ stream: CUDAStream) throws {
        try driver.check(driver.cuEventRecord(handle, stream.handle), "cuEventRecord")
    }

    /// Milliseconds from `start` to this event, waiting for this event to complete.
    public func milliseconds(since start: CUDAEvent) throws -> Double {
        try driver.check(driver.cuEventSynchronize(handle), "cuEventSynchronize")
        var ms: Float = 0
        try driver.check(driver.cuEventElapsedTime(&ms, start.handle, handle), "cuEventElapsedTime")
        return Double(ms)
    }
}

/// A captured sequence of launches, replayed with one call: the GPU runs the whole decode
/// step without the host issuing each kernel.
public final class CUDAGraph: @unchecked Sendable {
    let driver: Driver
    let graph: OpaquePointer?
    let exec: OpaquePointer?

    /// Captures what `body` enqueues on `stream` (nothing runs while capturing).
    public init(capturing stream: CUDAStream, _ body: () throws -> Void) throws {
        let d = stream.driver
        // CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: other threads' CUDA calls are not disturbed.
        try d.check(d.cuStreamBeginCapture(stream.handle, 1), "cuStreamBeginCapture")
        var g: OpaquePointer?
        do {
            try body()
        } catch {
            _ = d.cuStreamEndCapture(stream.handle, &g)
            if g != nil { _ = d.cuGraphDestroy(g) }
            throw error
        }
        try d.check(d.cuStreamEndCapture(stream.handle, &g), "cuStreamEndCapture")
        var e: OpaquePointer?
        let result = d.cuGraphInstantiateWithFlags(&e, g, 0)
        if result != 0 { _ = d.cuGraphDestroy(g) }
        try d.check(result, "cuGraphInstantiateWithFlags")
        driver = d
        graph = g
        exec = e
    }

    /// Takes ownership of a graph captured elsewhere (DeviceGroup.capture: several streams at once).
    init(driver: Driver, graph: OpaquePointer?, exec: OpaquePointer?) {
        self.driver = driver
        self.graph = graph
        self.exec = exec
    }

    deinit {
        _ = driver.cuGraphExecDestroy(exec)
        _ = driver.cuGraphDestroy(graph)
    }

    public func launch(_ stream: CUDAStream) throws {
        try driver.check(driver.cuGraphLaunch(exec, stream.handle), "cuGraphLaunch")
    }
}

extension DeviceBuffer {
    /// Copies `bytes` to offset `offset` on `stream`; the host memory must stay valid until
    /// the copy has run (the driver stages pageable memory before returning for small copies,
    /// but the caller should not rely on that).
    public func upload(_ bytes: UnsafeRawBufferPointer, offset: Int = 0, stream: CUDAStream) throws {
        precondition(offset + bytes.count <= byteCount, "upload past the end of a device buffer")
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        try pool.driver.check(pool.driver.cuMemcpyHtoDAsync(address + UInt64(offset), base, bytes.count, stream.handle), "cuMemcpyHtoDAsync(\(bytes.count) bytes)")
    }

    /// Copies `bytes.count` bytes from offset `offset` back on `stream`; valid once the stream is synchronized.
    public func download(into bytes: UnsafeMutableRawBufferPointer, offset: Int = 0, stream: CUDAStream) throws {
        precondition(offset + bytes.count <= byteCount, "download past the end of a device buffer")
        guard let base = bytes.baseAddress, bytes.count > 0 else { return }
        try pool.driver.check(pool.driver.cuMemcpyDtoHAsync(base, address + UInt64(offset), bytes.count, stream.handle), "cuMemcpyDtoHAsync(\(bytes.count) bytes)")
    }
}
