import Foundation
import Fulgur

/// Runs a plan on one GPU: the same ops as the CPU executor, in f32 activations, with the
/// weights in their stored formats (MXFP4, FP8, BF16; others decoded to f32 at upload). A
/// step of T <= 16 tokens is a fixed list of launches with no host round-trip; it is
/// captured once per T as a CUDA graph and replayed. Longer inputs run in chunks of 16.
///
/// Lowering fuses what the plan keeps apart where that saves launches: a residual add rides
/// in the norm after it; q/k/v (and gate/up) products from the same input become one product
/// over stacked weights when their formats allow; the q/k norms, RoPE, value scale and the
/// KV-cache write are one kernel before attention.
public final class CUDAExecutor: @unchecked Sendable {
    public let plan: Plan
    public let device: CUDADevice
    public let module: KernelModule
    public let stream: CUDAStream
    public let maxStepTokens: Int
    public let maxPositions: Int
    /// Positions held (the next token's position), shared with executors made by `sharingCache`.
    public var length: Int { cache.length }
    /// Bytes of weights one decode step reads (experts at top-k), as stored on the GPU.
    public private(set) var bytesPerDecodeStep = 0
    /// Entries of the step's launch list (a kernel family's launch closure each; one may enqueue
    /// several kernels, and which ones can depend on the token count). `kernelsPerStep` counts kernels.
    public var launchesPerStep: Int { launches.filter { !Self.bookkeeping.contains($0.kind) }.count }
    /// Kernels in the captured graph of a step of T tokens (the key), once one was captured.
    public private(set) var kernelsPerStep: [Int: Int] = [:]
    /// Launches of kernel family `kind` per step.
    public func launchCount(of kind: String) -> Int { launches.filter { $0.kind == kind }.count }
    /// Kernel families of the step, in order of first launch.
    public var kernelFamilies: [String] {
        var seen: [String] = []
        for l in launches where !Self.bookkeeping.contains(l.kind) && !seen.contains(l.kind) { seen.append(l.kind) }
        return seen
    }
    /// Entries of the launch list that are not kernel families: the layer-capture hook (a launch
    /// only while layers are captured) and the join of the L2-prefetch branch (no kernel).
    private static let bookkeeping: Set<String> = ["capture", "join"]

    /// Warming L2 with weights before the kernels that read them, during kernels that leave
    /// DRAM's bandwidth idle at batch 1: on a side branch of the step's graph, a short kernel
    /// prefetches a layer's o_proj and router bytes when its attention starts, and the next
    /// layer's q/k/v bytes when its MoE starts, so those products read from L2.
    /// `.evictLast` marks the lines evict-last. Off by default: on an H200 (gpt-oss-20b shape)
    /// it took 20-30 us off q/k/v and o_proj per step and gave as much back in the MoE and
    /// attention (Kernels/NOTES.md); a first version with bulk prefetches slowed the step 25%.
    public enum L2Prefetch: String, Sendable, CaseIterable { case off, normal, evictLast = "evict-last" }
    public let prefetch: L2Prefetch

    /// Sums a tensor-parallel shard's partial results over all shards (`.allReduce` ops of
    /// Plan.shard): enqueued on this executor's stream, capturable in its graph. With one, the
    /// step's greedy tokens are also found among the shards (SlicedArgmax), so `argmax` and the
    /// tokens a replayed step feeds to the next are the whole model's on every shard.
    public let communicator: (any StepAllReduce)?
    /// The first token id of this shard's LM head rows (Plan.vocabularySlice), with a communicator.
    public let vocabularyStart: Int
    /// Replay steps from CUDA graphs (one per token count, captured on first use).
    public var useGraphs = true

    /// The step: each launch with the kernel family it belongs to (for per-kernel timings).
    private var launches: [(kind: String, run: (Int) throws -> Void)] = []
    /// Each step's graph, keyed by the token count, plus `longKey` for a long-context step (`StepMode`).
    private var graphs: [Int: CUDAGraph] = [:]
    private static let longKey = 1 << 16
    /// What the launch closures read when a step is captured or run: whether it is a
    /// long-context step, and the threshold (`longContextPositions`).
    final class StepMode {
        var long = false
        var threshold = CUDAExecutor.defaultLongContextPositions
    }
    private let stepMode = StepMode()
    /// Sets `stepMode` for a step of T tokens from `length` on; returns its graph's key.
    private func setStepMode(tokens T: Int) -> Int {
        stepMode.long = !slotted && length + T >= stepMode.threshold
        return T + (stepMode.long ? Self.longKey : 0)
    }
    /// A single sequence's steps that reach this many positions are long-context steps
    /// (`defaultLongContextPositions`, which `FULGUR_ATTENTION_LONG` sets): their layers whose
    /// cache holds as many run version 3 with up to 64 splits. Setting it drops the captured
    /// graphs (gpu-check compares both ways on one executor).
    public var longContextPositions: Int {
        get { stepMode.threshold }
        set { stepMode.threshold = newValue; graphs = [:] }
    }

    /// Where a call's time went (`traceCalls`): host clock (DispatchTime nanoseconds) around the
    /// graph's launch and after the wait; the GPU's time between events recorded before and after
    /// the graph.
    public struct CallTiming: Sendable {
        public var launchStart: UInt64 = 0, launchEnd: UInt64 = 0, done: UInt64 = 0
        public var gpuMilliseconds = 0.0
    }
    /// Records `lastCall` for each argmax call (two events a step; for benchmarks), and adds
    /// its GPU time to `tracedCalls`.
    public var traceCalls = false
    public private(set) var lastCall = CallTiming()
    /// Argmax calls traced and the sum of their GPU times (events around the graphs).
    public var tracedCalls: (count: Int, gpuMilliseconds: Double) = (0, 0)
    private lazy var callEvents: (CUDAEvent, CUDAEvent)? = try? (device.makeEvent(), device.makeEvent())
    private var keep: [AnyObject] = []  // device objects the launches point into
    private var moeLayers: [CUDAMoE] = []
    private let tokens: DeviceBuffer, positions: DeviceBuffer, ids: DeviceBuffer, logits: DeviceBuffer
    /// Each row's slot of the cache (`slotted`: continuous batching); zeros otherwise.
    private let rowSlots: DeviceBuffer
    /// Sequences the cache holds: 1, or more for `forward(batch:)`.
    public let slots: Int
    /// Whether rows name their slot (`forward(batch:)`, any number of slots) or all use slot 0.
    private let slotted: Bool
    /// Positions held per slot (`slotted`).
    private var slotLengths: [Int]
    /// The device copies of the plan's weights, shared by executors made with `sharingWeights`.
    private let weights: WeightStore
    private var weightCursor = 0
    private let cache: Cache
    private var caches: [Cache.Layer] { cache.layers }
    private let vocab: Int
    /// x rows of `forward(rows:)` and the captured features ([T, captureLayers.count * hidden]).
    private let x: DeviceBuffer, features: DeviceBuffer

    /// Keys and values of every layer, f32, [capacity, kvHeads, dim] per layer and slot (slot
    /// major); a sliding layer keeps a ring of window + maxStepTokens positions (see KVCache).
    final class Cache {
        struct Layer {
            let keys: DeviceBuffer, values: DeviceBuffer
            let capacity: Int, window: Int?
        }
        let layers: [Layer]
        var length = 0
        let maxPositions: Int

        init(spec: ModelSpec, device: CUDADevice, maxPositions: Int, maxStepTokens: Int, slots: Int) throws {
            self.maxPositions = maxPositions
            layers = try spec.layers.map { l in
                let a = l.attention
                let capacity = a.window.map { min($0 + maxStepTokens, maxPositions) } ?? maxPositions
                return Layer(keys: try device.allocate(4 * slots * capacity * a.kvHeads * a.headDim),
                             values: try device.allocate(4 * slots * capacity * a.kvHeads * a.valueHeadDim), capacity: capacity, window: a.window)
            }
        }
    }

    /// Which MoE kernels run MXFP4 experts (Kernels/moe.cu versions 1, 2 and 3).
    public let moeVersion: Int

    /// `sharing`: an executor over the same layers whose cache (and positions) this one uses;
    /// the two also share a stream, so one's cache writes are ordered before the other's reads.
    /// `slots`: sequences the cache holds, for `forward(batch:)` (continuous batching).
    /// `sharingWeightsOf`: an executor of the same plan whose device copies of the weights this
    /// one uses instead of uploading its own (`sharingWeights`).
    public init(plan: Plan, device: CUDADevice, module: KernelModule, maxPositions: Int? = nil, maxStepTokens: Int = 16,
                moeVersion: Int = CUDAMoE.defaultVersion, prefetch: L2Prefetch = .off, communicator: (any StepAllReduce)? = nil, vocabularyStart: Int = 0,
                sharing: CUDAExecutor? = nil, slots: Int = 1, slotted: Bool = false, sharingWeightsOf owner: CUDAExecutor? = nil,
                progress: ((Int, Int) -> Void)? = nil) throws {
        precondition((1...CUDALinear.maxTokens).contains(maxStepTokens), "steps of 1 to \(CUDALinear.maxTokens) tokens")
        precondition(slots >= 1 && (sharing == nil || slots == 1), "a cache of at least one slot, and one when shared")
        if let owner {
            guard owner.device === device, owner.plan.ops.count == plan.ops.count, owner.plan.spec.layerCount == plan.spec.layerCount else {
                throw FulgurError(.usage, "CUDA executor: sharing the weights of an executor of another plan or device")
            }
        }
        self.plan = plan
        self.slots = slots
        self.slotted = slotted
        precondition(slotted || slots == 1, "several slots need slot-indexed rows")
        slotLengths = [Int](repeating: 0, count: slots)
        weights = owner?.weights ?? WeightStore()
        self.device = device
        self.module = module
        self.maxStepTokens = maxStepTokens
        self.moeVersion = moeVersion
        self.prefetch = prefetch
        self.communicator = communicator
        self.vocabularyStart = vocabularyStart
        try device.makeCurrent()
        var context = min(maxPositions ?? plan.spec.maxPositions, plan.spec.maxPositions)
        if let sharing { context = sharing.maxPositions }
        self.maxPositions = context
        stream = try sharing?.stream ?? device.makeStream()
        vocab = plan.lmHead.outFeatures
        tokens = try device.allocate(4 * maxStepTokens)
        positions = try device.allocate(4 * maxStepTokens)
        ids = try device.allocate(4 * maxStepTokens)
        let rowSlots = try device.allocate(4 * maxStepTokens)
        try [Int32](repeating: 0, count: maxStepTokens).withUnsafeBytes { try rowSlots.upload($0) }
        self.rowSlots = rowSlots
        logits = try device.allocate(4 * maxStepTokens * vocab)
        if let sharing {
            precondition(sharing.maxStepTokens == maxStepTokens && sharing.plan.spec.layerCount == plan.spec.layerCount, "sharing a cache of other layers")
            cache = sharing.cache
        } else {
            cache = try Cache(spec: plan.spec, device: device, maxPositions: context, maxStepTokens: maxStepTokens, slots: slots)
        }
        x = try device.allocate(4 * maxStepTokens * max(plan.widths[.x] ?? 0, plan.spec.hiddenSize))
        features = try device.allocate(4 * maxStepTokens * plan.spec.layerCount * plan.spec.hiddenSize)
        try lower(progress: progress)
    }

    public var vocabSize: Int { vocab }

    public func reset() { cache.length = 0 }

