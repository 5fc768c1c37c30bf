import Foundation
import Testing
@testable import Fulgur

/// DFlash on a split target (issue 7): CPUTensorParallel as an Executor under
/// SpeculativeGenerator, with the drafter whole on its own executor. Greedy output must be
/// plain greedy's of the unsplit model, token for token; the greedy tokens come from the
/// shards' candidates exchanged through their all-reduce (SlicedArgmax), as on the GPUs.
@Suite struct TensorParallelSpeculativeTests {
    static let prompts = [[1, 17, 42, 99, 3], [1, 200, 7, 7, 7, 150, 31, 64, 9, 88, 120, 5]]
    static let splits: [(String, Int)] = [
        ("llama", 2), ("qwen3", 2), ("qwen3_moe", 2), ("mimo_v2_flash", 2), ("gpt_oss", 2),
        ("llama", 4), ("qwen3_moe", 4), ("mimo_v2_flash", 4), ("gpt_oss", 4),
    ]

    /// Sampler.argmax's rules written out independently: the first index of the largest value
    /// that is not NaN and above -inf; 0 when there is none.
    static func expectedArgmax(_ row: [Float]) -> Int {
        var best: Int? = nil
        for i in row.indices where !row[i].isNaN && row[i] > -.infinity {
            if best == nil || row[i] > row[best!] { best = i }
        }
        return best ?? 0
    }

    /// The exchange as the shards run it: each rank's table from its slice, summed in rank
    /// order starting from zero (SumGroup's and comm.cu's order), then the pick.
    static func slicedArgmax(_ rows: [[Float]], slices: [Range<Int>]) -> [Int] {
        var sum = [Float](repeating: 0, count: rows.count * slices.count * SlicedArgmax.entryFloats)
        for (rank, slice) in slices.enumerated() {
            let candidates = rows.map { row in
                Array(row[slice]).withUnsafeBufferPointer { SlicedArgmax.candidate($0, start: slice.lowerBound) }
            }
            for (i, v) in SlicedArgmax.table(candidates, rank: rank, ranks: slices.count).enumerated() { sum[i] += v }
        }
        return SlicedArgmax.pick(sum, ranks: slices.count)
    }

    @Test func slicedArgmaxIsTheWholeRowsArgmaxWithItsTieAndNaNRules() throws {
        let plan = try Model(path: Fixtures.path("models/llama")).plan
        let vocab = plan.lmHead.outFeatures
        var rng = SeededGenerator(seed: 3)
        var rows: [[Float]] = []
        func row(_ fill: Float = -1, _ set: [Int: Float] = [:]) -> [Float] {
            var r = [Float](repeating: fill, count: vocab)
            for (i, v) in set { r[i] = v }
            return r
        }
        let half = vocab / 2
        rows.append(row(-1, [half - 1: 5, half: 5]))            // a tie across the 2-way boundary: the lower id
        rows.append(row(-1, [vocab - 1: 5, 3: 5]))              // a tie between the first and the last slice
        rows.append(row(-1, [vocab - 1: 5]))                    // the largest in the last slice only
        rows.append(row(.nan, [vocab - 2: -3]))                 // NaN everywhere else never wins
        rows.append(row(.nan))                                  // all NaN: 0
        rows.append(row(-.infinity))                            // all -inf: 0
        rows.append(row(-.infinity, [vocab - 1: .nan, half + 1: -1e30]))  // one finite value, late
        rows.append(row(0, [0: -0.0, half: 0]))                 // -0 == +0: the first
        rows.append(row(-.infinity, [half + 2: .infinity, vocab - 1: .infinity]))  // +inf ties
        rows.append(row(-2, [1: Float.leastNonzeroMagnitude, half + 1: Float.leastNonzeroMagnitude]))  // denormals survive x + 0
        for _ in 0..<20 { rows.append((0..<vocab).map { _ in Float(Int(rng.next() % 7)) - 3 }) }  // many ties
        for ranks in 1...5 {
            let slices = (0..<ranks).map { plan.vocabularySlice(rank: $0, of: ranks) }
            #expect(Self.slicedArgmax(rows, slices: slices) == rows.map(Self.expectedArgmax), "over \(ranks) slices")
        }
        #expect(rows.map { Sampler.argmax($0) } == rows.map(Self.expectedArgmax))
    }

