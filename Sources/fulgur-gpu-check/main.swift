// Checks and times the CUDA kernels on a GPU machine (scripts/gpu-check runs it there):
// every kernel against the CPU executor on fresh random inputs, then device-to-device copy
// bandwidth and each kernel's achieved bandwidth, timed with events after warm-up.
// Arguments name the kernel families to check (executor, speculative, layer, batch, long, moe, comm, gemv,
// random, tp); none checks all but tp (comm, and random's split models, only where there are at
// least 2 GPUs).
// Exits 1 on any mismatch, 2 when the GPU or the kernels cannot be used, 3 when a comm phase hangs.
import Foundation
import Fulgur
import FulgurCUDA

/// ‖gpu − cpu‖ / ‖cpu‖ bound: both sides are f32 products that differ in summation order
/// only (the GPU's dequantized weights are exact), so they agree to about 1e-6.
let tolerance = 1e-5

/// Host memory that a LinearWeight made for the check points into.
final class HostBytes {
    let pointer: UnsafeMutableRawPointer
    let count: Int
    init(_ count: Int, _ rng: inout SeededGenerator, map: (UInt64) -> UInt64 = { $0 }) {
        self.count = count
        pointer = .allocate(byteCount: (count + 7) / 8 * 8, alignment: 64)
        let words = pointer.bindMemory(to: UInt64.self, capacity: (count + 7) / 8)
        for i in 0..<((count + 7) / 8) { words[i] = map(rng.next()) }
    }
    deinit { pointer.deallocate() }
    func view(_ name: String, _ dtype: DType, _ shape: [Int]) -> TensorView {
        TensorView(name: name, dtype: dtype, shape: shape, data: pointer, byteCount: count, owner: self)
    }
}

enum Format: String, CaseIterable {
    case mxfp4, fp8, bf16, f32
    /// Stored as plain values (gemv::plain), with no wide layout.
    var plain: Bool { self == .bf16 || self == .f32 }
}

func randomWeight(_ format: Format, rows: Int, columns: Int, _ rng: inout SeededGenerator) throws -> LinearWeight {
    switch format {
    case .mxfp4:
        let codes = HostBytes(rows * columns / 2, &rng)
        // Scales 2^-9 ... 2^6: the spread of real checkpoints, with room either side.
        let scales = HostBytes(rows * columns / 32, &rng) { w in
            (0..<8).reduce(0) { $0 | (118 + (w >> (8 * $1)) & 0xF) << (8 * $1) }
        }
        return try LinearWeight(mxfp4: codes.view("w", .u8, [rows, columns / 2]), scales: scales.view("w.scales", .u8, [rows, columns / 32]))
    case .fp8:
        // Clear bit 0 of codes 0x7F/0xFF (NaN) so every weight is finite.
        let codes = HostBytes(rows * columns, &rng) { w in
            var v = w
            for b in 0..<8 where (w >> (8 * b)) & 0x7F == 0x7F { v ^= 1 << (8 * b) }
            return v
        }
        let tiles = [(rows + 127) / 128, (columns + 127) / 128]
        let scales = HostBytes(4 * tiles[0] * tiles[1], &rng)
        let s = scales.pointer.bindMemory(to: Float.self, capacity: tiles[0] * tiles[1])
        for i in 0..<(tiles[0] * tiles[1]) { s[i] = Float(rng.nextUnit() * 0.01 + 0.001) }
        return try LinearWeight(fp8: codes.view("w", .fp8e4m3, [rows, columns]), scaleInv: scales.view("w.scale_inv", .f32, tiles))
    case .bf16, .f32:
        // Uniform in [-1, 1), rounded down to BF16 for bf16.
        let bytes = HostBytes((format == .bf16 ? 2 : 4) * rows * columns, &rng)
        for i in 0..<(rows * columns) {
            let v = Float(rng.nextUnit() * 2 - 1)
            if format == .bf16 {
                bytes.pointer.storeBytes(of: UInt16(v.bitPattern >> 16), toByteOffset: 2 * i, as: UInt16.self)
            } else {
                bytes.pointer.storeBytes(of: v, toByteOffset: 4 * i, as: Float.self)
            }
        }
        return try LinearWeight(bytes.view("w", format == .bf16 ? .bf16 : .f32, [rows, columns]))
    }
}

func randomFloats(_ count: Int, _ rng: inout SeededGenerator) -> [Float] {
    (0..<count).map { _ in Float(rng.nextUnit() * 2 - 1) }
}

func median(_ xs: [Double]) -> Double { xs.sorted()[xs.count / 2] }

typealias Copy = CopyBandwidth

func copyBandwidth(_ device: CUDADevice, _ stream: CUDAStream) throws -> Copy { try CopyBandwidth(device, stream) }