    /// Whether the cache can rewind to `position`: a ring keeps its window only while the
    /// positions written since fit in its slack (as KVCache.canTruncate).
    public func canTruncate(to position: Int) -> Bool {
        guard position >= 0, position <= length else { return false }
        for c in caches {
            if let w = c.window, c.capacity < maxPositions, length - position > c.capacity - w { return false }
        }
        return true
    }

    public func truncate(to position: Int) {
        precondition(canTruncate(to: position), "KV cache cannot rewind from \(length) to \(position)")
        cache.length = position
    }

    /// Runs `tokens` at the next positions and returns logits (`[T, vocab]` for `.all`,
    /// `[vocab]` for `.last`), as CPUExecutor.forward.
    public func forward(_ input: [Int], logits want: CPUExecutor.Logits = .last) throws -> [Float] {
        var result: [Float] = []
        try run(input) { count, isLast in
            switch want {
            case .all:
                var l = [Float](repeating: 0, count: count * vocab)
                try l.withUnsafeMutableBytes { try logits.download(into: $0, stream: stream) }
                try stream.synchronize()
                result += l
            case .last where isLast:
                result = [Float](repeating: 0, count: vocab)
                try result.withUnsafeMutableBytes { try logits.download(into: $0, offset: 4 * (count - 1) * vocab, stream: stream) }
                try stream.synchronize()
            default:
                break
            }
        }
        return result
    }

    /// Runs a plan that starts from given rows of x (`[T, plan.widths[.x]]`) instead of token
    /// embeddings (the DFlash drafter's context features), as CPUExecutor.forward(rows:).
    public func forward(rows: [Float], logits want: CPUExecutor.Logits = .none) throws -> [Float] {
        let width = plan.widths[.x]!
        precondition(rows.count % width == 0, "rows of \(rows.count) floats do not split into rows of \(width)")
        return try forward(rowCount: rows.count / width, logits: want) { start, n in
            try rows.withUnsafeBytes { try x.upload(UnsafeRawBufferPointer(rebasing: $0[(4 * start * width)..<(4 * (start + n) * width)]), stream: stream) }
        }
    }

    /// forward(rows:) from the first `count` rows of what `source` captured in its last forward,
    /// copied from its device buffer, never through the host: the DFlash drafter's context update
    /// after a verify. `source` is a CUDA executor on this GPU or a peer (a split target's shard
    /// 0 has the features; Executor.forward(capturedRowsOf:count:)). False, having done nothing,
    /// where the rows are not there: another kind of executor, rows not captured by its last
    /// step (a forward longer than one step, or fewer rows), or another width.
    public func forward(capturedRowsOf source: any Executor, count: Int) throws -> Bool {
        guard let source = featureSource(source, count: count) else { return false }
        let bytes = 4 * count * plan.widths[.x]!
        // The source's step wrote the rows on its own stream; the next step of the source
        // overwrites them, and this copy is done before this call returns (the stream synchronized).
        try source.device.makeCurrent()
        try source.stream.synchronize()
        try device.makeCurrent()
        _ = try forward(rowCount: count, logits: .none) { _, _ in
            try x.copy(from: source.features, bytes: bytes, stream: stream)
            try stream.synchronize()
        }
        return true
    }

    /// `FULGUR_CAPTURED_ROWS=host`: every drafter context update through the host, as before the
    /// twenty-sixth session (for an A/B in one binary).
    static let capturedRowsThroughHost = ProcessInfo.processInfo.environment["FULGUR_CAPTURED_ROWS"] == "host"

    /// The executor whose `features` hold the rows forward(capturedRowsOf:count:) asks for, where
    /// this executor can copy them: on this GPU, or shard 0 of a tensor-parallel group this GPU
    /// is in (its PeerAllReduce enabled peer access between the GPUs' primary contexts, which
    /// every executor on them uses). Nil otherwise.
    func featureSource(_ source: any Executor, count: Int) -> CUDAExecutor? {
        guard !Self.capturedRowsThroughHost else { return nil }
        let found: CUDAExecutor
        if let s = source as? CUDAExecutor, s.device.ordinal == device.ordinal {
            found = s
        } else if let split = source as? CUDATensorParallel, split.group.devices.contains(where: { $0.ordinal == device.ordinal }) {
            found = split.shards[0]
        } else {
            return nil
        }
        guard count >= 1, count <= found.deviceFeatureRows, count <= maxStepTokens,
              plan.widths[.x] == found.captureLayers.count * found.plan.spec.hiddenSize else { return nil }
        return found
    }

    /// The steps of forward(rows:), `fill(start, n)` putting rows start..<start+n into x.
    private func forward(rowCount count: Int, logits want: CPUExecutor.Logits, fill: (Int, Int) throws -> Void) throws -> [Float] {
        try device.makeCurrent()
        try oneSequence()
        guard length + count <= maxPositions else {
            throw FulgurError(.usage, "context is full: \(length) + \(count) rows exceed the \(maxPositions)-position context")
        }
        dropFeatures()
        var result: [Float] = []
        var start = 0
        while start < count {
            let n = min(maxStepTokens, count - start)
            try fill(start, n)
            let pos = (0..<n).map { Int32(length + $0) }
            try pos.withUnsafeBytes { try positions.upload($0, stream: stream) }
            try keepFeatures()
            try enqueueStep(n)
            cache.length += n
            start += n
            markFeatures(n)
            if want == .all || (want == .last && start == count) {
                var l = [Float](repeating: 0, count: n * vocab)
                try l.withUnsafeMutableBytes { try logits.download(into: $0, stream: stream) }
                try stream.synchronize()
                result = want == .all ? result + l : Array(l.suffix(vocab))
            }
        }
        return result
    }

    /// Layers whose output hidden states each forward returns in `capturedFeatures`
    /// (`[T, captureLayers.count * hidden]`), as CPUExecutor.captureLayers.
    public var captureLayers: [Int] = [] {
        didSet {
            captureSlot = Array(repeating: nil, count: plan.spec.layerCount)
            for (slot, layer) in captureLayers.enumerated() { captureSlot[layer] = slot }
            graphs = [:]  // the captured graphs copy the old layers
            dropFeatures()  // rows of the old layers
        }
    }
    /// The rows of the last forward's steps before its last, downloaded; its last step's rows
    /// (`deviceFeatureRows`) stay in `features` until something asks for them here, so a
    /// drafter that reads them on the GPU (forward(capturedRowsOf:count:)) costs no download.
    public var capturedFeatures: [Float] {
        get throws {
            try keepFeatures()
            return hostFeatures
        }
    }
    private var hostFeatures: [Float] = []
    private var deviceFeatureRows = 0
    private var captureSlot: [Int?] = []

    private func dropFeatures() {
        hostFeatures.removeAll(keepingCapacity: true)
        deviceFeatureRows = 0
    }

    /// After a step of `T` rows: its features are in `features`.
    private func markFeatures(_ T: Int) { deviceFeatureRows = captureLayers.isEmpty ? 0 : T }

    /// Downloads the rows still only in `features` (before a step overwrites them, or when asked).
    private func keepFeatures() throws {
        guard deviceFeatureRows > 0 else { return }
        try device.makeCurrent()
        var f = [Float](repeating: 0, count: deviceFeatureRows * captureLayers.count * plan.spec.hiddenSize)
        try f.withUnsafeMutableBytes { try features.download(into: $0, stream: stream) }
        try stream.synchronize()
        hostFeatures += f
        deviceFeatureRows = 0
    }

    public func sharingCache(plan other: Plan) throws -> any Executor {
        try oneSequence()
        return try derived(CUDAExecutor(plan: other, device: device, module: module, maxStepTokens: maxStepTokens, moeVersion: moeVersion, prefetch: prefetch,
                                        sharing: self))
    }

    /// An executor made from this one, with this one's long-context threshold.
    private func derived(_ e: CUDAExecutor) -> CUDAExecutor {
        e.longContextPositions = longContextPositions
        return e
    }

    /// `sharingCache(plan:)` over the device copies of the weights of `weightsOf`, a CUDA
    /// executor of `other` on this device (a DFlash drafter's context plan, for another lane):
    /// nothing is uploaded again. Anything else: as `sharingCache(plan:)`.
    public func sharingCache(plan other: Plan, weightsOf: any Executor) throws -> any Executor {
        guard let owner = weightsOf as? CUDAExecutor, owner.communicator == nil else { return try sharingCache(plan: other) }
        try oneSequence()
        return try derived(CUDAExecutor(plan: other, device: device, module: module, maxStepTokens: maxStepTokens, moeVersion: moeVersion, prefetch: prefetch,
                                        sharing: self, sharingWeightsOf: owner))
    }

    /// Whether this executor runs on the same device copies of its weights as `other`
    /// (`sharingWeights`, `sharingCache(plan:weightsOf:)`), for checks.
    public func sharesWeights(with other: any Executor) -> Bool {
        (other as? CUDAExecutor).map { $0.weights === weights } ?? false
    }

    /// Another executor over this one's device copies of the weights (the large ones are not
    /// uploaded again), with its own cache, activations and stream: a server lane (one
    /// sequence), or a batch (`slotted`: `slots` sequences, `forward(batch:)`). Not for
    /// tensor-parallel shards.
    private func sibling(slots: Int, slotted: Bool) throws -> CUDAExecutor {
        guard communicator == nil else { throw FulgurError(.unsupported, "CUDA executor: sharing a tensor-parallel shard's weights") }
        guard slots >= 1 else { throw FulgurError(.usage, "a cache of at least one slot, got \(slots)") }
        return try derived(CUDAExecutor(plan: plan, device: device, module: module, maxPositions: maxPositions, maxStepTokens: maxStepTokens,
                                        moeVersion: moeVersion, prefetch: prefetch, slots: slots, slotted: slotted, sharingWeightsOf: self))
    }

    public func sharingWeights() throws -> any Executor { try sibling(slots: 1, slotted: false) }

    /// A batch executor over these weights: a cache of `slots` sequences. Its steps take up to
    /// `maxStepTokens` rows (one graph), so a longer batch runs as several, in order, and a
    /// sequence may bring any number of tokens (`maxSequenceTokens` is not a limit here).
    /// Causal plans only: a non-causal row's keys end at the step's last row's position.
    public func batchExecutor(slots: Int, maxSequenceTokens: Int) throws -> any BatchExecutor {
        guard plan.spec.layers.allSatisfy({ $0.attention.causal }) else {
            throw FulgurError(.unsupported, "CUDA executor: batching a plan with non-causal attention (a DFlash drafter's)")
        }
        return try sibling(slots: slots, slotted: true)
    }

    /// Runs `tokens` and returns the greedy choice after each position of the last chunk.
    public func argmax(_ input: [Int]) throws -> [Int] {
        var result: [Int] = []
        if traceCalls { lastCall = CallTiming() }
        try run(input) { count, isLast in
            guard isLast else { return }
            var got = [Int32](repeating: 0, count: count)
            try got.withUnsafeMutableBytes { try ids.download(into: $0, stream: stream) }
            try stream.synchronize()
            result = got.map { Int($0) }
        }
        if traceCalls, lastCall.launchStart != 0, let (a, b) = callEvents {  // events recorded (graphs in use)
            lastCall.done = DispatchTime.now().uptimeNanoseconds
            lastCall.gpuMilliseconds = try b.milliseconds(since: a)
            tracedCalls.count += 1
            tracedCalls.gpuMilliseconds += lastCall.gpuMilliseconds
        }
        return result
    }