    @Test(arguments: splits)
    func splitArgmaxIsTheGatheredLogitsArgmax(_ name: String, _ count: Int) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let prompt = (0..<21).map { ($0 * 37 + 11) % model.spec.vocabSize }
        let gathered = try CPUTensorParallel(plan: model.plan, count: count, maxStepTokens: 8)
        let logits = try gathered.forward(prompt, logits: .all)
        let vocab = gathered.vocabSize
        let rows = (0..<prompt.count).map { Sampler.argmax(Array(logits[($0 * vocab)..<(($0 + 1) * vocab)])) }
        let split = try CPUTensorParallel(plan: model.plan, count: count, maxStepTokens: 8)
        #expect(try split.argmax(prompt) == Array(rows.suffix(5)))  // steps of 8, 8, then 5
        // And on through decode steps, each fed the last pick.
        var token = rows.last!
        for _ in 0..<6 {
            let want = Sampler.argmax(try gathered.forward([token]))
            let got = try split.argmax([token])
            #expect(got == [want])
            token = want
        }
        #expect(try split.argmax([]) == [])
    }

    @Test(arguments: [("mimo_v2_flash", 2), ("gpt_oss", 4)])
    func rankZeroCapturesTheWholeModelsHiddenStates(_ name: String, _ count: Int) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let prompt = (0..<12).map { ($0 * 29 + 5) % model.spec.vocabSize }
        let layers = [0, model.spec.layerCount - 1]
        let whole = CPUExecutor(plan: model.plan, maxStepTokens: 8)
        whole.captureLayers = layers
        _ = try whole.forward(prompt, logits: .none)
        let split = try CPUTensorParallel(plan: model.plan, count: count, maxStepTokens: 8)
        for s in split.shards { s.captureLayers = layers }
        _ = try split.forward(prompt, logits: .none)
        // Replicated: every shard holds the same bits...
        let first = split.shards[0].capturedFeatures
        for s in split.shards.dropFirst() { #expect(s.capturedFeatures.map(\.bitPattern) == first.map(\.bitPattern)) }
        // ... and they are the whole model's, up to summation order.
        let executor: any Executor = split
        let seen = try executor.capturedFeatures
        #expect(seen.count == whole.capturedFeatures.count)
        let d = zip(seen, whole.capturedFeatures).map { ($0 - $1) * ($0 - $1) }.reduce(0, +)
        let n = whole.capturedFeatures.map { $0 * $0 }.reduce(0, +)
        #expect((d / n).squareRoot() < 1e-5)
    }

    // Done-means 1 with DFlash on the CPU: 200 tokens, two prompts, blocks 2, 8 and 16.
    @Test(arguments: splits)
    func greedySpeculativeOnASplitTargetMatchesPlainGreedy(_ name: String, _ count: Int) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let parameters = GenerationParameters(maxTokens: 200)
        for prompt in Self.prompts {
            let expected = try Generator(executor: CPUExecutor(plan: model.plan)).generate(prompt: prompt, parameters: parameters, decode: { "<\($0)>" })
            #expect(expected.tokens.count == 200)
            for blockSize in [2, 8, 16] {
                let target = try CPUTensorParallel(plan: model.plan, count: count, maxPositions: 512, maxStepTokens: 16)
                let drafter = try DFlashDrafter(directory: Fixtures.path("drafters/\(name)"), target: model,
                                                maxPositions: target.maxPositions, maxStepTokens: target.maxStepTokens)
                let r = try SpeculativeGenerator(target: target, drafter: drafter, blockSize: blockSize)
                    .generate(prompt: prompt, parameters: parameters, decode: { "<\($0)>" })
                #expect(r.tokens == expected.tokens, "\(name) over \(count), block \(blockSize), prompt \(prompt)")
                #expect(r.text == expected.text)
                let stats = try #require(r.speculative)
                #expect(stats.acceptanceLengths.reduce(0, +) == 199)
                #expect(target.length == prompt.count + 199)  // rolled back to what was emitted, on every shard
                #expect(target.shards.allSatisfy { $0.cache.length == target.length })
            }
        }
    }

    @Test func aSplitTargetSharesItsCacheWithAPlanThatSplitsAndRefusesOneThatDoesNot() throws {
        let model = try Model(path: Fixtures.path("models/gpt_oss"))
        let prompt = [1, 17, 42, 99, 3], next = [7, 8]
        let split = try CPUTensorParallel(plan: model.plan, count: 2, maxStepTokens: 8)
        _ = try split.forward(prompt, logits: .none)
        let shared = try split.sharingCache(plan: model.plan)
        #expect(shared.length == prompt.count)
        let reference = try CPUTensorParallel(plan: model.plan, count: 2, maxStepTokens: 8)
        _ = try reference.forward(prompt, logits: .none)
        #expect(try shared.forward(next, logits: .all) == reference.forward(next, logits: .all))
        #expect(split.length == prompt.count + next.count)
        // A product with no splitting rule (the MLP's down matrix read from x) is refused.
        let down = try #require(model.plan.ops.lazy.compactMap { op -> LinearWeight? in
            if case .linear(_, _, let w, _) = op { return w } else { return nil }
        }.first)
        let odd = Plan(spec: model.plan.spec, ops: [.embed, .linear(src: .out, dst: .h, weight: down, bias: nil)], widths: model.plan.widths,
                       embedding: model.plan.embedding, lmHead: model.plan.lmHead)
        expectError(["from out into h has no rule for splitting"]) { _ = try split.sharingCache(plan: odd) }
    }

    /// The drafter split like its target (Plan.shard of both of its plans: the context plan's fc
    /// replicated and its k/v paths on each shard's heads, sharing the block plan's cache): after
    /// the same context its block logits are the whole drafter's up to summation order, and
    /// DFlash over a split target with it is plain greedy with the whole drafter's acceptance.
    /// (Losslessness alone would not show the split drafter right: any drafter is lossless.)
    @Test(arguments: [("gpt_oss", "gpt_oss", 2), ("mimo_v2_flash", "mimo_v2_flash_swa", 2), ("mimo_v2_flash", "mimo_v2_flash", 4),
                      ("qwen3_moe", "qwen3_moe", 4)])
    func aDrafterSplitLikeItsTargetDraftsAsTheWholeOne(_ name: String, _ drafterName: String, _ count: Int) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let directory = Fixtures.path("drafters/\(drafterName)")
        let split: (Plan, Int) throws -> any Executor = { plan, context in
            try CPUTensorParallel(plan: plan, count: count, maxPositions: context, maxStepTokens: 16)
        }
        let whole = try DFlashDrafter(directory: directory, target: model, maxPositions: 512, maxStepTokens: 16)
        let parted = try DFlashDrafter(directory: directory, target: model, maxPositions: 512, maxStepTokens: 16, executor: split)
        #expect(parted.block is CPUTensorParallel && parted.context is CPUTensorParallel)

        let target = CPUExecutor(plan: model.plan, maxPositions: 512, maxStepTokens: 16)
        target.captureLayers = whole.targetLayerIds
        let prompt = (0..<13).map { ($0 * 41 + 7) % model.spec.vocabSize }
        _ = try target.forward(prompt, logits: .none)
        try whole.extend(tokens: prompt, features: target.capturedFeatures)
        try parted.extend(tokens: prompt, features: target.capturedFeatures)
        #expect(parted.contextLength == prompt.count)
        let block = [prompt.last!] + Array(repeating: whole.maskTokenId, count: 7)
        let a = try whole.block.forward(block, logits: .all), b = try parted.block.forward(block, logits: .all)
        #expect(a.count == block.count * model.plan.lmHead.outFeatures && b.count == a.count)
        let d = zip(a, b).map { ($0 - $1) * ($0 - $1) }.reduce(0, +), n = a.map { $0 * $0 }.reduce(0, +)
        #expect(n > 0 && (d / n).squareRoot() < 1e-5, "\(drafterName) over \(count): relative difference \((d / n).squareRoot())")

        let parameters = GenerationParameters(maxTokens: 120)
        let expected = try Generator(executor: CPUExecutor(plan: model.plan)).generate(prompt: Self.prompts[1], parameters: parameters, decode: { "<\($0)>" })
        var acceptance: [[Int]] = []
        for drafterExecutor in [nil, split] {
            let target = try CPUTensorParallel(plan: model.plan, count: count, maxPositions: 512, maxStepTokens: 16)
            let drafter = try DFlashDrafter(directory: directory, target: model, maxPositions: 512, maxStepTokens: 16, executor: drafterExecutor)
            let r = try SpeculativeGenerator(target: target, drafter: drafter, blockSize: 8)
                .generate(prompt: Self.prompts[1], parameters: parameters, decode: { "<\($0)>" })
            #expect(r.tokens == expected.tokens, "\(name) over \(count), drafter \(drafterExecutor == nil ? "whole" : "split")")
            acceptance.append(try #require(r.speculative).acceptanceLengths)
        }
        // The tiny random drafters guess nothing right (every round emits 1), so the rounds say
        // little; the logits above and the guesses below are what show the split drafter right.
        #expect(acceptance[0] == acceptance[1])
        whole.block.truncate(to: prompt.count)
        parted.block.truncate(to: prompt.count)
        let guesses = try whole.propose(after: prompt.last!, count: 7)
        #expect(guesses.count == 7)
        #expect(try parted.propose(after: prompt.last!, count: 7) == guesses)
    }

    @Test func replayBenchmarkRunsOnASplitTarget() throws {
        let random = try RandomModel(preset: "tiny-gpt-oss", seed: 5)
        let model = try random.build()
        let target = try CPUTensorParallel(plan: model.plan, count: 2, maxPositions: 512, maxStepTokens: 16)
        let drafter = try RandomDrafter(for: random).load(for: model, maxPositions: 512, maxStepTokens: 16)
        let report = try ReplayBenchmark.run(target: target, drafter: drafter, model: "tiny", drafterName: "tiny drafter", device: "CPU, 2 shards",
                                             acceptance: [4.3, 6.3], blockSize: 8, context: 16, rounds: 10, warmupRounds: 2)
        #expect(report.results.map(\.tokens) == [43, 63])
        #expect(report.table.contains("CPU, 2 shards"))
    }
}
