// The communication layer on every visible GPU (family `comm`): NCCL's all-reduce and the
// peer all-reduce (Kernels/comm.cu) against CPU sums on fresh random inputs, then timed per
// call, launched back to back on the streams and replayed from a graph per GPU; then 1000
// back-to-back peer all-reduces of changing sizes and inputs, every output checked (a race on
// the epoch, the flags or the slots shows up as a wrong sum).
// Nothing here may hang the device call: the kernel's waits trap after about 2 s, and a
// watchdog ends the process (exit 3) when a phase, NCCL's included, outlives its deadline.
import Foundation
import Fulgur
import FulgurCUDA

let commSizes = [2880, 4096, 5760, 16384, 65536, 1 << 20]
/// ‖nccl − sum‖ / ‖sum‖ against a double-precision sum: NCCL adds in its own order.
let ncclTolerance = 1e-6
let callsTimed = 200, roundsTimed = 5
/// How long each stream is held (comm.cu's hold_stream) while the host queues a timed round.
let holdNanoseconds = 25_000_000

/// Ends the process when the armed phase is still running at its deadline: NCCL's kernels
/// spin without bound when a peer never comes, and a hung device call would tell nothing.
final class Watchdog: @unchecked Sendable {
    private let lock = NSLock()
    private var phase = ""
    private var deadline: Date?

    init() {
        // The thread keeps the watchdog alive for the rest of the process; disarmed, it only sleeps.
        let t = Thread { [self] in
            while true {
                Thread.sleep(forTimeInterval: 0.1)
                lock.lock()
                let expired = deadline.map { Date() > $0 } ?? false
                let what = phase
                lock.unlock()
                if expired {
                    fflush(stdout)
                    FileHandle.standardError.write("\ncomm FAIL: \(what) did not finish within its deadline: hung (peer all-reduce waits trap after about 2 s; NCCL's do not). Exiting.\n".data(using: .utf8)!)
                    _exit(3)
                }
            }
        }
        t.start()
    }

    /// Runs `body` under a deadline of `seconds`, and names the phase in any error it throws.
    func during<T>(_ what: String, seconds: Double, _ body: () throws -> T) throws -> T {
        lock.lock(); phase = what; deadline = Date().addingTimeInterval(seconds); lock.unlock()
        defer { lock.lock(); deadline = nil; lock.unlock() }
        do {
            return try body()
        } catch {
            throw CommFailure(message: "\(what): \(error)")
        }
    }
}

struct CommFailure: Error, CustomStringConvertible { let message: String; var description: String { message } }

/// Per size: NCCL's error and the peer result (nil: not run), and microseconds per call
/// (nil: not timed) with the rounds in which the host may have queued slower than the GPU ran.
struct CommRow {
    let floats: Int
    var ncclError: Double?
    var peerExact: Bool?
    var nccl: [String: (micros: Double, hostPaced: Int)] = [:]
    var peer: [String: (micros: Double, hostPaced: Int)] = [:]
}

/// The fixed-order sum every GPU must produce: ((x0 + x1) + x2) + ... in f32.
func rankOrderSum(_ xs: [[Float]]) -> [Float] {
    var s = xs[0]
    for x in xs.dropFirst() { for i in s.indices { s[i] += x[i] } }
    return s
}

final class CommBench {
    let group: DeviceGroup
    let streams: [CUDAStream]
    let holds: [KernelModule.Function]
    let watchdog: Watchdog

    init(_ group: DeviceGroup, _ watchdog: Watchdog) throws {
        self.group = group
        self.watchdog = watchdog
        var streams: [CUDAStream] = [], holds: [KernelModule.Function] = []
        for r in 0..<group.count {
            try group.makeCurrent(r)
            streams.append(try group.devices[r].makeStream())
            holds.append(try group.modules[r].function("hold_stream"))
        }
        self.streams = streams
        self.holds = holds
    }

    var ranks: Range<Int> { 0..<group.count }