    private func run(_ input: [Int], after: (Int, Bool) throws -> Void) throws {
        // The server decodes on its own threads; a CUDA context is current per thread.
        try device.makeCurrent()
        try oneSequence()
        dropFeatures()
        guard !input.isEmpty else { return }
        let table = plan.embedding.table.shape[0]
        for t in input where t < 0 || t >= table {
            throw FulgurError(.usage, "token id \(t) is outside the vocabulary (0..<\(table))")
        }
        guard length + input.count <= maxPositions else {
            throw FulgurError(.usage, "context is full: \(length) + \(input.count) tokens exceed the \(maxPositions)-position context")
        }
        var start = 0
        while start < input.count {
            let chunk = Array(input[start..<min(start + maxStepTokens, input.count)])
            start += chunk.count
            let ints = chunk.map { Int32($0) }, pos = (0..<chunk.count).map { Int32(length + $0) }
            try ints.withUnsafeBytes { try tokens.upload($0, stream: stream) }
            try pos.withUnsafeBytes { try positions.upload($0, stream: stream) }
            try keepFeatures()
            try enqueueStep(chunk.count)
            cache.length += chunk.count
            markFeatures(chunk.count)
            try after(chunk.count, start == input.count)
        }
    }

    /// Enqueues one step of `T` tokens (tokens and positions already on the device).
    private func enqueueStep(_ T: Int) throws {
        guard useGraphs else {
            _ = setStepMode(tokens: T)
            for l in launches { try l.run(T) }
            return
        }
        let key = setStepMode(tokens: T)
        if graphs[key] == nil {
            graphs[key] = try countingKernels(tokens: T) { try CUDAGraph(capturing: stream) { for l in launches { try l.run(T) } } }
        }
        let trace = traceCalls ? callEvents : nil
        if let (a, _) = trace {
            try a.record(stream)
            lastCall.launchStart = DispatchTime.now().uptimeNanoseconds
        }
        try graphs[key]!.launch(stream)
        if let (_, b) = trace {
            lastCall.launchEnd = DispatchTime.now().uptimeNanoseconds
            try b.record(stream)
        }
    }

    // MARK: Benchmark support

    /// Times `steps` decode steps of `T` tokens replayed back to back on the GPU: each step's
    /// greedy tokens feed the next step's embedding and the positions advance on the device,
    /// so the host only launches graphs. A tensor-parallel shard's greedy tokens are the whole
    /// model's (exchanged among the shards inside the step), so every shard of a group feeds
    /// the same tokens, as real decoding does. Returns milliseconds per step (events, after
    /// `warmup` steps). The cache must hold `(warmup + steps) * T` more positions.
    ///
    /// `skipping`: kernel families left out of the graph (the step then computes garbage; for
    /// measuring what a family costs inside the replayed step). `advance: false` leaves the
    /// cache's length where it was, so the next timing runs at the same context.
    ///
    /// With `fixedTokens` every step runs the same T distinct tokens (drawn once) instead of
    /// feeding the greedy tokens back: a family left out of the graph then cannot change which
    /// experts the step's tokens reach (left-out attention or sampling made the 8 tokens of a
    /// verify step alike, so the MoE touched 4 experts instead of ~20 and looked cheap).
    public func timeReplayedSteps(tokens T: Int, steps: Int, warmup: Int = 5, skipping: Set<String> = [], advance: Bool = true,
                                  fixedTokens: Bool = false) throws -> Double {
        precondition((1...maxStepTokens).contains(T))
        try device.makeCurrent()
        try oneSequence()
        dropFeatures()  // the replayed steps overwrite them
        var skip = skipping
        if skip.contains("prefetch") { skip.insert("join") }
        guard length + (warmup + steps) * T <= maxPositions else {
            throw FulgurError(.usage, "the benchmark needs \((warmup + steps) * T) positions after \(length); the context holds \(maxPositions)")
        }
        let graph = try replayGraph(tokens: T, skipping: skip, fixedTokens: fixedTokens)
        for _ in 0..<warmup { try graph.launch(stream) }
        let start = try device.makeEvent(), end = try device.makeEvent()
        try start.record(stream)
        for _ in 0..<steps { try graph.launch(stream) }
        try end.record(stream)
        let ms = try end.milliseconds(since: start)
        if advance { cache.length += (warmup + steps) * T }
        return ms / Double(steps)
    }

    /// Whether the benchmarks' replayed steps of `T` tokens run fixed distinct random ids (steps of
    /// several tokens) rather than feed each step's greedy tokens to the next (one token). A
    /// verify block's ids are distinct; greedy tokens fed back were as few as 5 or 6 distinct ids
    /// of 8, a count that moved with each build's rounding, so which experts a step reached
    /// depended on the build (the two ways measured within 1% of each other in one build;
    /// Kernels/NOTES.md, twenty-ninth session).
    public static func replaysDistinctTokens(_ T: Int) -> Bool { T > 1 }
    public static let replayedTokensNote = "1-token steps feed each step's greedy token to the next; steps of more tokens run the same T distinct random ids every step (as a verify block's)."

    /// The step of `T` tokens for back-to-back replays (`timeReplayedSteps`, `timeline`): uploads
    /// the tokens (fixed random ones, or 1s that each step's greedy tokens replace) and the
    /// positions from `length`, then captures the launches not in `skipping`, feeding the greedy
    /// tokens back (unless fixed) and advancing the positions on the GPU. `capturing` is told
    /// each launch's family as it is captured ("step" for the feeding back).
    private func replayGraph(tokens T: Int, skipping: Set<String> = [], fixedTokens: Bool = false,
                             capturing: (String) -> Void = { _ in }) throws -> CUDAGraph {
        let advancePositions = try module.function("advance_positions")
        var rng = SeededGenerator(seed: 11)
        let vocab = UInt64(min(plan.embedding.table.shape[0], plan.spec.vocabSize))
        let ints = fixedTokens ? (0..<T).map { _ in Int32(rng.next() % vocab) } : [Int32](repeating: 1, count: T)
        let pos = (0..<T).map { Int32(length + $0) }
        try ints.withUnsafeBytes { try tokens.upload($0, stream: stream) }
        try pos.withUnsafeBytes { try positions.upload($0, stream: stream) }
        _ = setStepMode(tokens: T)
        func capture() throws -> CUDAGraph {
            try CUDAGraph(capturing: self.stream) {
                for l in self.launches where !skipping.contains(l.kind) {
                    capturing(l.kind)
                    try l.run(T)
                }
                capturing("step")
                if !fixedTokens { try self.tokens.copy(from: self.ids, bytes: 4 * T, stream: self.stream) }
                try self.module.launch(advancePositions, grid: (1, 1, 1), block: (32, 1, 1), stream: self.stream,
                                       [.pointer(self.positions.address), .int32(Int32(T))])
            }
        }
        // The whole step (bar the host's token copy and the position advance) counts as kernelsPerStep.
        return skipping.isEmpty ? try countingKernels(tokens: T, extra: 1, capture) : try capture()
    }

    /// Runs `capture` (a step's graph capture) counting the kernels it launches into
    /// kernelsPerStep[T], less `extra` launched for the replay's own bookkeeping.
    private func countingKernels(tokens T: Int, extra: Int = 0, _ capture: () throws -> CUDAGraph) throws -> CUDAGraph {
        let outer = module.launchObserver
        var count = 0
        module.launchObserver = { count += 1; outer?($0) }
        defer { module.launchObserver = outer }
        let graph = try capture()
        kernelsPerStep[T] = count - extra
        return graph
    }

    /// Per MoE layer, the experts the last step of `T` tokens reached (CUDAMoE.expertsReached;
    /// empty where the MoE kernels do not keep their routing). A step's cost follows them, so a
    /// benchmark says how many its rows reached.
    public func expertsReached(tokens T: Int) throws -> [Int] {
        try device.makeCurrent()
        try stream.synchronize()
        return try moeLayers.compactMap { try $0.expertsReached(tokens: T) }
    }

    /// Distinct token ids among the `T` rows of the last replayed step (its greedy tokens fed
    /// back, or the fixed ids). The MoE's cost depends on how many experts a step's rows reach,
    /// and alike rows reach fewer, so a benchmark says how varied its rows were.
    public func distinctFedTokens(_ T: Int) throws -> Int { Set(try fedTokens(T)).count }

    /// The `T` token ids in the replayed step's token buffer (the greedy tokens fed back, or the fixed ids).
    public func fedTokens(_ T: Int) throws -> [Int] {
        precondition((1...maxStepTokens).contains(T))
        try device.makeCurrent()
        var got = [Int32](repeating: 0, count: T)
        try got.withUnsafeMutableBytes { try tokens.download(into: $0, stream: stream) }
        try stream.synchronize()
        return got.map { Int($0) }
    }

    /// Default steps of `timeline` after its untimed ones (the bench reserves positions for them).
    public static let timelineSteps = 20, timelineWarmup = 3

    /// Replays `steps` decode steps of `T` tokens as the benchmarks do (`replaysDistinctTokens`,
    /// positions advancing on the GPU) with the kernels recording each block's start and
    /// end, and returns where the step's time goes kernel by kernel (`Timeline`). Needs a
    /// timeline build of the kernels (scripts/build-kernels --trace); the records cost the
    /// kernels a little, so time steps without it. Leaves the cache's length where it was.
    public func timeline(tokens T: Int, steps: Int = CUDAExecutor.timelineSteps, warmup: Int = CUDAExecutor.timelineWarmup) throws -> Timeline {
        precondition((1...maxStepTokens).contains(T) && steps >= 2)
        try device.makeCurrent()
        try oneSequence()
        dropFeatures()
        guard length + (warmup + steps) * T <= maxPositions else {
            throw FulgurError(.usage, "the timeline needs \((warmup + steps) * T) positions after \(length); the context holds \(maxPositions)")
        }
        let start = length
        defer { cache.length = start }
        var names: [(family: String, kernel: String)] = []
        var family = ""
        module.launchObserver = { names.append((family, $0)) }
        defer { module.launchObserver = nil }
        let graph = try replayGraph(tokens: T, fixedTokens: Self.replaysDistinctTokens(T)) { family = $0 }
        module.launchObserver = nil
        for _ in 0..<warmup { try graph.launch(stream) }
        try stream.synchronize()
        // Room for the blocks of `steps` steps, at most 256 MB (gpt-oss-20b: about 86k blocks a
        // step, 50k of them the LM head's; more than fits is reported, not dropped silently).
        let recordBytes = Timeline.Record.bytes, capacity = min(names.count * steps * 4096, (256 << 20) / recordBytes)
        let buffer = try device.allocate(16 + recordBytes * capacity)
        try [UInt32(0), UInt32(capacity), 0, 0].withUnsafeBytes { try buffer.upload($0) }
        try module.setTrace(buffer.address)
        do {
            for _ in 0..<steps { try graph.launch(stream) }
            try stream.synchronize()
        } catch {
            try? module.setTrace(0)
            throw error
        }
        try module.setTrace(0)
        var header = [UInt32](repeating: 0, count: 4)
        try header.withUnsafeMutableBytes { try buffer.download(into: $0) }
        guard Int(header[0]) <= capacity else {
            throw FulgurError(.usage, "timeline: \(header[0]) block records, room for \(capacity)")
        }
        var bytes = [UInt8](repeating: 0, count: 16 + recordBytes * Int(header[0]))
        try bytes.withUnsafeMutableBytes { try buffer.download(into: $0) }
        let records = bytes.withUnsafeBytes { raw in
            (0..<Int(header[0])).map { i -> Timeline.Record in
                let o = 16 + recordBytes * i
                func u64(_ at: Int) -> UInt64 { raw.loadUnaligned(fromByteOffset: o + at, as: UInt64.self) }
                return Timeline.Record(grid: u64(0), start: u64(8), end: u64(16), marks: (u64(24), u64(32)),
                                       sm: raw.loadUnaligned(fromByteOffset: o + 40, as: UInt32.self),
                                       block: raw.loadUnaligned(fromByteOffset: o + 44, as: UInt32.self))
            }
        }
        return try Timeline(records: records, names: names, steps: steps, tokens: T)
    }

