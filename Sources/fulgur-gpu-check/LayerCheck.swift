// The per-layer kernels (Kernels/norm.cu, attention.cu, sampling.cu) against the CPU
// executor's own code (CPUExecutor's public per-layer math, Activations.glu, Dequant.row,
// Sampler.argmax) on fresh random inputs. Each kernel is launched as CUDAExecutor.lower
// launches it: the same arguments in the same order, grid, block and dynamic shared memory,
// each launch overlapping the previous kernel; attention_prep and attention_decode run back
// to back as in a step, so the decode reads keys the prep just wrote. Outputs (and the
// attention's per-split scratch) are NaN-poisoned before the launch and every element is
// compared, so a skipped or misplaced write fails.
import Foundation
import Fulgur
import FulgurCUDA

/// Bounds on the worst row's ‖gpu − cpu‖ / ‖cpu‖ (a row: a token's hidden vector, or one
/// head). Embedding rows, residual adds, the value scale and argmax are one IEEE operation per
/// element or none on both sides, so they must match bit for bit. RMSNorm, RoPE and the GLU
/// differ only by the order of a row's sum of squares, rsqrtf against 1 / sqrt, FMA
/// contraction and expf: a few ulp per element, about 1e-7 per row; bound 1e-5.
let layerNormTolerance = 1e-5
/// Attention sums up to a few thousand keys per query in another order, merges the split
/// shares rescaled by exp(m_s - M), and starts from the GPU's own rotated q and keys: a few
/// 1e-6 per head (3e-6 from a Swift port of the kernel's split-and-merge); bound 1e-4.
let layerAttentionTolerance = 1e-4

/// The steps the executor's buffers and cache rings are sized for (CUDAExecutor's default
/// maxStepTokens): a sliding layer's ring holds window + 16 positions.
let layerStepTokens = 16
let layerTokenCounts = [1, 3, 8, 16]
/// Attention adds 4, version 3's smallest step: the most splits, so MiMo's group of 16 query
/// heads (16 splits at 1024 positions) merges its shares in two batches of heads.
let attentionTokenCounts = [1, 3, 4, 8, 16]

/// One checked launch (or prep + decode pair): each comparison's error against its bound;
/// bound 0 means bit for bit, and the error counts the elements that differ.
struct LayerCase {
    let name: String
    var parts: [(label: String, error: Double, bound: Double)] = []

    init(_ name: String) { self.name = name }

    var passed: Bool { parts.allSatisfy { $0.error <= $0.bound } }

    mutating func exact(_ label: String, _ got: [Float], _ want: [Float]) {
        let differ = got.count != want.count ? max(got.count, want.count, 1)
            : zip(got, want).reduce(0) { $0 + ($1.0.bitPattern == $1.1.bitPattern ? 0 : 1) }
        parts.append((label, Double(differ), 0))
    }

    mutating func exact(_ label: String, _ got: [Int32], _ want: [Int32]) {
        let differ = got.count != want.count ? max(got.count, want.count, 1) : zip(got, want).reduce(0) { $0 + ($1.0 == $1.1 ? 0 : 1) }
        parts.append((label, Double(differ), 0))
    }

    /// Worst row of `width` floats; NaN (a failure) when any element of `got` is not finite.
    mutating func close(_ label: String, _ got: [Float], _ want: [Float], width: Int, bound: Double) {
        parts.append((label, worstRowError(got, want, width: width), bound))
    }

    var line: String {
        let detail = parts.map { p in
            p.bound == 0 ? "\(p.label) " + (p.error == 0 ? "bitwise" : "\(Int(p.error)) DIFFER")
                : "\(p.label) " + String(format: "%.1e", p.error) + (p.error <= p.bound ? "" : " OVER \(p.bound)")
        }
        return "layer: \(name): " + detail.joined(separator: ", ") + (passed ? "  ok" : "  FAIL")
    }
}

/// The executor's launches: its `launch` closure (CUDAExecutor.lower), block (threads, 1, 1),
/// overlapping the previous kernel.
struct LayerKernels {
    let device: CUDADevice, module: KernelModule, stream: CUDAStream
    let functions: [String: KernelModule.Function]

    init(_ device: CUDADevice, _ module: KernelModule, _ stream: CUDAStream) throws {
        self.device = device
        self.module = module
        self.stream = stream
        let names = ["embed", "add_rmsnorm", "add_inplace", "glu", "attention_prep", "attention_decode_g1", "attention_decode_g2", "attention_decode_g4",
                     "attention_decode_g8", "attention_decode_g16", "attention_decode_v2", "attention_decode_h1", "attention_decode_h1p", "argmax"]
        functions = try Dictionary(uniqueKeysWithValues: names.map { ($0, try module.function($0)) })
    }

