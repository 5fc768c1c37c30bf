import Fulgur

/// The card's measured memory bandwidth, the ceiling every decode number is compared with:
/// a device-to-device copy of 1 GiB of random bytes, counting bytes read plus written,
/// median of 10 after 3 warm-ups. The two buffers stay allocated for callers that queue
/// copies ahead of timed work (so the host's launch rate is not what gets timed).
public struct CopyBandwidth {
    public let src: DeviceBuffer
    public let dst: DeviceBuffer
    public let gbps: Double

    public init(_ device: CUDADevice, _ stream: CUDAStream) throws {
        let bytes = 1 << 30
        var rng = SeededGenerator(seed: 1)
        let src = try device.allocate(bytes), dst = try device.allocate(bytes)
        self.src = src
        self.dst = dst
        var chunk = [UInt64](repeating: 0, count: (64 << 20) / 8)
        for i in chunk.indices { chunk[i] = rng.next() }
        for offset in stride(from: 0, to: bytes, by: 8 * chunk.count) {
            try chunk.withUnsafeBytes { try src.upload($0, offset: offset) }
        }
        let start = try device.makeEvent(), end = try device.makeEvent()
        for _ in 0..<3 { try dst.copy(from: src, bytes: bytes, stream: stream) }
        var times: [Double] = []
        for _ in 0..<10 {
            try start.record(stream)
            try dst.copy(from: src, bytes: bytes, stream: stream)
            try end.record(stream)
            times.append(try end.milliseconds(since: start))
        }
        gbps = 2 * Double(bytes) / (times.sorted()[times.count / 2] * 1e-3) / 1e9
    }

    /// Microseconds the GPU takes to copy `bytes`.
    public func micros(_ bytes: Int) -> Double { 2 * Double(bytes) / (gbps * 1e3) }

    /// Microseconds to stream `bytes` once (read only) at this bandwidth: a roofline.
    public func readMicros(_ bytes: Int) -> Double { Double(bytes) / (gbps * 1e3) }
}
