import Foundation

/// The GPUs of one host that one model is split over, in one process: each with its primary
/// context and its own load of the kernels. A context is current per thread, so every call
/// that touches rank r's memory, streams or kernels runs after `makeCurrent(r)` (the methods
/// here and PeerAllReduce do that themselves).
public final class DeviceGroup: @unchecked Sendable {
    public let devices: [CUDADevice]
    public let modules: [KernelModule]
    /// The driver's CUdevice of each rank (for peer queries).
    let handles: [Int32]

    public var count: Int { devices.count }

    /// GPUs `ordinals` (default: every GPU the driver sees, in its order), kernels from `kernels`.
    public init(ordinals: [Int32]? = nil, kernels: String = KernelModule.defaultPath()) throws {
        let wanted = try ordinals ?? (0..<Int32(CUDADevice.visibleCount())).map { $0 }
        guard !wanted.isEmpty else {
            throw CUDAError(operation: "open a device group", code: nil, message: "a device group needs at least one GPU; the driver sees none")
        }
        var devices: [CUDADevice] = [], modules: [KernelModule] = [], handles: [Int32] = []
        for ordinal in wanted {
            let device = try CUDADevice(ordinal: ordinal)  // makes its context current
            modules.append(try KernelModule(device: device, path: kernels))
            var handle: Int32 = 0
            try device.driver.check(device.driver.cuDeviceGet(&handle, ordinal), "cuDeviceGet(\(ordinal))")
            devices.append(device)
            handles.append(handle)
        }
        self.devices = devices
        self.modules = modules
        self.handles = handles
    }

    public func makeCurrent(_ rank: Int) throws { try devices[rank].makeCurrent() }

    /// How rank `a` reaches rank `b`'s memory, by the driver: whether it can at all, the
    /// driver's relative performance rank of the link (0 is the best it reports; -1 where the
    /// driver would not say), and whether atomics on `b`'s memory are native (NVLink) rather
    /// than unsupported (PCIe).
    public func peerLink(_ a: Int, _ b: Int) throws -> (access: Bool, performanceRank: Int, nativeAtomics: Bool) {
        let d = devices[a].driver
        var can: Int32 = 0, rank: Int32 = 0, atomics: Int32 = 0
        try d.check(d.cuDeviceCanAccessPeer(&can, handles[a], handles[b]), "cuDeviceCanAccessPeer(GPU \(devices[a].ordinal), GPU \(devices[b].ordinal))")
        // CU_DEVICE_P2P_ATTRIBUTE_PERFORMANCE_RANK = 1, CU_DEVICE_P2P_ATTRIBUTE_NATIVE_ATOMIC_SUPPORTED = 3;
        // facts for the log only, so a driver that refuses them does not stop anything.
        if d.cuDeviceGetP2PAttribute(&rank, 1, handles[a], handles[b]) != 0 { rank = -1 }
        if d.cuDeviceGetP2PAttribute(&atomics, 3, handles[a], handles[b]) != 0 { atomics = 0 }
        return (can != 0, Int(rank), atomics != 0)
    }

    /// Lets every GPU's kernels read and write every other GPU's memory (all allocations of
    /// its context, present and future). Throws, naming the pair, where the driver says a GPU
    /// cannot reach another's memory (no NVLink and no PCIe peer-to-peer between them).
    public func enablePeerAccess() throws {
        for a in 0..<count {
            for b in 0..<count where b != a {
                guard try peerLink(a, b).access else {
                    throw CUDAError(operation: "enable peer access", code: nil,
                                    message: "GPU \(devices[a].ordinal) cannot access GPU \(devices[b].ordinal)'s memory (cuDeviceCanAccessPeer says no): the peer all-reduce needs NVLink or PCIe peer-to-peer between every pair; use NCCL on this machine")
                }
            }
        }
        for a in 0..<count {
            try makeCurrent(a)
            let d = devices[a].driver
            for b in 0..<count where b != a {
                let result = d.cuCtxEnablePeerAccess(devices[b].context, 0)
                if result == 704 { continue }  // CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED (by NCCL, or an earlier group)
                try d.check(result, "cuCtxEnablePeerAccess(GPU \(devices[a].ordinal) -> GPU \(devices[b].ordinal))")
            }
        }
    }

    /// One graph per rank from what `body` enqueues on `streams[r]` (rank r's) at once: a
    /// call that enqueues on several GPUs' streams together (NCCL's grouped collectives) can
    /// only be captured this way. Nothing runs while capturing; replay graph r on rank r's
    /// stream, every rank's graph the same number of times.
    public func capture(_ streams: [CUDAStream], _ body: () throws -> Void) throws -> [CUDAGraph] {
        precondition(streams.count == count, "one stream per rank")
        let d = devices[0].driver
        var begun = 0
        func abandon() {
            for r in 0..<begun {
                _ = try? makeCurrent(r)
                var g: OpaquePointer?
                _ = d.cuStreamEndCapture(streams[r].handle, &g)
                if g != nil { _ = d.cuGraphDestroy(g) }
            }
        }
        do {
            for r in 0..<count {
                try makeCurrent(r)
                // CU_STREAM_CAPTURE_MODE_THREAD_LOCAL, as CUDAGraph: NCCL may allocate while we capture.
                try d.check(d.cuStreamBeginCapture(streams[r].handle, 1), "cuStreamBeginCapture(GPU \(devices[r].ordinal))")
                begun += 1
            }
            try body()
        } catch {
            abandon()
            throw error
        }
        var graphs: [OpaquePointer?] = []
        var failure: Error?
        for r in 0..<count {
            var g: OpaquePointer?
            do {
                try makeCurrent(r)
                try d.check(d.cuStreamEndCapture(streams[r].handle, &g), "cuStreamEndCapture(GPU \(devices[r].ordinal))")
            } catch {
                failure = failure ?? error
            }
            graphs.append(g)
        }
        var result: [CUDAGraph] = []
        if failure == nil {
            for r in 0..<count {
                var e: OpaquePointer?
                do {
                    try makeCurrent(r)
                    try d.check(d.cuGraphInstantiateWithFlags(&e, graphs[r], 0), "cuGraphInstantiateWithFlags(GPU \(devices[r].ordinal))")
                    result.append(CUDAGraph(driver: d, graph: graphs[r], exec: e))
                } catch {
                    failure = error
                    break
                }
            }
        }
        if let failure {
            for g in graphs.dropFirst(result.count) where g != nil { _ = d.cuGraphDestroy(g) }
            throw failure
        }
        return result
    }
}

extension CUDADevice {
    /// How many GPUs the driver sees (after CUDA_VISIBLE_DEVICES).
    public static func visibleCount() throws -> Int {
        let d = try Driver.get()
        var n: Int32 = 0
        try d.check(d.cuDeviceGetCount(&n), "cuDeviceGetCount")
        return Int(n)
    }
}