    func launch(_ name: String, _ grid: (Int, Int, Int), _ block: Int, _ shared: Int, _ args: [KernelModule.Argument]) throws {
        guard let f = functions[name] else { throw FulgurError(.usage, "gpu-check layer: kernel \(name) is not in LayerKernels' list") }
        try module.launch(f, grid: grid, block: (block, 1, 1), sharedBytes: shared, stream: stream, overlapPrevious: true, args)
    }

    /// A device copy; synchronous (and the device synchronized before launching, so copies the
    /// driver staged from pageable memory have landed).
    func upload<T>(_ values: [T]) throws -> DeviceBuffer {
        precondition(!values.isEmpty)
        return try values.withUnsafeBytes { try device.upload($0) }
    }

    /// `bytes` of NaN floats (or -1 ints): whatever the kernel leaves unwritten fails the comparison.
    func poisoned(_ bytes: Int) throws -> DeviceBuffer {
        let b = try device.allocate(bytes)
        try b.fill(byte: 0xFF, stream: stream)
        return b
    }

    /// Waits for the stream and reads `count` elements back.
    func download<T>(_ b: DeviceBuffer, _ count: Int, _ zero: T) throws -> [T] {
        try stream.synchronize()
        var a = [T](repeating: zero, count: count)
        try a.withUnsafeMutableBytes { try b.download(into: $0) }
        return a
    }
}

// MARK: Embedding, residual adds, RMSNorm, GLU, argmax

func checkEmbed(_ k: LayerKernels, _ rng: inout SeededGenerator) throws -> [LayerCase] {
    var cases: [LayerCase] = []
    let vocab = 1000
    for (dtype, code) in [(DType.f32, Int32(0)), (.bf16, 1), (.f16, 2)] {
        for hidden in [2880, 100] {
            // Random bit patterns, every finite value (subnormals too): the conversion is a copy.
            let rowBytes = dtype.byteCount(elements: hidden)
            var table = [UInt8](repeating: 0, count: vocab * rowBytes)
            table.withUnsafeMutableBytes { b in
                for i in 0..<(vocab * hidden) {
                    let r = rng.next()
                    switch dtype {
                    case .f32:
                        var w = UInt32(truncatingIfNeeded: r)
                        if w & 0x7F80_0000 == 0x7F80_0000 { w ^= 0x0080_0000 }
                        b.storeBytes(of: w, toByteOffset: 4 * i, as: UInt32.self)
                    case .bf16:
                        var h = UInt16(truncatingIfNeeded: r)
                        if h & 0x7F80 == 0x7F80 { h ^= 0x0080 }
                        b.storeBytes(of: h, toByteOffset: 2 * i, as: UInt16.self)
                    default:
                        var h = UInt16(truncatingIfNeeded: r)
                        if h & 0x7C00 == 0x7C00 { h ^= 0x0400 }
                        b.storeBytes(of: h, toByteOffset: 2 * i, as: UInt16.self)
                    }
                }
            }
            let tableBuffer = try k.upload(table)
            for T in layerTokenCounts {
                let tokens = (0..<T).map { $0 == 0 ? vocab - 1 : Int(rng.next() % UInt64(vocab)) }
                let tokenBuffer = try k.upload(tokens.map { Int32($0) })
                let x = try k.poisoned(4 * T * hidden)
                try k.device.synchronize()
                try k.launch("embed", (T, 1, 1), 256, 0, [.pointer(tableBuffer.address), .int32(code), .pointer(tokenBuffer.address), .int32(Int32(hidden)), .pointer(x.address)])
                let got = try k.download(x, T * hidden, Float(0))
                var want = [Float](repeating: 0, count: T * hidden)
                table.withUnsafeBytes { t in
                    want.withUnsafeMutableBufferPointer { w in
                        for (i, id) in tokens.enumerated() { Dequant.row(dtype, t.baseAddress! + id * rowBytes, hidden, w.baseAddress! + i * hidden) }
                    }
                }
                var c = LayerCase("embed \(dtype.rawValue) hidden \(hidden) T=\(T)")
                c.exact("x", got, want)
                cases.append(c)
            }
        }
    }
    return cases
}