    func synchronize() throws {
        for r in ranks {
            try group.makeCurrent(r)
            try streams[r].synchronize()
        }
    }

    func upload(_ xs: [[Float]]) throws -> [DeviceBuffer] {
        try ranks.map { r in
            try group.makeCurrent(r)
            let b = try xs[r].withUnsafeBytes { try group.devices[r].upload($0) }
            try group.devices[r].synchronize()  // a pageable upload may return before its DMA is done
            return b
        }
    }

    /// Buffers of `floats` floats on every rank, all bytes 0xFF (NaN: an element never written
    /// fails every check).
    func poisoned(_ floats: Int) throws -> [DeviceBuffer] {
        try ranks.map { r in
            try group.makeCurrent(r)
            let b = try group.devices[r].allocate(4 * floats)
            try b.fill(byte: 0xFF, stream: streams[r])
            return b
        }
    }

    func download(_ buffers: [DeviceBuffer], floats: Int) throws -> [[Float]] {
        try ranks.map { r in
            try group.makeCurrent(r)
            var out = [Float](repeating: 0, count: floats)
            try out.withUnsafeMutableBytes { try buffers[r].download(into: $0) }
            return out
        }
    }

    /// Median over rounds of microseconds per call of `calls` calls that `enqueue` queues on
    /// every rank's stream: events on each stream (the slowest rank counts), each stream held
    /// by hold_stream while the host queues, so the events time the GPUs. Also the rounds in
    /// which queueing took longer than most of the hold (the host may have paced the GPUs).
    func time(calls: Int, _ enqueue: () throws -> Void) throws -> (micros: Double, hostPaced: Int) {
        var starts: [CUDAEvent] = [], ends: [CUDAEvent] = []
        for r in ranks {
            try group.makeCurrent(r)
            starts.append(try group.devices[r].makeEvent())
            ends.append(try group.devices[r].makeEvent())
        }
        var perCall: [Double] = [], hostPaced = 0
        for _ in 0..<roundsTimed {
            for r in ranks {
                try group.makeCurrent(r)
                // hold_stream's long long fills one 8-byte argument slot, as a pointer does.
                try group.modules[r].launch(holds[r], grid: (1, 1, 1), block: (1, 1, 1), stream: streams[r], [.pointer(UInt64(holdNanoseconds))])
                try starts[r].record(streams[r])
            }
            let queued = DispatchTime.now().uptimeNanoseconds
            try enqueue()
            if Double(DispatchTime.now().uptimeNanoseconds - queued) > 0.8 * Double(holdNanoseconds) { hostPaced += 1 }
            for r in ranks {
                try group.makeCurrent(r)
                try ends[r].record(streams[r])
            }
            var slowest = 0.0
            for r in ranks {
                try group.makeCurrent(r)
                slowest = max(slowest, try ends[r].milliseconds(since: starts[r]))
            }
            perCall.append(slowest * 1e3 / Double(calls))
        }
        return (median(perCall), hostPaced)
    }
}

/// One all-reduce implementation under test: `enqueue` queues one call on every rank,
/// `check` judges every rank's output (nil: correct; else what is wrong), `error` is NCCL's
/// relative error where it has one.
struct CommMode {
    let name: String
    let outputs: [DeviceBuffer]
    let enqueue: () throws -> Void
    let check: ([[Float]]) -> (problem: String?, error: Double?)
}

