// The MoE layer (Kernels/moe.cu through CUDAMoE) against the CPU's MoE.run on fresh random
// weights and inputs, and its time per call against the roofline of the experts it touched.
import Foundation
import Fulgur
import FulgurCUDA

/// Routing must not hinge on rounding: every token's input is redrawn until the k-th and
/// (k+1)-th selection scores (and, with groups, the kept and dropped group scores) differ by
/// at least this much. The CPU and the GPU sum the router products in different orders, so
/// they may swap two experts closer than about 1e-6.
let routingMargin: Float = 1e-3

struct MoEShape {
    enum Experts { case interleaved, halves, separate }
    let name: String
    let hidden: Int, experts: Int, intermediate: Int, topK: Int
    let routing: Routing
    let activation: Activation
    let storage: Experts
    let bf16Router: Bool, biases: Bool
    let timed: Bool
}

let moeShapes = [
    MoEShape(name: "gpt-oss-20b", hidden: 2880, experts: 32, intermediate: 2880, topK: 4, routing: .topKSoftmax,
             activation: .clampedSwiGLU(alpha: 1.702, limit: 7), storage: .interleaved, bf16Router: true, biases: true, timed: true),
    // MiMo-V2-Flash's MoE with 64 of its 256 experts (one card's memory for the timing copies).
    MoEShape(name: "mimo-like", hidden: 4096, experts: 64, intermediate: 2048, topK: 8,
             routing: .sigmoidWithBias(normalize: true, scaling: 2.5, groups: 1, topKGroups: 1),
             activation: .silu, storage: .separate, bf16Router: false, biases: false, timed: true),
    // What one GPU computes of MiMo-V2-Flash's MoE over 4 (tensor parallelism splits every
    // expert's intermediate dimension: 2048 / 4): all 256 experts, thin ones. The 8-token
    // verify step of the 4-GPU run spends most of its time here (bench/results, tenth-eleventh sessions).
    MoEShape(name: "mimo-shard4", hidden: 4096, experts: 256, intermediate: 512, topK: 8,
             routing: .sigmoidWithBias(normalize: true, scaling: 2.5, groups: 1, topKGroups: 1),
             activation: .silu, storage: .separate, bf16Router: false, biases: false, timed: true),
    // Correctness only: softmax-top-k with fused halves (Qwen3-MoE), and grouped sigmoid routing
    // (DeepSeek-V3) on small shapes.
    MoEShape(name: "qwen-like", hidden: 512, experts: 128, intermediate: 256, topK: 8, routing: .softmaxTopK(normalize: true),
             activation: .silu, storage: .halves, bf16Router: true, biases: false, timed: false),
    MoEShape(name: "grouped", hidden: 256, experts: 64, intermediate: 128, topK: 6,
             routing: .sigmoidWithBias(normalize: false, scaling: 1.5, groups: 8, topKGroups: 3),
             activation: .silu, storage: .separate, bf16Router: false, biases: true, timed: false),
    // MiMo-V2.5-Pro's router width (384 experts, the kernels' most) on a small shape.
    MoEShape(name: "pro-like", hidden: 512, experts: 384, intermediate: 128, topK: 8,
             routing: .sigmoidWithBias(normalize: true, scaling: 2.5, groups: 1, topKGroups: 1),
             activation: .silu, storage: .separate, bf16Router: false, biases: false, timed: false),
]

/// Stacked MXFP4 experts [E, rows, columns]: random codes, scales 2^-7 ... 2^-4 (products of
/// order 1 at these widths).
func randomExperts(_ name: String, experts: Int, rows: Int, columns: Int, _ rng: inout SeededGenerator) throws -> [LinearWeight] {
    let codes = HostBytes(experts * rows * columns / 2, &rng)
    let scales = HostBytes(experts * rows * columns / 32, &rng) { w in
        (0..<8).reduce(0) { $0 | (120 + (w >> (8 * $1)) & 3) << (8 * $1) }
    }
    return try (0..<experts).map {
        try LinearWeight(mxfp4: codes.view(name, .u8, [experts, rows, columns / 2]),
                         scales: scales.view(name + ".scales", .u8, [experts, rows, columns / 32]), expert: $0)
    }
}