func checkNorms(_ k: LayerKernels, _ rng: inout SeededGenerator) throws -> [LayerCase] {
    var cases: [LayerCase] = []
    // Widths: gpt-oss, MiMo, ragged, fewer than a block's threads. In place: the DFlash
    // drafter's context norm of h into h.
    let shapes: [(n: Int, add: Bool, inPlace: Bool)] = [(2880, true, false), (2880, false, false), (4096, true, false), (100, true, false),
                                                        (5, false, false), (2880, false, true), (9000, true, false)]
    let eps: Float = 1e-5
    // 1024 threads as the executor launches it (rows in registers); 256 also takes the loop
    // for rows wider than 8 * 256.
    for s in shapes {
        for threads in [1024, 256] {
        for T in layerTokenCounts {
            let n = s.n
            let x = randomFloats(T * n, &rng).map { $0 * 3 }, add = randomFloats(T * n, &rng), w = randomFloats(n, &rng).map { 1 + $0 / 2 }
            let xb = try k.upload(x), wb = try k.upload(w)
            let addb = s.add ? try k.upload(add) : nil
            let dst = s.inPlace ? xb : try k.poisoned(4 * T * n)
            try k.device.synchronize()
            try k.launch("add_rmsnorm", (T, 1, 1), threads, 0, [.pointer(xb.address), .pointer(addb?.address ?? 0), .pointer(dst.address), .pointer(wb.address),
                                                          .int32(Int32(n)), .float(eps)])
            let gotX = try k.download(xb, T * n, Float(0)), gotDst = try k.download(dst, T * n, Float(0))
            // The CPU's residual op (x += src), then its RMSNorm.
            var xr = x
            if s.add { for i in xr.indices { xr[i] += add[i] } }
            var want = [Float](repeating: 0, count: T * n)
            CPUExecutor.rmsNorm(xr, &want, rows: T, weight: w, eps: eps)
            var c = LayerCase("add_rmsnorm n \(n)\(s.add ? " + residual" : "")\(s.inPlace ? " in place" : "") T=\(T) \(threads) threads")
            if s.inPlace {
                c.close("x", gotX, want, width: n, bound: layerNormTolerance)
            } else {
                c.exact("x", gotX, xr)
                c.close("dst", gotDst, want, width: n, bound: layerNormTolerance)
            }
            cases.append(c)
        }
        }
    }
    // add_inplace over T rows, with floats past the end that must stay as they were.
    let hidden = 2880, tail = 300
    for T in layerTokenCounts {
        let x = randomFloats(T * hidden + tail, &rng), src = randomFloats(T * hidden, &rng)
        let xb = try k.upload(x), sb = try k.upload(src)
        try k.device.synchronize()
        try k.launch("add_inplace", ((T * hidden + 255) / 256, 1, 1), 256, 0, [.pointer(xb.address), .pointer(sb.address), .int32(Int32(T * hidden))])
        let got = try k.download(xb, x.count, Float(0))
        var want = x
        for i in 0..<(T * hidden) { want[i] += src[i] }
        var c = LayerCase("add_inplace hidden \(hidden) T=\(T)")
        c.exact("x", got, want)
        cases.append(c)
    }
    return cases
}

func checkGLU(_ k: LayerKernels, _ rng: inout SeededGenerator) throws -> [LayerCase] {
    var cases: [LayerCase] = []
    // (this layer's width, the widest layer's: the gate|up rows are 2 * widest apart)
    let shapes: [(inter: Int, widest: Int, activation: Activation)] = [
        (2880, 2880, .clampedSwiGLU(alpha: 1.702, limit: 7)), (1536, 2048, .silu), (100, 100, .clampedSwiGLU(alpha: 1.702, limit: 7)), (100, 128, .silu),
    ]
    for s in shapes {
        for T in layerTokenCounts {
            let n = s.inter, stride = 2 * s.widest
            let gu = randomFloats(T * stride, &rng).map { $0 * 10 }  // past the clamp at 7
            let gub = try k.upload(gu), act = try k.poisoned(4 * T * n)
            let (clamped, alpha, limit) = CUDAMoE.activationArguments(s.activation)
            try k.device.synchronize()
            try k.launch("glu", ((T * n + 255) / 256, 1, 1), 256, 0, [
                .pointer(gub.address), .int32(Int32(n)), .int32(Int32(stride)), .pointer(act.address), .int32(Int32(T)), .int32(clamped), .float(alpha), .float(limit)])
            let got = try k.download(act, T * n, Float(0))
            var want = [Float](repeating: 0, count: T * n)
            for t in 0..<T { for i in 0..<n { want[t * n + i] = Activations.glu(gu[t * stride + i], gu[t * stride + n + i], s.activation) } }
            var c = LayerCase("glu \(s.activation == .silu ? "silu" : "clamped") inter \(n) of \(s.widest) T=\(T)")
            c.close("act", got, want, width: n, bound: layerNormTolerance)
            cases.append(c)
        }
    }
    return cases
}

