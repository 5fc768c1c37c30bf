import Fulgur

/// A mixture-of-experts layer copied to the GPU and run by the kernels of Kernels/moe.cu for
/// 1-16 tokens: router and routing, grouping by expert, gate+up with the GLU, down and the
/// weighted sum, in three launches and no host round-trip. Experts must be MXFP4 with split
/// scales: a fused gate+up weight (gpt-oss `_blocks`/`_scales`, gate and up interleaved, or
/// stacked with gate rows first) or separate gate and up weights (MiMo), which are uploaded as
/// one gate-rows-first matrix. The router is BF16 or F32.
public final class CUDAMoE: @unchecked Sendable {
    public static let maxTokens = 16
    static let maxExperts = 256, maxTopK = 8, maxGroups = 32
    public let spec: MoESpec
    public let hidden: Int
    /// Bytes one touched expert reads (codes, scales, biases), and the router's bytes.
    public let expertBytes: Int
    public let routerBytes: Int
    let module: KernelModule
    let routeKernel: KernelModule.Function
    /// gate_up and down kernels for the token bins 1, 2, 4, 8, 16.
    let gateUpKernels: [KernelModule.Function]
    let downKernels: [KernelModule.Function]
    let router: DeviceBuffer, routerIsBF16: Bool
    let routerBias: DeviceBuffer?, correctionBias: DeviceBuffer?
    let gateUpCodes: DeviceBuffer, gateUpScales: DeviceBuffer, gateUpBias: DeviceBuffer?
    let downCodes: DeviceBuffer, downScales: DeviceBuffer, downBias: DeviceBuffer?
    let interleaved: Bool
    /// Scratch: logits [16, E], the routing buffer (layout in moe::Routes), act [16 * k, I].
    let logits: DeviceBuffer, routes: DeviceBuffer, act: DeviceBuffer

    static let bins = [1, 2, 4, 8, 16]