    /// Per kernel family, microseconds of one step of `T` tokens: every launch timed alone
    /// between events (so without the overlap of programmatic launches; the sum exceeds a
    /// replayed step), median of `rounds`. The step runs at the current positions without
    /// advancing them.
    public func profile(tokens T: Int, rounds: Int = 10) throws -> [(kind: String, launches: Int, micros: Double)] {
        try device.makeCurrent()
        try oneSequence()
        let ints = [Int32](repeating: 1, count: T), pos = (0..<T).map { Int32(length + $0) }
        try ints.withUnsafeBytes { try tokens.upload($0, stream: stream) }
        try pos.withUnsafeBytes { try positions.upload($0, stream: stream) }
        _ = setStepMode(tokens: T)
        let events = try (0...launches.count).map { _ in try device.makeEvent() }
        var times = [[Double]](repeating: [], count: launches.count)
        for _ in 0..<(rounds + 2) {
            try events[0].record(stream)
            for (i, l) in launches.enumerated() {
                try l.run(T)
                try events[i + 1].record(stream)
            }
            try stream.synchronize()
            for i in launches.indices { times[i].append(try events[i + 1].milliseconds(since: events[i]) * 1e3) }
        }
        var order: [String] = [], sums: [String: (Int, Double)] = [:]
        for (i, l) in launches.enumerated() where l.kind != "join" {
            let median = times[i].dropFirst(2).sorted()[rounds / 2]  // the first two rounds warm up
            if sums[l.kind] == nil { order.append(l.kind) }
            let s = sums[l.kind] ?? (0, 0)
            sums[l.kind] = (s.0 + 1, s.1 + median)
        }
        return order.map { ($0, sums[$0]!.0, sums[$0]!.1) }
    }

    // MARK: Lowering the plan to launches

    /// Blocks that share one (head, token)'s keys: enough for the longest range the layer sees.
    /// (Fewer at large steps, to fill the GPU about 8 blocks an SM deep instead of 15 waves at
    /// 16 tokens, measured slower on an H200: 8.50 / 19.35 ms against 8.40 / 18.91 for 8 / 16.)
    public static func attentionSplits(_ capacity: Int) -> Int { min(attentionMaxSplits, max(1, (capacity + 127) / 128)) }
    /// The most splits version 2 and version 4 take (kMaxSplits in Kernels/attention.cu).
    public static let attentionMaxSplits = 16
    /// The most splits version 3 takes (kMaxGroupedSplits): in long-context steps; the shares
    /// buffer is sized for it where such steps can happen.
    public static let groupedLongMaxSplits = 64
    /// Single-sequence steps that reach this many positions are long-context steps: their
    /// layers whose cache holds as many (full attention, not a sliding window's ring) run
    /// version 3 at every token count, with up to `groupedLongMaxSplits` splits. At 1-3 tokens
    /// version 4 (a block per query head) reads each key once per query head, and both
    /// versions' blocks walk their share in 64-key chunks one after another, so their time grew
    /// with the context. `FULGUR_ATTENTION_LONG=N` sets the threshold (0: every step is long).
    public static let defaultLongContextPositions = Int(ProcessInfo.processInfo.environment["FULGUR_ATTENTION_LONG"] ?? "") ?? 8192

    /// Version 3's entry for a group of heads / kvHeads query heads: attention_decode_g<GMAX>, the
    /// group rounded up to a power of two (1, 2, 4, 8, 16).
    static func groupedAttentionKernel(heads: Int, kvHeads: Int) -> String {
        "attention_decode_g\(paddedGroup(heads / max(kvHeads, 1)))"
    }
    /// A query-head group rounded up to a power of two (the kernel's GMAX).
    static func paddedGroup(_ group: Int) -> Int { group <= 1 ? 1 : 1 << (Int.bitWidth - (group - 1).leadingZeroBitCount) }

    /// Which attention kernel a step of T tokens launches: below `attentionGroupedMinTokens`,
    /// version 4 (`attention_decode_h1`: a block per query head, with version 3's chunk
    /// pipeline), from there up version 3 (`attention_decode_g<G>`, a block per KV head's
    /// group). On an H100 (Kernels/NOTES.md, sixth session) version 3 made the 8-token
    /// gpt-oss-20b step 6.14 -> 5.49 ms (5.24 after its later changes) and the 1-token step
    /// 2.49 -> 2.80. For comparisons, FULGUR_ATTENTION_VERSION=3 or 4 takes that version at
    /// every T, and 2 version 2 (`attention_decode_v2`, a chain of dependent loads) below 4 tokens.
    public static let attentionVersion = Int(ProcessInfo.processInfo.environment["FULGUR_ATTENTION_VERSION"] ?? "") ?? 0
    public static let attentionGroupedMinTokens = 4
    /// Whether a norm of the residual stream into h is done by the product or MoE router after
    /// it at one token (ResidualNorm: gemv_wide_norm_*, moe6_route) instead of its own
    /// add_rmsnorm launch. `FULGUR_FUSE_NORMS=0` turns it off (comparisons).
    static let fuseNorms = ProcessInfo.processInfo.environment["FULGUR_FUSE_NORMS"] != "0"
    /// Whether version 4's blocks do attention_prep's work (q/k norms, RoPE, value scale, the
    /// KV-cache write) for a single sequence's 1-token step (attention_decode_h1p) instead of
    /// its own launch. `FULGUR_FUSE_PREP=0` turns it off (comparisons).
    public static let fusePrep = ProcessInfo.processInfo.environment["FULGUR_FUSE_PREP"] != "0"
    /// The most tokens attention_decode_h1p takes (kMaxPrepRows in Kernels/attention.cu).
    public static let prepMaxTokens = 3
    /// The most tokens the executor gives attention_decode_h1p. Measured (H200, gpt-oss-20b,
    /// three rounds in one call; Kernels/NOTES.md, thirteenth session): 1 token 2.040 -> 2.018
    /// ms, but 2 tokens 2.793 -> 2.808 and 3 tokens 3.327 -> 3.336, so one.
    public static let prepTokens = 1
    /// attention_decode_h1p's dynamic shared memory beyond version 4's (Kernels/attention.cu,
    /// decode's `prep`): raw q and key rows, the step's keys and values, the rotary factors.
    public static func prepSharedBytes(headDim: Int, valueDim: Int) -> Int {
        4 * ((2 + 3 * prepMaxTokens) * headDim + prepMaxTokens * valueDim)
    }
    /// Whether attention_decode_h1p can take a single sequence's step of T tokens (version 4's
    /// grid, at most prepMaxTokens): what `gpu-check layer` checks it on.
    public static func prepKernelTakes(tokens: Int) -> Bool {
        tokens <= prepMaxTokens && !groupedAttention(tokens: tokens) && attentionVersion != 2
    }
    /// Whether a single sequence's step of T tokens runs attention_decode_h1p (version 4 with
    /// attention_prep's work in it) instead of attention_prep and then its attention kernel.
    public static func prepInAttention(tokens: Int) -> Bool {
        fusePrep && tokens <= prepTokens && prepKernelTakes(tokens: tokens)
    }
    /// Blocks a row of logits is cut over by `argmax` and `argmax_slice` (a thread-block
    /// cluster; sampling::kSplits in Kernels/sampling.cu): their grid is (argmaxSplits, T).
    public static let argmaxSplits = 8
    /// A cap on version 3's splits (`FULGUR_ATTENTION_MAX_SPLITS`, for measurements).
    static let groupedMaxSplits = Int(ProcessInfo.processInfo.environment["FULGUR_ATTENTION_MAX_SPLITS"] ?? "") ?? 16
    public static func groupedAttention(tokens: Int) -> Bool {
        attentionVersion == 3 || (attentionVersion != 4 && tokens >= attentionGroupedMinTokens)
    }

    /// The attention kernel, grid and dynamic shared memory a step of T tokens launches for a
    /// layer (`sharedBytes`: attentionDecodeSharedBytes). Versions 3 and 4 run a chain of global
    /// round trips a block (copy, shares, arrival counter, merge), so a second wave of blocks
    /// doubles the time: their splits are cut to one wave of resident blocks.
    /// `fusedPrep`: steps the executor gives attention_decode_h1p (`prepInAttention`) run it on
    /// version 4's grid, their splits cut to a wave of whichever of the two fits fewer blocks;
    /// other steps keep version 4's own wave.
    ///
    /// The closure's second argument says whether the layer runs long in this step (a
    /// long-context step, and the layer's cache holds at least the threshold): then version 3
    /// at every T, with up to `groupedLongMaxSplits` splits, still one wave.
    public static func attentionShape(heads: Int, kvHeads: Int, headDim: Int, valueDim: Int, sharedBytes: Int, capacity: Int, module: KernelModule,
                                      fusedPrep: Bool = true) throws
        -> (Int, Bool) -> (name: String, grid: (Int, Int, Int), sharedBytes: Int) {
        let splits = attentionSplits(capacity)
        // Versions 3 and 4 split finer (version 3 a share of at least 32 keys: a sliding layer's
        // ring of 144 gets 5, not 2; version 4 one 64-key chunk), then cut to one wave.
        let groupedSplits = min(attentionMaxSplits, groupedMaxSplits, max(1, (capacity + 31) / 32))
        let grouped = groupedAttentionKernel(heads: heads, kvHeads: kvHeads)
        let resident = try module.residentBlocksPerMultiprocessor(try module.function(grouped), threads: 128, sharedBytes: sharedBytes)
            * module.device.multiprocessors
        // Version 4: decode<1>'s shared memory (Kernels/attention.cu): a chunk's V and padded K
        // rows, q, probabilities, outputs.
        let keyStride = headDim + (headDim % 8 == 0 ? 4 : 1)
        let perHeadShared = 4 * (64 * valueDim + 64 * keyStride + (keyStride + 3) / 4 * 4 + 64 + valueDim)
        let perHead = try module.function("attention_decode_h1")
        let room = module.device.maxSharedMemoryPerBlock - (try module.staticSharedBytes(perHead))
        guard perHeadShared <= room else {
            throw FulgurError(.unsupported, "CUDA executor: attention heads of \(headDim) key / \(valueDim) value dimensions need \(perHeadShared) bytes of shared memory a block; this GPU allows \(room)")
        }
        try module.allowSharedMemory(perHead, bytes: room)
        let perHeadResident = try module.residentBlocksPerMultiprocessor(perHead, threads: 128, sharedBytes: perHeadShared)
            * module.device.multiprocessors
        var prepResident = perHeadResident
        if fusedPrep {
            // attention_decode_h1p (the same with attention_prep's work) takes the same grid: the
            // splits are cut to a wave of whichever fits fewer blocks.
            let withPrep = try module.function("attention_decode_h1p")
            let prepShared = perHeadShared + prepSharedBytes(headDim: headDim, valueDim: valueDim)
            let prepRoom = module.device.maxSharedMemoryPerBlock - (try module.staticSharedBytes(withPrep))
            guard prepShared <= prepRoom else {
                throw FulgurError(.unsupported, "CUDA executor: attention heads of \(headDim) key / \(valueDim) value dimensions need \(prepShared) bytes of shared memory a block; this GPU allows \(prepRoom)")
            }
            try module.allowSharedMemory(withPrep, bytes: prepRoom)
            prepResident = min(perHeadResident, try module.residentBlocksPerMultiprocessor(withPrep, threads: 128, sharedBytes: prepShared)
                * module.device.multiprocessors)
        }
        let perHeadSplits = min(attentionMaxSplits, max(1, (capacity + 63) / 64))
        // Version 2's dynamic shared memory: q, then the merge's shares (splits * (valueDim + 2)
        // floats, plus 8 for the copy's widening to 16-byte bounds).
        let v2Shared = 4 * max(headDim, splits * (valueDim + 2) + 8)
        let longSplits = min(groupedLongMaxSplits, max(1, (capacity + 31) / 32))
        return { T, long in
            if long {
                return (grouped, (kvHeads, T, min(longSplits, max(1, resident / (kvHeads * T)))), sharedBytes)
            }
            if groupedAttention(tokens: T) {
                return (grouped, (kvHeads, T, min(groupedSplits, max(1, resident / (kvHeads * T)))), sharedBytes)
            }
            if attentionVersion == 2 { return ("attention_decode_v2", (heads, T, splits), v2Shared) }
            let wave = fusedPrep && prepInAttention(tokens: T) ? prepResident : perHeadResident
            return ("attention_decode_h1", (heads, T, min(perHeadSplits, max(1, wave / (heads * T)))), perHeadShared)
        }
    }

