import Foundation

/// The one-shot all-reduce of Kernels/comm.cu over a DeviceGroup: for small f32 messages
/// (a decode step's hidden state), summed in rank order so that every GPU gets the same bits.
/// Each rank enqueues its part on its own stream, directly or inside a captured graph; the
/// kernel keeps its call count on the device, so graphs replay it correctly. Calls must come
/// in the same order on every rank, one at a time (not from two streams of a GPU at once).
public final class PeerAllReduce: @unchecked Sendable {
    public let group: DeviceGroup
    /// The largest message, in floats.
    public let capacity: Int
    /// Each rank's registered buffer (comm.cu's layout: header, then two sets of one receive
    /// slot per rank).
    let buffers: [DeviceBuffer]
    let kernels: [KernelModule.Function]
    /// peer_all_reduce_norm on each rank.
    let normKernels: [KernelModule.Function]

    // comm.cu's constants.
    static let maxRanks = 8, maxBlocks = 128, threads = 512, slotsOffset = 256
    /// peer_all_reduce_norm's block and the largest row it takes (comm.cu).
    static let normThreads = 512, normMaxHidden = 8192

    /// Blocks of a call of `count` floats: one float4 per thread up to 128 blocks (a 2880-float
    /// message takes 2), the same on every rank.
    static func blocks(count: Int) -> Int { min(maxBlocks, max(1, (count / 4 + threads - 1) / threads)) }

    /// Enables peer access in `group` (throws where a pair of GPUs has none) and registers a
    /// buffer of 2 x (GPU count) `maxFloats` receive slots on every GPU, all marked empty.
    public init(group: DeviceGroup, maxFloats: Int) throws {
        guard group.count <= Self.maxRanks else {
            throw CUDAError(operation: "create a peer all-reduce", code: nil,
                            message: "the peer all-reduce handles up to \(Self.maxRanks) GPUs; this group has \(group.count)")
        }
        precondition(maxFloats > 0 && maxFloats <= Int(Int32.max) / 8, "peer all-reduce capacity out of range")
        try group.enablePeerAccess()
        let capacity = (maxFloats + 63) / 64 * 64  // every slot stays 256-byte aligned
        let bytes = Self.slotsOffset + 2 * group.count * 4 * capacity
        var buffers: [DeviceBuffer] = [], kernels: [KernelModule.Function] = [], normKernels: [KernelModule.Function] = []
        for r in 0..<group.count {
            try group.makeCurrent(r)
            buffers.append(try group.devices[r].allocate(bytes))
            kernels.append(try group.modules[r].function("peer_all_reduce"))
            normKernels.append(try group.modules[r].function("peer_all_reduce_norm"))
        }
        // The header of every rank: all base addresses, epoch 0, no block done; every slot's
        // floats the empty mark 0xFFFFFFFF (comm.cu).
        var header = [UInt64](repeating: 0, count: Self.slotsOffset / 8)
        for r in 0..<buffers.count { header[r] = buffers[r].address }
        for r in 0..<group.count {
            try group.makeCurrent(r)
            let stream = try group.devices[r].makeStream()
            try buffers[r].fill(byte: 0xFF, stream: stream)
            try stream.synchronize()
            try header.withUnsafeBytes { try buffers[r].upload($0) }
            // A pageable upload may return before its DMA is done; no kernel may see a stale header.
            try group.devices[r].synchronize()
        }
        self.group = group
        self.capacity = capacity
        self.buffers = buffers
        self.kernels = kernels
        self.normKernels = normKernels
    }

    /// Enqueues rank `rank`'s part of one all-reduce: output[0, count) = the sum over ranks
    /// r = 0, 1, ... of rank r's input[0, count), once every rank has enqueued its part (each
    /// waits on the GPU for the others, up to about 2 s, then traps). `count` is a multiple
    /// of 4 up to `capacity`, the same on every rank; output may be input. With `overlap` the
    /// call is a programmatic dependent of the kernel before it on `stream` and lets the kernel
    /// after it start early (comm.cu): only where every kernel around it executes
    /// griddepcontrol.wait before it touches what an earlier kernel wrote, as a decode step's do.
    public func enqueue(rank: Int, input: DeviceBuffer, output: DeviceBuffer, count: Int, stream: CUDAStream, overlap: Bool = false) throws {
        guard count > 0, count % 4 == 0, count <= capacity else {
            throw CUDAError(operation: "peer all-reduce", code: nil,
                            message: "peer all-reduce of \(count) floats: the count must be a positive multiple of 4 up to the registered capacity, \(capacity)")
        }
        precondition(input.byteCount >= 4 * count && output.byteCount >= 4 * count, "peer all-reduce of \(count) floats past the end of a buffer")
        precondition(input.address % 16 == 0 && output.address % 16 == 0, "peer all-reduce buffers must be 16-byte aligned")
        try group.makeCurrent(rank)
        try group.modules[rank].launch(kernels[rank], grid: (Self.blocks(count: count), 1, 1), block: (Self.threads, 1, 1), stream: stream,
                                       overlapPrevious: overlap,
                                       [.pointer(input.address), .pointer(output.address), .int32(Int32(count)),
                                        .pointer(buffers[rank].address), .int32(Int32(capacity)), .int32(Int32(rank)), .int32(Int32(group.count)),
                                        .int32(overlap ? 1 : 0)])
    }

    /// Enqueues rank `rank`'s part of an all-reduce of `tokens` rows of `hidden` floats
    /// followed by the residual add and RMSNorm (comm.cu, peer_all_reduce_norm): input = the
    /// rank-order sum of every rank's input, x += input, h = weight * rmsnorm(x), each row
    /// on its own. Shares peer_all_reduce's epoch and slots: calls of both kinds may be mixed,
    /// in the same order on every rank.
    public func enqueueNorm(rank: Int, input: DeviceBuffer, tokens: Int, hidden: Int, x: UInt64, h: UInt64, weight: UInt64, eps: Float,
                            stream: CUDAStream, overlap: Bool = false) throws {
        guard tokens > 0, tokens <= Self.maxBlocks, hidden > 0, hidden % 4 == 0, hidden <= Self.normMaxHidden, tokens * hidden <= capacity else {
            throw CUDAError(operation: "peer all-reduce with norm", code: nil,
                            message: "\(tokens) rows of \(hidden) floats: at most \(Self.maxBlocks) rows of a multiple of 4 up to \(Self.normMaxHidden) floats, \(capacity) in all")
        }
        precondition(input.byteCount >= 4 * tokens * hidden && input.address % 16 == 0 && x % 16 == 0 && h % 16 == 0 && weight % 16 == 0,
                     "peer all-reduce with norm: buffers too small or not 16-byte aligned")
        try group.makeCurrent(rank)
        try group.modules[rank].launch(normKernels[rank], grid: (tokens, 1, 1), block: (Self.normThreads, 1, 1), stream: stream,
                                       overlapPrevious: overlap,
                                       [.pointer(input.address), .int32(Int32(hidden)), .pointer(buffers[rank].address), .int32(Int32(capacity)),
                                        .int32(Int32(rank)), .int32(Int32(group.count)), .int32(overlap ? 1 : 0),
                                        .pointer(x), .pointer(h), .pointer(weight), .float(eps)])
    }
}