func randomMoE(_ s: MoEShape, _ rng: inout SeededGenerator) throws -> MoEWeights {
    let E = s.experts, H = s.hidden, I = s.intermediate
    // Router entries uniform in ±6/sqrt(H): logits of standard deviation about 2 for x in ±1.
    let a = 6 / Float(H).squareRoot()
    let router: LinearWeight
    if s.bf16Router {
        let b = HostBytes(2 * E * H, &rng)
        let p = b.pointer.bindMemory(to: UInt16.self, capacity: E * H)
        for i in 0..<(E * H) {
            let v = Float(rng.nextUnit() * 2 - 1) * a
            p[i] = UInt16(v.bitPattern >> 16)
        }
        router = try LinearWeight(b.view("router", .bf16, [E, H]))
    } else {
        let b = HostBytes(4 * E * H, &rng)
        let p = b.pointer.bindMemory(to: Float.self, capacity: E * H)
        for i in 0..<(E * H) { p[i] = Float(rng.nextUnit() * 2 - 1) * a }
        router = try LinearWeight(b.view("router", .f32, [E, H]))
    }
    func small(_ n: Int, _ scale: Float) -> [Float] { (0..<n).map { _ in Float(rng.nextUnit() * 2 - 1) * scale } }
    let down = try randomExperts("down", experts: E, rows: H, columns: I, &rng)
    var experts: [ExpertWeights] = []
    switch s.storage {
    case .interleaved, .halves:
        let gu = try randomExperts("gate_up", experts: E, rows: 2 * I, columns: H, &rng)
        for e in 0..<E {
            experts.append(ExpertWeights(gateUp: gu[e], gate: nil, up: nil, down: down[e], gateUpBias: s.biases ? small(2 * I, 0.1) : nil,
                                         downBias: s.biases ? small(H, 0.1) : nil, interleaved: s.storage == .interleaved))
        }
    case .separate:
        let gate = try randomExperts("gate", experts: E, rows: I, columns: H, &rng)
        let up = try randomExperts("up", experts: E, rows: I, columns: H, &rng)
        for e in 0..<E {
            experts.append(ExpertWeights(gateUp: nil, gate: gate[e], up: up[e], down: down[e], gateUpBias: nil,
                                         downBias: s.biases ? small(H, 0.1) : nil, interleaved: false))
        }
    }
    let sigmoid = if case .sigmoidWithBias = s.routing { true } else { false }
    let spec = MoESpec(experts: E, topK: s.topK, intermediate: I, routing: s.routing, routerBias: s.biases && !sigmoid,
                       expertBias: s.biases, activation: s.activation, layout: s.storage == .interleaved ? .gptOss : s.storage == .halves ? .fusedGateUp : .perExpert)
    return MoEWeights(spec: spec, router: router, routerBias: spec.routerBias ? small(E, 0.5) : nil,
                      correctionBias: sigmoid ? small(E, 0.05) : nil, experts: experts)
}

/// The smallest gap at which a token's routing would change: k-th to (k+1)-th selection
/// score, and kept to dropped group score.
func routingGap(_ logits: ArraySlice<Float>, _ m: MoEWeights) -> Float {
    let k = m.spec.topK
    var choice = Array(logits)
    var gap = Float.infinity
    if case .sigmoidWithBias(_, _, let groups, let keep) = m.spec.routing {
        choice = zip(logits, m.correctionBias!).map { 1 / (1 + exp(-$0)) + $1 }
        if groups > 1 {
            let per = choice.count / groups
            let scores = (0..<groups).map { g in choice[(g * per)..<((g + 1) * per)].sorted(by: >).prefix(2).reduce(0, +) }
            let order = scores.indices.sorted { scores[$0] > scores[$1] }
            gap = scores[order[keep - 1]] - scores[order[keep]]
            for g in order[keep...] { for i in (g * per)..<((g + 1) * per) { choice[i] = -.infinity } }
        }
    }
    let sorted = choice.sorted(by: >)
    return min(gap, sorted[k - 1] - sorted[k])
}

/// One kernel version's result for a check: error against the CPU, tokens whose expert set
/// differs from MoE.route's, and (timed shapes) us per call launched plainly / overlapping the
/// previous kernel, and the median us of each kernel with events between the launches.
struct MoEResult {
    let error: Double; let routeMismatches: Int; let touched: Int
    let timings: [Timing]; let stages: [Double]
    var passed: Bool { error <= tolerance && routeMismatches == 0 }
}