/// One check; `timings` holds (microseconds, GB/s, rounds of 20 in which the host may have
/// queued launches slower than the GPU ran them) launched plainly, then overlapping the
/// previous kernel (programmatic dependent launch), when the shape is timed.
struct Row { let format: Format; let layout: CUDALinear.Layout; let rows: Int; let columns: Int; let tokens: Int; let error: Double; let timings: [Timing] }
typealias Timing = (micros: Double, gbps: Double, hostPaced: Int)

/// Two wide products of one kernel with different K (so different shared memory for x), the
/// larger run again after the smaller: the kernel's shared-memory limit belongs to the function
/// and must not drop under the larger one (a MiMo-V2-Flash step failed with
/// CUDA_ERROR_INVALID_VALUE when it did). The larger product's second result against the CPU.
func checkWideSharedLimit(_ device: CUDADevice, _ module: KernelModule, _ stream: CUDAStream, _ format: Format, seed: UInt64) throws -> Row {
    var rng = SeededGenerator(seed: seed)
    let (n, big, small) = (64, 16384, 512)
    let wb = try randomWeight(format, rows: n, columns: big, &rng), ws = try randomWeight(format, rows: n, columns: small, &rng)
    let gb = try CUDALinear(wb, module: module), gs = try CUDALinear(ws, module: module)
    for g in [gb, gs] { g.layout = .wide; g.forceLayout = true }
    let xb = randomFloats(big, &rng), xs = randomFloats(small, &rng)
    var want = [Float](repeating: 0, count: n)
    wb.apply(xb, tokens: 1, into: &want)
    let xbd = try xb.withUnsafeBytes { try device.upload($0) }, xsd = try xs.withUnsafeBytes { try device.upload($0) }
    let out = try device.allocate(4 * n)
    try gb.apply(xbd, tokens: 1, into: out, stream: stream)
    try gs.apply(xsd, tokens: 1, into: out, stream: stream)
    try out.fill(byte: 0xFF, stream: stream)
    try gb.apply(xbd, tokens: 1, into: out, stream: stream)
    try stream.synchronize()
    var got = [Float](repeating: 0, count: n)
    try got.withUnsafeMutableBytes { try out.download(into: $0) }
    let error = worstRowError(got, want, width: n)
    print("gemv: \(format) wide \(n) x \(big) run again after \(n) x \(small): rel.err \(String(format: "%.2e", error))")
    return Row(format: format, layout: .wide, rows: n, columns: big, tokens: 1, error: error, timings: [])
}

func check(_ device: CUDADevice, _ module: KernelModule, _ stream: CUDAStream, _ format: Format, rows: Int, columns: Int,
           tokens: [Int], timed: Bool, copy: Copy, seed: UInt64, layouts: [CUDALinear.Layout] = [.rows]) throws -> [Row] {
    var rng = SeededGenerator(seed: seed)
    let w = try randomWeight(format, rows: rows, columns: columns, &rng)
    let gpu = try CUDALinear(w, module: module)
    // Enough copies of the weight that a round of launches streams from memory, not L2, but
    // at most 64: the host must queue a round's launches within the 1 GiB copy ahead of it
    // (1024 launches took about 16 us each on the H200 machine's host).
    let copies = timed ? min(64, max(2, (256 << 20) / gpu.weightBytes)) : 1
    let weights = [gpu] + (try (1..<copies).map { _ in try CUDALinear(w, module: module) })
    var result: [Row] = []
    for t in tokens {
        let x = randomFloats(t * columns, &rng)
        var want = [Float](repeating: 0, count: t * rows)
        w.apply(x, tokens: t, into: &want)
        let xd = try x.withUnsafeBytes { try device.upload($0) }
        let out = try device.allocate(4 * t * rows)
        for layout in layouts {
        for g in weights { g.layout = layout; g.forceLayout = true }
        try out.fill(byte: 0xFF, stream: stream)  // NaN: an element the kernel skips fails the check
        try gpu.apply(xd, tokens: t, into: out, stream: stream)
        try stream.synchronize()
        var got = [Float](repeating: 0, count: t * rows)
        try got.withUnsafeMutableBytes { try out.download(into: $0) }
        var diff = 0.0, norm = 0.0
        for i in 0..<got.count {
            let d = Double(got[i]) - Double(want[i])
            diff += d * d; norm += Double(want[i]) * Double(want[i])
        }
        let error = got.allSatisfy { $0.isFinite } ? (diff / norm).squareRoot() : .nan
        var timings: [Timing] = []
        for overlap in timed ? [false, true] : [] {
            let start = try device.makeEvent(), end = try device.makeEvent()
            for _ in 0..<3 { for g in weights { try g.apply(xd, tokens: t, into: out, stream: stream, overlapPrevious: overlap) } }
            var times: [Double] = [], hostPaced = 0
            for _ in 0..<20 {
                // Three 1 GiB copies (about 1.5 ms) first, so the host has queued every launch
                // before the GPU reaches them: the events then time the GPU, not the host's
                // launch rate (6 to 16 us a launch on the H200 machine, more than a kernel).
                for _ in 0..<3 { try copy.dst.copy(from: copy.src, bytes: copy.src.byteCount, stream: stream) }
                let queued = DispatchTime.now().uptimeNanoseconds
                try start.record(stream)
                for g in weights { try g.apply(xd, tokens: t, into: out, stream: stream, overlapPrevious: overlap) }
                try end.record(stream)
                let hostMicros = Double(DispatchTime.now().uptimeNanoseconds - queued) / 1e3
                if hostMicros > 0.8 * copy.micros(3 * copy.src.byteCount) { hostPaced += 1 }
                times.append(try end.milliseconds(since: start) * 1e3 / Double(weights.count))
            }
            let micros = median(times)
            timings.append((micros, Double(gpu.weightBytes + 4 * t * (rows + columns)) / (micros * 1e-6) / 1e9, hostPaced))
        }
        result.append(Row(format: format, layout: layout, rows: rows, columns: columns, tokens: t, error: error, timings: timings))
        }
    }
    return result
}