    /// Whether a layer whose cache holds `capacity` positions runs version 3 in long-context
    /// steps at the default threshold (gpu-check picks its long cases by it).
    public static func longLayer(capacity: Int) -> Bool { capacity >= defaultLongContextPositions }

    /// attention_decode's dynamic shared memory for a layer (Kernels/attention.cu, `decode`):
    /// the V and K rows of a 64-key chunk (key rows padded), then q, probabilities and outputs of
    /// the group's query heads, the group rounded up to a power of two. Refuses shapes the kernel
    /// does not take, and lets it launch with more than 48 KiB.
    public static func attentionDecodeSharedBytes(heads: Int, kvHeads: Int, headDim: Int, valueDim: Int, module: KernelModule) throws -> Int {
        guard kvHeads > 0, heads % kvHeads == 0, heads / kvHeads <= 16 else {
            throw FulgurError(.unsupported, "CUDA executor: attention of \(heads) query heads over \(kvHeads) KV heads (attention_decode takes groups of up to 16 query heads per KV head)")
        }
        guard valueDim <= 256 else {
            throw FulgurError(.unsupported, "CUDA executor: value heads of \(valueDim) dimensions (up to 256)")
        }
        let group = heads / kvHeads, chunk = 64
        let padded = paddedGroup(group)
        let keyStride = headDim + (headDim % 8 == 0 ? 4 : 1)
        let bytes = 4 * (chunk * valueDim + chunk * keyStride + (padded * keyStride + 3) / 4 * 4 + chunk * padded + padded * valueDim)
        let f = try module.function(groupedAttentionKernel(heads: heads, kvHeads: kvHeads))
        let room = module.device.maxSharedMemoryPerBlock - (try module.staticSharedBytes(f))
        guard bytes <= room else {
            throw FulgurError(.unsupported, "CUDA executor: attention heads of \(headDim) key / \(valueDim) value dimensions in groups of \(group) need \(bytes) bytes of shared memory a block; this GPU allows \(room)")
        }
        // The device's limit, not this layer's need: executors sharing the module (a target and
        // its drafter) would otherwise lower each other's.
        // (Raising it only to the layer's need measured the same on an H100.)
        try module.allowSharedMemory(f, bytes: room)
        return bytes
    }

    private func add(_ kind: String, _ run: @escaping (Int) throws -> Void) { launches.append((kind, run)) }

    /// The single-sequence entry points read slot 0's positions (`length`); a cache of several
    /// slots runs only `forward(batch:)`, whose rows name their slots.
    private func oneSequence() throws {
        guard !slotted else { throw FulgurError(.usage, "CUDA executor: a batch's cache (\(slots) slots) runs forward(batch:)") }
    }

    /// Device copies of a plan's weights in the order lowering makes them, so that an executor
    /// lowering the same plan finds each at the same index (`sharingWeights`).
    final class WeightStore: @unchecked Sendable {
        var entries: [(label: String, object: AnyObject)] = []
    }

    /// The weight object lowering needs next: the store's when an executor sharing these weights
    /// made it, else `make()`'s, recorded. `label` catches a plan lowered in another order.
    private func sharedWeight<T: AnyObject>(_ label: String, _ make: () throws -> T) throws -> (object: T, isNew: Bool) {
        defer { weightCursor += 1 }
        if weightCursor < weights.entries.count {
            let entry = weights.entries[weightCursor]
            guard entry.label == label, let object = entry.object as? T else {
                throw FulgurError(.usage, "CUDA executor: the shared weights were lowered from another plan ('\(entry.label)' where '\(label)' is)")
            }
            return (object, false)
        }
        let object = try make()
        weights.entries.append((label, object))
        return (object, true)
    }

    /// A product over `parts` stacked by rows, shared like every weight (`sharedWeight`).
    private func linear(_ parts: [LinearWeight], _ biases: [[Float]?], name: String) throws -> CUDALinear {
        let shape = parts.map { "\($0.outFeatures)x\($0.inFeatures)" }.joined(separator: "+")
        return try sharedWeight("linear \(name) \(shape)") { try CUDALinear(stacking: parts, biases: biases, name: name, module: module) }.object
    }

    private typealias Launch = (String, (Int, Int, Int), Int, Int, [KernelModule.Argument]) throws -> Void

