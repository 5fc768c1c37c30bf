import Dispatch
import Foundation
import Fulgur

/// A mixture-of-experts layer copied to the GPU and run by the kernels of Kernels/moe.cu for
/// 1-16 tokens: router and routing, grouping by expert, gate+up with the GLU, down and the
/// weighted sum, with no host round-trip. Experts must be MXFP4 with split scales: a fused
/// gate+up weight (gpt-oss `_blocks`/`_scales`, gate and up interleaved, or stacked with gate
/// rows first) or separate gate and up weights (MiMo). The router is BF16 or F32.
///
/// `version` picks the kernels: 2 routes in a small launch and runs every expert
/// product in one persistent launch on the tensor cores, from weights repacked at upload
/// (`tiled`); 1 is the first version (three launches, FFMA), kept so one GPU run can time both.
/// 3 is version 2's kernel with a deeper ring (a launch plan per token bin, so x takes only the
/// room the call's tokens need; chunks sized to fill their ring slots) and a unit end that only
/// the unit's epilogue warp waits at (`moe3_experts`). 4 keeps version 2's router and weight
/// layout and runs the products in two plain launches, gate_up then down, whose warps each
/// stream whole units straight into registers (`moe4_gate_up`, `moe4_down`). 7 (the default)
/// is 4 routing once, in the router launch (`moe6_route`), whose product kernels
/// (`moe7_gate_up`, `moe7_down`) copy the result instead of routing in every block. (5, 6, 8,
/// 9 and 10, and a router in one cluster of 8 blocks, were measured and removed; Kernels/NOTES.md.)
public final class CUDAMoE: @unchecked Sendable {
    /// The kernels every executor uses unless told otherwise: with version 7 the gpt-oss-20b
    /// 1-token step measured 5% faster than with 2, its MoE calls at 8-16 tokens 1.8-1.9x faster
    /// (Kernels/NOTES.md, 2026-11-27, H200).
    public static let defaultVersion = 7
    public static let maxTokens = 16
    static let maxExperts = 384, maxTopK = 8, maxGroups = 32
    public let spec: MoESpec
    public let hidden: Int
    public let version: Int
    /// Bytes one touched expert reads (codes, scales, biases), and the router's bytes.
    public let expertBytes: Int
    public let routerBytes: Int
    let module: KernelModule
    let router: DeviceBuffer, routerIsBF16: Bool
    /// Device memory of the router's weights and biases (to warm L2 before the layer runs).
    public var routerRanges: [(address: UInt64, bytes: Int)] {
        [router, routerBias, correctionBias].compactMap { $0 }.map { ($0.address, $0.byteCount) }
    }
    let routerBias: DeviceBuffer?, correctionBias: DeviceBuffer?
    /// Scratch: logits [16, E]; the routing buffer (layout in moe::Routes), which both versions
    /// fill for `lastRoutes`.
    let logits: DeviceBuffer, routes: DeviceBuffer
    let kernels: Kernels

    enum Kernels {
        case v1(Version1)
        case v2(Version2)
        case v4(Version4)
    }

    /// Versions 4 and 7: version 2's buffers and router with `experts` = the gate_up kernel;
    /// partial holds `v4MaxSplits` pieces.
    struct Version4 {
        let base: Version2
        let down: KernelModule.Function
        /// Version 7: moe6_route (routes once) and its output, BlockRoutes as ints plus the
        /// arrival counter (zero between calls).
        let route6: KernelModule.Function?, routed: DeviceBuffer?
        /// The most experts a moe6_route block takes, read from the fatbin: up to H = 4096, above.
        let route6PerBlock: (narrow: Int, wide: Int)
        /// Version 7's gate_up for one token (`moe7_gate_up_t1`: x's B rows as moe6_route staged
        /// them). Nil only with an older fatbin loaded unchecked; gateUp then runs every T.
        let gateUp1: KernelModule.Function?
        /// Version 7's down sums as their own launch (`moe7_combine`), for the plans that ask
        /// for it. Nil only with an older fatbin loaded unchecked: down then always sums them.
        let combine: KernelModule.Function?
        /// Launch plans for calls of 1...16 tokens (index tokens - 1).
        let plans: [Plan4]
    }

    /// moe4's launches for a token count: grids (what fits at once), dynamic shared memory
    /// (B for `window` pairs), slot size and down's pieces of K.
    struct Plan4 {
        let gateBlocks: Int, gateShared: Int, gateWindow: Int
        let downBlocks: Int, downShared: Int, downWindow: Int
        let tokensPerSlot: Int, splits: Int
        /// Down writes its pairs' rows only and `moe7_combine` sums them in the next launch
        /// (Kernels/moe.cu says why); else down's last unit of each 16-row tile sums it.
        var combineApart = false
    }
    static let v4Threads = 256, v4MaxSplits = 2

    struct Version1 {
        let route: KernelModule.Function
        /// gate_up and down kernels for the token bins 1, 2, 4, 8, 16.
        let gateUp: [KernelModule.Function], down: [KernelModule.Function]
        let gateUpCodes: DeviceBuffer, gateUpScales: DeviceBuffer, gateUpBias: DeviceBuffer?
        let downCodes: DeviceBuffer, downScales: DeviceBuffer, downBias: DeviceBuffer?
        let interleaved: Bool
        /// act [16 * k, I]
        let act: DeviceBuffer
    }

    struct Version2 {
        let route: KernelModule.Function, experts: KernelModule.Function
        /// Weights in `tiled` layout; gateUpBias [E, 2, I] (gate, then up), downBias [E, H].
        let gateUp: DeviceBuffer, gateUpBias: DeviceBuffer?, down: DeviceBuffer, downBias: DeviceBuffer?
        /// xexp [16]; sync: the counters moe2_route zeroes; act [16k, I]; partial [16k, H].
        let xexp: DeviceBuffer, sync: DeviceBuffer, act: DeviceBuffer, partial: DeviceBuffer
        let syncCount: Int
        /// Launch plans for calls of up to 1, 2, 4 and 8+ tokens (version 2: the same plan).
        let plans: [Plan]
        var plan: Plan { plans[3] }
        func plan(tokens: Int) -> Plan { plans[tokens <= 1 ? 0 : tokens <= 2 ? 1 : tokens <= 4 ? 2 : 3] }
    }