func checkArgmax(_ k: LayerKernels, _ rng: inout SeededGenerator) throws -> [LayerCase] {
    var cases: [LayerCase] = []
    for vocab in [201088, 151936, 1000, 37] {
        for T in layerTokenCounts {
            var logits = randomFloats(T * vocab, &rng).map { $0 * 10 }
            // Rows by t % 6: plain; a tie (the first wins); NaNs (index 0 among them), which
            // never win; the maximum at the last index; all -inf; all NaN (both say 0).
            for t in 0..<T {
                let row = t * vocab
                switch t % 6 {
                case 1:
                    let a = Int(rng.next() % UInt64(vocab - 1)), b = a + 1 + Int(rng.next() % UInt64(vocab - 1 - a))
                    logits[row + a] = 100; logits[row + b] = 100
                case 2:
                    for i in stride(from: 0, to: vocab, by: 3) { logits[row + i] = .nan }
                case 3:
                    logits[row + vocab - 1] = 100
                case 4:
                    for i in 0..<vocab { logits[row + i] = -.infinity }
                case 5:
                    for i in 0..<vocab { logits[row + i] = .nan }
                default:
                    break
                }
            }
            let lb = try k.upload(logits), ids = try k.poisoned(4 * T)
            try k.device.synchronize()
            try k.launch("argmax", (CUDAExecutor.argmaxSplits, T, 1), 1024, 0, [.pointer(lb.address), .int32(Int32(vocab)), .pointer(ids.address)])
            let got = try k.download(ids, T, Int32(0))
            let want = (0..<T).map { t in Int32(Sampler.argmax(Array(logits[(t * vocab)..<((t + 1) * vocab)]))) }
            var c = LayerCase("argmax vocab \(vocab) T=\(T)")
            c.exact("ids", got, want)
            cases.append(c)
        }
    }
    return cases
}

// MARK: Attention

/// One layer shape; checked at each start position with T = 1, 3, 8, 16 tokens.
struct AttentionCase {
    let name: String
    let heads: Int, kvHeads: Int, headDim: Int, valueDim: Int
    let window: Int?
    let sinks: Bool, causal: Bool, qkNorm: Bool
    let rope: RoPESpec
    let valueScale: Float
    /// The context: a full layer's cache holds this many positions.
    let maxPositions: Int
    let starts: [Int]
    /// false: the DFlash drafter's context rows (storeKV): keys and values into the cache, no queries.
    var attend = true
    /// Floats after a token's q | k | v: the executor's region is as wide as its widest layer's.
    var pad = 0
}

/// gpt-oss's YaRN: low frequencies interpolated by the factor 32, cos and sin times 0.1 ln 32 + 1.
func yarnLike() -> RoPESpec {
    var r = RoPESpec.standard(theta: 150_000, rotaryDim: 64)
    r.inverseFrequencies = r.inverseFrequencies.enumerated().map { $0 < 12 ? $1 : $1 / 32 }
    r.attentionFactor = 0.1 * log(32.0) + 1
    return r
}