struct MoERow {
    let shape: String; let tokens: Int; let bytes: Int
    /// Each version's kernel names (CUDAMoE.stageNames), for the table's header.
    let stageNames: [[String]]
    /// One per `moeVersions` entry.
    let results: [MoEResult]
}

/// Kernel versions checked and timed side by side: `FULGUR_MOE_VERSIONS` (comma-separated),
/// else 2, 4 and 7 (CUDAMoE.defaultVersion: its router launch routes, one token by one warp).
/// Versions 1 and 3 measured slower than 2 (Kernels/NOTES.md).
let moeVersions: [Int] = {
    let listed = ProcessInfo.processInfo.environment["FULGUR_MOE_VERSIONS"]?.split(separator: ",").compactMap { Int($0) } ?? []
    return listed.isEmpty ? [2, 4, 7] : listed
}()

/// us per call over 10 rounds of `calls` calls rotating over `copies`, each round queued behind
/// three 1 GiB copies so the events time the GPU, not the host's launch rate; the median round.
func timeMoE(_ copies: [CUDAMoE], _ x: DeviceBuffer, tokens t: Int, _ out: DeviceBuffer, overlap: Bool, _ device: CUDADevice,
             _ stream: CUDAStream, copy: Copy) throws -> Timing {
    let calls = 20
    let start = try device.makeEvent(), end = try device.makeEvent()
    for i in 0..<(2 * copies.count) { try copies[i % copies.count].run(x, tokens: t, into: out, stream: stream, overlapPrevious: overlap) }
    var times: [Double] = [], hostPaced = 0
    for _ in 0..<10 {
        for _ in 0..<3 { try copy.dst.copy(from: copy.src, bytes: copy.src.byteCount, stream: stream) }
        let queued = DispatchTime.now().uptimeNanoseconds
        try start.record(stream)
        for i in 0..<calls { try copies[i % copies.count].run(x, tokens: t, into: out, stream: stream, overlapPrevious: overlap) }
        try end.record(stream)
        let hostMicros = Double(DispatchTime.now().uptimeNanoseconds - queued) / 1e3
        if hostMicros > 0.8 * copy.micros(3 * copy.src.byteCount) { hostPaced += 1 }
        times.append(try end.milliseconds(since: start) * 1e3 / Double(calls))
    }
    return (median(times), 0, hostPaced)
}

/// Median us of each kernel of a call, from events recorded between plain launches (queued
/// behind copies as in timeMoE; 5 rounds of `calls`).
func timeStages(_ copies: [CUDAMoE], _ x: DeviceBuffer, tokens t: Int, _ out: DeviceBuffer, _ device: CUDADevice,
                _ stream: CUDAStream, copy: Copy) throws -> [Double] {
    let calls = 20, stages = copies[0].stageNames.count
    let events = try (0..<calls).map { _ in try (0...stages).map { _ in try device.makeEvent() } }
    var samples = [[Double]](repeating: [], count: stages)
    for _ in 0..<5 {
        for _ in 0..<3 { try copy.dst.copy(from: copy.src, bytes: copy.src.byteCount, stream: stream) }
        for i in 0..<calls { try copies[i % copies.count].run(x, tokens: t, into: out, stream: stream, stageEvents: events[i]) }
        for e in events {
            for s in 0..<stages { samples[s].append(try e[s + 1].milliseconds(since: e[s]) * 1e3) }
        }
    }
    return samples.map(median)
}