    private func lower(progress: ((Int, Int) -> Void)?) throws {
        let spec = plan.spec, hidden = spec.hiddenSize, S = maxStepTokens
        let w = plan.widths
        // Activation buffers. q, k and v share one region (a token's row is [q | k | v] at the
        // widest layer's sizes), so one stacked product can write all three; gate and up too.
        let qkvStride = (w[.q] ?? 0) + (w[.k] ?? 0) + (w[.v] ?? 0)
        let interMax = w[.gate] ?? 0
        let x = self.x, h = try device.allocate(4 * S * hidden), out = try device.allocate(4 * S * hidden)
        // The arrival counter of the norms done inside the product after them (ResidualNorm).
        let arrivals = try device.allocate(4)
        try [Int32(0)].withUnsafeBytes { try arrivals.upload($0) }
        let qkv = try device.allocate(4 * S * max(qkvStride, 1)), attn = try device.allocate(4 * S * max(w[.attn] ?? 0, 1))
        let gu = try device.allocate(4 * S * max(2 * interMax, 1)), act = try device.allocate(4 * S * max(interMax, 1))
        keep += [x, h, out, qkv, attn, gu, act, arrivals]
        // Attention's per-split results and arrival counters, shared by every layer (one runs
        // at a time); the counters start at zero and the kernel leaves them there.
        // Up to 64 splits where a long-context step can happen (a single sequence's cache: the
        // threshold can be set later), else 16.
        var partialFloats = 1, counterCount = 1
        let maxSplits = !slotted ? Self.groupedLongMaxSplits : Self.attentionMaxSplits
        for l in spec.layers {
            partialFloats = max(partialFloats, S * l.attention.heads * maxSplits * (l.attention.valueHeadDim + 2))
            counterCount = max(counterCount, S * l.attention.heads)
        }
        let partial = try device.allocate(4 * partialFloats), counters = try device.allocate(4 * counterCount)
        try [Int32](repeating: 0, count: counterCount).withUnsafeBytes { try counters.upload($0) }
        keep += [partial, counters]
        func address(_ b: Buffer) throws -> UInt64 {
            switch b {
            case .x: return x.address
            case .h: return h.address
            case .out: return out.address
            case .attn: return attn.address
            case .act: return act.address
            default: throw FulgurError(.unsupported, "CUDA executor: a product reads or writes \(b) outside the q/k/v and gate/up groups")
            }
        }
        func floats(_ v: [Float]) throws -> DeviceBuffer {
            let b = try v.withUnsafeBytes { try device.upload($0) }
            keep.append(b)
            return b
        }
        let names = ["embed", "capture_rows", "add_rmsnorm", "add_inplace", "glu", "qkv_scatter", "attention_prep", "kv_store", "attention_decode_g1", "attention_decode_g2", "attention_decode_g4",
                     "attention_decode_g8", "attention_decode_g16", "attention_decode_v2", "attention_decode_h1", "attention_decode_h1p",
                     "moe_route", "moe_dense_glu", "moe_dense_combine", "argmax", "argmax_slice", "argmax_pick"]
        let module = self.module, stream = self.stream, positions = self.positions
        // Row slots only where the cache holds several sequences (null: slot 0).
        let rowSlots = slotted ? self.rowSlots.address : 0
        let f = try Dictionary(uniqueKeysWithValues: names.map { ($0, try module.function($0)) })
        let launch: Launch = { name, grid, block, shared, args in
            try module.launch(f[name]!, grid: grid, block: (block, 1, 1), sharedBytes: shared, stream: stream, overlapPrevious: true, args)
        }
        var bytes = 0

        // Embedding: f32 / bf16 / f16 tables as stored, anything else decoded to f32.
        let table = plan.embedding.table
        let tableType: Int32 = table.dtype == .f32 ? 0 : table.dtype == .bf16 ? 1 : table.dtype == .f16 ? 2 : 0
        // A plan without an embedding op (the DFlash drafter's context path) uploads no table.
        let embeds = plan.ops.contains { if case .embed = $0 { return true }; return false }
        let tableBuffer = !embeds ? nil : try sharedWeight("embedding \(table.shape)") { () -> DeviceBuffer in
            switch table.dtype {
            case .f32, .bf16, .f16:
                return try device.upload(UnsafeRawBufferPointer(start: table.data, count: table.byteCount))
            default:
                var rows = [Float](repeating: 0, count: table.shape[0] * hidden)
                rows.withUnsafeMutableBufferPointer { r in
                    for i in 0..<table.shape[0] { Dequant.row(table.dtype, table.data + i * table.rowBytes, hidden, r.baseAddress! + i * hidden) }
                }
                return try rows.withUnsafeBytes { try device.upload($0) }
            }
        }.object
        if let tableBuffer { keep.append(tableBuffer) }
        if embeds { bytes += table.dtype.byteCount(elements: hidden) }

        // State carried between ops of a layer.
        var qOff = 0, kOff = 0, vOff = 0, qW = 0, kW = 0, vW = 0, inter = 0
        var pendingResidual: Buffer? = nil
        var qNorm: DeviceBuffer? = nil, kNorm: DeviceBuffer? = nil, headEps: Float = 0, rope: RoPESpec? = nil, vScale: Float = 1
        var ropeFrequencies: [[Double]: DeviceBuffer] = [:]

        // A norm of x into h that the product or MoE after it does for one token (ResidualNorm);
        // at other token counts, or where that kernel cannot, add_rmsnorm runs before it.
        var pendingNorm: ResidualNorm? = nil
        // A tensor-parallel shard's all-reduce of out just enqueued (until the next op that is
        // not the residual or norm after it), and the box of the pending norm when that norm
        // adds out: at token counts where the op after the norm does not take it, the
        // all-reduce does it (AllReduceNorm).
        var pendingAllReduce: AllReduceNorm? = nil
        var pendingNormBox: AllReduceNorm? = nil

        func flushResidual() throws {
            guard let src = pendingResidual else { return }
            pendingResidual = nil
            let s = try address(src)
            add("norm") { T in try launch("add_inplace", ((T * hidden + 255) / 256, 1, 1), 256, 0, [.pointer(x.address), .pointer(s), .int32(Int32(T * hidden))]) }
        }
        /// add_rmsnorm for `n` at T tokens (the launch a fused norm replaces).
        func separateNorm(_ n: ResidualNorm, tokens T: Int) throws {
            try launch("add_rmsnorm", (T, 1, 1), 1024, 0, [.pointer(n.resid), .pointer(n.add), .pointer(n.h), .pointer(n.weight), .int32(Int32(hidden)), .float(n.eps)])
        }
        /// The pending norm as its own launch, for an op after it that does not take it.
        func flushNorm() {
            guard let n = pendingNorm else { return }
            let box = pendingNormBox
            pendingNorm = nil
            pendingNormBox = nil
            add("norm") { T in if !(try box?.fuses(tokens: T) ?? false) { try separateNorm(n, tokens: T) } }
        }
        /// `fusable`: the next op reads h only through a product or MoE that may do the norm itself.
        func norm(src: Buffer, dst: Buffer, weight: [Float], eps: Float, fusable: Bool = false) throws {
            guard [.x, .h, .out].contains(src), weight.count == hidden else {
                throw FulgurError(.unsupported, "CUDA executor: RMSNorm of \(src) over \(weight.count) values (full-width norms of x, h or out; head norms on q and k)")
            }
            if src != .x { try flushResidual() }
            let wb = try floats(weight), residual = try pendingResidual.map { try address($0) } ?? 0, sa = try address(src), d = try address(dst)
            pendingResidual = nil
            if fusable && src == .x && dst == .h && Self.fuseNorms {
                pendingNorm = ResidualNorm(resid: sa, add: residual, weight: wb.address, eps: eps, h: d, arrivals: arrivals.address)
                if let box = pendingAllReduce, residual == out.address {
                    box.norm = pendingNorm
                    pendingNormBox = box
                }
                return
            }
            add("norm") { T in
                try launch("add_rmsnorm", (T, 1, 1), 1024, 0, [.pointer(sa), .pointer(residual), .pointer(d), .pointer(wb.address), .int32(Int32(hidden)), .float(eps)])
            }
        }
        // Per layer, the device ranges of its q/k/v weights and of the weights used after
        // attention (o_proj, router, dense MLP), and where its attention and MoE launches are
        // (see L2Prefetch).
        var qkvRanges = [[(address: UInt64, bytes: Int)]](repeating: [], count: spec.layerCount)
        var laterRanges = qkvRanges
        var attentionLaunch: [Int: Int] = [:], moeLaunch: [Int: Int] = [:]
        var layersDone = 0
        func product(_ lin: CUDALinear, _ kind: String, x xs: UInt64, out o: UInt64, outStride: Int) {
            keep.append(lin)
            bytes += lin.weightBytes
            if layersDone < spec.layerCount {
                if kind == "qkv" { qkvRanges[layersDone] += lin.deviceRanges } else { laterRanges[layersDone] += lin.deviceRanges }
            }
            // The pending norm goes with the first product after it (which writes h for the rest).
            let norm = pendingNorm, box = pendingNormBox
            pendingNorm = nil
            pendingNormBox = nil
            box?.consumerTakes = { T in try lin.takesNorm(tokens: T) }
            add(kind) { T in
                if let norm {
                    if try lin.takesNorm(tokens: T) { return try lin.apply(norm: norm, out: o, outStride: outStride, stream: stream) }
                    if !(try box?.fuses(tokens: T) ?? false) { try separateNorm(norm, tokens: T) }
                }
                try lin.apply(x: xs, tokens: T, out: o, outStride: outStride, stream: stream)
            }
        }
        func attention(layer: Int, spec a: AttentionSpec, sinks: [Float]?, attend: Bool) throws {
            guard !attend || qW == a.heads * a.headDim, kW == a.kvHeads * a.headDim, vW == a.kvHeads * a.valueHeadDim else {
                throw FulgurError(.unsupported, "CUDA executor: layer \(layer)'s q/k/v widths \(qW)/\(kW)/\(vW) do not match its attention shape")
            }
            let decodeShared = attend
                ? try Self.attentionDecodeSharedBytes(heads: a.heads, kvHeads: a.kvHeads, headDim: a.headDim, valueDim: a.valueHeadDim, module: module) : 0
            let cache = caches[layer]
            let r = rope ?? RoPESpec.standard(theta: 1, rotaryDim: 0)
            var freq: UInt64 = 0
            if !r.inverseFrequencies.isEmpty {
                if ropeFrequencies[r.inverseFrequencies] == nil {
                    let b = try r.inverseFrequencies.withUnsafeBytes { try device.upload($0) }
                    keep.append(b)
                    ropeFrequencies[r.inverseFrequencies] = b
                }
                freq = ropeFrequencies[r.inverseFrequencies]!.address
            }
            let q = qkv.address + UInt64(4 * qOff), k = qkv.address + UInt64(4 * kOff), v = qkv.address + UInt64(4 * vOff)
            let qn = qNorm?.address ?? 0, kn = kNorm?.address ?? 0, eps = headEps, vs = vScale, heads = attend ? a.heads : 0
            let sinkAddress = try sinks.map { try floats($0).address } ?? 0
            let stride = Int32(qkvStride)
            if attentionLaunch[layer] == nil { attentionLaunch[layer] = launches.count }
            // Version 4's blocks do attention_prep's work themselves for one sequence's 1-token step
            // (attention_decode_h1p) on one GPU; the shape's T decides in the attention launch
            // below. Not in a tensor-parallel shard: over 2 H200 it made the 1-token step 1-1.2%
            // slower (gpt-oss-20b 1.800 -> 1.818 ms, MiMo-V2-Flash 5.018 -> 5.078) where one GPU
            // gained 0.6-1.1% (Kernels/NOTES.md, thirteenth session).
            let fusedPrep = attend && rowSlots == 0 && Self.fusePrep && communicator == nil
            // A long-context step's full-range layers run version 3, attention_prep before it.
            let mode = stepMode, capacity = cache.capacity
            add("attention") { T in
                if fusedPrep && Self.prepInAttention(tokens: T) && !(mode.long && capacity >= mode.threshold) { return }
                try launch("attention_prep", (heads + a.kvHeads, T, 1), 128, 4 * a.headDim, [
                    .pointer(q), .int32(stride), .pointer(k), .int32(stride), .pointer(v), .int32(stride), .int32(Int32(heads)),
                    .int32(Int32(a.kvHeads)), .int32(Int32(a.headDim)), .int32(Int32(a.valueHeadDim)), .pointer(qn), .pointer(kn), .float(eps),
                    .int32(Int32(r.rotaryDim)), .int32(r.style == .neox ? 1 : 0), .pointer(freq), .double(r.attentionFactor), .float(vs),
                    .pointer(positions.address), .pointer(cache.keys.address), .pointer(cache.values.address), .int32(Int32(cache.capacity)),
                    .pointer(rowSlots)])
            }
            if attend {
                let shape = try Self.attentionShape(heads: a.heads, kvHeads: a.kvHeads, headDim: a.headDim, valueDim: a.valueHeadDim, sharedBytes: decodeShared,
                                                    capacity: cache.capacity, module: module, fusedPrep: fusedPrep)
                let prepShared = Self.prepSharedBytes(headDim: a.headDim, valueDim: a.valueHeadDim)
                add("attention") { T in
                    let long = mode.long && capacity >= mode.threshold
                    let l = shape(T, long)
                    if fusedPrep && Self.prepInAttention(tokens: T) && !long {
                        precondition(l.name == "attention_decode_h1", "attention_decode_h1p takes version 4's grid")
                        try launch("attention_decode_h1p", l.grid, 128, l.sharedBytes + prepShared, [
                            .pointer(q), .int32(stride), .pointer(cache.keys.address), .pointer(cache.values.address), .int32(Int32(cache.capacity)),
                            .int32(Int32(a.heads)), .int32(Int32(a.kvHeads)), .int32(Int32(a.headDim)), .int32(Int32(a.valueHeadDim)),
                            .pointer(positions.address), .int32(Int32(T)), .int32(Int32(a.window ?? 0)), .int32(a.causal ? 1 : 0),
                            .pointer(sinkAddress), .float(a.softmaxScale), .pointer(attn.address), .int32(Int32(a.heads * a.valueHeadDim)),
                            .pointer(partial.address), .pointer(counters.address), .pointer(k), .int32(stride), .pointer(v), .int32(stride),
                            .pointer(qn), .pointer(kn), .float(eps), .int32(Int32(r.rotaryDim)), .int32(r.style == .neox ? 1 : 0), .pointer(freq),
                            .double(r.attentionFactor), .float(vs)])
                        return
                    }
                    try launch(l.name, l.grid, 128, l.sharedBytes, [
                        .pointer(q), .int32(stride), .pointer(cache.keys.address), .pointer(cache.values.address), .int32(Int32(cache.capacity)),
                        .int32(Int32(a.heads)), .int32(Int32(a.kvHeads)), .int32(Int32(a.headDim)), .int32(Int32(a.valueHeadDim)),
                        .pointer(positions.address), .int32(Int32(T)), .int32(Int32(a.window ?? 0)), .int32(a.causal ? 1 : 0),
                        .pointer(sinkAddress), .float(a.softmaxScale), .pointer(attn.address), .int32(Int32(a.heads * a.valueHeadDim)),
                        .pointer(partial.address), .pointer(counters.address), .pointer(rowSlots)])
                }
            }
            qNorm = nil; kNorm = nil; rope = nil; vScale = 1
        }

        let ops = plan.ops
        var i = 0
        while i < ops.count {
            let op = ops[i]
            i += 1
            switch op {
            case .linear, .moe: break
            default: flushNorm()
            }
            switch op {
            // A layer's end sits between its last all-reduce and the next layer's first norm:
            // the all-reduce may still do that norm (the capture below allows for it).
            case .residual, .rmsNorm, .layerEnd: break
            default: pendingAllReduce = nil
            }
            switch op {
            case .embed:
                let tokens = self.tokens
                add("embed") { T in
                    try launch("embed", (T, 1, 1), 256, 0, [.pointer(tableBuffer!.address), .int32(tableType), .pointer(tokens.address), .int32(Int32(hidden)), .pointer(x.address)])
                }
            case .rmsNorm(let src, let dst, let weight, let eps):
                switch (src, dst) {
                case (.q, .q): qNorm = try floats(weight); headEps = eps
                case (.k, .k): kNorm = try floats(weight); headEps = eps
                default:
                    // Fused where the next op is a product (or MoE) reading h.
                    var fusable = false
                    if i < ops.count {
                        switch ops[i] {
                        case .linear(let s2, _, _, _): fusable = s2 == .h
                        case .moe(let s2, _, _): fusable = s2 == .h
                        default: break
                        }
                    }
                    try norm(src: src, dst: dst, weight: weight, eps: eps, fusable: fusable)
                }
            case .finalNorm(let weight, let eps):
                try norm(src: .x, dst: .h, weight: weight, eps: eps)
            case .allReduce(let buffer):
                try flushResidual()
                guard let communicator, buffer == .out else {
                    throw FulgurError(.unsupported, "CUDA executor: a tensor-parallel shard's plan (all-reduce of \(buffer)) needs a communicator; run it through CUDATensorParallel")
                }
                let stream = self.stream, box = AllReduceNorm(hidden: hidden, ranks: communicator.ranks, fuses: communicator.fusesNorm)
                pendingAllReduce = box
                add("comm") { T in
                    if try box.fuses(tokens: T), let norm = box.norm {
                        try communicator.enqueueNorm(input: out, tokens: T, hidden: hidden, norm: norm, stream: stream)
                    } else {
                        try communicator.enqueue(input: out, output: out, count: T * hidden, stream: stream)
                    }
                }
            case .residual(let src):
                try flushResidual()
                pendingResidual = src
            case .linear(let src, let dst, let weight, let bias):
                try flushResidual()
                let xs = try address(src)
                let family: [Buffer] = [.q, .k, .v].contains(dst) ? [.q, .k, .v] : [.gate, .up].contains(dst) ? [.gate, .up] : []
                if family.isEmpty {
                    product(try linear([weight], [bias], name: weight.name), src == .attn ? "o_proj" : dst == .out ? "mlp" : "other", x: xs, out: try address(dst), outStride: weight.outFeatures)
                    continue
                }
                // The run of products from the same input into the family, in q | k | v or
                // gate | up order in its region.
                var group: [Buffer: (LinearWeight, [Float]?)] = [dst: (weight, bias)]
                while i < ops.count, case .linear(let s2, let d2, let w2, let b2) = ops[i], s2 == src, family.contains(d2), group[d2] == nil {
                    group[d2] = (w2, b2)
                    i += 1
                }
                // Keys and values alone are the DFlash drafter's context path (no queries).
                let members = family == [.q, .k, .v] && group[.q] == nil ? [Buffer.k, .v] : family
                let ordered = members.compactMap { group[$0] }
                guard ordered.count == members.count else {
                    throw FulgurError(.unsupported, "CUDA executor: products from \(src) into \(group.keys.map { "\($0)" }.sorted()) do not cover \(members)")
                }
                var offsets: [Int] = [], o = 0
                for g in ordered { offsets.append(o); o += g.0.outFeatures }
                let region: DeviceBuffer, stride: Int
                if family == [.q, .k, .v] {
                    let q = members.count == 3
                    (qOff, kOff, vOff) = q ? (offsets[0], offsets[1], offsets[2]) : (0, offsets[0], offsets[1])
                    (qW, kW, vW) = (q ? ordered[0].0.outFeatures : 0, ordered[q ? 1 : 0].0.outFeatures, ordered[q ? 2 : 1].0.outFeatures)
                    (region, stride) = (qkv, qkvStride)
                } else {
                    guard ordered[0].0.outFeatures == ordered[1].0.outFeatures else {
                        throw FulgurError(.unsupported, "CUDA executor: gate and up of different sizes (\(ordered[0].0.outFeatures), \(ordered[1].0.outFeatures))")
                    }
                    inter = ordered[0].0.outFeatures
                    (region, stride) = (gu, 2 * interMax)
                }
                let parts = ordered.map(\.0)
                if CUDALinear.canStack(parts) {
                    product(try linear(parts, ordered.map(\.1), name: parts.map(\.name).joined(separator: " + ")),
                            family == [.q, .k, .v] ? "qkv" : "mlp", x: xs, out: region.address, outStride: stride)
                } else {
                    for (g, off) in zip(ordered, offsets) {
                        product(try linear([g.0], [g.1], name: g.0.name), family == [.q, .k, .v] ? "qkv" : "mlp", x: xs, out: region.address + UInt64(4 * off), outStride: stride)
                    }
                }
            case .fusedQKV(let chunks, let qRows, let kRows, let vRows):
                try flushResidual()
                let rows = qRows + kRows + vRows, n = chunks.count
                let part = try device.allocate(4 * S * n * rows)
                keep.append(part)
                for (c, cw) in chunks.enumerated() {
                    product(try linear([cw], [nil], name: cw.name), "qkv", x: h.address, out: part.address + UInt64(4 * c * rows), outStride: n * rows)
                }
                (qW, kW, vW) = (n * qRows, n * kRows, n * vRows)
                (qOff, kOff, vOff) = (0, qW, qW + kW)
                let stride = Int32(qkvStride), base = qkv.address, (ko, vo) = (kOff, vOff)
                add("qkv") { T in
                    try launch("qkv_scatter", (n, T, 1), 128, 0, [
                        .pointer(part.address), .int32(Int32(qRows)), .int32(Int32(kRows)), .int32(Int32(vRows)), .pointer(base), .int32(stride),
                        .pointer(base + UInt64(4 * ko)), .int32(stride), .pointer(base + UInt64(4 * vo)), .int32(stride)])
                }
            case .rope(let buffer, _, let r):
                guard buffer == .q || buffer == .k, rope == nil || rope == r else {
                    throw FulgurError(.unsupported, "CUDA executor: RoPE on \(buffer) (only q and k, with one rotation per layer)")
                }
                rope = r
            case .scale(let buffer, let factor):
                guard buffer == .v else { throw FulgurError(.unsupported, "CUDA executor: scaling \(buffer) (only v)") }
                vScale = factor
            case .attention(let layer, let a, let sinks):
                try attention(layer: layer, spec: a, sinks: sinks, attend: true)
            case .storeKV(let layer):
                try attention(layer: layer, spec: spec.layers[layer].attention, sinks: nil, attend: false)
            case .layerEnd(let layer):
                // x after this layer, with a residual still pending added on the way, into the
                // features buffer when the layer is captured (decided when the step is enqueued).
                // Where the all-reduce before this point does the next layer's residual add and
                // norm (AllReduceNorm.fuses at T), x already holds that residual: added again it
                // would be counted twice.
                let residual = try pendingResidual.map { try address($0) } ?? 0
                let features = self.features, box = pendingAllReduce
                add("capture") { [unowned self] T in
                    guard let slot = self.captureSlot.count > layer ? self.captureSlot[layer] : nil else { return }
                    let pending = try box?.fuses(tokens: T) ?? false ? 0 : residual
                    try launch("capture_rows", (T, 1, 1), 256, 0, [
                        .pointer(x.address), .pointer(pending), .int32(Int32(hidden)), .pointer(features.address + UInt64(4 * slot * hidden)),
                        .int32(Int32(self.captureLayers.count * hidden))])
                }
                layersDone += 1
                progress?(layersDone, spec.layerCount)
            case .glu(let activation):
                try flushResidual()
                let (clamped, alpha, limit) = CUDAMoE.activationArguments(activation)
                let n = inter, stride = 2 * interMax
                add("mlp") { T in
                    try launch("glu", ((T * n + 255) / 256, 1, 1), 256, 0, [
                        .pointer(gu.address), .int32(Int32(n)), .int32(Int32(stride)), .pointer(act.address), .int32(Int32(T)), .int32(clamped), .float(alpha), .float(limit)])
                }
            case .moe(let src, let dst, let weights):
                try flushResidual()
                guard src == .h, dst == .out else {
                    throw FulgurError(.unsupported, "CUDA executor: MoE from \(src) into \(dst) (expected h into out)")
                }
                if weights.experts.allSatisfy({ e in e.down.format == .mxfp4 && [e.gateUp, e.gate, e.up].allSatisfy { $0 == nil || $0!.format == .mxfp4 } }) {
                    let owner = try sharedWeight("moe \(layersDone)") { try CUDAMoE(weights, module: module, version: moeVersion) }
                    let moe = owner.isNew ? owner.object : try CUDAMoE(sharingWeightsOf: owner.object)
                    keep.append(moe)
                    moeLayers.append(moe)
                    if layersDone < spec.layerCount { laterRanges[layersDone] += moe.routerRanges }
                    moeLaunch[layersDone] = launches.count
                    bytes += moe.routerBytes + weights.spec.topK * moe.expertBytes
                    let norm = pendingNorm, box = pendingNormBox
                    pendingNorm = nil
                    pendingNormBox = nil
                    box?.consumerTakes = { T in moe.takesNorm(tokens: T) }
                    add("moe") { T in
                        if let norm {
                            if moe.takesNorm(tokens: T) { return try moe.run(h, tokens: T, into: out, stream: stream, norm: norm) }
                            if !(try box?.fuses(tokens: T) ?? false) { try separateNorm(norm, tokens: T) }
                        }
                        try moe.run(h, tokens: T, into: out, stream: stream)
                    }
                } else {
                    flushNorm()
                    bytes += try lowerDenseMoE(weights, x: h.address, out: out.address, launch: launch)
                }
            }
        }
        try flushResidual()
        // Layer L's o_proj and router while its attention runs; layer L + 1's q/k/v while L's MoE runs.
        var prefetches: [(at: Int, ranges: [(address: UInt64, bytes: Int)])] = []
        for (layer, at) in attentionLaunch where !laterRanges[layer].isEmpty { prefetches.append((at, laterRanges[layer])) }
        for (layer, at) in moeLaunch where layer + 1 < spec.layerCount && !qkvRanges[layer + 1].isEmpty { prefetches.append((at, qkvRanges[layer + 1])) }
        try insertPrefetches(prefetches)
        // A plan without a final norm (the DFlash drafter's context path) ends without logits.
        guard ops.contains(where: { if case .finalNorm = $0 { return true }; return false }) else {
            bytesPerDecodeStep = bytes
            return
        }
        let head = try linear([plan.lmHead], [nil], name: plan.lmHead.name)
        let logits = self.logits, ids = self.ids, vocab = self.vocab
        product(head, "lm head", x: h.address, out: logits.address, outStride: vocab)
        if let communicator {
            // This shard's logits are a slice of the vocabulary: its candidates, exchanged with
            // every shard's through the all-reduce, then the same pick on every shard
            // (Kernels/sampling.cu's top comment has the cost).
            let ranks = communicator.ranks, entry = SlicedArgmax.entryFloats
            let table = try device.allocate(4 * entry * S * ranks)
            keep.append(table)
            let slice: [KernelModule.Argument] = [.pointer(logits.address), .int32(Int32(vocab)), .int32(Int32(vocabularyStart)),
                                                  .int32(Int32(communicator.rank)), .int32(Int32(ranks)), .pointer(table.address)]
            add("sampling") { T in try launch("argmax_slice", (Self.argmaxSplits, T, 1), 1024, 0, slice) }
            add("comm") { T in try communicator.enqueue(input: table, output: table, count: entry * T * ranks, stream: stream) }
            add("sampling") { T in
                try launch("argmax_pick", (1, 1, 1), 32, 0, [.pointer(table.address), .int32(Int32(T)), .int32(Int32(ranks)), .pointer(ids.address)])
            }
        } else {
            add("sampling") { T in try launch("argmax", (Self.argmaxSplits, T, 1), 1024, 0, [.pointer(logits.address), .int32(Int32(vocab)), .pointer(ids.address)]) }
        }
        bytesPerDecodeStep = bytes
    }