/// Checks, then times, `mode` at `floats` floats; adds what it finds to `failures`.
func exercise(_ mode: CommMode, floats: Int, _ bench: CommBench, _ failures: inout [String])
    throws -> (ok: Bool, error: Double?, timings: [String: (micros: Double, hostPaced: Int)]) {
    let w = bench.watchdog
    let what = "\(mode.name) all-reduce of \(floats) floats"
    func verify(_ after: String) throws -> (problem: String?, error: Double?) {
        try w.during("\(what), \(after)", seconds: 30) { try bench.synchronize() }
        let got = try bench.download(mode.outputs, floats: floats)
        return mode.check(got)
    }
    func poison() throws {
        for r in bench.ranks {
            try bench.group.makeCurrent(r)
            try mode.outputs[r].fill(byte: 0xFF, stream: bench.streams[r])
        }
    }
    try poison()
    try w.during("\(what), first call", seconds: 30) { try mode.enqueue() }
    let first = try verify("first call")
    if let p = first.problem {
        failures.append("\(what): \(p)")
        return (false, first.error, [:])
    }
    var timings: [String: (micros: Double, hostPaced: Int)] = [:]
    try poison()
    timings["stream"] = try w.during("\(what), \(callsTimed) calls back to back, timed", seconds: 60) {
        try bench.time(calls: callsTimed) { for _ in 0..<callsTimed { try mode.enqueue() } }
    }
    if let p = try verify("after \(callsTimed * roundsTimed) back-to-back calls").problem {
        failures.append("\(what), after \(callsTimed * roundsTimed) back-to-back calls: \(p)")
        return (false, first.error, timings)
    }
    let graphs: [CUDAGraph]
    do {
        graphs = try w.during("\(what), capturing \(callsTimed) calls in a graph per GPU", seconds: 60) {
            try bench.group.capture(bench.streams) { for _ in 0..<callsTimed { try mode.enqueue() } }
        }
    } catch {
        failures.append("\(error)")
        return (false, first.error, timings)
    }
    try poison()
    timings["graph"] = try w.during("\(what), graph of \(callsTimed) calls replayed, timed", seconds: 60) {
        try bench.time(calls: callsTimed) {
            for r in bench.ranks {
                try bench.group.makeCurrent(r)
                try graphs[r].launch(bench.streams[r])
            }
        }
    }
    if let p = try verify("after \(roundsTimed) graph replays").problem {
        failures.append("\(what), after \(roundsTimed) replays of its graph: \(p)")
        return (false, first.error, timings)
    }
    return (true, first.error, timings)
}

/// Bit-for-bit comparison of every rank's output with the rank-order CPU sum; the first
/// mismatch described.
func exactProblem(_ got: [[Float]], _ want: [Float], count: Int) -> String? {
    for (r, out) in got.enumerated() {
        for i in 0..<out.count {
            let expected: UInt32 = i < count ? want[i].bitPattern : 0xFFFF_FFFF  // past count: untouched poison
            if out[i].bitPattern != expected {
                let mismatches = (0..<out.count).filter { out[$0].bitPattern != (($0 < count) ? want[$0].bitPattern : 0xFFFF_FFFF) }.count
                return "rank \(r): \(mismatches) of \(out.count) elements differ from the rank-order CPU sum; first at \(i): got \(out[i]) (0x\(String(out[i].bitPattern, radix: 16))), want \(i < count ? "\(want[i]) (0x\(String(want[i].bitPattern, radix: 16)))" : "the poison 0xffffffff (past the count)")"
            }
        }
    }
    return nil
}

/// The comm family. With fewer than 2 GPUs it prints "comm: skipped, 1 GPU" and passes. An
/// error that leaves the GPUs unusable (a trapped kernel) prints "comm FAIL" and is rethrown.
func runCommChecks(seed: UInt64) throws -> Bool {
    let visible = try CUDADevice.visibleCount()
    guard visible >= 2 else {
        print("comm: skipped, \(visible) GPU")
        return true
    }
    do {
        return try runComm(visible: visible, seed: seed)
    } catch {
        print("comm FAIL: \(error)")
        throw error
    }
}