let attentionCases: [AttentionCase] = [
    // Ring of 128 + 16 (2 splits): from position 0, across the ring's end (427 + 16 > 3 * 144), far past it.
    AttentionCase(name: "gpt-oss sliding 64/8 heads d64 sinks", heads: 64, kvHeads: 8, headDim: 64, valueDim: 64, window: 128, sinks: true,
                  causal: true, qkNorm: false, rope: yarnLike(), valueScale: 1, maxPositions: 4096, starts: [0, 5, 427, 1000]),
    AttentionCase(name: "gpt-oss full 64/8 heads d64 sinks", heads: 64, kvHeads: 8, headDim: 64, valueDim: 64, window: nil, sinks: true,
                  causal: true, qkNorm: false, rope: yarnLike(), valueScale: 1, maxPositions: 8192, starts: [0, 7000]),
    AttentionCase(name: "MiMo sliding 4/1 heads qk192 v128 rope64 sinks", heads: 4, kvHeads: 1, headDim: 192, valueDim: 128, window: 128, sinks: true,
                  causal: true, qkNorm: false, rope: .standard(theta: 10_000, rotaryDim: 64), valueScale: 0.707, maxPositions: 4096,
                  starts: [0, 427, 1000]),
    AttentionCase(name: "MiMo full 4/1 heads qk192 v128 rope64", heads: 4, kvHeads: 1, headDim: 192, valueDim: 128, window: nil, sinks: false,
                  causal: true, qkNorm: false, rope: .standard(theta: 5_000_000, rotaryDim: 64), valueScale: 0.707, maxPositions: 1024,
                  starts: [0, 700], pad: 96),
    // Groups of 16 query heads (MiMo's full layers: 64 over 4 KV heads, 108 KB of shared memory
    // a block), of 1, and of 3 (padded to 4) with key rows not a multiple of 8 floats and value
    // rows not of 4 (the 4-byte copy paths).
    AttentionCase(name: "MiMo full 64/4 heads qk192 v128 rope64 sinks", heads: 64, kvHeads: 4, headDim: 192, valueDim: 128, window: nil,
                  sinks: true, causal: true, qkNorm: false, rope: .standard(theta: 5_000_000, rotaryDim: 64), valueScale: 0.707,
                  maxPositions: 1024, starts: [0, 700]),
    // The same at a long context: long-context steps take version 3 at every T, up to 64 splits.
    AttentionCase(name: "MiMo full 64/4 heads qk192 v128 rope64 sinks, long", heads: 64, kvHeads: 4, headDim: 192, valueDim: 128, window: nil,
                  sinks: true, causal: true, qkNorm: false, rope: .standard(theta: 5_000_000, rotaryDim: 64), valueScale: 0.707,
                  maxPositions: 8192, starts: [5000]),
    AttentionCase(name: "group of 1: 8/8 heads d64 sinks", heads: 8, kvHeads: 8, headDim: 64, valueDim: 64, window: 128, sinks: true,
                  causal: true, qkNorm: false, rope: .standard(theta: 10_000, rotaryDim: 64), valueScale: 1, maxPositions: 4096,
                  starts: [0, 427]),
    AttentionCase(name: "group of 3: 6/2 heads qk100 v98", heads: 6, kvHeads: 2, headDim: 100, valueDim: 98, window: nil, sinks: false,
                  causal: true, qkNorm: false, rope: .standard(theta: 10_000, rotaryDim: 64), valueScale: 1, maxPositions: 512,
                  starts: [0, 300], pad: 3),
    AttentionCase(name: "Qwen3 16/8 heads d128 q/k norm", heads: 16, kvHeads: 8, headDim: 128, valueDim: 128, window: nil, sinks: false,
                  causal: true, qkNorm: true, rope: .standard(theta: 1_000_000, rotaryDim: 128), valueScale: 1, maxPositions: 2048,
                  starts: [3, 1500]),
    AttentionCase(name: "Llama 8/2 heads d64 interleaved", heads: 8, kvHeads: 2, headDim: 64, valueDim: 64, window: nil, sinks: false,
                  causal: true, qkNorm: false, rope: .standard(theta: 10_000, rotaryDim: 64, style: .interleaved), valueScale: 1,
                  maxPositions: 512, starts: [0, 300], pad: 24),
    // The DFlash drafter: queries also see the step's later keys (up to the window).
    AttentionCase(name: "DFlash non-causal window 32 16/4 heads d128 q/k norm sinks", heads: 16, kvHeads: 4, headDim: 128, valueDim: 128,
                  window: 32, sinks: true, causal: false, qkNorm: true, rope: .standard(theta: 1_000_000, rotaryDim: 128), valueScale: 1,
                  maxPositions: 1024, starts: [0, 200]),
    AttentionCase(name: "DFlash non-causal full 16/4 heads d128 q/k norm", heads: 16, kvHeads: 4, headDim: 128, valueDim: 128, window: nil,
                  sinks: false, causal: false, qkNorm: true, rope: .standard(theta: 1_000_000, rotaryDim: 128), valueScale: 1,
                  maxPositions: 1024, starts: [0, 600]),
    AttentionCase(name: "DFlash context keys/values 4 kv heads d128 k norm", heads: 16, kvHeads: 4, headDim: 128, valueDim: 128, window: nil,
                  sinks: false, causal: false, qkNorm: true, rope: .standard(theta: 1_000_000, rotaryDim: 128), valueScale: 1,
                  maxPositions: 1024, starts: [0, 500], attend: false),
]