func checkMoE(_ device: CUDADevice, _ module: KernelModule, _ stream: CUDAStream, _ s: MoEShape, tokens: [Int],
              timed: [Int], copy: Copy, seed: UInt64) throws -> [MoERow] {
    var rng = SeededGenerator(seed: seed)
    let m = try randomMoE(s, &rng)
    let gpus = try moeVersions.map { try CUDAMoE(m, module: module, version: $0) }
    for g in gpus where g.version >= 2 { print("\(s.name): \(g.planDescription)") }
    let H = s.hidden, E = s.experts
    // Copies so that consecutive calls touch other weights: more than L2 between two reads.
    let copyCount = max(2, min(4, (2 << 30) / (E * gpus[0].expertBytes)))
    let copies = try gpus.map { g in timed.isEmpty ? [g] : [g] + (try (1..<copyCount).map { _ in try CUDAMoE(m, module: module, version: g.version) }) }
    var rows: [MoERow] = []
    for t in tokens {
        var x = [Float](repeating: 0, count: t * H)
        var logits = [Float](repeating: 0, count: t * E)
        for token in 0..<t {
            for _ in 0..<100 {
                for i in 0..<H { x[token * H + i] = Float(rng.nextUnit() * 2 - 1) }
                x[(token * H)..<((token + 1) * H)].withUnsafeBufferPointer { xp in
                    logits.withUnsafeMutableBufferPointer { l in
                        if let b = m.routerBias {
                            b.withUnsafeBufferPointer { m.router.apply(xp.baseAddress!, tokens: 1, bias: $0.baseAddress!, into: l.baseAddress! + token * E) }
                        } else {
                            m.router.apply(xp.baseAddress!, tokens: 1, into: l.baseAddress! + token * E)
                        }
                    }
                }
                if routingGap(logits[(token * E)..<((token + 1) * E)], m) >= routingMargin { break }
            }
        }
        var want = [Float](repeating: 0, count: t * H)
        x.withUnsafeMutableBufferPointer { xp in want.withUnsafeMutableBufferPointer { MoE.run(m, x: xp.baseAddress!, tokens: t, hidden: H, out: $0.baseAddress!) } }
        let xd = try x.withUnsafeBytes { try device.upload($0) }
        let out = try device.allocate(4 * t * H)
        var results: [MoEResult] = []
        for (v, gpu) in gpus.enumerated() {
            // A kernel that traps (moe2's hang watchdog) kills the context: the log's last line says where.
            print("moe: \(s.name) T = \(t) version \(gpu.version)")
            try out.fill(byte: 0xFF, stream: stream)  // NaN: an element the kernels skip fails the check
            try gpu.run(xd, tokens: t, into: out, stream: stream)
            try stream.synchronize()
            var got = [Float](repeating: 0, count: t * H)
            try got.withUnsafeMutableBytes { try out.download(into: $0) }
            let (chosen, touched) = try gpu.lastRoutes(tokens: t)
            var mismatches = 0
            for token in 0..<t {
                let cpu = MoE.route(Array(logits[(token * E)..<((token + 1) * E)]), m)
                if Set(cpu.map(\.expert)) != Set(chosen[token].map(\.expert)) { mismatches += 1 }
            }
            var diff = 0.0, norm = 0.0
            for i in 0..<got.count {
                let d = Double(got[i]) - Double(want[i])
                diff += d * d; norm += Double(want[i]) * Double(want[i])
            }
            let error = got.allSatisfy { $0.isFinite } ? (diff / norm).squareRoot() : .nan
            var timings: [Timing] = [], stages: [Double] = []
            if timed.contains(t) {
                for overlap in [false, true] { timings.append(try timeMoE(copies[v], xd, tokens: t, out, overlap: overlap, device, stream, copy: copy)) }
                stages = try timeStages(copies[v], xd, tokens: t, out, device, stream, copy: copy)
            }
            if timed.contains(t) && gpu.version >= 2 && [1, 4, 8, 12, 16].contains(t) { try printTrace(gpu, copies[v], xd, tokens: t, out, stream, shape: s.name) }
            results.append(MoEResult(error: error, routeMismatches: mismatches, touched: touched, timings: timings, stages: stages))
        }
        let bytes = results[0].touched * gpus[0].expertBytes + gpus[0].routerBytes
        rows.append(MoERow(shape: s.name, tokens: t, bytes: bytes, stageNames: gpus.map(\.stageNames), results: results))
    }
    return rows
}