    public init(_ m: MoEWeights, module: KernelModule) throws {
        let s = m.spec, E = s.experts, k = s.topK, I = s.intermediate, H = m.router.inFeatures
        func unsupported(_ why: String) -> FulgurError {
            FulgurError(.unsupported, "MoE layer (router '\(m.router.name)'): \(why); the CUDA MoE kernel takes MXFP4 experts with split scales, up to \(Self.maxExperts) experts, top-k up to \(Self.maxTopK), hidden and intermediate sizes that are multiples of 32")
        }
        guard E <= Self.maxExperts, E == m.experts.count, (1...Self.maxTopK).contains(k), H % 32 == 0, I % 32 == 0 else {
            throw unsupported("\(E) experts, top-\(k), hidden \(H), intermediate \(I)")
        }
        guard m.router.outFeatures == E, !m.router.transposed, m.router.format == .plain(.bf16) || m.router.format == .plain(.f32) else {
            throw unsupported("router is \(m.router.format) [\(m.router.outFeatures), \(m.router.inFeatures)]\(m.router.transposed ? " transposed" : "")")
        }
        if case .sigmoidWithBias(_, _, let groups, _) = s.routing, groups > Self.maxGroups || E % groups != 0 {
            throw unsupported("\(groups) expert groups")
        }
        let mx = LinearWeight.Format.mxfp4
        for (e, x) in m.experts.enumerated() {
            let parts = x.gateUp.map { [$0] } ?? [x.gate, x.up].compactMap { $0 }
            guard x.down.format == mx, x.down.outFeatures == H, x.down.inFeatures == I,
                  parts.allSatisfy({ $0.format == mx && $0.inFeatures == H }), parts.reduce(0, { $0 + $1.outFeatures }) == 2 * I,
                  (x.gateUpBias == nil) == (m.experts[0].gateUpBias == nil), (x.downBias == nil) == (m.experts[0].downBias == nil) else {
                throw unsupported("expert \(e) is not MXFP4 [2x\(I), \(H)] + [\(H), \(I)] like expert 0")
            }
        }
        self.spec = s
        self.hidden = H
        self.module = module
        self.interleaved = m.experts[0].gateUp != nil && m.experts[0].interleaved
        let device = module.device
        routeKernel = try module.function("moe_route")
        gateUpKernels = try Self.bins.map { try module.function("moe_gate_up_t\($0)") }
        downKernels = try Self.bins.map { try module.function("moe_down_t\($0)") }
        for (i, b) in Self.bins.enumerated() {
            try module.allowSharedMemory(gateUpKernels[i], bytes: Self.sharedBytes(bin: b))
            try module.allowSharedMemory(downKernels[i], bytes: Self.sharedBytes(bin: b))
        }

        router = try device.upload(m.router.storage.codes)
        routerIsBF16 = m.router.format == .plain(.bf16)
        routerBytes = m.router.byteCount
        func floats(_ v: [Float]?) throws -> DeviceBuffer? { try v.map { a in try a.withUnsafeBytes { try device.upload($0) } } }
        routerBias = try floats(m.routerBias)
        correctionBias = try floats(m.correctionBias)

        // Experts stacked [E, rows, ...]: each expert's weights copied in at its offset.
        func stack(_ rows: Int, _ columns: Int, _ parts: (ExpertWeights) -> [LinearWeight]) throws -> (DeviceBuffer, DeviceBuffer) {
            let codeBytes = rows * columns / 2, scaleBytes = rows * columns / 32
            let codes = try device.allocate(E * codeBytes), scales = try device.allocate(E * scaleBytes)
            for (e, x) in m.experts.enumerated() {
                var c = e * codeBytes, sc = e * scaleBytes
                for w in parts(x) {
                    let (wc, ws) = w.storage
                    try codes.upload(wc, offset: c)
                    try scales.upload(ws!, offset: sc)
                    c += wc.count; sc += ws!.count
                }
            }
            return (codes, scales)
        }
        (gateUpCodes, gateUpScales) = try stack(2 * I, H) { x in x.gateUp.map { [$0] } ?? [x.gate!, x.up!] }
        (downCodes, downScales) = try stack(H, I) { [$0.down] }
        gateUpBias = try floats(m.experts[0].gateUpBias.map { _ in m.experts.flatMap { $0.gateUpBias! } })
        downBias = try floats(m.experts[0].downBias.map { _ in m.experts.flatMap { $0.downBias! } })
        expertBytes = (2 * I * H + H * I) * 17 / 32 + 4 * ((gateUpBias == nil ? 0 : 2 * I) + (downBias == nil ? 0 : H))

        logits = try device.allocate(4 * Self.maxTokens * E)
        let routeInts = Self.routesLayout(experts: E, topK: k).total
        let routes = try device.allocate(4 * routeInts)
        try [Int32](repeating: 0, count: routeInts).withUnsafeBytes { try routes.upload($0) }  // the arrival counter starts at 0
        self.routes = routes
        act = try device.allocate(4 * Self.maxTokens * k * I)
    }

    /// Int32 offsets in the routing buffer; mirrors moe::Routes in Kernels/moe.cu.
    static func routesLayout(experts E: Int, topK k: Int) -> (chosen: Int, chosenWeight: Int, total: Int) {
        let token = 2 + E + E + 1, pairs = maxTokens * k
        return (token + 2 * pairs, token + 3 * pairs, token + 4 * pairs)
    }

    /// Dynamic shared memory of the bin's kernels; mirrors moe::Tile (NT * 32 * unroll chunks
    /// of 36 floats, unroll 4 / 2 / 1 for NT <= 2 / <= 8 / 16).
    static func sharedBytes(bin: Int) -> Int {
        let unroll = bin <= 2 ? 4 : bin <= 8 ? 2 : 1
        return 4 * bin * 32 * unroll * 36
    }

