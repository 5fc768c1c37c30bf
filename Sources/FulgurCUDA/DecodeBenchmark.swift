import Foundation
import Fulgur

/// Decode speed of a plan on one GPU against the memory roofline: the card's copy bandwidth
/// is measured first, then steps of 1 token (decode) and of 8 and 16 (verify blocks) are
/// replayed back to back from CUDA graphs after a prefix of `context` positions, and one step
/// is profiled per kernel family. `fulgur bench` and fulgur-gpu-check print it.
public struct DecodeBenchmark: Codable {
    public struct Step: Codable {
        public let tokens: Int
        public let millisecondsPerStep: Double
        public let tokensPerSecond: Double
        /// Distinct ids among the last timed step's rows (CUDAExecutor.distinctFedTokens): T for
        /// steps of several tokens (fixed distinct ids), 1 for one token.
        public let distinctTokens: Int
    }
    public struct Kernel: Codable {
        public let kind: String
        public let launches: Int
        public let microsecondsPerStep: Double
    }

    public let model: String
    public let card: String
    public let date: String
    public let layers: Int
    public let context: Int
    public let copyGBps: Double
    /// Weight bytes one 1-token step reads (experts at top-k, as stored on the GPU).
    public let bytesPerStep: Int
    /// bytesPerStep at the copy bandwidth.
    public let rooflineMilliseconds: Double
    public let launchesPerStep: Int
    /// Kernels in the 1-token step's graph (nil when no 1-token step was captured).
    public let kernelsPerStep: Int?
    /// How L2 was warmed (CUDAExecutor.L2Prefetch).
    public let prefetch: String
    public let steps: [Step]
    /// Each launch timed alone (small kernels overstated: no overlap, launch cost in full).
    public let kernels: [Kernel]
    /// What each family costs inside the replayed 1-token step: the step's time minus the
    /// step's time with that family's launches left out of the graph (both with fixed distinct
    /// tokens, CUDAExecutor.timeReplayedSteps).
    public let inGraph: [Kernel]
    /// The same for the 8-token (verify) step, when 8 is among the timed token counts.
    public let inGraphVerify: [Kernel]?
    /// With `timeline`: each timed step size's kernels, read from a trace build's records.
    public let timelines: [Timeline]?

    /// The 1-token step's share of the roofline.
    public var rooflineFraction: Double { rooflineMilliseconds / (steps.first { $0.tokens == 1 }?.millisecondsPerStep ?? .nan) }

    public static func run(plan: Plan, model: String, device: CUDADevice, module: KernelModule, context: Int = 512,
                           steps count: Int = 100, tokenCounts: [Int] = [1, 8, 16], moeVersion: Int = CUDAMoE.defaultVersion, prefetch: CUDAExecutor.L2Prefetch = .off,
                           timeline: Bool = false, log: @escaping (String) -> Void = { _ in }) throws -> DecodeBenchmark {
        let stream = try device.makeStream()
        let copy = try CopyBandwidth(device, stream)
        log(String(format: "copy bandwidth %.0f GB/s", copy.gbps))
        let warmup = 5
        let positions = context + tokenCounts.reduce(0) { $0 + ($1 * (count + warmup)) } + 16
            + (timeline ? (tokenCounts.max() ?? 0) * (CUDAExecutor.timelineSteps + CUDAExecutor.timelineWarmup) : 0)
        let executor = try CUDAExecutor(plan: plan, device: device, module: module, maxPositions: positions, moeVersion: moeVersion, prefetch: prefetch,
                                        progress: { done, all in if done == all { log("weights on the GPU") } })
        var rng = SeededGenerator(seed: 7)
        let vocab = min(plan.embedding.table.shape[0], plan.spec.vocabSize)
        let prompt = (0..<context).map { _ in Int(rng.next() % UInt64(vocab)) }
        if context > 0 { _ = try executor.forward(prompt, logits: .none) }
        try stream.synchronize()
        try executor.stream.synchronize()  // a fault in the prefill is reported here, not in the timings
        log("prefilled \(context) positions")
        let kernels = try executor.profile(tokens: 1).map { Kernel(kind: $0.kind, launches: $0.launches, microsecondsPerStep: $0.micros) }
        // The family ablation runs at the prefilled context and leaves it there.
        let whole = try executor.timeReplayedSteps(tokens: 1, steps: count, warmup: warmup, advance: false, fixedTokens: true)
        func ablation(tokens T: Int, whole: Double) throws -> [Kernel] {
            try executor.kernelFamilies.map { family in
                let without = try executor.timeReplayedSteps(tokens: T, steps: count, warmup: warmup, skipping: [family], advance: false,
                                                             fixedTokens: true)
                return Kernel(kind: family, launches: kernels.first { $0.kind == family }?.launches ?? 0, microsecondsPerStep: (whole - without) * 1e3)
            }
        }
        let inGraph = try ablation(tokens: 1, whole: whole)
        var inGraphVerify: [Kernel]?
        if tokenCounts.contains(8) {
            let verify = try executor.timeReplayedSteps(tokens: 8, steps: count, warmup: warmup, advance: false, fixedTokens: true)
            inGraphVerify = try ablation(tokens: 8, whole: verify)
        }
        // At the prefilled context (each timeline leaves the cache where it found it).
        var timelines: [Timeline]?
        if timeline {
            timelines = try tokenCounts.map { T in
                let t = try executor.timeline(tokens: T)
                log(String(format: "T = %d: timeline %.1f us a step", T, t.stepMicros))
                return t
            }
        }
        // The runs above leave the cache's length where it was but wrote the positions after it:
        // a sliding layer's ring (window + 16 slots) then holds later positions' rows where the
        // next steps' windows look. The same prompt again, so the timed steps read its rows.
        executor.reset()
        if context > 0 { _ = try executor.forward(prompt, logits: .none) }
        try executor.stream.synchronize()
        log("prefilled \(context) positions again")
        var steps: [Step] = []
        for T in tokenCounts {
            // Steps of several tokens run T distinct random ids (CUDAExecutor.replaysDistinctTokens).
            let ms = try executor.timeReplayedSteps(tokens: T, steps: count, warmup: warmup, fixedTokens: CUDAExecutor.replaysDistinctTokens(T))
            steps.append(Step(tokens: T, millisecondsPerStep: ms, tokensPerSecond: Double(T) * 1000 / ms, distinctTokens: try executor.distinctFedTokens(T)))
            log(String(format: "T = %d: %.3f ms a step", T, ms))
        }
        let date = ISO8601DateFormatter().string(from: Date()).prefix(10)
        return DecodeBenchmark(model: model, card: device.name, date: String(date), layers: plan.spec.layerCount, context: context,
                               copyGBps: copy.gbps, bytesPerStep: executor.bytesPerDecodeStep,
                               rooflineMilliseconds: copy.readMicros(executor.bytesPerDecodeStep) / 1e3,
                               launchesPerStep: executor.launchesPerStep, kernelsPerStep: executor.kernelsPerStep[1], prefetch: prefetch.rawValue, steps: steps, kernels: kernels, inGraph: inGraph,
                               inGraphVerify: inGraphVerify, timelines: timelines)
    }