/// One traced run of the experts kernel (after warm calls over the timing copies, behind a copy
/// as in timeMoE, plain launches): per phase, the median and largest SM clock count since a
/// block's entry, in thousands of clocks (about 2 per us at the H200's 1.98 GHz), and the spread
/// of the blocks' entry times.
func printTrace(_ gpu: CUDAMoE, _ copies: [CUDAMoE], _ x: DeviceBuffer, tokens t: Int, _ out: DeviceBuffer, _ stream: CUDAStream, shape: String) throws {
    for c in copies { try c.run(x, tokens: t, into: out, stream: stream, overlapPrevious: false) }
    try gpu.setTracing(true)
    defer { try? gpu.setTracing(false) }
    try gpu.run(x, tokens: t, into: out, stream: stream, overlapPrevious: false)
    try stream.synchronize()
    let blocks = try gpu.lastTrace(tokens: t)
    guard !blocks.isEmpty else { return }
    let entry = blocks.map { $0[0] }, first = entry.min()!
    let names = ["routed", "unit 0", "gate_up", "down wait", "consumed", "signaler", "producer"]
    var line = "trace \(shape) T = \(t) v\(gpu.version): entry spread \(String(format: "%.2f", Double(entry.max()! - first) / 1e3)) us; kclocks median/max:"
    for (i, n) in names.enumerated() {
        let v = blocks.map { Double($0[i + 1]) / 1e3 }.filter { $0 > 0 }.sorted()
        if v.isEmpty { continue }
        line += String(format: " %@ %.1f/%.1f", n, v[v.count / 2], v.last!)
    }
    print(line)
}

/// Checks and times every MoE shape with both kernel versions; prints the table; true when all pass.
func runMoE(_ device: CUDADevice, _ module: KernelModule, _ stream: CUDAStream, copy: Copy, seed: UInt64) throws -> Bool {
    var rows: [MoERow] = []
    // FULGUR_MOE_SHAPES (names, comma-separated) and FULGUR_MOE_TOKENS narrow a run (a device
    // call's minutes); the NaN routing check always runs.
    let env = ProcessInfo.processInfo.environment
    let shapeFilter = env["FULGUR_MOE_SHAPES"].map { Set($0.split(separator: ",").map(String.init)) }
    // Every entry must be a step size: one that is not ("8x", an empty one) is an error, not dropped.
    let tokenEntries = env["FULGUR_MOE_TOKENS"]?.split(separator: ",", omittingEmptySubsequences: false)
        .map { $0.trimmingCharacters(in: .whitespaces) }
    let tokenFilter = tokenEntries?.compactMap { Int($0) }
    if let unknown = shapeFilter?.subtracting(moeShapes.map(\.name)), !unknown.isEmpty {
        print("MoE FAIL: FULGUR_MOE_SHAPES names no shape \(unknown.sorted()) (shapes: \(moeShapes.map(\.name).joined(separator: ", ")))")
        return false
    }
    if let tokenEntries, let tokenFilter,
       tokenFilter.count != tokenEntries.count || tokenFilter.isEmpty || !tokenFilter.allSatisfy({ (1...16).contains($0) }) {
        print("MoE FAIL: FULGUR_MOE_TOKENS takes step sizes from 1 to 16, comma-separated (got \(tokenEntries))")
        return false
    }
    for (i, s) in moeShapes.enumerated() where shapeFilter?.contains(s.name) ?? true {
        let tokens = tokenFilter ?? [1, 2, 3, 4, 5, 8, 12, 16]
        rows += try checkMoE(device, module, stream, s, tokens: tokens, timed: s.timed ? tokens : [], copy: copy, seed: seed + UInt64(i))
    }
    let checks = rows.count * moeVersions.count
    let failed = rows.filter { !$0.results.allSatisfy(\.passed) }
    func pct(_ roof: Double, _ us: Double) -> String { String(format: "%7.2f %5.1f%%", us, 100 * roof / us) }
    print("\nMoE (Kernels/moe.cu), seed base \(seed); tolerance ‖gpu − cpu‖/‖cpu‖ <= \(tolerance), routed expert sets identical")
    print("roofline: router + touched experts' bytes over the copy bandwidth (\(String(format: "%.0f", copy.gbps)) GB/s); us per call (% of roofline)")
    print("plain: cuLaunchKernel; overlap: each kernel a programmatic dependent of the one before; kernels: median us of each, events between plain launches")
    print("shape        T  experts      MB  roofline | rel.err " + moeVersions.map { "v\($0)" .padding(toLength: 9, withPad: " ", startingAt: 0) }.joined() + "| "
          + moeVersions.map { "v\($0) plain        v\($0) overlap      | " }.joined()
          + zip(moeVersions, rows.first?.stageNames ?? []).map { v, names in "v\(v) " + names.joined(separator: " ") + " | " }.joined())
    for r in rows where !r.results[0].timings.isEmpty || failed.contains(where: { $0.shape == r.shape && $0.tokens == r.tokens }) {
        let roof = copy.micros(r.bytes) / 2
        var line = r.shape.padding(toLength: 11, withPad: " ", startingAt: 0)
            + String(format: "%3d  %7d  %6.1f  %8.2f |", r.tokens, r.results[0].touched, Double(r.bytes) / 1e6, roof)
            + r.results.map { String(format: " %.2e", $0.error) }.joined() + " |"
        for res in r.results {
            line += res.timings.map { " " + pct(roof, $0.micros) + ($0.hostPaced > 0 ? " (host-paced \($0.hostPaced)/10)" : "") }.joined() + " |"
        }
        for res in r.results { line += res.stages.map { String(format: " %6.2f", $0) }.joined() + " |" }
        for (v, res) in r.results.enumerated() where res.routeMismatches > 0 || res.touched != r.results[0].touched {
            line += "  v\(moeVersions[v]): ROUTING DIFFERS for \(res.routeMismatches) tokens, \(res.touched) experts touched"
        }
        print(line)
    }
    for v in moeVersions.indices {
        print("MoE v\(moeVersions[v]): \(rows.count) checks (T = \(Set(rows.map(\.tokens)).sorted().map(String.init).joined(separator: ", ")) on \(Set(rows.map(\.shape)).sorted().joined(separator: ", "))), worst rel.err \(String(format: "%.2e", rows.map { $0.results[v].error }.max() ?? 0)), \(rows.filter { !$0.results[v].passed }.count) failed")
    }
    print(failed.isEmpty ? "MoE PASS: \(checks) checks" : "MoE FAIL: \(failed.count) of \(rows.count) shapes x T (\(checks) checks)")
    let nanPassed = try checkNaNRouting(device, module, stream, seed: seed + 500)
    return failed.isEmpty && nanPassed
}