    /// out[t] = MoE(x[t]) for `tokens` rows of f32 `x` ([tokens, hidden]) into f32 `out`
    /// ([tokens, hidden]), enqueued on `stream`. With `overlapPrevious` (the default) each
    /// kernel is launched as a programmatic dependent of the one before it.
    public func run(_ x: DeviceBuffer, tokens: Int, into out: DeviceBuffer, stream: CUDAStream, overlapPrevious: Bool = true) throws {
        precondition((1...Self.maxTokens).contains(tokens), "CUDAMoE takes 1 to \(Self.maxTokens) tokens")
        precondition(x.byteCount >= 4 * tokens * hidden && out.byteCount >= 4 * tokens * hidden, "activation buffers too small for \(tokens) tokens")
        let E = Int32(spec.experts), k = Int32(spec.topK), H = Int32(hidden), I = Int32(spec.intermediate), T = Int32(tokens)
        let (mode, normalize, scaling, groups, topKGroups): (Int32, Bool, Float, Int, Int) = switch spec.routing {
        case .softmaxTopK(let n): (0, n, 1, 1, 1)
        case .topKSoftmax: (1, false, 1, 1, 1)
        case .sigmoidWithBias(let n, let s, let g, let kg): (2, n, s, g, kg)
        }
        let (clamped, alpha, limit): (Int32, Float, Float) = switch spec.activation {
        case .silu: (0, 0, 0)
        case .clampedSwiGLU(let a, let l): (1, a, l)
        }
        func ptr(_ b: DeviceBuffer?) -> KernelModule.Argument { .pointer(b?.address ?? 0) }
        try module.launch(routeKernel, grid: ((spec.experts + 3) / 4, 1, 1), block: (128, 1, 1), stream: stream, overlapPrevious: overlapPrevious, [
            ptr(router), .int32(routerIsBF16 ? 1 : 0), ptr(routerBias), ptr(correctionBias), .int32(mode), .int32(normalize ? 1 : 0),
            .float(scaling), .int32(Int32(groups)), .int32(Int32(topKGroups)), ptr(x), .int32(T), .int32(H), .int32(E), .int32(k),
            ptr(logits), ptr(routes)])
        let bin = Self.bins.firstIndex { $0 >= tokens }!, b = Self.bins[bin], shared = Self.sharedBytes(bin: b)
        let pairsPerWarp = b == 2 || b == 4 ? 2 : 1, rowsPerWarp = b == 1 ? 1 : 2
        try module.launch(gateUpKernels[bin], grid: ((spec.intermediate + 4 * pairsPerWarp - 1) / (4 * pairsPerWarp), 1, 1), block: (128, 1, 1),
                          sharedBytes: shared, stream: stream, overlapPrevious: overlapPrevious, [
            ptr(routes), .int32(E), .int32(k), ptr(x), .int32(H), .int32(I), ptr(gateUpCodes), ptr(gateUpScales), ptr(gateUpBias),
            .int32(interleaved ? 1 : 0), .int32(clamped), .float(alpha), .float(limit), ptr(act)])
        try module.launch(downKernels[bin], grid: ((hidden + 4 * rowsPerWarp - 1) / (4 * rowsPerWarp), 1, 1), block: (128, 1, 1),
                          sharedBytes: shared, stream: stream, overlapPrevious: overlapPrevious, [
            ptr(routes), .int32(E), .int32(k), ptr(act), .int32(T), .int32(H), .int32(I), ptr(downCodes), ptr(downScales), ptr(downBias), ptr(out)])
    }

    /// The last run's routing, read back once `stream` is synchronized (for checks and statistics): each
    /// token's experts and weights in top-k order, and how many experts were touched.
    public func lastRoutes(tokens: Int) throws -> (chosen: [[(expert: Int, weight: Float)]], touched: Int) {
        let layout = Self.routesLayout(experts: spec.experts, topK: spec.topK)
        var ints = [Int32](repeating: 0, count: layout.total)
        try ints.withUnsafeMutableBytes { try routes.download(into: $0) }
        let k = spec.topK
        let chosen = (0..<tokens).map { t in
            (0..<k).map { j in (Int(ints[layout.chosen + t * k + j]), Float(bitPattern: UInt32(bitPattern: ints[layout.chosenWeight + t * k + j]))) }
        }
        return (chosen, Int(ints[1]))
    }
}