    /// Inserts before launch `at` a side-branch launch that warms L2 with `ranges`, for each
    /// entry, and one join of the branch at the end of the step.
    private func insertPrefetches(_ prefetches: [(at: Int, ranges: [(address: UInt64, bytes: Int)])]) throws {
        guard prefetch != .off, !prefetches.isEmpty else { return }
        let side = try device.makeStream(), fork = try device.makeMarker(), join = try device.makeMarker()
        let kernel = try module.function("prefetch_l2"), stream = self.stream, module = self.module
        let evictLast: Int32 = prefetch == .evictLast ? 1 : 0, blocks = 2 * device.multiprocessors
        keep += [side, fork, join]
        for p in prefetches.sorted(by: { $0.at > $1.at }) {
            let pairs = p.ranges.flatMap { [$0.address, UInt64($0.bytes)] }
            let table = try pairs.withUnsafeBytes { try device.upload($0) }
            keep.append(table)
            let count = Int32(p.ranges.count)
            launches.insert(("prefetch", { _ in
                try fork.record(stream)
                try side.wait(for: fork)
                try module.launch(kernel, grid: (blocks, 1, 1), block: (128, 1, 1), stream: side,
                                  [.pointer(table.address), .int32(count), .int32(evictLast)])
            }), at: p.at)
        }
        add("join") { _ in
            try join.record(side)
            try stream.wait(for: join)
        }
    }

