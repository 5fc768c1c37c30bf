import ArgumentParser
import Foundation
import Fulgur
import FulgurCUDA

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Decode speed on one GPU against the memory roofline.",
        discussion: """
            Builds random weights at the shape of a published model (presets: \(RandomModel.presets.joined(separator: ", "))); \
            by default each GPU makes its own shard of the experts and linear layers in device memory (--random-weights), \
            so a full-size model starts in seconds. Or loads a checkpoint. It then measures the card's copy bandwidth, then replays decode steps of 1 token and \
            verify steps of 8 and 16 from CUDA graphs (greedy tokens feed the next step on the GPU) and times one step \
            per kernel family. The roofline is the weight bytes a 1-token step reads (experts at top-k) over the copy \
            bandwidth.

            With --replay-acceptance, DFlash decoding instead: the preset's target and a random drafter at the \
            published drafter's shape (presets: \(RandomDrafter.presets.joined(separator: ", "))) run every round for \
            real (drafter block forward, target verify of --block tokens, rollback, drafter context update), but the \
            number of tokens a round emits is REPLAYED from a fixed schedule whose mean is the requested acceptance \
            length (bonus token included); tokens/s and ms per round (draft / verify / other) are printed per value. \
            --device cpu runs this mode on the CPU executor (tiny presets, for tests). With --tp N the target is \
            split over N GPUs (or N CPU shards with --device cpu) and the drafter split the same way, or whole on \
            GPU 0 with --drafter-tp 1. The target verifies random tokens in place of the random drafter's guesses \
            (--verify-tokens).
            """)

    @Option(help: "A preset name or a checkpoint path.") var model = "gpt-oss-20b"
    @Option(help: "Keep only the first N layers of a preset (to fit one card).") var layers: Int?
    @Option(help: "Expert weights of a preset: mxfp4 or bf16.") var experts: RandomModel.ExpertFormat = .mxfp4
    @Option(help: "Other linear layers of a preset: fp8 (128x128 block scales) or bf16.") var linear: RandomModel.LinearFormat = .fp8
    @Option(help: "Seed of a preset's weights.") var seed: UInt64 = 0
    @Option(name: .customLong("random-weights"), help: """
        Where a preset's matrices (experts and linear layers) are made: device (each GPU fills its own shard in device \
        memory with a kernel, so mimo-v2-flash over 2 GPUs starts in seconds with about 3 GB of host memory; the CPU \
        executor makes a matrix in memory when it first reads it) or host (the whole model in host memory, the weights \
        `fulgur random-model` exports: about 165 GB and minutes of CPU for mimo-v2-flash). The two are different \
        random models of the same shapes and distributions. Default: device, host with --compare-logits (its \
        reference comes from an exported model).
        """)
    var randomWeights: RandomWeights?
    @Option(help: "Positions filled before timing (attention reads them).") var context = 512
    @Option(help: "Timed steps per step size.") var steps = 100
    @Option(name: .customLong("tokens"), help: "Step sizes to time, comma-separated (1...16).") var tokenList = "1,8,16"
    @Option(name: .customLong("moe-version"), help: "MoE kernels for MXFP4 experts: 7 (gate_up and down launches, warps streaming whole units, routed once; the default), 4 (the same, each block routing), 2 (one persistent launch), 3 or 1 (earlier versions).") var moeVersion = CUDAMoE.defaultVersion
    @Option(help: "Warming L2 with the next layer's dense weights during each MoE: off, normal, evict-last; several comma-separated run one after another.")
    var prefetch = "off"
    @Option(help: "Split the model over this many GPUs (tensor parallelism; the peer all-reduce inside each step); with --replay-acceptance, the target (and the drafter, unless --drafter-tp 1).")
    var tp = 1
    @Option(help: "Time one tensor-parallel shard alone on one GPU, as R/N (shard R of N, e.g. 0/4): what each GPU of --tp N computes, without the all-reduces (its tokens are not the model's). Works with --timeline.")
    var shard: String?
    @Flag(name: .customLong("dry-run"), help: "Print where a preset's weights and KV cache go over --tp GPUs at --context positions, without a GPU or any weights.")
    var dryRun = false
    @Option(help: "Also write the report as JSON to this file.") var json: String?
    @Flag(help: "Also read each step size's kernels off a timeline (needs the trace build of the kernels: scripts/build-kernels --trace, then FULGUR_KERNELS=Kernels/build/fulgur-trace.fatbin; its records cost the kernels a little). With --tp: every GPU's step time and GPU 0's kernels. With --replay-acceptance: the drafter's block step.")
    var timeline = false
    @Option(name: .customLong("compare-logits"), help: "A safetensors file with input_ids and logits (recipes/peer/transformers_decode.py --logits-out): run the ids on the GPU first and print the agreement.")
    var compareLogits: String?
    @Option(name: .customLong("replay-acceptance"), help: "Run DFlash decoding with the acceptance REPLAYED at these lengths (tokens per round, comma-separated, e.g. 4.3,5.6,6.3) instead of timing steps.")
    var replayAcceptance: String?
    @Option(help: "Block size of --replay-acceptance, 2...16.") var block = 8
    @Option(help: "Timed rounds per acceptance length of --replay-acceptance.") var rounds = 200
    @Option(name: .customLong("warmup-rounds"), help: "Untimed rounds before them (CUDA graphs are captured).") var warmupRounds = 20
    @Option(name: .customLong("drafter-linear"), help: "Linear layers of the random drafter: fp8 or bf16 (as z-lab publishes it); default: --linear.")
    var drafterLinear: RandomModel.LinearFormat?
    @Option(help: "Where --replay-acceptance runs: cuda or cpu (the CPU executor, for tiny presets).") var device: BenchDevice = .cuda
    @Option(name: .customLong("drafter-tp"), help: "With --replay-acceptance and --tp N: N (the default) splits the drafter over the target's GPUs like the target, 1 runs it whole on GPU 0.")
    var drafterTP: Int?
    @Option(name: .customLong("verify-tokens"), help: "With --replay-acceptance: what the target verifies, random (the default: the drafter runs, then its guesses are replaced by random tokens, as varied as text can be) or drafted (the random drafter's own guesses, 2 to 3.2 distinct ids in 8, which reach fewer experts and make the verify look cheaper).")
    var verifyTokens: ReplayBenchmark.VerifyTokens = .random

    func run() throws {
        try reportingErrors {
            guard shard == nil || (replayAcceptance == nil && tp == 1 && compareLogits == nil && !dryRun) else {
                throw FulgurError(.usage, "--shard times one shard alone: it takes no --tp, --replay-acceptance, --compare-logits or --dry-run")
            }
            let shardOf: (rank: Int, count: Int)? = try shard.map { text in
                let parts = text.split(separator: "/", omittingEmptySubsequences: false).map { Int($0) }
                guard parts.count == 2, let r = parts[0], let n = parts[1], n >= 1, (0..<n).contains(r) else {
                    throw FulgurError(.usage, "--shard takes R/N with 0 <= R < N (e.g. 0/4); got '\(text)'")
                }
                return (r, n)
            }
            if let replayAcceptance { return try runReplay(replayAcceptance) }
            guard device == .cuda else { throw FulgurError(.usage, "--device cpu runs only with --replay-acceptance; the step benchmark times CUDA graphs") }
            let sizes = tokenList.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }
            guard !sizes.isEmpty, sizes.allSatisfy({ (1...16).contains($0) }) else {
                throw FulgurError(.usage, "--tokens takes step sizes from 1 to 16, e.g. 1,8,16; got '\(tokenList)'")
            }
            guard steps >= 1, context >= 0 else { throw FulgurError(.usage, "--steps must be at least 1 and --context at least 0") }
            let prefetches = try prefetch.split(separator: ",").map { p in
                guard let v = CUDAExecutor.L2Prefetch(rawValue: String(p)) else {
                    throw FulgurError(.usage, "--prefetch takes off, normal or evict-last (comma-separated); got '\(p)'")
                }
                return v
            }
            guard tp == 1 || dryRun || prefetches == [.off] else {
                throw FulgurError(.usage, "--prefetch runs on one GPU; the tensor-parallel step (--tp \(tp)) has no L2 prefetch")
            }
            if dryRun {
                guard RandomModel.presets.contains(model) else { throw FulgurError(.usage, "--dry-run takes a preset (\(RandomModel.presets.joined(separator: ", "))); got '\(model)'") }
                guard tp >= 1 else { throw FulgurError(.usage, "--tp must be at least 1") }
                let random = try RandomModel(preset: model, layers: layers, seed: seed, experts: experts, linear: linear)
                print(try MemoryPlan(random, gpus: tp, context: context).table)
                print(String(format: "host memory for the weights: %.1f GB with --random-weights device (embedding, LM head, routers, norms), %.1f GB with host",
                             Double(try random.byteCount(deferringMatrices: true)) / 1e9, Double(try random.byteCount(deferringMatrices: false)) / 1e9))
                return
            }
            let device = try CUDADevice()
            let module = try KernelModule(device: device)
            var plan: Plan, name: String
            let start = Date()
            if FileManager.default.fileExists(atPath: model) {
                plan = try Model(path: model).plan
                name = URL(fileURLWithPath: model).lastPathComponent
            } else {
                let random = try RandomModel(preset: model, layers: layers, seed: seed, experts: experts, linear: linear)
                let place = randomWeights ?? (compareLogits == nil ? .device : .host)
                plan = try place.build(random).plan
                name = random.description + (place == .device ? ", deferred random matrices" : "")
            }
            if let shardOf {
                plan = try plan.shard(rank: shardOf.rank, of: shardOf.count).droppingCommunication()
                name += ", shard \(shardOf.rank) of \(shardOf.count) alone (no all-reduce; tokens not the model's)"
            }
            Terminal.status(String(format: "%@ ready in %.1f s", name, Date().timeIntervalSince(start)))
            if let compareLogits {
                let executor = try CUDAExecutor(plan: plan, device: device, module: module, maxPositions: 4096, moeVersion: moeVersion)
                try compareLogitsFile(compareLogits, executor, vocab: plan.lmHead.outFeatures)
            }
            if tp > 1 {
                try tensorParallel(plan: plan, name: name, sizes: sizes)
                return
            }
            var reports: [DecodeBenchmark] = []
            for p in prefetches {
                let report = try DecodeBenchmark.run(plan: plan, model: name, device: device, module: module, context: context,
                                                     steps: steps, tokenCounts: sizes, moeVersion: moeVersion, prefetch: p, timeline: timeline,
                                                     log: { Terminal.status($0) })
                print(report.table)
                reports.append(report)
                try device.pool.trim()
            }
            if let json {
                let text = reports.count == 1 ? reports[0].json : "[\n" + reports.map(\.json).joined(separator: ",\n") + "\n]"
                try text.write(toFile: json, atomically: true, encoding: .utf8)
            }
        }
    }

    /// The step split over `tp` GPUs: replayed steps of each size, and the same 1-token step
    /// without its all-reduces (their cost in the step).
    func tensorParallel(plan: Plan, name: String, sizes: [Int]) throws {
        let group = try deviceGroup()
        let warmup = 5, timelinePositions = timeline ? sizes.reduce(0) { $0 + $1 * (CUDAExecutor.timelineSteps + CUDAExecutor.timelineWarmup) } : 0
        let positions = context + sizes.reduce(0) { $0 + $1 * (steps + warmup) } + timelinePositions + 16
        let bar = ProgressBar(label: "Weights to \(tp) GPUs"), start = Date()
        let split = try CUDATensorParallel(plan: plan, group: group, maxPositions: positions, progress: { bar.update($0, $1) })
        bar.finish()
        Terminal.status(String(format: "weights on %d GPUs in %.1f s (%.1f GB of device memory in use on GPU 0)", tp, Date().timeIntervalSince(start),
                               Double(group.devices[0].pool.bytesInUse) / 1e9))
        var rng = SeededGenerator(seed: 7)
        let prompt = (0..<context).map { _ in Int(rng.next() % UInt64(plan.spec.vocabSize)) }
        if context > 0 { _ = try split.forward(prompt, logits: .none) }
        let whole = try split.timeReplayedSteps(tokens: 1, steps: steps, warmup: warmup, advance: false)
        let noComm = try split.timeReplayedSteps(tokens: 1, steps: steps, warmup: warmup, skipping: ["comm"], advance: false)
        // Those two wrote the positions after the prompt into the sliding layers' rings (window +
        // 16 slots), where the next steps' windows look: the prompt again.
        split.reset()
        if context > 0 { _ = try split.forward(prompt, logits: .none) }
        try group.makeCurrent(0)
        let copy = try CopyBandwidth(group.devices[0], try group.devices[0].makeStream())
        let bytes = split.shards.map(\.bytesPerDecodeStep).max()!
        print("\(name), \(plan.spec.layerCount) layers, tensor-parallel over \(tp) x \(group.devices[0].name); context \(context)")
        print(String(format: "weights per 1-token step: %.1f MB on the busiest GPU; roofline %.3f ms at its copy bandwidth (%.0f GB/s); 1-token step at %.1f%% of it",
                     Double(bytes) / 1e6, copy.readMicros(bytes) / 1e3, copy.gbps, 100 * copy.readMicros(bytes) / 1e3 / whole))
        print(String(format: "all-reduces in the 1-token step: %.3f ms of %.3f (%d per step: two per layer, one for the greedy token)", whole - noComm, whole,
                     split.shards[0].launchCount(of: "comm")))
        // Experts a MoE layer reached in a shard's last step, on average (every shard routes alike).
        func reached(_ T: Int) throws -> String {
            let counts = try split.shards[0].expertsReached(tokens: T)
            return counts.isEmpty ? "-" : String(format: "%.1f", Double(counts.reduce(0, +)) / Double(counts.count))
        }
        print("tokens/step   ms/step   tokens/s   distinct ids in the last step   experts a MoE layer reached in it")
        for T in sizes {
            let ms = try split.timeReplayedSteps(tokens: T, steps: steps, warmup: warmup, fixedTokens: CUDAExecutor.replaysDistinctTokens(T))
            print(String(format: "%11d   %7.3f   %8.1f   %29d   %@", T, ms, Double(T) * 1000 / ms, try split.shards[0].distinctFedTokens(T),
                         try reached(T).padding(toLength: 33, withPad: " ", startingAt: 0)))
        }
        print(CUDAExecutor.replayedTokensNote + " Every GPU finds the greedy token (each GPU's candidate from its vocabulary slice, exchanged inside the step).")
        if timeline {
            for T in sizes {
                let lines = try split.timelines(tokens: T)
                print(String(format: "timelines of the %d-token step, us a step by GPU: ", T) + lines.map { String(format: "%.1f", $0.stepMicros) }.joined(separator: ", "))
                print("GPU 0's " + lines[0].table())
            }
        }
        // The same step sizes as a decoder calls them: argmax from the host (tokens up, one graph
        // a GPU, the ids down), random distinct tokens, the cache rewound after each call.
        let rewind = split.length
        for s in split.shards { s.traceCalls = true }
        defer { for s in split.shards { s.traceCalls = false } }
        // Then one block of T random distinct ids over and over, as the replayed rows run them.
        for (T, fixed) in sizes.flatMap({ T in [(T, false), (T, true)] }) where T > 1 && split.length + T <= split.maxPositions {
            var seconds: [Double] = []
            let fixedBlock = (0..<T).map { _ in Int(rng.next() % UInt64(plan.spec.vocabSize)) }
            // Per rank, milliseconds from the call's start: launch begun, launch returned, wait
            // over; and the GPU's time between events around the graphs.
            var parts = [[[Double]]](repeating: [[], [], [], []], count: tp)
            var reachedSum = 0, reachedLayers = 0
            for i in 0..<(warmup + steps) {
                let block = fixed ? fixedBlock : (0..<T).map { _ in Int(rng.next() % UInt64(plan.spec.vocabSize)) }
                let t0 = DispatchTime.now().uptimeNanoseconds
                _ = try split.argmax(block)
                if i >= warmup {
                    seconds.append(Double(DispatchTime.now().uptimeNanoseconds - t0) / 1e9)
                    for (r, s) in split.shards.enumerated() {
                        let c = s.lastCall
                        func ms(_ t: UInt64) -> Double { (Double(t) - Double(t0)) / 1e6 }
                        for (k, v) in [ms(c.launchStart), ms(c.launchEnd), ms(c.done), c.gpuMilliseconds].enumerated() { parts[r][k].append(v) }
                    }
                    let counts = try split.shards[0].expertsReached(tokens: T)
                    reachedSum += counts.reduce(0, +)
                    reachedLayers += counts.count
                }
                split.truncate(to: rewind)
            }
            func median(_ v: [Double]) -> Double { v.sorted()[v.count / 2] }
            print(String(format: "argmax of %d random tokens called from the host%@: median %.3f ms (the host clock around the call, %d calls)", T,
                         fixed ? ", the same block every call" : "", 1e3 * median(seconds), seconds.count)
                  + (reachedLayers > 0 ? String(format: "; a MoE layer reached %.1f experts on average", Double(reachedSum) / Double(reachedLayers)) : ""))
            for r in 0..<tp {
                print(String(format: "  GPU %d, medians in ms from the call's start: launch begun %.3f, returned %.3f (%.3f in the launch); wait over %.3f; GPU between events %.3f",
                             r, median(parts[r][0]), median(parts[r][1]), median(zip(parts[r][1], parts[r][0]).map { $0 - $1 }), median(parts[r][2]), median(parts[r][3])))
            }
        }
    }

    /// GPUs 0 ..< --tp, or an error that says how many there are.
    func deviceGroup() throws -> DeviceGroup {
        let visible = try CUDADevice.visibleCount()
        guard tp <= visible else { throw FulgurError(.usage, "--tp \(tp) splits the model over \(tp) GPUs; the driver sees \(visible)") }
        return try DeviceGroup(ordinals: (0..<tp).map { Int32($0) })
    }
}

/// Where `fulgur bench` makes a preset's matrices (`--random-weights`).
enum RandomWeights: String, ExpressibleByArgument, CaseIterable {
    case device, host

    /// The model, with a progress bar: only its small tensors in memory (device), or everything.
    func build(_ random: RandomModel) throws -> Model {
        let bar = ProgressBar(label: self == .device ? "Building small tensors (matrices are made where they run)" : "Building random weights")
        defer { bar.finish() }
        switch self {
        case .device: return try random.buildDeferred(progress: { bar.update($0, $1) })
        case .host: return try random.build(progress: { bar.update($0, $1) })
        }
    }
}