    public var table: String {
        var lines: [String] = []
        lines.append("\(model), \(layers) layers, \(card), \(date); context \(context); copy \(String(format: "%.0f", copyGBps)) GB/s")
        lines.append(String(format: "weights per 1-token step %.1f MB, roofline %.3f ms (%.0f tokens/s); %@ a 1-token step; L2 prefetch %@",
                            Double(bytesPerStep) / 1e6, rooflineMilliseconds, 1000 / rooflineMilliseconds,
                            kernelsPerStep.map { "\($0) kernels" } ?? "\(launchesPerStep) launch entries", prefetch))
        let one = steps.first { $0.tokens == 1 }?.millisecondsPerStep
        lines.append("tokens/step   ms/step   tokens/s   vs 1-token step   distinct ids in the last step")
        for s in steps {
            lines.append(String(format: "%11d   %7.3f   %8.1f   %14.2fx   %29d", s.tokens, s.millisecondsPerStep, s.tokensPerSecond,
                                s.millisecondsPerStep / (one ?? .nan), s.distinctTokens))
        }
        lines.append(CUDAExecutor.replayedTokensNote)
        lines.append(String(format: "1-token step at %.1f%% of the roofline", 100 * rooflineFraction))
        lines.append("per kernel family, 1-token step, each launch timed alone (us):")
        let total = kernels.reduce(0) { $0 + $1.microsecondsPerStep }
        for k in kernels.sorted(by: { $0.microsecondsPerStep > $1.microsecondsPerStep }) {
            lines.append("  " + k.kind.padding(toLength: 10, withPad: " ", startingAt: 0)
                         + String(format: " %4d launches  %9.1f us  %5.1f%%", k.launches, k.microsecondsPerStep, 100 * k.microsecondsPerStep / total))
        }
        lines.append("per kernel family, 1-token step, left out of the replayed graph (us the step got faster):")
        for k in inGraph.sorted(by: { $0.microsecondsPerStep > $1.microsecondsPerStep }) {
            lines.append("  " + k.kind.padding(toLength: 10, withPad: " ", startingAt: 0)
                         + String(format: " %4d launches  %9.1f us  %5.1f%%", k.launches, k.microsecondsPerStep, 100 * k.microsecondsPerStep / (1e3 * (one ?? .nan))))
        }
        if let verify = inGraphVerify, let eight = steps.first(where: { $0.tokens == 8 })?.millisecondsPerStep {
            lines.append("per kernel family, 8-token step, left out of the replayed graph (us the step got faster):")
            for k in verify.sorted(by: { $0.microsecondsPerStep > $1.microsecondsPerStep }) {
                lines.append("  " + k.kind.padding(toLength: 10, withPad: " ", startingAt: 0)
                             + String(format: " %4d launches  %9.1f us  %5.1f%%", k.launches, k.microsecondsPerStep, 100 * k.microsecondsPerStep / (1e3 * eight)))
            }
        }
        for t in timelines ?? [] { lines.append(t.table()) }
        return lines.joined(separator: "\n")
    }

    public var json: String {
        let e = JSONEncoder()
        e.outputFormatting = [.prettyPrinted, .sortedKeys]
        return String(decoding: try! e.encode(self), as: UTF8.self)
    }
}