/// A token whose activations are NaN (a diverged model) must give NaN outputs, not a fault:
/// every version, every shape, 3 tokens with the middle one all NaN. Before the router ranked
/// NaN below every number, the lanes' argmax disagreed and an expert index of INT_MAX was read.
func checkNaNRouting(_ device: CUDADevice, _ module: KernelModule, _ stream: CUDAStream, seed: UInt64) throws -> Bool {
    var rng = SeededGenerator(seed: seed)
    var failures: [String] = []
    for s in moeShapes {
        let m = try randomMoE(s, &rng)
        let T = 3, H = s.hidden
        var x = (0..<(T * H)).map { _ in Float(rng.nextUnit() * 2 - 1) }
        for i in H..<(2 * H) { x[i] = .nan }
        let xd = try x.withUnsafeBytes { try device.upload($0) }
        let out = try device.allocate(4 * T * H)
        for v in moeVersions {
            let gpu = try CUDAMoE(m, module: module, version: v)
            try gpu.run(xd, tokens: T, into: out, stream: stream)
            try stream.synchronize()
            var got = [Float](repeating: 0, count: T * H)
            try got.withUnsafeMutableBytes { try out.download(into: $0) }
            let routes = try gpu.lastRoutes(tokens: T).chosen
            let validExperts = routes.allSatisfy { $0.allSatisfy { (0..<s.experts).contains($0.expert) } }
            let finiteOthers = got[0..<H].allSatisfy(\.isFinite) && got[(2 * H)...].allSatisfy(\.isFinite)
            let nanMiddle = got[H..<(2 * H)].contains { $0.isNaN }
            if !(validExperts && finiteOthers && nanMiddle) {
                failures.append("\(s.name) v\(v): experts valid \(validExperts), other tokens finite \(finiteOthers), NaN token gives NaN \(nanMiddle)")
            }
        }
    }
    for f in failures { print("MoE NaN routing: \(f)") }
    print(failures.isEmpty ? "MoE NaN routing PASS: \(moeShapes.count * moeVersions.count) checks" : "MoE NaN routing FAIL: \(failures.count)")
    return failures.isEmpty
}