/// attention_prep then attention_decode over a cache of random keys and values, against the
/// CPU's ops for the layer: head norms, RoPE, value scale, the cache write, attention.
/// `fusedPrep`: attention_decode_h1p alone (attention_prep's work in the attention launch, as
/// the executor runs one sequence's 1-token step; the kernel takes 1-3 tokens) instead of
/// attention_prep and then the kernel attentionShape picks; the q/k/v rows are then left as
/// they were.
///
/// `long`: the kernel and grid of a long-context step (CUDAExecutor.longContextPositions, at the default threshold).
func checkAttention(_ k: LayerKernels, _ a: AttentionCase, start: Int, tokens T: Int, fusedPrep: Bool = false, long: Bool = false,
                    _ rng: inout SeededGenerator) throws -> LayerCase {
    let S = layerStepTokens
    precondition(T <= S && start + T <= a.maxPositions)
    // CUDAExecutor.Cache (and KVCache.capacity): a sliding layer keeps a ring of window + S.
    let capacity = a.window.map { min($0 + S, a.maxPositions) } ?? a.maxPositions
    let positions = Array(start..<(start + T))
    // The executor's region: a token's row is [q | k | v] (keys and values only for storeKV),
    // `stride` floats apart.
    let heads = a.attend ? a.heads : 0
    let qW = heads * a.headDim, kW = a.kvHeads * a.headDim, vW = a.kvHeads * a.valueDim
    let stride = qW + kW + vW + a.pad
    let (qOff, kOff, vOff) = (0, qW, qW + kW)
    func part(_ rows: [Float], _ offset: Int, _ width: Int) -> [Float] {
        (0..<T).flatMap { t in rows[(t * stride + offset)..<(t * stride + offset + width)] }
    }

    // q at 3x the keys' scale, so logits spread over a few units (the softmax is not flat).
    var region = [Float](repeating: 0, count: T * stride)
    for t in 0..<T {
        for i in 0..<stride { region[t * stride + i] = Float(rng.nextUnit() * 2 - 1) * (i < qW ? 3 : 1) }
    }
    let keys = randomFloats(capacity * kW, &rng), values = randomFloats(capacity * vW, &rng)
    let qNorm = a.qkNorm && a.attend ? randomFloats(a.headDim, &rng).map { 1 + $0 / 2 } : nil
    let kNorm = a.qkNorm ? randomFloats(a.headDim, &rng).map { 1 + $0 / 2 } : nil
    let sinks = a.sinks && a.attend ? (0..<heads).map { _ in Float(rng.nextUnit() * 4 - 1) } : nil
    let eps: Float = 1e-6, scale = 1 / Float(a.headDim).squareRoot()

    let regionBuffer = try k.upload(region), cacheK = try k.upload(keys), cacheV = try k.upload(values)
    let positionBuffer = try k.upload(positions.map { Int32($0) })
    let qn = try qNorm.map { try k.upload($0) }, kn = try kNorm.map { try k.upload($0) }, sinkBuffer = try sinks.map { try k.upload($0) }
    let freq = a.rope.inverseFrequencies.isEmpty ? nil : try k.upload(a.rope.inverseFrequencies)
    let counters = try k.upload([Int32](repeating: 0, count: S * max(heads, 1)))
    let attn = try k.poisoned(4 * T * max(heads, 1) * a.valueDim)
    let partial = try k.poisoned(4 * T * max(heads, 1) * CUDAExecutor.groupedLongMaxSplits * (a.valueDim + 2))
    try k.device.synchronize()

    let q = regionBuffer.address + UInt64(4 * qOff), kp = regionBuffer.address + UInt64(4 * kOff), v = regionBuffer.address + UInt64(4 * vOff)
    let s32 = Int32(stride)
    if !fusedPrep { try k.launch("attention_prep", (heads + a.kvHeads, T, 1), 128, 4 * a.headDim, [
        .pointer(q), .int32(s32), .pointer(kp), .int32(s32), .pointer(v), .int32(s32), .int32(Int32(heads)),
        .int32(Int32(a.kvHeads)), .int32(Int32(a.headDim)), .int32(Int32(a.valueDim)), .pointer(qn?.address ?? 0), .pointer(kn?.address ?? 0), .float(eps),
        .int32(Int32(a.rope.rotaryDim)), .int32(a.rope.style == .neox ? 1 : 0), .pointer(freq?.address ?? 0), .double(a.rope.attentionFactor), .float(a.valueScale),
        .pointer(positionBuffer.address), .pointer(cacheK.address), .pointer(cacheV.address), .int32(Int32(capacity)), .pointer(0)]) }
    var launched = "prep only"
    if a.attend {
        // The kernel and grid the executor launches at this T (version 4 below 4 tokens).
        let shared = try CUDAExecutor.attentionDecodeSharedBytes(heads: heads, kvHeads: a.kvHeads, headDim: a.headDim, valueDim: a.valueDim, module: k.module)
        let l = try CUDAExecutor.attentionShape(heads: heads, kvHeads: a.kvHeads, headDim: a.headDim, valueDim: a.valueDim, sharedBytes: shared, capacity: capacity, module: k.module)(T, long && CUDAExecutor.longLayer(capacity: capacity))
        launched = "\(fusedPrep ? "attention_decode_h1p" : l.name), \(l.grid.2) splits\(long && CUDAExecutor.longLayer(capacity: capacity) ? ", long-context step" : "")"
        if fusedPrep {
            precondition(l.name == "attention_decode_h1", "attention_decode_h1p takes version 4's grid")
            let extra = CUDAExecutor.prepSharedBytes(headDim: a.headDim, valueDim: a.valueDim)
            try k.launch("attention_decode_h1p", l.grid, 128, l.sharedBytes + extra, [
                .pointer(q), .int32(s32), .pointer(cacheK.address), .pointer(cacheV.address), .int32(Int32(capacity)),
                .int32(Int32(heads)), .int32(Int32(a.kvHeads)), .int32(Int32(a.headDim)), .int32(Int32(a.valueDim)),
                .pointer(positionBuffer.address), .int32(Int32(T)), .int32(Int32(a.window ?? 0)), .int32(a.causal ? 1 : 0),
                .pointer(sinkBuffer?.address ?? 0), .float(scale), .pointer(attn.address), .int32(Int32(heads * a.valueDim)),
                .pointer(partial.address), .pointer(counters.address), .pointer(kp), .int32(s32), .pointer(v), .int32(s32),
                .pointer(qn?.address ?? 0), .pointer(kn?.address ?? 0), .float(eps), .int32(Int32(a.rope.rotaryDim)),
                .int32(a.rope.style == .neox ? 1 : 0), .pointer(freq?.address ?? 0), .double(a.rope.attentionFactor), .float(a.valueScale)])
        } else {
        try k.launch(l.name, l.grid, 128, l.sharedBytes, [
            .pointer(q), .int32(s32), .pointer(cacheK.address), .pointer(cacheV.address), .int32(Int32(capacity)),
            .int32(Int32(heads)), .int32(Int32(a.kvHeads)), .int32(Int32(a.headDim)), .int32(Int32(a.valueDim)),
            .pointer(positionBuffer.address), .int32(Int32(T)), .int32(Int32(a.window ?? 0)), .int32(a.causal ? 1 : 0),
            .pointer(sinkBuffer?.address ?? 0), .float(scale), .pointer(attn.address), .int32(Int32(heads * a.valueDim)),
            .pointer(partial.address), .pointer(counters.address), .pointer(0)])
        }
    }
    let gotRegion = try k.download(regionBuffer, region.count, Float(0))
    let gotKeys = try k.download(cacheK, keys.count, Float(0)), gotValues = try k.download(cacheV, values.count, Float(0))
    let gotOut = a.attend ? try k.download(attn, T * heads * a.valueDim, Float(0)) : []
    let gotCounters = try k.download(counters, S * max(heads, 1), Int32(0))

    // The CPU executor's ops for the layer, in the plan's order.
    var qr = part(region, qOff, qW), kr = part(region, kOff, kW), vr = part(region, vOff, vW)
    if let w = qNorm { qr.withUnsafeMutableBufferPointer { CPUExecutor.rmsNorm($0.baseAddress!, $0.baseAddress!, rows: T * heads, weight: w, eps: eps) } }
    if let w = kNorm { kr.withUnsafeMutableBufferPointer { CPUExecutor.rmsNorm($0.baseAddress!, $0.baseAddress!, rows: T * a.kvHeads, weight: w, eps: eps) } }
    if a.rope.rotaryDim > 0 {
        if a.attend { CPUExecutor.applyRoPE(&qr, width: qW, headDim: a.headDim, rope: a.rope, positions: positions) }
        CPUExecutor.applyRoPE(&kr, width: kW, headDim: a.headDim, rope: a.rope, positions: positions)
    }
    if a.valueScale != 1 { for i in vr.indices { vr[i] *= a.valueScale } }
    var keysRef = keys, valuesRef = values, out = [Float](repeating: 0, count: T * heads * a.valueDim)
    keysRef.withUnsafeMutableBufferPointer { kb in
        valuesRef.withUnsafeMutableBufferPointer { vb in
            let layer = KVCache.Layer(capacity: capacity, kvHeads: a.kvHeads, keyDim: a.headDim, valueDim: a.valueDim, keys: kb.baseAddress!, values: vb.baseAddress!)
            CPUExecutor.store(k: kr, v: vr, into: layer, positions: positions)
            if a.attend {
                CPUExecutor.attention(q: qr, out: &out, cache: layer, heads: heads, window: a.window, causal: a.causal, scale: scale, sinks: sinks, positions: positions)
            }
        }
    }

    let ring = a.window == nil ? "capacity \(capacity)" : "ring of \(capacity)"
    var c = LayerCase("attention \(a.name) T=\(T) at \(start)...\(start + T - 1) (\(ring), \(launched))")
    if fusedPrep {
        c.exact("q/k/v rows untouched", gotRegion, region)
    } else {
        if a.attend { c.close("q", part(gotRegion, qOff, qW), qr, width: a.headDim, bound: layerNormTolerance) }
        c.close("k", part(gotRegion, kOff, kW), kr, width: a.headDim, bound: layerNormTolerance)
        c.exact("v", part(gotRegion, vOff, vW), vr)
    }
    if a.pad > 0 { c.exact("pad", part(gotRegion, vOff + vW, a.pad), part(region, vOff + vW, a.pad)) }
    // The cache: the step's key rows close to the CPU's, every other slot untouched, values exact.
    let written = Set(positions.map { $0 % capacity })
    var gotRows: [Float] = [], wantRows: [Float] = [], gotRest: [Float] = [], wantRest: [Float] = []
    for slot in 0..<capacity {
        let r = (slot * kW)..<((slot + 1) * kW)
        if written.contains(slot) { gotRows += gotKeys[r]; wantRows += keysRef[r] } else { gotRest += gotKeys[r]; wantRest += keysRef[r] }
    }
    c.close("cache k", gotRows, wantRows, width: a.headDim, bound: layerNormTolerance)
    c.exact("other slots", gotRest, wantRest)
    c.exact("cache v", gotValues, valuesRef)
    if a.attend {
        c.close("out", gotOut, out, width: a.valueDim, bound: layerAttentionTolerance)
        c.exact("counters", gotCounters, [Int32](repeating: 0, count: gotCounters.count))
    }
    return c
}

