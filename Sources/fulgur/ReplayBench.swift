import ArgumentParser
import Foundation
import Fulgur
import FulgurCUDA

enum BenchDevice: String, ExpressibleByArgument, CaseIterable { case cuda, cpu }
extension ReplayBenchmark.VerifyTokens: ExpressibleByArgument {}

extension Bench {
    /// `fulgur bench --replay-acceptance`: the preset's target and a random drafter of the
    /// published shape on one device, then ReplayBenchmark at each acceptance length.
    func runReplay(_ list: String) throws {
        let values = try list.split(separator: ",").map { part -> Double in
            guard let v = Double(part.trimmingCharacters(in: .whitespaces)) else {
                throw FulgurError(.usage, "--replay-acceptance takes tokens per round, comma-separated, e.g. 4.3,5.6,6.3; got '\(list)'")
            }
            return v
        }
        guard !values.isEmpty else { throw FulgurError(.usage, "--replay-acceptance needs at least one length, e.g. 4.3,5.6,6.3") }
        guard (2...16).contains(block) else { throw FulgurError(.usage, "--block must be in 2...16, got \(block)") }
        guard compareLogits == nil else { throw FulgurError(.usage, "--compare-logits does not combine with --replay-acceptance") }
        guard !dryRun else { throw FulgurError(.usage, "--dry-run does not combine with --replay-acceptance (it prints a memory plan and runs nothing)") }
        guard tp >= 1 else { throw FulgurError(.usage, "--tp must be at least 1, got \(tp)") }
        // Split like the target unless told: on 2 H200 that drafted in 0.89-0.99 ms a round where
        // the whole drafter on GPU 0 took 1.25-1.26 (twenty-sixth session).
        let drafterTP = self.drafterTP ?? tp
        guard drafterTP == 1 || drafterTP == tp else {
            throw FulgurError(.usage, "--drafter-tp is 1 (the drafter whole on the first GPU) or the target's --tp (\(tp)); got \(drafterTP)")
        }
        guard !timeline || (device == .cuda && drafterTP == 1) else {
            throw FulgurError(.usage, "--timeline with --replay-acceptance reads the drafter's block step off a timeline on its GPU: needs --device cuda and the drafter whole (--drafter-tp 1)")
        }
        guard !FileManager.default.fileExists(atPath: model) else {
            throw FulgurError(.usage, "--replay-acceptance builds a random drafter of the published shape for a preset's model; "
                              + "give a preset (with a drafter shape: \(RandomDrafter.presets.joined(separator: ", "))), not a checkpoint")
        }
        let start = Date()
        let random = try RandomModel(preset: model, layers: layers, seed: seed, experts: experts, linear: linear)
        let randomDrafter = try RandomDrafter(for: random, linear: drafterLinear)
        // The CPU executor would make every deferred matrix in memory anyway: host weights there.
        let place = randomWeights ?? (device == .cpu ? .host : .device)
        let target = try place.build(random)
        let modelName = random.description + (place == .device ? ", deferred random matrices" : "")

        let positions = ReplayBenchmark.positions(context: context, rounds: rounds, warmupRounds: warmupRounds, blockSize: block)
        let executor: any Executor, makeExecutor: ((Plan, Int) throws -> any Executor)?, deviceName: String
        switch device {
        case .cuda where tp > 1:
            // The target split over GPUs 0 ..< tp; the drafter whole on GPU 0, or split the same way.
            let group = try deviceGroup()
            let split = try CUDATensorParallel(plan: target.plan, group: group, maxPositions: positions, moeVersion: moeVersion)
            let moeVersion = self.moeVersion
            executor = split
            if drafterTP > 1 {
                makeExecutor = { plan, context in
                    try CUDATensorParallel(plan: plan, group: group, maxPositions: context, maxStepTokens: split.maxStepTokens, moeVersion: moeVersion)
                }
            } else {
                makeExecutor = { plan, context in
                    try group.makeCurrent(0)
                    return try CUDAExecutor(plan: plan, device: group.devices[0], module: group.modules[0], maxPositions: context,
                                            maxStepTokens: split.maxStepTokens, moeVersion: moeVersion)
                }
            }
            deviceName = "\(tp) x \(group.devices[0].name) (target split over \(tp) GPUs, drafter " + (drafterTP > 1 ? "split over \(tp))" : "on GPU 0)")
        case .cuda:
            let device = try CUDADevice()
            let module = try KernelModule(device: device)
            let cuda = try CUDAExecutor(plan: target.plan, device: device, module: module, maxPositions: positions, moeVersion: moeVersion)
            let moeVersion = self.moeVersion
            executor = cuda
            makeExecutor = { plan, context in
                try CUDAExecutor(plan: plan, device: device, module: module, maxPositions: context, maxStepTokens: cuda.maxStepTokens, moeVersion: moeVersion)
            }
            deviceName = device.name
        case .cpu:
            let cores = ProcessInfo.processInfo.activeProcessorCount
            if tp > 1 {
                executor = try CPUTensorParallel(plan: target.plan, count: tp, maxPositions: positions, maxStepTokens: 16)
                deviceName = "CPU executor (\(cores) cores), target split into \(tp) shards" + (drafterTP > 1 ? ", drafter too" : "")
            } else {
                executor = CPUExecutor(plan: target.plan, maxPositions: positions, maxStepTokens: 16)
                deviceName = "CPU executor (\(cores) cores)"
            }
            let tp = self.tp
            makeExecutor = drafterTP > 1 ? { plan, context in try CPUTensorParallel(plan: plan, count: tp, maxPositions: context, maxStepTokens: 16) } : nil
        }
        // A timeline replays its steps at the positions after the benchmark's.
        let timelinePositions = timeline ? block * (CUDAExecutor.timelineSteps + CUDAExecutor.timelineWarmup) : 0
        let drafter = try randomDrafter.load(for: target, maxPositions: executor.maxPositions + timelinePositions, maxStepTokens: executor.maxStepTokens,
                                             executor: makeExecutor)
        Terminal.status(String(format: "%@ and its drafter ready in %.1f s", modelName, Date().timeIntervalSince(start)))
        // The verify's GPU time (events around each target shard's graph), against the host's
        // clock around the call that the report's verify column holds.
        let targetShards = (executor as? CUDATensorParallel)?.shards ?? [executor as? CUDAExecutor].compactMap { $0 }
        for s in targetShards { s.traceCalls = true; s.tracedCalls = (0, 0) }
        let report = try ReplayBenchmark.run(target: executor, drafter: drafter, model: modelName, drafterName: randomDrafter.description,
                                             device: deviceName, acceptance: values, blockSize: block, context: context, rounds: rounds,
                                             warmupRounds: warmupRounds, verifyTokens: verifyTokens, log: { Terminal.status($0) })
        print(report.table)
        for (r, s) in targetShards.enumerated() where s.tracedCalls.count > 0 {
            print(String(format: "target GPU %d: %d verify calls (warm-up rounds included), GPU time between events around the graph %.3f ms on average",
                         r, s.tracedCalls.count, s.tracedCalls.gpuMilliseconds / Double(s.tracedCalls.count)))
        }
        for s in targetShards { s.traceCalls = false }
        if let json { try report.json.write(toFile: json, atomically: true, encoding: .utf8) }
        if timeline, let blockStep = drafter.block as? CUDAExecutor {
            // The verify is the target's step of `block` tokens: `fulgur bench --timeline --tokens N` has it.
            let t = try blockStep.timeline(tokens: block)
            print(String(format: "The drafter's block step (%d tokens) on a timeline: %.1f us a step", block, t.stepMicros))
            print(t.table())
        }
    }
}