private func runComm(visible: Int, seed: UInt64) throws -> Bool {
    let w = Watchdog()
    print("\ncomm: \(visible) GPUs, seed \(seed)")
    let group = try w.during("opening \(visible) GPUs and loading their kernels", seconds: 120) { try DeviceGroup() }
    for (r, d) in group.devices.enumerated() { print("  rank \(r): GPU \(d.ordinal), \(d.name)") }
    for a in 0..<group.count {
        for b in 0..<group.count where b != a {
            let l = try group.peerLink(a, b)
            print("  \(a) -> \(b): peer access \(l.access ? "yes" : "NO"), performance rank \(l.performanceRank), native atomics \(l.nativeAtomics ? "yes" : "no")")
        }
    }
    var failures: [String] = []
    var nccl: NCCL?
    do {
        let lib = try NCCL.describe()
        print("  NCCL \(lib.version) from \(lib.path), NCCL_NVLS_ENABLE=\(getenv("NCCL_NVLS_ENABLE").map { String(cString: $0) } ?? "unset")")
        nccl = try w.during("ncclCommInitAll over \(visible) GPUs", seconds: 120) { try NCCL(group: group) }
    } catch {
        failures.append("\(error)")
        print("  NCCL not usable: \(error)")
    }
    var peer: PeerAllReduce?
    do {
        peer = try w.during("registering the peer all-reduce's buffers", seconds: 60) { try PeerAllReduce(group: group, maxFloats: commSizes.max()!) }
    } catch {
        failures.append("\(error)")
        print("  peer all-reduce not usable: \(error)")
    }
    let bench = try CommBench(group, w)
    var rng = SeededGenerator(seed: seed)
    var rows: [CommRow] = []
    for floats in commSizes {
        var row = CommRow(floats: floats)
        let xs = bench.ranks.map { _ in randomFloats(floats, &rng) }
        let want = rankOrderSum(xs)
        var exact = [Double](repeating: 0, count: floats)
        for x in xs { for i in 0..<floats { exact[i] += Double(x[i]) } }
        let norm = exact.reduce(0) { $0 + $1 * $1 }.squareRoot()
        let inputs = try bench.upload(xs)
        if let nccl {
            let outputs = try bench.poisoned(floats)
            let mode = CommMode(name: "NCCL", outputs: outputs,
                                enqueue: { try nccl.allReduceSum(inputs: inputs, outputs: outputs, count: floats, streams: bench.streams) },
                                check: { got in
                                    var worst = 0.0
                                    for out in got {
                                        var diff = 0.0
                                        for i in 0..<floats { let d = Double(out[i]) - exact[i]; diff += d * d }
                                        worst = max(worst, out.allSatisfy(\.isFinite) ? diff.squareRoot() / norm : .infinity)
                                    }
                                    return (worst <= ncclTolerance ? nil : String(format: "relative error %.2e over %.0e", worst, ncclTolerance), worst)
                                })
            let result = try exercise(mode, floats: floats, bench, &failures)
            row.ncclError = result.error
            row.nccl = result.timings
        }
        if let peer {
            let outputs = try bench.poisoned(floats)
            let mode = CommMode(name: "peer", outputs: outputs,
                                enqueue: {
                                    for r in bench.ranks { try peer.enqueue(rank: r, input: inputs[r], output: outputs[r], count: floats, stream: bench.streams[r]) }
                                },
                                check: { got in (exactProblem(got, want, count: floats), nil) })
            let result = try exercise(mode, floats: floats, bench, &failures)
            row.peerExact = result.ok
            row.peer = result.timings
        }
        rows.append(row)
    }

    // 1000 calls back to back, sizes (so grids) and inputs changing every call, each into its
    // own output: a call that read a slot before a peer filled it, or after a peer refilled it
    // for a later call, sums another call's inputs. Two calls of three are programmatic
    // dependents that let the next call start early (PeerAllReduce.enqueue's `overlap`, as in a
    // decode step): their blocks are resident while the call before runs.
    var raceLine = "race: not run (no peer all-reduce)"
    if let peer {
        let raceSizes = [2880, 16384, 65536], sets = 5, calls = 1000, largest = raceSizes.max()!
        let setInputs = (0..<sets).map { _ in bench.ranks.map { _ in randomFloats(largest, &rng) } }
        let setWants = setInputs.map(rankOrderSum)
        let inputs = try setInputs.map { try bench.upload($0) }
        let outputs = try (0..<calls).map { _ in try bench.poisoned(largest) }
        try w.during("\(calls) back-to-back peer all-reduces", seconds: 60) {
            for i in 0..<calls {
                for r in bench.ranks {
                    try peer.enqueue(rank: r, input: inputs[i % sets][r], output: outputs[i][r], count: raceSizes[i % raceSizes.count], stream: bench.streams[r],
                                     overlap: i % 3 != 0)
                }
            }
            try bench.synchronize()
        }
        var wrong: [String] = []
        for i in 0..<calls {
            let got = try bench.download(outputs[i], floats: largest)
            if let p = exactProblem(got, setWants[i % sets], count: raceSizes[i % raceSizes.count]) { wrong.append("call \(i): \(p)") }
        }
        raceLine = wrong.isEmpty
            ? "race: \(calls) back-to-back peer all-reduces (\(raceSizes.map(String.init).joined(separator: "/")) floats, \(sets) input sets, 2 of 3 overlapping), every output bit-identical to the CPU on every GPU, the last (call \(calls - 1)) included"
            : "race: \(wrong.count) of \(calls) back-to-back peer all-reduces wrong; first: \(wrong[0])"
        if !wrong.isEmpty { failures.append(raceLine) }
    }

    // The all-reduce with the residual add and RMSNorm after it (peer_all_reduce_norm), as a
    // shard's step runs it at 2-16 tokens, between plain all-reduces on the same flags.
    var normLine = "norm: not run (no peer all-reduce)"
    if let peer {
        let (line, problems) = try w.during("peer all-reduces with the norm", seconds: 60) { try checkAllReduceNorm(peer, bench, &rng) }
        normLine = line
        failures += problems
    }

    // ncclCommDestroy runs here, under the watchdog, not at some later release.
    try w.during("destroying NCCL's communicators", seconds: 60) { nccl = nil }

    func cell(_ t: (micros: Double, hostPaced: Int)?) -> String {
        guard let t else { return "       -" }
        return String(format: "%8.2f", t.micros) + (t.hostPaced > 0 ? "*" : " ")
    }
    print("\ncomm: \(group.count) GPUs; us per call, median of \(roundsTimed) rounds of \(callsTimed) calls (the slowest GPU's events)")
    print("  " + String(repeating: " ", count: 9 + 11 + 14 + 12 + 3) + "NCCL, us per call".padding(toLength: 24, withPad: " ", startingAt: 0) + "peer, us per call")
    print("  floats        KiB   NCCL rel.err  peer = CPU     stream     graph          stream     graph")
    for r in rows {
        let err = r.ncclError.map { String(format: "%.2e", $0) } ?? "-"
        let exact = r.peerExact.map { $0 ? "bit-exact" : "WRONG" } ?? "-"
        print("  " + String(r.floats).padding(toLength: 9, withPad: " ", startingAt: 0)
              + String(format: "%8.1f   ", Double(4 * r.floats) / 1024)
              + err.padding(toLength: 14, withPad: " ", startingAt: 0) + exact.padding(toLength: 12, withPad: " ", startingAt: 0)
              + "   " + cell(r.nccl["stream"]) + " " + cell(r.nccl["graph"]) + "     " + cell(r.peer["stream"]) + " " + cell(r.peer["graph"]))
    }
    if rows.contains(where: { ($0.nccl.values.map(\.hostPaced) + $0.peer.values.map(\.hostPaced)).contains { $0 > 0 } }) {
        print("  * the host took most of the \(holdNanoseconds / 1_000_000) ms hold to queue a round: those calls may be host-paced")
    }
    print(raceLine)
    print(normLine)
    for f in failures { print("  failure: \(f)") }
    print(failures.isEmpty ? "comm PASS" : "comm FAIL")
    return failures.isEmpty
}