// MARK: All

/// Every per-layer kernel; prints a line per case and a summary; true when all pass.
func runLayerChecks(_ device: CUDADevice, _ module: KernelModule, _ stream: CUDAStream, seed: UInt64) throws -> Bool {
    let k = try LayerKernels(device, module, stream)
    var rng = SeededGenerator(seed: seed)
    print("\nper-layer kernels (Kernels/norm.cu, attention.cu, sampling.cu) vs the CPU executor's code, seed \(seed)")
    var cases: [LayerCase] = []
    func report(_ new: [LayerCase]) {
        for c in new { print(c.line) }
        cases += new
    }
    report(try checkEmbed(k, &rng))
    report(try checkNorms(k, &rng))
    report(try checkGLU(k, &rng))
    report(try checkArgmax(k, &rng))
    for a in attentionCases {
        for start in a.starts {
            for T in attentionTokenCounts {
                report([try checkAttention(k, a, start: start, tokens: T, &rng)])
                // attention_prep inside version 4 (the executor's single-sequence 1-token path; the kernel takes 1-3).
                if a.attend && CUDAExecutor.prepKernelTakes(tokens: T) {
                    report([try checkAttention(k, a, start: start, tokens: T, fusedPrep: true, &rng)])
                }
                // A long-context step's kernel (version 3 at every T, up to 64 splits) where the
                // layer's cache is long enough to get it.
                let capacity = a.window.map { min($0 + layerStepTokens, a.maxPositions) } ?? a.maxPositions
                if a.attend && CUDAExecutor.longLayer(capacity: capacity) {
                    report([try checkAttention(k, a, start: start, tokens: T, long: true, &rng)])
                }
            }
        }
    }
    let failed = cases.filter { !$0.passed }
    func worst(_ bound: Double) -> String {
        let e = cases.flatMap { $0.parts.filter { $0.bound == bound }.map(\.error) }
        return String(format: "%.2e", e.contains { $0.isNaN } ? .nan : e.max() ?? 0)
    }
    let summary = "worst rel.err \(worst(layerNormTolerance)) (norm/RoPE/GLU, bound \(layerNormTolerance)), \(worst(layerAttentionTolerance)) (attention, bound \(layerAttentionTolerance)); copies, adds, value scale, argmax bit for bit"
    let named = failed.prefix(3).map(\.name).joined(separator: "; ") + (failed.count > 3 ? "; ..." : "")
    print(failed.isEmpty ? "layer: PASS \(cases.count) checks, \(summary)" : "layer: FAIL \(failed.count) of \(cases.count) checks (\(named)), \(summary)")
    return failed.isEmpty
}