func run() throws -> Bool {
    let device = try CUDADevice()
    print("device: \(device.name), \(device.multiprocessors) SMs, \(device.totalMemory >> 20) MiB")
    let module = try KernelModule(device: device)
    print("kernels: \(module.path)")
    let stream = try device.makeStream()
    let copy = try copyBandwidth(device, stream)
    let copyGBs = copy.gbps
    print(String(format: "device-to-device copy: %.0f GB/s (read + write, 1 GiB, median of 10)", copyGBs))
    var rows: [Row] = []
    var seed: UInt64 = UInt64(Date().timeIntervalSince1970)  // fresh inputs every run
    let families = CommandLine.arguments.dropFirst()
    let wholeModel = families.isEmpty || families.contains("executor") ? try runExecutorChecks(device, module) : true
    let speculative = families.isEmpty || families.contains("speculative")
        ? try runSpeculativeChecks(device, module) && capturedRowsChecks(DeviceGroup(ordinals: [0])) : true
    let layerPassed = families.isEmpty || families.contains("layer") ? try runLayerChecks(device, module, stream, seed: seed + 2000) : true
    let batchPassed = families.isEmpty || families.contains("batch") ? try runBatchChecks(device, module, seed: seed + 4000) : true
    let longPassed = families.isEmpty || families.contains("long") ? try runLongContextChecks(device, module) : true
    let executorPassed = wholeModel && speculative && layerPassed && batchPassed && longPassed
    let moePassed = families.isEmpty || families.contains("moe") ? try runMoE(device, module, stream, copy: copy, seed: seed + 1000) : true
    let commPassed = families.isEmpty || families.contains("comm") ? try runCommChecks(seed: seed + 3000) : true
    let tpPassed = families.contains("tp") ? try runTensorParallelChecks() : true
    let randomPassed = families.isEmpty || families.contains("random") ? try runRandomChecks(device, module) : true
    guard families.isEmpty || families.contains("gemv") else { return moePassed && executorPassed && commPassed && tpPassed && randomPassed }
    // FULGUR_GEMV_SHAPES=NxK,NxK,... (for example a model's q/k/v and o_proj): only those
    // shapes, FP8, every layout, timed at 1, 2, 4, 8 and 16 tokens; the standard list is skipped.
    let extraShapes = try (ProcessInfo.processInfo.environment["FULGUR_GEMV_SHAPES"] ?? "").split(separator: ",").map { item -> (Int, Int) in
        let parts = item.split(separator: "x").compactMap { Int($0) }
        guard parts.count == 2, parts[0] > 0, parts[1] > 0, parts[1] % 64 == 0 else {
            throw FulgurError(.usage, "FULGUR_GEMV_SHAPES: '\(item)' is not NxK with K a multiple of 64")
        }
        return (parts[0], parts[1])
    }
    for (n, k) in extraShapes {
        seed += 1
        rows += try check(device, module, stream, .fp8, rows: n, columns: k, tokens: [1, 2, 4, 8, 16], timed: true, copy: copy, seed: seed,
                          layouts: [.rows, .wide, .mma])
    }
    for format in extraShapes.isEmpty ? Format.allCases : [] {
        // Edge shapes: rows not a multiple of a block's rows, fewer chunks than lanes, ragged chunk counts.
        for (n, k) in [(37, 96), (200, 4160)] {
            seed += 1
            rows += try check(device, module, stream, format, rows: n, columns: k, tokens: Array(1...16), timed: false, copy: copy, seed: seed)
        }
        // The tensor-core layout (FP8, BF16; K a multiple of 64): edge shapes at every T.
        let mma: [CUDALinear.Layout] = format == .fp8 || format == .bf16 ? [.mma] : []
        for (n, k) in mma.isEmpty ? [] : [(37, 192), (200, 4160)] {
            seed += 1
            rows += try check(device, module, stream, format, rows: n, columns: k, tokens: Array(1...16), timed: false, copy: copy, seed: seed, layouts: mma)
        }
        if format.plain {
            // Plain BF16/f32 (gemv::plain, 1, 2 or 4 rows a warp by token bin): attention-sized
            // and the gpt-oss-20b LM head, whose 8-token calls were L1-bound with one row a warp;
            // BF16 also on the tensor cores.
            // K = 99: no 16-byte path, the scalar loop alone (one row a warp, and split over a
            // block's warps from 2 tokens: gemv::plain_split).
            seed += 1
            rows += try check(device, module, stream, format, rows: 37, columns: 99, tokens: Array(1...16), timed: false, copy: copy, seed: seed)
            for (n, k, tokens) in [(2880, 2880, Array(1...16)), (201088, 2880, [1, 4, 8, 16])] {
                seed += 1
                rows += try check(device, module, stream, format, rows: n, columns: k, tokens: tokens, timed: true, copy: copy, seed: seed, layouts: [.rows] + mma)
            }
            continue
        }
        // The launch floor (a 64 KiB weight, 4 MiB in all, so from L2: what a call costs
        // beyond its bytes), then
        // gpt-oss-20b: expert down and attention-sized 2880 x 2880, expert gate_up 5760 x 2880.
        seed += 1
        rows += try check(device, module, stream, format, rows: 256, columns: 512, tokens: [1, 16], timed: true, copy: copy, seed: seed)
        for (n, k) in [(2880, 2880), (5760, 2880)] {
            seed += 1
            rows += try check(device, module, stream, format, rows: n, columns: k, tokens: Array(1...16), timed: true, copy: copy, seed: seed, layouts: [.rows] + mma)
        }
        // The wide layout (LM heads): edge shapes, every T, then against the rows layout on a
        // gpt-oss-20b LM head (201088 x 2880) and on 5760 x 2880.
        for (n, k) in [(37, 96), (200, 4160)] {
            seed += 1
            rows += try check(device, module, stream, format, rows: n, columns: k, tokens: Array(1...16), timed: false, copy: copy, seed: seed, layouts: [.wide])
        }
        seed += 1
        rows += try check(device, module, stream, format, rows: 5760, columns: 2880, tokens: [1, 2, 4, 8, 16], timed: true, copy: copy, seed: seed, layouts: [.wide])
        seed += 1
        rows += try check(device, module, stream, format, rows: 201088, columns: 2880, tokens: [1, 4, 8], timed: true, copy: copy, seed: seed, layouts: [.rows, .wide] + mma)
        seed += 1
        rows.append(try checkWideSharedLimit(device, module, stream, format, seed: seed))
    }
    try device.synchronize()
    let failed = rows.filter { !($0.error <= tolerance) }
    print("\nseed base \(seed); tolerance ‖gpu − cpu‖/‖cpu‖ <= \(tolerance)")
    print("format  N x K              T  rel.err    plain launch: us   GB/s  % copy   overlapping previous: us   GB/s  % copy")
    for r in rows where !r.timings.isEmpty || !(r.error <= tolerance) {
        let shape = "\(r.rows)x\(r.columns)" + (r.layout == .wide ? " wide" : r.layout == .mma ? " mma" : "")
        var line = r.format.rawValue.padding(toLength: 8, withPad: " ", startingAt: 0) + shape.padding(toLength: 18, withPad: " ", startingAt: 0)
            + String(format: "%2d  %.2e", r.tokens, r.error)
        for (i, t) in r.timings.enumerated() {
            line += (i == 0 ? "      " : "             ") + String(format: "%8.2f  %5.0f  %5.1f%%", t.micros, t.gbps, 100 * t.gbps / copyGBs)
                + (t.hostPaced > 0 ? " host-paced in \(t.hostPaced)/20" : "")
        }
        print(line)
    }
    let small = rows.filter { $0.timings.isEmpty }
    if !small.isEmpty { print("edge shapes (37x96, 37x192, 200x4160), T = 1...16, every format and layout: \(small.count) checks, worst rel.err \(String(format: "%.2e", small.map(\.error).max() ?? 0))") }
    print(failed.isEmpty ? "PASS: \(rows.count) checks" : "FAIL: \(failed.count) of \(rows.count) checks over tolerance")
    return failed.isEmpty && moePassed && executorPassed && commPassed && tpPassed && randomPassed
}

do {
    exit(try run() ? 0 : 1)
} catch {
    FileHandle.standardError.write("fulgur-gpu-check: \(error)\n".data(using: .utf8)!)
    exit(2)
}