    /// The MoE layer for experts the MXFP4 kernels do not take: routing on the GPU (the same
    /// kernel as CUDAMoE), then every expert over every token (one product over all experts'
    /// stacked gate/up rows, the GLU, one grouped product over all down rows) and the weighted
    /// sum of the chosen ones. Right for small models; it reads every expert. Returns the bytes
    /// it reads per step.
    private func lowerDenseMoE(_ m: MoEWeights, x: UInt64, out: UInt64, launch: @escaping Launch) throws -> Int {
        let s = m.spec, E = s.experts, k = s.topK, I = s.intermediate, H = plan.spec.hiddenSize, S = maxStepTokens
        func unsupported(_ why: String) -> FulgurError {
            FulgurError(.unsupported, "CUDA executor: MoE layer (router '\(m.router.name)'): \(why)")
        }
        guard E <= CUDAMoE.maxExperts, (1...CUDAMoE.maxTopK).contains(k), m.router.outFeatures == E else {
            throw unsupported("\(E) experts, top-\(k) (up to \(CUDAMoE.maxExperts) experts, top-\(CUDAMoE.maxTopK))")
        }
        if case .sigmoidWithBias(_, _, let groups, _) = s.routing, groups > CUDAMoE.maxGroups || E % groups != 0 {
            throw unsupported("\(groups) expert groups")
        }
        let device = self.device, stream = self.stream
        // The router as f32 rows [E, H] (the routing kernel reads BF16 or F32).
        let routerRows = CUDALinear.f32Rows([m.router])
        func upload(_ v: [Float]) throws -> DeviceBuffer {
            let b = try v.withUnsafeBytes { try device.upload($0) }
            keep.append(b)
            return b
        }
        let router = try upload(routerRows)
        let routerBias = try m.routerBias.map(upload), correction = try m.correctionBias.map(upload)
        let layout = CUDAMoE.routesLayout(experts: E, topK: k)
        let routes = try upload([Float](repeating: 0, count: layout.total))  // zero words: the arrival counter starts at 0
        let logits = try device.allocate(4 * CUDAMoE.maxTokens * E)
        keep.append(logits)

        let gateUpParts = m.experts.flatMap { e in e.gateUp.map { [$0] } ?? [e.gate!, e.up!] }
        let gateUpBiases: [[Float]?] = m.experts.flatMap { e in e.gateUp != nil ? [e.gateUpBias] : [e.gateUpBias, nil] }
        guard CUDALinear.canStack(gateUpParts), CUDALinear.canStack(m.experts.map(\.down)) else {
            throw unsupported("experts of mixed formats")
        }
        let gateUp = try linear(gateUpParts, gateUpBiases, name: "experts gate/up")
        let down = try linear(m.experts.map(\.down), m.experts.map(\.downBias), name: "experts down")
        guard down.storage == .f32 || down.storage == .bf16 else {
            throw unsupported("experts stored as \(down.storage); the dense fallback takes f32/bf16 (MXFP4 experts run the MoE kernels)")
        }
        keep += [gateUp, down]
        let gu = try device.allocate(4 * S * E * 2 * I), act = try device.allocate(4 * S * E * I), y = try device.allocate(4 * S * E * H)
        keep += [gu, act, y]
        let (mode, normalize, scaling, groups, topKGroups) = CUDAMoE.routingArguments(s.routing)
        let (clamped, alpha, limit) = CUDAMoE.activationArguments(s.activation)
        let interleaved: Int32 = m.experts[0].gateUp != nil && m.experts[0].interleaved ? 1 : 0
        add("moe") { T in
            try launch("moe_route", ((E + 3) / 4, 1, 1), 128, 0, [
                .pointer(router.address), .int32(0), .pointer(routerBias?.address ?? 0), .pointer(correction?.address ?? 0), .int32(mode),
                .int32(normalize ? 1 : 0), .float(scaling), .int32(Int32(groups)), .int32(Int32(topKGroups)), .pointer(x), .int32(Int32(T)),
                .int32(Int32(H)), .int32(Int32(E)), .int32(Int32(k)), .pointer(logits.address), .pointer(routes.address)])
            try gateUp.apply(x: x, tokens: T, out: gu.address, stream: stream)
            try launch("moe_dense_glu", ((T * E * I + 255) / 256, 1, 1), 256, 0, [
                .pointer(gu.address), .pointer(act.address), .int32(Int32(T)), .int32(Int32(E)), .int32(Int32(I)), .int32(interleaved),
                .int32(clamped), .float(alpha), .float(limit)])
            try down.apply(x: act.address, tokens: T, out: y.address, xStride: E * I, groupRows: H, stream: stream)
            try launch("moe_dense_combine", ((T * H + 255) / 256, 1, 1), 256, 0, [
                .pointer(y.address), .pointer(routes.address + UInt64(4 * layout.chosen)), .pointer(routes.address + UInt64(4 * layout.chosenWeight)),
                .pointer(out), .int32(Int32(T)), .int32(Int32(E)), .int32(Int32(k)), .int32(Int32(H))])
        }
        return router.byteCount + gateUp.weightBytes + down.weightBytes
    }
}

extension CUDAExecutor: Executor {}

extension CUDAExecutor: BatchExecutor {
    public func length(slot: Int) -> Int { slotLengths[checkedSlot(slot)] }
    public func reset(slot: Int) { slotLengths[checkedSlot(slot)] = 0 }

    /// One forward pass over the tokens of several sequences, each in its own slot of the cache
    /// (continuous batching; a cache from `batchExecutor`): the products, experts and LM head run once over all
    /// rows, attention reads and writes each row's slot at its position. The rows go in steps
    /// of up to `maxStepTokens` (a graph each), in order, so a sequence's rows may span two
    /// steps. Returns, per part, the logits after its last token or nothing. A sequence's logits
    /// agree with running it alone to float rounding (kernels sum in another order at another
    /// step size), not bit for bit as on the CPU.
    public func forward(batch: [BatchStep]) throws -> [[Float]] {
        guard slotted else { throw FulgurError(.usage, "CUDA executor: forward(batch:) needs a batch's cache (batchExecutor)") }
        try device.makeCurrent()
        dropFeatures()
        let table = plan.embedding.table.shape[0]
        var rows: [(slot: Int32, token: Int32, position: Int32, part: Int?)] = []
        for (i, part) in batch.enumerated() {
            guard (0..<slots).contains(part.slot) else {
                throw FulgurError(.usage, "slot \(part.slot) of a batched step is outside the batch's \(slots) slots")
            }
            guard !part.tokens.isEmpty else { throw FulgurError(.usage, "sequence \(i) of a batched step has no tokens") }
            guard !batch[..<i].contains(where: { $0.slot == part.slot }) else {
                throw FulgurError(.usage, "sequences \(batch[..<i].firstIndex { $0.slot == part.slot }!) and \(i) of a batched step share slot \(part.slot)")
            }
            for t in part.tokens where t < 0 || t >= table {
                throw FulgurError(.usage, "token id \(t) is outside the vocabulary (0..<\(table))")
            }
            let start = slotLengths[part.slot]
            guard start + part.tokens.count <= maxPositions else {
                throw FulgurError(.usage, "context is full: \(start) + \(part.tokens.count) tokens exceed the \(maxPositions)-position context")
            }
            for (j, t) in part.tokens.enumerated() {
                let last = j == part.tokens.count - 1 && part.wantsLogits
                rows.append((Int32(part.slot), Int32(t), Int32(start + j), last ? i : nil))
            }
        }
        var results = [[Float]](repeating: [], count: batch.count)
        var start = 0
        while start < rows.count {
            let chunk = rows[start..<min(start + maxStepTokens, rows.count)]
            try chunk.map(\.token).withUnsafeBytes { try tokens.upload($0, stream: stream) }
            try chunk.map(\.position).withUnsafeBytes { try positions.upload($0, stream: stream) }
            try chunk.map(\.slot).withUnsafeBytes { try rowSlots.upload($0, stream: stream) }
            try enqueueStep(chunk.count)
            // The logits rows from the first wanted to the last, in one copy.
            let wanted = chunk.indices.filter { rows[$0].part != nil }.map { $0 - start }
            if let first = wanted.first, let last = wanted.last {
                var got = [Float](repeating: 0, count: (last - first + 1) * vocab)
                try got.withUnsafeMutableBytes { try logits.download(into: $0, offset: 4 * first * vocab, stream: stream) }
                // The next step's uploads overwrite what this one reads, and the logits it leaves.
                try stream.synchronize()
                for r in wanted { results[rows[start + r].part!] = Array(got[((r - first) * vocab)..<((r - first + 1) * vocab)]) }
            } else {
                try stream.synchronize()
            }
            start += chunk.count
        }
        for part in batch { slotLengths[part.slot] += part.tokens.count }
        return results
    }
}

/// The residual add and RMSNorm right after a tensor-parallel shard's all-reduce of out, done
/// by the all-reduce (StepAllReduce.enqueueNorm: one launch instead of two) at the token counts
/// where the op after the norm does not do it itself (ResidualNorm at one token). Filled while
/// the step's launches are built; read when they are enqueued, by the all-reduce and by the op
/// after the norm, which must agree.
final class AllReduceNorm {
    let hidden: Int, ranks: Int, enabled: Bool
    var norm: ResidualNorm?
    /// Whether the op after the norm takes it at T tokens (nil: it never does).
    var consumerTakes: ((Int) throws -> Bool)?
    /// The fused launch takes a block per token, each reading its row from every GPU; it paid
    /// up to 32 rows over all GPUs, and lost beyond (4 H200, MiMo-V2-Flash: 8 tokens 7.990 ->
    /// 7.970 ms, 16 tokens 11.357 -> 11.48; 2 H200: 16 tokens 14.26 -> 14.18; Kernels/NOTES.md).
    static let maxRows = 32
    init(hidden: Int, ranks: Int, fuses: Bool) { (self.hidden, self.ranks, self.enabled) = (hidden, ranks, fuses) }
    func fuses(tokens T: Int) throws -> Bool {
        guard enabled, norm != nil, hidden % 4 == 0, hidden <= PeerAllReduce.normMaxHidden, T <= PeerAllReduce.maxBlocks,
              T * ranks <= Self.maxRows else { return false }
        return !(try consumerTakes?(T) ?? false)
    }
}

/// One rank's side of an all-reduce over the GPUs of a tensor-parallel group.
public protocol StepAllReduce: AnyObject {
    /// This GPU's rank and the group's size.
    var rank: Int { get }
    var ranks: Int { get }
    /// output[0, count) = the sum over ranks of input[0, count), enqueued on `stream`.
    func enqueue(input: DeviceBuffer, output: DeviceBuffer, count: Int, stream: CUDAStream) throws
    /// Whether enqueueNorm may be used (a communicator that cannot throws from it).
    var fusesNorm: Bool { get }
    /// input (tokens rows of hidden floats) = the sum over ranks, then the residual add and
    /// RMSNorm after it: x += input, h = weight * rmsnorm(x) (norm.resid, norm.weight,
    /// norm.eps, norm.h; norm.add is input itself), enqueued on `stream`.
    func enqueueNorm(input: DeviceBuffer, tokens: Int, hidden: Int, norm: ResidualNorm, stream: CUDAStream) throws
}