    /// moe2_experts' launch: blocks (all resident at once), dynamic shared memory split into a
    /// ring of `ringSlots` chunks, x for `tokensPerSlot` tokens (`xBytes`) and the warp partials.
    struct Plan {
        let blocks: Int, ringSlots: Int, tokensPerSlot: Int, xBytes: Int, sharedBytes: Int
        /// Steps (544 bytes each) per bulk copy and ring slot.
        var chunkSteps = 32
        var slotBytes: Int { chunkSteps * CUDAMoE.stepBytes }
    }

    /// moe2_experts' per-block timestamps of the last run (`tracing`), 8 Int64 per block.
    public private(set) var trace: DeviceBuffer?

    static let bins = [1, 2, 4, 8, 16]

    public init(_ m: MoEWeights, module: KernelModule, version: Int = CUDAMoE.defaultVersion) throws {
        let s = m.spec, E = s.experts, k = s.topK, I = s.intermediate, H = m.router.inFeatures
        func unsupported(_ why: String) -> FulgurError {
            FulgurError(.unsupported, "MoE layer (router '\(m.router.name)'): \(why); the CUDA MoE kernel takes MXFP4 experts with split scales, up to \(Self.maxExperts) experts, top-k up to \(Self.maxTopK), hidden and intermediate sizes that are multiples of 32 (version 2: hidden at most 8192)")
        }
        guard [1, 2, 3, 4, 7].contains(version) else { throw unsupported("kernel version \(version) (there are 1, 2, 3, 4 and 7)") }
        guard E <= Self.maxExperts, E == m.experts.count, (1...Self.maxTopK).contains(k), H % 32 == 0, I % 32 == 0, version == 1 || H <= 8192 else {
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
        self.version = version
        self.module = module
        let device = module.device

        router = try device.upload(m.router.storage.codes)
        routerIsBF16 = m.router.format == .plain(.bf16)
        routerBytes = m.router.byteCount
        func floats(_ v: [Float]?) throws -> DeviceBuffer? { try v.map { a in try a.withUnsafeBytes { try device.upload($0) } } }
        routerBias = try floats(m.routerBias)
        correctionBias = try floats(m.correctionBias)
        let hasGateUpBias = m.experts[0].gateUpBias != nil, hasDownBias = m.experts[0].downBias != nil
        expertBytes = (2 * I * H + H * I) * 17 / 32 + 4 * ((hasGateUpBias ? 2 * I : 0) + (hasDownBias ? H : 0))
        logits = try device.allocate(4 * Self.maxTokens * E)
        let routeInts = Self.routesLayout(experts: E, topK: k).total
        let routes = try device.allocate(4 * routeInts)
        try [Int32](repeating: 0, count: routeInts).withUnsafeBytes { try routes.upload($0) }  // v1's arrival counter starts at 0
        self.routes = routes
        let interleaved = m.experts[0].gateUp != nil && m.experts[0].interleaved
        let downBias = try floats(hasDownBias ? m.experts.flatMap { $0.downBias! } : nil)

        if version == 1 {
            let route = try module.function("moe_route")
            let gateUpKernels = try Self.bins.map { try module.function("moe_gate_up_t\($0)") }
            let downKernels = try Self.bins.map { try module.function("moe_down_t\($0)") }
            for (i, b) in Self.bins.enumerated() {
                try module.allowSharedMemory(gateUpKernels[i], bytes: Self.sharedBytes(bin: b))
                try module.allowSharedMemory(downKernels[i], bytes: Self.sharedBytes(bin: b))
            }
            // Experts stacked [E, rows, ...]: each expert's weights copied (or made) at its offset.
            func stack(_ parts: (ExpertWeights) -> [LinearWeight]) throws -> (DeviceBuffer, DeviceBuffer) {
                let stacked = try CUDALinear.deviceStorage(m.experts.flatMap(parts), scaled: true, module: module)
                return (stacked.codes, stacked.scales!)
            }
            let (gateUpCodes, gateUpScales) = try stack { x in x.gateUp.map { [$0] } ?? [x.gate!, x.up!] }
            let (downCodes, downScales) = try stack { [$0.down] }
            let gateUpBias = try floats(hasGateUpBias ? m.experts.flatMap { $0.gateUpBias! } : nil)
            kernels = .v1(Version1(route: route, gateUp: gateUpKernels, down: downKernels, gateUpCodes: gateUpCodes, gateUpScales: gateUpScales,
                                   gateUpBias: gateUpBias, downCodes: downCodes, downScales: downScales, downBias: downBias,
                                   interleaved: interleaved, act: try device.allocate(4 * Self.maxTokens * k * I)))
            return
        }

        let route = try module.function("moe2_route")
        let experts = try module.function(version >= 4 ? "moe\(version)_gate_up" : version == 3 ? "moe3_experts" : "moe2_experts")
        let plans: [Plan]
        if version >= 4 {
            plans = []
        } else if version == 3 {
            plans = try Self.plans3(experts, module: module, hidden: H, intermediate: I)
        } else {
            let plan = try Self.plan(experts, module: module, hidden: H, intermediate: I)
            try module.allowSharedMemory(experts, bytes: plan.sharedBytes)
            plans = [plan, plan, plan, plan]
        }
        let (gateUp, down) = try Self.tiledWeights(m, module: module)
        let gateUpBias = try floats(hasGateUpBias ? m.experts.flatMap { x -> [Float] in
            let b = x.gateUpBias!
            return interleaved ? (0..<I).map { b[2 * $0] } + (0..<I).map { b[2 * $0 + 1] } : b
        } : nil)
        let syncCount = 2 * Self.maxTokens * Self.maxTopK + H / 16
        let splits = version >= 4 ? Self.v4MaxSplits : 1
        let base = Version2(route: route, experts: experts, gateUp: gateUp, gateUpBias: gateUpBias, down: down, downBias: downBias,
                            xexp: try device.allocate(4 * Self.maxTokens), sync: try device.allocate(4 * syncCount),
                            act: try device.allocate(4 * Self.maxTokens * k * I),
                            partial: try device.allocate(4 * splits * Self.maxTokens * k * H), syncCount: syncCount, plans: plans)
        if version >= 4 {
            let downFunction = try module.function("moe\(version)_down")
            let routes6 = version == 7
            // BlockRoutes and the router's counter in the first 2048 ints, then one token's staged
            // x rows for gate_up (Kernels/moe.cu, moe4::kStagedInt: up to 32 KB).
            let routedInts = 2048 + 8192
            let routed = routes6 ? try device.allocate(4 * routedInts) : nil
            if let routed { try [Int32](repeating: 0, count: routedInts).withUnsafeBytes { try routed.upload($0) } }
            let combine = routes6 ? try? module.function("moe7_combine") : nil
            let plans = try Self.plans4(gateUp: experts, down: downFunction, module: module, hidden: H, intermediate: I, topK: k,
                                        experts: E, combineApart: combine != nil)
            let gateUp1 = routes6 ? try? module.function("moe7_gate_up_t1") : nil
            if let gateUp1 { try module.allowSharedMemory(gateUp1, bytes: plans.map(\.gateShared).max()!) }
            // An older fatbin (loaded unchecked) has no such table: one expert a block, as it was.
            let perBlock = routes6 ? (try? module.int32Global("moe6_experts_per_block", count: 2)).map { (Int($0[0]), Int($0[1])) } ?? (1, 1) : (1, 1)
            kernels = .v4(Version4(base: base, down: downFunction, route6: routes6 ? try module.function("moe6_route") : nil, routed: routed,
                                   route6PerBlock: perBlock, gateUp1: gateUp1, combine: combine, plans: plans))
        } else {
            kernels = .v2(base)
        }
    }

    /// A layer over `owner`'s device copies of the weights, with scratch buffers of its own, so
    /// that executors on different streams (server lanes, a batch) run it at the same time.
    public init(sharingWeightsOf owner: CUDAMoE) throws {
        let device = owner.module.device, k = owner.spec.topK, I = owner.spec.intermediate
        spec = owner.spec
        hidden = owner.hidden
        version = owner.version
        expertBytes = owner.expertBytes
        routerBytes = owner.routerBytes
        module = owner.module
        router = owner.router
        routerIsBF16 = owner.routerIsBF16
        routerBias = owner.routerBias
        correctionBias = owner.correctionBias
        logits = try device.allocate(owner.logits.byteCount)
        let routes = try device.allocate(owner.routes.byteCount)
        try [Int32](repeating: 0, count: owner.routes.byteCount / 4).withUnsafeBytes { try routes.upload($0) }
        self.routes = routes
        func fresh(_ v: Version2) throws -> Version2 {
            Version2(route: v.route, experts: v.experts, gateUp: v.gateUp, gateUpBias: v.gateUpBias, down: v.down, downBias: v.downBias,
                     xexp: try device.allocate(v.xexp.byteCount), sync: try device.allocate(v.sync.byteCount),
                     act: try device.allocate(v.act.byteCount), partial: try device.allocate(v.partial.byteCount), syncCount: v.syncCount, plans: v.plans)
        }
        switch owner.kernels {
        case .v1(let v):
            kernels = .v1(Version1(route: v.route, gateUp: v.gateUp, down: v.down, gateUpCodes: v.gateUpCodes, gateUpScales: v.gateUpScales,
                                   gateUpBias: v.gateUpBias, downCodes: v.downCodes, downScales: v.downScales, downBias: v.downBias,
                                   interleaved: v.interleaved, act: try device.allocate(4 * Self.maxTokens * k * I)))
        case .v2(let v):
            kernels = .v2(try fresh(v))
        case .v4(let v):
            let routed = try v.routed.map { r in
                let b = try device.allocate(r.byteCount)
                try [Int32](repeating: 0, count: r.byteCount / 4).withUnsafeBytes { try b.upload($0) }
                return b
            }
            kernels = .v4(Version4(base: try fresh(v.base), down: v.down, route6: v.route6, routed: routed, route6PerBlock: v.route6PerBlock,
                                   gateUp1: v.gateUp1, combine: v.combine, plans: v.plans))
        }
    }

    /// Version 4's plans for 1...16 tokens. B takes 256 bytes per 64 columns per pair; a window
    /// holds the pairs of up to all the call's tokens (T k), at least a whole slot, and as many
    /// more as keep two blocks on a multiprocessor. Slots of 8 tokens where 8 pairs still leave
    /// two blocks a multiprocessor, else 4: at MiMo-V2-Flash's hidden size (4096: 16 KB a pair)
    /// slots of 8 held gate_up to one block of 8 warps a multiprocessor, and 4 took its 8-token
    /// call from 63 to 52 us (H200, MiMo's shard over 4 GPUs; Kernels/NOTES.md, eleventh
    /// session); an expert chosen by more than 4 of the step's tokens then streams its weights
    /// once per 4. `FULGUR_MOE_SLOT_TOKENS` (4 or 8) overrides, for measurements. Down's K is
    /// split in two at T <= 4, where there are few units to spread.
    ///
    /// With `combineApart` (version 7), down leaves its sums to `moe7_combine` when the call can
    /// have more units than down has warps (so a warp runs several and each one's arrival would
    /// drain its loads): about min(E, T k) slots x pieces x H / 16 tiles against 8 warps a
    /// block. `FULGUR_MOE_COMBINE` = `apart` or `down` sets it for every token count (A/B runs).
    static func plans4(gateUp: KernelModule.Function, down: KernelModule.Function, module: KernelModule,
                       hidden H: Int, intermediate I: Int, topK k: Int, experts E: Int,
                       combineApart: Bool) throws -> [Plan4] {
        let device = module.device
        let pairG = 256 * ((H + 63) / 64), pairD = 256 * ((I + 63) / 64)
        let staticBytes = max(try module.staticSharedBytes(gateUp), try module.staticSharedBytes(down))
        // twoPerSM: the most dynamic shared memory at which two blocks still fit a
        // multiprocessor. It was room / 2 - 1 KB, which forgot the second block's static
        // shared memory: MiMo's 8-token down window came to 108 KB and ran one block of 8
        // warps a multiprocessor.
        let room = device.maxSharedMemoryPerBlock - staticBytes
        let twoPerSM = device.sharedMemoryPerMultiprocessor / 2 - device.reservedSharedMemoryPerBlock - staticBytes
        let pair = max(pairG, pairD)
        let asked = ProcessInfo.processInfo.environment["FULGUR_MOE_SLOT_TOKENS"].flatMap { Int($0) }.map { [$0] }
            ?? (8 * pair <= twoPerSM ? [8, 4] : [4])
        guard let tokensPerSlot = asked.first(where: { [4, 8].contains($0) && $0 * pair <= room }) else {
            throw FulgurError(.unsupported, "MoE layer of hidden size \(H), intermediate \(I): 4 pairs' activations (\(4 * pair) bytes) do not fit the \(room) bytes of shared memory a block has here (version 4)")
        }
        func window(_ T: Int, _ pairBytes: Int) -> Int {
            min(T * k, max(min(tokensPerSlot, T), twoPerSM / pairBytes), room / pairBytes)
        }
        let windows = (1...maxTokens).map { (window($0, pairG), window($0, pairD)) }
        // The occupancy calculation counts only up to the dynamic shared memory the function
        // is allowed (48 KiB until raised), so raise it first.
        try module.allowSharedMemory(gateUp, bytes: windows.map { $0.0 * pairG }.max()!)
        try module.allowSharedMemory(down, bytes: windows.map { $0.1 * pairD }.max()!)
        return try (1...maxTokens).map { T in
            let (wg, wd) = windows[T - 1]
            let g = try module.residentBlocksPerMultiprocessor(gateUp, threads: v4Threads, sharedBytes: wg * pairG)
            let d = try module.residentBlocksPerMultiprocessor(down, threads: v4Threads, sharedBytes: wd * pairD)
            guard g >= 1, d >= 1 else {
                throw FulgurError(.unsupported, "moe4 kernels with \(wg * pairG) / \(wd * pairD) bytes of shared memory cannot run on \(device.name)")
            }
            let splits = T <= 4 ? v4MaxSplits : 1, downBlocks = d * device.multiprocessors
            let units = min(E, T * k) * splits * (H / 16)
            let apart = switch ProcessInfo.processInfo.environment["FULGUR_MOE_COMBINE"] {
            case "apart": combineApart
            case "down": false
            default: combineApart && units > downBlocks * v4Threads / 32
            }
            return Plan4(gateBlocks: g * device.multiprocessors, gateShared: wg * pairG, gateWindow: wg,
                         downBlocks: downBlocks, downShared: wd * pairD, downWindow: wd,
                         tokensPerSlot: tokensPerSlot, splits: splits, combineApart: apart)
        }
    }

    /// Int32 offsets in the routing buffer; mirrors moe::Routes in Kernels/moe.cu.
    static func routesLayout(experts E: Int, topK k: Int) -> (chosen: Int, chosenWeight: Int, total: Int) {
        let token = 2 + E + E + 1, pairs = maxTokens * k
        return (token + 2 * pairs, token + 3 * pairs, token + 4 * pairs)
    }

    /// Dynamic shared memory of version 1's kernels for a token bin; mirrors moe::Tile (NT * 32
    /// * unroll chunks of 36 floats, unroll 4 / 2 / 1 for NT <= 2 / <= 8 / 16).
    static func sharedBytes(bin: Int) -> Int {
        let unroll = bin <= 2 ? 4 : bin <= 8 ? 2 : 1
        return 4 * bin * 32 * unroll * 36
    }

    // Mirrors moe2:: in Kernels/moe.cu.
    static let v2Threads = 320, stepBytes = 544, chunkBytes = 32 * 544, maxRingSlots = 8, maxRingSlots3 = 16
    static let partialBytes = 2 * 8 * 2 * 4 * 32 * 4

    /// Splits the block's shared memory: x for as many tokens per slot as fit (8, else 4, 2,
    /// 1) beside a ring of at least 2 chunks, then as many chunks as fit, up to 8. 4 KB stay free
    /// so the next call's router block can start beside a running block.
    static func plan(_ experts: KernelModule.Function, module: KernelModule, hidden H: Int, intermediate I: Int) throws -> Plan {
        let steps = max((H / 32 + 1) / 2, (I / 32 + 1) / 2)
        let room = module.device.maxSharedMemoryPerBlock - (try module.staticSharedBytes(experts)) - partialBytes - 4096
        guard let tokens = [8, 4, 2, 1].first(where: { $0 * 256 * steps + 2 * chunkBytes <= room }) else {
            throw FulgurError(.unsupported, "MoE layer of hidden size \(H), intermediate \(I): one token's activations (\(256 * steps) bytes) and two weight chunks do not fit the \(room) bytes of shared memory a block has here")
        }
        let xBytes = tokens * 256 * steps, ring = min(maxRingSlots, (room - xBytes) / chunkBytes)
        let shared = ring * chunkBytes + xBytes + partialBytes
        // The occupancy calculation counts only up to the dynamic shared memory the function
        // is allowed (48 KiB until raised), so raise it first.
        try module.allowSharedMemory(experts, bytes: shared)
        let perSM = try module.residentBlocksPerMultiprocessor(experts, threads: v2Threads, sharedBytes: shared)
        guard perSM >= 1 else {
            throw FulgurError(.unsupported, "moe2_experts with \(shared) bytes of shared memory cannot run on \(module.device.name)")
        }
        return Plan(blocks: perSM * module.device.multiprocessors, ringSlots: ring, tokensPerSlot: tokens, xBytes: xBytes, sharedBytes: shared)
    }

    /// Version 3's plans, for calls of up to 1, 2, 4 and 8 or more tokens: x for that many tokens
    /// per slot, chunks of `chunkSteps` = the unit's steps split evenly into pieces of at most 32
    /// (gpt-oss: 45 steps in 2 chunks of 23, where 32 + 13 left slots 30% empty), and as many
    /// ring slots as fit, up to 16. The same 4 KB stay free as in `plan`.
    static func plans3(_ experts: KernelModule.Function, module: KernelModule, hidden H: Int, intermediate I: Int) throws -> [Plan] {
        let stepsG = (H / 32 + 1) / 2, stepsD = (I / 32 + 1) / 2, steps = max(stepsG, stepsD)
        func even(_ s: Int) -> Int { let pieces = (s + 31) / 32; return (s + pieces - 1) / pieces }
        let chunkSteps = max(even(stepsG), even(stepsD)), slotBytes = chunkSteps * stepBytes
        let room = module.device.maxSharedMemoryPerBlock - (try module.staticSharedBytes(experts)) - partialBytes - 4096
        var shapes: [(tokens: Int, xBytes: Int, ring: Int, shared: Int)] = []
        for bin in [1, 2, 4, 8] {
            // A bin whose x does not fit takes the largest token count that does.
            guard let tokens = [8, 4, 2, 1].filter({ $0 <= bin }).first(where: { $0 * 256 * steps + 2 * slotBytes <= room }) else {
                throw FulgurError(.unsupported, "MoE layer of hidden size \(H), intermediate \(I): one token's activations (\(256 * steps) bytes) and two weight chunks do not fit the \(room) bytes of shared memory a block has here")
            }
            let xBytes = tokens * 256 * steps, ring = min(maxRingSlots3, (room - xBytes) / slotBytes)
            shapes.append((tokens, xBytes, ring, ring * slotBytes + xBytes + partialBytes))
        }
        // Raise the dynamic limit to the largest plan before the occupancy queries (see plan).
        try module.allowSharedMemory(experts, bytes: shapes.map(\.shared).max()!)
        return try shapes.map { p in
            let perSM = try module.residentBlocksPerMultiprocessor(experts, threads: v2Threads, sharedBytes: p.shared)
            guard perSM >= 1 else {
                throw FulgurError(.unsupported, "moe3_experts with \(p.shared) bytes of shared memory cannot run on \(module.device.name)")
            }
            return Plan(blocks: perSM * module.device.multiprocessors, ringSlots: p.ring, tokensPerSlot: p.tokens, xBytes: p.xBytes,
                        sharedBytes: p.shared, chunkSteps: chunkSteps)
        }
    }

    /// Turns the per-block timestamps of versions 2 and 3 on or off (`trace`, `lastTrace`).
    public func setTracing(_ on: Bool) throws {
        guard case .v2(let v) = kernels else { return }  // version 4 records no timestamps
        trace = on ? try module.device.allocate(8 * 8 * v.plans.map(\.blocks).max()!) : nil
    }

    /// The last run's timestamps, once `stream` is synchronized: per block, [0] %globaltimer (ns)
    /// at entry, then SM clocks since entry at: routing done, first unit consumed, last gate_up
    /// unit consumed, first down unit's wait over, all units consumed, signaler done, producer
    /// done (0: not reached, or no such unit).
    public func lastTrace(tokens: Int) throws -> [[Int64]] {
        guard case .v2(let v) = kernels, let trace else { return [] }
        let blocks = v.plan(tokens: tokens).blocks
        var raw = [Int64](repeating: 0, count: 8 * blocks)
        try raw.withUnsafeMutableBytes { try trace.download(into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<(64 * blocks)])) }
        return (0..<blocks).map { Array(raw[(8 * $0)..<(8 * $0 + 8)]) }
    }

    /// gate_up and down of every expert in the `tiled` layout. gate_up tile i: rows 0-7 are
    /// gate rows 8i..8i+7, rows 8-15 the matching up rows; down tile i: rows 16i..16i+15.
    /// Repacked on the host and uploaded, or, when every expert is a deferred random matrix
    /// (RandomModel.buildDeferred), made in device memory (RandomFiller.fillTiled).
    static func tiledWeights(_ m: MoEWeights, module: KernelModule) throws -> (gateUp: DeviceBuffer, down: DeviceBuffer) {
        let device = module.device
        let deferred = m.experts.allSatisfy { x in [x.gateUp, x.gate, x.up, x.down].allSatisfy { $0 == nil || $0!.deferred != nil } }
        guard deferred else {
            let host = hostTiled(m)
            return (try upload(device, host.gateUp), try upload(device, host.down))
        }
        let bytes = tiledByteCounts(m)
        let gateUp = try device.allocate(bytes.gateUp), down = try device.allocate(bytes.down)
        let filler = try module.randomFiller()
        try filler.run(tiledLaunches(m, gateUp: gateUp.address, down: down.address, tables: filler.tables.address))
        try filler.finish()
        return (gateUp, down)
    }

    /// Bytes of gate_up and down in the tiled layout.
    static func tiledByteCounts(_ m: MoEWeights) -> (gateUp: Int, down: Int) {
        let E = m.experts.count, I = m.spec.intermediate, H = m.router.inFeatures
        func tileBytes(_ columns: Int) -> Int { (columns / 32 + 1) / 2 * stepBytes }
        return (E * (I / 8) * tileBytes(H), E * (H / 16) * tileBytes(I))
    }

    /// RandomFiller's launches that write every expert of `m` (all deferred) in the tiled
    /// layout at `gateUp` and `down`: per expert, the gate half of the gate_up tiles (rows
    /// 0-7), the up half (rows 8-15), then down.
    static func tiledLaunches(_ m: MoEWeights, gateUp: UInt64, down: UInt64, tables: UInt64) throws -> [RandomFiller.Launch] {
        let I = m.spec.intermediate, H = m.router.inFeatures
        let E = m.experts.count, bytes = tiledByteCounts(m)
        var launches: [RandomFiller.Launch] = []
        for (e, x) in m.experts.enumerated() {
            let at = gateUp + UInt64(e * bytes.gateUp / E)
            // (matrix, first row, row step) of the gate half, then of the up half.
            let halves: [(DeferredRandomMatrix, Int, Int)]
            if let fused = x.gateUp?.deferred {
                halves = x.interleaved ? [(fused, 0, 2), (fused, 1, 2)] : [(fused, 0, 1), (fused, I, 1)]
            } else {
                halves = [(x.gate!.deferred!, 0, 1), (x.up!.deferred!, 0, 1)]
            }
            for (h, (matrix, first, step)) in halves.enumerated() {
                launches.append(try RandomFiller.tiledLaunch(matrix, firstRow: first, rowStep: step, at: at, tiles: I / 8,
                                                             tileRows: (8 * h)..<(8 * h + 8), tables: tables))
            }
            launches.append(try RandomFiller.tiledLaunch(x.down.deferred!, firstRow: 0, rowStep: 1, at: down + UInt64(e * bytes.down / E),
                                                         tiles: H / 16, tileRows: 0..<16, tables: tables))
        }
        return launches
    }

    /// The `tiled` bytes of gate_up and down made on the host from the experts' stored bytes
    /// (those of deferred experts made by DeferredRandomMatrix): what `tiledWeights` puts on
    /// the device, for checks.
    public static func hostTiled(_ m: MoEWeights) -> (gateUp: [UInt8], down: [UInt8]) {
        let E = m.experts.count, I = m.spec.intermediate, H = m.router.inFeatures
        let gateUp = tiled(experts: E, tiles: I / 8, columns: H) { e, tile, r in
            let x = m.experts[e], j = 8 * tile + r % 8, gate = r < 8
            if let fused = x.gateUp { return CUDAMoE.row(fused, x.interleaved ? 2 * j + (gate ? 0 : 1) : (gate ? 0 : I) + j) }
            return CUDAMoE.row(gate ? x.gate! : x.up!, j)
        }
        let down = tiled(experts: E, tiles: H / 16, columns: I) { e, tile, r in CUDAMoE.row(m.experts[e].down, 16 * tile + r) }
        return (gateUp, down)
    }

    /// The device bytes of gate_up and down in the tiled layout (versions 2 and up), for checks.
    public func deviceTiledBytes() throws -> (gateUp: [UInt8], down: [UInt8])? {
        let base: Version2
        switch kernels {
        case .v1: return nil
        case .v2(let v): base = v
        case .v4(let v): base = v.base
        }
        return (try base.gateUp.bytes(), try base.down.bytes())
    }

    /// Codes and E8M0 scales of row `r` of an MXFP4 weight.
    static func row(_ w: LinearWeight, _ r: Int) -> (codes: UnsafeRawPointer, scales: UnsafeRawPointer) {
        let (codes, scales) = w.storage
        return (codes.baseAddress! + r * w.inFeatures / 2, scales!.baseAddress! + r * w.inFeatures / 32)
    }

    static func upload(_ device: CUDADevice, _ bytes: [UInt8]) throws -> DeviceBuffer {
        try bytes.withUnsafeBytes { try device.upload($0) }
    }

    /// MXFP4 matrices of `experts` x `tiles` x 16 rows, `columns` wide, in moe2_experts' layout:
    /// per tile, steps of 64 columns, each 544 bytes. Bytes 0-511 are the codes in the order of
    /// the mma A fragment: lane 4g + t's 16 bytes are word t (columns 8t..8t+7) of rows g and
    /// g + 8 of the step's first 32-column block, then of its second; each word's nibble bits
    /// rearranged by `placed`. Bytes 512-543: for g = 0..7, the scales of rows g and g + 8 of
    /// the first block, then of the second. A block past the end of the row (an odd number of
    /// blocks) is zero codes with scale 1. `rows(e, tile, r)` gives tile row r of expert e.
    static func tiled(experts: Int, tiles: Int, columns: Int,
                      rows: @escaping (Int, Int, Int) -> (codes: UnsafeRawPointer, scales: UnsafeRawPointer)) -> [UInt8] {
        let blocks = columns / 32, steps = (blocks + 1) / 2, tileBytes = steps * stepBytes
        var out = [UInt8](repeating: 0, count: experts * tiles * tileBytes)
        let table = placedTable
        out.withUnsafeMutableBytes { buffer in
            let base = buffer.baseAddress!
            // Each expert's tiles are its own bytes: the experts repack in parallel.
            DispatchQueue.concurrentPerform(iterations: experts) { e in
                for tile in 0..<tiles {
                    let source = (0..<16).map { rows(e, tile, $0) }
                    for s in 0..<steps {
                        let step = base + (e * tiles + tile) * tileBytes + s * stepBytes
                        for g in 0..<8 {
                            for h in 0..<2 {
                                let b = 2 * s + h
                                for q in 0..<2 {
                                    let (codes, scales) = source[g + 8 * q]
                                    step.storeBytes(of: b < blocks ? scales.load(fromByteOffset: b, as: UInt8.self) : 127,
                                                    toByteOffset: 512 + 4 * g + 2 * h + q, as: UInt8.self)
                                    for t in 0..<4 {
                                        var word: UInt32 = 0
                                        if b < blocks {
                                            let c = codes + 16 * b + 4 * t
                                            word = table[Int(c.load(as: UInt8.self))] | table[256 + Int(c.load(fromByteOffset: 1, as: UInt8.self))]
                                                | table[512 + Int(c.load(fromByteOffset: 2, as: UInt8.self))] | table[768 + Int(c.load(fromByteOffset: 3, as: UInt8.self))]
                                        }
                                        step.storeBytes(of: word, toByteOffset: 16 * (4 * g + t) + 4 * (2 * h + q), as: UInt32.self)
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        return out
    }

    /// A checkpoint code word (nibble q = column q, sign in its top bit) with its bits moved to
    /// where moe2::e2m1_pairs reads them: pair I = (nibble I, nibble I + 4) has its magnitude
    /// bits at 9, 6, 3, 0 (I = 0..3) and its sign at 15, 12, 13, 14 in the low half for nibble
    /// I, the same plus 16 for nibble I + 4.
    static func placed(_ word: UInt32) -> UInt32 {
        let magnitudeAt: [UInt32] = [9, 6, 3, 0], signAt: [UInt32] = [15, 12, 13, 14]
        var out: UInt32 = 0
        for q in 0..<8 {
            let nibble = (word >> (4 * UInt32(q))) & 0xF, pair = q % 4, half = UInt32(16 * (q / 4))
            out |= (nibble & 7) << (magnitudeAt[pair] + half) | (nibble >> 3) << (signAt[pair] + half)
        }
        return out
    }

    /// placed() per byte of the word: entry 256 * byte + value; a word's image is the OR of its
    /// four bytes' entries.
    static let placedTable: [UInt32] = (0..<4).flatMap { byte in (0..<256).map { placed(UInt32($0) << (8 * UInt32(byte))) } }

    /// Kernel names in launch order, for `stageEvents`.
    public var stageNames: [String] {
        switch kernels {
        case .v1: ["route", "gate_up", "down"]
        case .v2: ["route", "experts"]
        case .v4: ["route", "gate_up", "down", "combine"]
        }
    }

    /// Launch shape, for logs.
    public var planDescription: String {
        switch kernels {
        case .v1: "version 1: route, gate_up, down"
        case .v2(let v):
            "version \(version): \(v.plan.blocks) blocks of \(Self.v2Threads) threads; " + (version == 3 ? [0, 1, 2, 3] : [3]).map { i in
                let p = v.plans[i]
                return (version == 3 ? "T <= \([1, 2, 4, 16][i]): " : "") + "\(p.sharedBytes) bytes of shared memory (ring of \(p.ringSlots) x \(p.slotBytes), x for \(p.tokensPerSlot) tokens)"
            }.joined(separator: ", ")
        case .v4(let v):
            "version \(version): blocks of \(Self.v4Threads) threads; " + [1, 8, 16].map { t in
                let p = v.plans[t - 1]
                return "T = \(t): gate_up \(p.gateBlocks) blocks, \(p.gateShared) bytes (\(p.gateWindow) pairs), down \(p.downBlocks) blocks, \(p.downShared) bytes (\(p.downWindow) pairs), \(p.splits) pieces"
                    + (p.combineApart ? ", sums apart" : "")
            }.joined(separator: "; ")
        }
    }

    /// out[t] = MoE(x[t]) for `tokens` rows of f32 `x` ([tokens, hidden]) into f32 `out`
    /// ([tokens, hidden]), enqueued on `stream`. With `overlapPrevious` (the default) each
    /// kernel is launched as a programmatic dependent of the one before it. With `stageEvents`
    /// (one more than `stageNames`), each launch is preceded by a record of the next event and
    /// the last event follows them; launches are then plain, so the events time each kernel.
    ///
    /// With `norm` (one token; `takesNorm(tokens:)` must hold), the router launch first makes
    /// x = norm.h itself from the residual add and RMSNorm before the layer (moe6_route), in
    /// place of an add_rmsnorm launch.
    public func run(_ x: DeviceBuffer, tokens: Int, into out: DeviceBuffer, stream: CUDAStream, overlapPrevious: Bool = true,
                    stageEvents: [CUDAEvent] = [], norm: ResidualNorm? = nil) throws {
        precondition(norm == nil || takesNorm(tokens: tokens) && norm!.h == x.address,
                     "CUDAMoE.run(norm:) at a token count or version that does not take it")
        precondition((1...Self.maxTokens).contains(tokens), "CUDAMoE takes 1 to \(Self.maxTokens) tokens")
        precondition(x.byteCount >= 4 * tokens * hidden && out.byteCount >= 4 * tokens * hidden, "activation buffers too small for \(tokens) tokens")
        precondition(stageEvents.isEmpty || stageEvents.count == stageNames.count + 1, "stageEvents: one more than the \(stageNames.count) kernels")
        let overlap = overlapPrevious && stageEvents.isEmpty
        var stage = 0
        func mark() throws {
            if stage < stageEvents.count { try stageEvents[stage].record(stream) }
            stage += 1
        }
        let E = Int32(spec.experts), k = Int32(spec.topK), H = Int32(hidden), I = Int32(spec.intermediate), T = Int32(tokens)
        let (mode, normalize, scaling, groups, topKGroups) = Self.routingArguments(spec.routing)
        let (clamped, alpha, limit) = Self.activationArguments(spec.activation)
        func ptr(_ b: DeviceBuffer?) -> KernelModule.Argument { .pointer(b?.address ?? 0) }
        switch kernels {
        case .v1(let v):
            try mark()
            try module.launch(v.route, grid: ((spec.experts + 3) / 4, 1, 1), block: (128, 1, 1), stream: stream, overlapPrevious: overlap, [
                ptr(router), .int32(routerIsBF16 ? 1 : 0), ptr(routerBias), ptr(correctionBias), .int32(mode), .int32(normalize ? 1 : 0),
                .float(scaling), .int32(Int32(groups)), .int32(Int32(topKGroups)), ptr(x), .int32(T), .int32(H), .int32(E), .int32(k),
                ptr(logits), ptr(routes)])
            let bin = Self.bins.firstIndex { $0 >= tokens }!, b = Self.bins[bin], shared = Self.sharedBytes(bin: b)
            let pairsPerWarp = b == 2 || b == 4 ? 2 : 1, rowsPerWarp = b == 1 ? 1 : 2
            try mark()
            try module.launch(v.gateUp[bin], grid: ((spec.intermediate + 4 * pairsPerWarp - 1) / (4 * pairsPerWarp), 1, 1), block: (128, 1, 1),
                              sharedBytes: shared, stream: stream, overlapPrevious: overlap, [
                ptr(routes), .int32(E), .int32(k), ptr(x), .int32(H), .int32(I), ptr(v.gateUpCodes), ptr(v.gateUpScales), ptr(v.gateUpBias),
                .int32(v.interleaved ? 1 : 0), .int32(clamped), .float(alpha), .float(limit), ptr(v.act)])
            try mark()
            try module.launch(v.down[bin], grid: ((hidden + 4 * rowsPerWarp - 1) / (4 * rowsPerWarp), 1, 1), block: (128, 1, 1),
                              sharedBytes: shared, stream: stream, overlapPrevious: overlap, [
                ptr(routes), .int32(E), .int32(k), ptr(v.act), .int32(T), .int32(H), .int32(I), ptr(v.downCodes), ptr(v.downScales), ptr(v.downBias), ptr(out)])
        case .v2(let v):
            let plan = v.plan(tokens: tokens)
            if let trace { try trace.fill(byte: 0, stream: stream) }
            try mark()
            try module.launch(v.route, grid: (spec.experts, 1, 1), block: (256, 1, 1), stream: stream, overlapPrevious: overlap, [
                ptr(router), .int32(routerIsBF16 ? 1 : 0), ptr(routerBias), ptr(x), .int32(T), .int32(H), .int32(E),
                ptr(logits), ptr(v.xexp), ptr(v.sync), .int32(Int32(v.syncCount))])
            try mark()
            try module.launch(v.experts, grid: (plan.blocks, 1, 1), block: (Self.v2Threads, 1, 1), sharedBytes: plan.sharedBytes,
                              stream: stream, overlapPrevious: overlap, [
                ptr(logits), ptr(correctionBias), .int32(mode), .int32(normalize ? 1 : 0), .float(scaling), .int32(Int32(groups)),
                .int32(Int32(topKGroups)), ptr(x), ptr(v.xexp), .int32(T), .int32(H), .int32(I), .int32(E), .int32(k),
                ptr(v.gateUp), ptr(v.gateUpBias), ptr(v.down), ptr(v.downBias), .int32(clamped), .float(alpha), .float(limit),
                ptr(v.act), ptr(v.partial), ptr(v.sync), ptr(routes), ptr(out),
                .int32(Int32(plan.ringSlots)), .int32(Int32(plan.tokensPerSlot)), .int32(Int32(plan.xBytes)),
                .int32(Int32(plan.chunkSteps)), ptr(trace)])
        case .v4(let v):
            let b = v.base, plan = v.plans[tokens - 1]
            let logitArguments: [KernelModule.Argument] = [ptr(router), .int32(routerIsBF16 ? 1 : 0), ptr(routerBias), ptr(x), .int32(T),
                                                           .int32(H), .int32(E), ptr(logits), ptr(b.xexp), ptr(b.sync), .int32(Int32(b.syncCount))]
            try mark()
            if let route6 = v.route6 {
                try module.launch(route6, grid: (Self.route6Blocks(experts: spec.experts, hidden: hidden, perBlock: v.route6PerBlock), 1, 1),
                                  block: (256, 1, 1),
                                  sharedBytes: norm == nil ? 0 : 4 * hidden,
                                  stream: stream, overlapPrevious: overlap, logitArguments + [
                    ptr(correctionBias), .int32(mode), .int32(normalize ? 1 : 0), .float(scaling), .int32(Int32(groups)),
                    .int32(Int32(topKGroups)), .int32(k), .int32(Int32(plan.tokensPerSlot)), ptr(v.routed), ptr(routes),
                    .pointer(norm?.resid ?? 0), .pointer(norm?.add ?? 0), .pointer(norm?.weight ?? 0), .float(norm?.eps ?? 0)])
            } else {
                try module.launch(b.route, grid: (spec.experts, 1, 1), block: (256, 1, 1), stream: stream, overlapPrevious: overlap, logitArguments)
            }
            let routing: [KernelModule.Argument] = [ptr(logits), ptr(correctionBias), .int32(mode), .int32(normalize ? 1 : 0), .float(scaling),
                                                    .int32(Int32(groups)), .int32(Int32(topKGroups))]
            try mark()
            try module.launch(tokens == 1 ? v.gateUp1 ?? b.experts : b.experts, grid: (plan.gateBlocks, 1, 1), block: (Self.v4Threads, 1, 1),
                              sharedBytes: plan.gateShared,
                              stream: stream, overlapPrevious: overlap, routing + [
                ptr(x), ptr(b.xexp), .int32(T), .int32(H), .int32(I), .int32(E), .int32(k), ptr(b.gateUp), ptr(b.gateUpBias),
                .int32(clamped), .float(alpha), .float(limit), ptr(b.act), ptr(b.sync), ptr(routes),
                .int32(Int32(plan.gateWindow)), .int32(Int32(plan.tokensPerSlot)), ptr(v.routed)])
            try mark()
            try module.launch(v.down, grid: (plan.downBlocks, 1, 1), block: (Self.v4Threads, 1, 1), sharedBytes: plan.downShared,
                              stream: stream, overlapPrevious: overlap, routing + [
                ptr(b.act), .int32(T), .int32(H), .int32(I), .int32(E), .int32(k), ptr(b.down), ptr(b.downBias), ptr(b.partial),
                ptr(b.sync), ptr(out), .int32(Int32(plan.downWindow)), .int32(Int32(plan.tokensPerSlot)), .int32(Int32(plan.splits)),
                ptr(v.routed), .int32(plan.combineApart ? 1 : 0)])
            try mark()  // "combine": an empty stage when down sums its tiles itself
            if plan.combineApart, let combine = v.combine {
                try module.launch(combine, grid: ((hidden + 63) / 64, 1, 1), block: (128, 1, 1), stream: stream, overlapPrevious: overlap, [
                    ptr(v.routed), ptr(b.partial), ptr(out), .int32(T), .int32(H), .int32(k), .int32(Int32(plan.splits))])
            }
        }
        try mark()
    }

    /// moe6_route's grid: with 128 experts or more, each block takes the most experts' logits
    /// the fatbin allows (`perBlock.narrow` up to a hidden size of 4096, `perBlock.wide` above:
    /// its moe6_experts_per_block), else one (Kernels/moe.cu has the measurements: fewer blocks
    /// read x fewer times, but with few experts too few multiprocessors would read it).
    static func route6Blocks(experts: Int, hidden: Int, perBlock: (narrow: Int, wide: Int)) -> Int {
        let n = experts < 128 ? 1 : hidden <= 4096 ? perBlock.narrow : perBlock.wide
        return (experts + n - 1) / n
    }

    /// Experts the last call's tokens reached (version 7, which keeps its routing in `routed`; nil
    /// for the others): k at one token, else the routing's touched count. The caller has waited
    /// for the call (it reads device memory plainly).
    public func expertsReached(tokens T: Int) throws -> Int? {
        guard case .v4(let v) = kernels, v.route6 != nil, let routed = v.routed else { return nil }
        if T == 1 { return spec.topK }
        var head = [Int32](repeating: 0, count: 2)  // moe::Routes: the arrival counter, then the touched count
        try head.withUnsafeMutableBytes { try routed.download(into: $0) }
        return Int(head[1])
    }

    /// Whether `run(norm:)` can do the norm before the layer: one token, version 7 (its
    /// router, moe6_route, takes it), hidden size up to 8192 (the norm weight in its dynamic
    /// shared memory, under the 48 KB a launch gets without asking).
    public func takesNorm(tokens: Int) -> Bool {
        guard tokens == 1, hidden <= 8192, case .v4(let v) = kernels else { return false }
        return v.route6 != nil
    }

    /// The routing kernels' arguments for a routing rule: mode (0 softmax-top-k, 1 top-k-softmax,
    /// 2 sigmoid with correction bias), normalize, scaling, groups, groups kept.
    static func routingArguments(_ r: Routing) -> (mode: Int32, normalize: Bool, scaling: Float, groups: Int, topKGroups: Int) {
        switch r {
        case .softmaxTopK(let n): return (0, n, 1, 1, 1)
        case .topKSoftmax: return (1, false, 1, 1, 1)
        case .sigmoidWithBias(let n, let s, let g, let kg): return (2, n, s, g, kg)
        }
    }

    /// The GLU kernels' arguments for an activation: clamped (gpt-oss), alpha, limit.
    public static func activationArguments(_ a: Activation) -> (clamped: Int32, alpha: Float, limit: Float) {
        switch a {
        case .silu: return (0, 0, 0)
        case .clampedSwiGLU(let alpha, let limit): return (1, alpha, limit)
        }
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