/// peer_all_reduce_norm on rows of hidden sizes and token counts a shard's step uses, each call
/// followed by a plain all-reduce (both advance the same epoch): `in` must be the rank-order
/// sum bit for bit, x its own x plus that sum bit for bit (f32 adds, as the CPU's), h the
/// RMSNorm of the new x within 1e-5 of the largest |h| (a sum of squares in another order,
/// rsqrtf). Half the calls overlap (programmatic launch), as in a step.
func checkAllReduceNorm(_ peer: PeerAllReduce, _ bench: CommBench, _ rng: inout SeededGenerator) throws -> (String, [String]) {
    let cases = [(1, 2880), (3, 4096), (8, 4096), (16, 2880), (5, 6144), (16, 8192)]
    let eps: Float = 1e-5, tolerance = 1e-5
    var problems: [String] = [], worst = 0.0
    for (c, (T, n)) in cases.enumerated() {
        let count = T * n
        let partials = bench.ranks.map { _ in randomFloats(count, &rng) }
        let xs = bench.ranks.map { _ in randomFloats(count, &rng) }
        let weight = randomFloats(n, &rng)
        let sum = rankOrderSum(partials)
        let plainInputs = bench.ranks.map { _ in randomFloats(2880, &rng) }
        let plainSum = rankOrderSum(plainInputs)
        let ins = try bench.upload(partials), x = try bench.upload(xs), w = try bench.upload(bench.ranks.map { _ in weight })
        let h = try bench.poisoned(count), plainIn = try bench.upload(plainInputs), plainOut = try bench.poisoned(2880)
        for r in bench.ranks {
            try peer.enqueueNorm(rank: r, input: ins[r], tokens: T, hidden: n, x: x[r].address, h: h[r].address, weight: w[r].address, eps: eps,
                                 stream: bench.streams[r], overlap: c % 2 == 1)
            try peer.enqueue(rank: r, input: plainIn[r], output: plainOut[r], count: 2880, stream: bench.streams[r], overlap: c % 2 == 1)
        }
        try bench.synchronize()
        let what = "norm, \(T) x \(n)"
        if let p = exactProblem(try bench.download(ins, floats: count), sum, count: count) { problems.append("\(what): the all-reduced rows: \(p)") }
        if let p = exactProblem(try bench.download(plainOut, floats: 2880), plainSum, count: 2880) { problems.append("\(what): the plain all-reduce after it: \(p)") }
        let gotX = try bench.download(x, floats: count), gotH = try bench.download(h, floats: count)
        for r in bench.ranks {
            var newX = xs[r]
            for i in 0..<count { newX[i] += sum[i] }
            if let p = exactProblem([gotX[r]], newX, count: count) { problems.append("\(what): rank \(r)'s x: \(p)") }
            var wantH = [Double](repeating: 0, count: count), largest = 0.0
            for t in 0..<T {
                let row = newX[(t * n)..<((t + 1) * n)].map(Double.init)
                let inv = 1 / (row.reduce(0) { $0 + $1 * $1 } / Double(n) + Double(eps)).squareRoot()
                for i in 0..<n { wantH[t * n + i] = Double(weight[i]) * row[i] * inv; largest = max(largest, abs(wantH[t * n + i])) }
            }
            let error = (0..<count).map { gotH[r][$0].isFinite ? abs(Double(gotH[r][$0]) - wantH[$0]) : .infinity }.max()! / largest
            worst = max(worst, error)
            if !(error <= tolerance) { problems.append(String(format: "\(what): rank \(r)'s h off by %.2e of its largest value (bound %.0e)", error, tolerance)) }
        }
    }
    let shapes = cases.map { "\($0.0)x\($0.1)" }.joined(separator: ", ")
    let line = problems.isEmpty
        ? String(format: "norm: all-reduce + residual add + RMSNorm (%@ rows x floats), each followed by a plain all-reduce: sums and x bit-identical to the CPU on every GPU, h within %.1e (bound %.0e)", shapes, worst, tolerance)
        : "norm: \(problems.count) problems; first: \(problems[0])"
    return (line, problems)
}
