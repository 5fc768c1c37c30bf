import Foundation
import Testing
@testable import Fulgur

// The replayed-acceptance benchmark: the schedule's mean, a random drafter of the published
// shape, rounds that really run the drafter and the verify, and counts that come from the
// schedule. Also the greedy verify through Executor.argmax.

/// Forwards to an executor and records every call, so a test can see which passes ran.
private final class CountingExecutor: Executor {
    final class Calls {
        /// (tokens, logits asked for, cache length before) of each `forward(_:logits:)`.
        var tokenForwards: [(tokens: Int, logits: CPUExecutor.Logits, length: Int)] = []
        /// Rows of each `forward(rows:)`.
        var rowForwards: [Int] = []
        /// (tokens, cache length before) of each `argmax`.
        var argmaxes: [(tokens: Int, length: Int)] = []
    }

    let inner: any Executor
    let calls: Calls

    init(_ inner: any Executor, calls: Calls = Calls()) {
        self.inner = inner
        self.calls = calls
    }

    var plan: Plan { inner.plan }
    var maxStepTokens: Int { inner.maxStepTokens }
    var vocabSize: Int { inner.vocabSize }
    var length: Int { inner.length }
    var maxPositions: Int { inner.maxPositions }
    var captureLayers: [Int] {
        get { inner.captureLayers }
        set { inner.captureLayers = newValue }
    }
    var capturedFeatures: [Float] { get throws { try inner.capturedFeatures } }

    func forward(_ tokens: [Int], logits: CPUExecutor.Logits) throws -> [Float] {
        calls.tokenForwards.append((tokens.count, logits, inner.length))
        return try inner.forward(tokens, logits: logits)
    }

    func forward(rows: [Float], logits: CPUExecutor.Logits) throws -> [Float] {
        calls.rowForwards.append(rows.count / plan.widths[.x]!)
        return try inner.forward(rows: rows, logits: logits)
    }

    func argmax(_ tokens: [Int]) throws -> [Int] {
        calls.argmaxes.append((tokens.count, inner.length))
        return try inner.argmax(tokens)
    }

    func sharingCache(plan: Plan) throws -> any Executor { CountingExecutor(try inner.sharingCache(plan: plan), calls: calls) }
    func canTruncate(to position: Int) -> Bool { inner.canTruncate(to: position) }
    func truncate(to position: Int) { inner.truncate(to: position) }
    func reset() { inner.reset() }
}

/// The tiny gpt-oss target on the CPU executor and its random drafter of the published
/// structure, both counted.
private struct TinySetup {
    let model: Model
    let target: CountingExecutor
    let drafter: DFlashDrafter
    let drafterCalls: CountingExecutor.Calls

    init(positions: Int = 1024) throws {
        let random = try RandomModel(preset: "tiny-gpt-oss", seed: 5)
        model = try random.build()
        target = CountingExecutor(CPUExecutor(plan: model.plan, maxPositions: positions, maxStepTokens: 16))
        let calls = CountingExecutor.Calls()
        drafterCalls = calls
        drafter = try RandomDrafter(for: random).load(for: model, maxPositions: positions, maxStepTokens: 16) { plan, context in
            CountingExecutor(CPUExecutor(plan: plan, maxPositions: context, maxStepTokens: 16), calls: calls)
        }
    }
}

private let lengths = [4.3, 5.6, 6.3]

// MARK: The schedule

@Test func scheduleEmitsFloorOrCeilWithTheRequestedMean() throws {
    for (a, block) in [(4.3, 8), (5.6, 8), (6.3, 8), (1.0, 8), (8.0, 8), (2.75, 4), (15.99, 16)] {
        for rounds in [1, 3, 10, 20, 100, 200] {
            var schedule = try AcceptanceSchedule(mean: a, blockSize: block)
            let counts = (0..<rounds).map { _ in schedule.next() }
            #expect(counts.allSatisfy { Double($0) == a.rounded(.down) || Double($0) == a.rounded(.up) }, "\(a): \(counts)")
            let mean = Double(counts.reduce(0, +)) / Double(rounds)
            #expect(mean <= a && a - mean < 1 / Double(rounds), "\(a) over \(rounds) rounds: mean \(mean)")
        }
    }
    // Over whole periods the mean is exact: 10 rounds for 4.3 and 6.3, 5 for 5.6.
    for (a, period) in [(4.3, 10), (5.6, 5), (6.3, 10)] {
        var schedule = try AcceptanceSchedule(mean: a, blockSize: 8)
        #expect((0..<(3 * period)).map { _ in schedule.next() }.reduce(0, +) == Int((Double(3 * period) * a).rounded()))
    }
    for bad in [0.5, 8.5, .nan, .infinity] {
        expectError(["1...8"]) { _ = try AcceptanceSchedule(mean: bad, blockSize: 8) }
    }
}

// MARK: The published drafter shape

@Test func randomDrafterHasThePublishedGptOss20bShape() throws {
    let drafter = try RandomDrafter(for: RandomModel(preset: "gpt-oss-20b"), linear: .bf16)
    let c = try drafter.config()
    #expect(c["architectures"] == ["DFlashDraftModel"])
    #expect(c["hidden_size"] == 2880 && c["num_hidden_layers"] == 8 && c["intermediate_size"] == 7680)
    #expect(c["num_attention_heads"] == 64 && c["num_key_value_heads"] == 8 && c["head_dim"] == 64)
    #expect(c["attention_bias"] == true && c["block_size"] == 8 && c["vocab_size"] == 201088)
    #expect(c["dflash_config"]?["mask_token_id"] == 200000)
    #expect(c["dflash_config"]?["target_layer_ids"] == [1, 6, 11, 16, 21])  // z-lab's spread over 24 layers
    // 1.46 GiB of BF16, the published checkpoint's size.
    #expect(try drafter.parameterCount() == 784_767_104)
    #expect(RandomDrafter.spread(targetLayers: 36, count: 5) == [1, 9, 17, 25, 33])  // gpt-oss-120b-DFlash's layers
    expectError(["qwen3-30b-a3b", "gpt-oss-20b"]) { _ = try RandomDrafter(for: RandomModel(preset: "qwen3-30b-a3b")) }
    expectError(["at least 6"]) { _ = try RandomDrafter(for: RandomModel(preset: "gpt-oss-20b", layers: 4)) }
}

@Test func randomDrafterHasTheAssumedMiMoShapes() throws {
    // Assumed (no published config here): 5 Qwen3-style layers at the target's hidden size,
    // 32 query and 8 key/value heads of 128, an MLP of 3x hidden, reading 5 target layers.
    for (preset, hidden, targetLayers) in [("mimo-v2-flash", 4096, 48), ("mimo-v2.5-pro", 6144, 70)] {
        let drafter = try RandomDrafter(for: RandomModel(preset: preset), linear: .bf16)
        let c = try drafter.config()
        #expect(c["model_type"] == "qwen3" && c["attention_bias"] == false && c["block_size"] == 8)
        #expect(c["hidden_size"] == .int(hidden) && c["num_hidden_layers"] == 5 && c["intermediate_size"] == .int(3 * hidden))
        #expect(c["num_attention_heads"] == 32 && c["num_key_value_heads"] == 8 && c["head_dim"] == 128)
        #expect(c["dflash_config"]?["target_layer_ids"] == .array(RandomDrafter.spread(targetLayers: targetLayers, count: 5).map { .int($0) }))
        // Per layer: q and o (hidden x 4096 each), k and v (hidden x 1024 each), the MLP (3 x
        // hidden x 3 hidden), two norms and q/k norms of 128; then fc (5 hidden -> hidden) and two norms.
        let layer = 2 * hidden * 4096 + 2 * hidden * 1024 + 3 * hidden * 3 * hidden + 2 * hidden + 2 * 128
        #expect(try drafter.parameterCount() == 5 * layer + 5 * hidden * hidden + 2 * hidden)
    }
}

@Test func randomDrafterLoadsAndDraftsInBothFormats() throws {
    let random = try RandomModel(preset: "tiny-gpt-oss", seed: 2)
    let model = try random.build()
    for linear in RandomModel.LinearFormat.allCases {
        let drafter = try RandomDrafter(for: random, linear: linear).load(for: model, maxPositions: 256, maxStepTokens: 16)
        #expect(drafter.targetLayerIds == [1, 2] && drafter.maskTokenId == 511 && drafter.blockSize == 8)
        let hidden = model.spec.hiddenSize
        try drafter.extend(tokens: [1, 2, 3], features: (0..<(3 * 2 * hidden)).map { Float(($0 * 7) % 13) / 13 - 0.5 })
        let guesses = try drafter.propose(after: 4, count: 7)
        #expect(guesses.count == 7 && guesses.allSatisfy { (0..<512).contains($0) })
        #expect(drafter.contextLength == 3)
    }
}

// MARK: Replayed rounds

@Test func replayBenchmarkRunsDrafterAndVerifyEveryRoundAtTheRequestedMean() throws {
    let setup = try TinySetup()
    let (rounds, warmup, context, block) = (20, 3, 16, 8)
    let report = try ReplayBenchmark.run(target: setup.target, drafter: setup.drafter, model: "tiny", drafterName: "tiny drafter",
                                         device: "CPU", acceptance: lengths, blockSize: block, context: context, rounds: rounds,
                                         warmupRounds: warmup)
    #expect(report.acceptance.hasPrefix("replayed, not measured"))
    #expect(report.table.contains("The acceptance decision was replayed, not measured"))
    #expect(report.results.map(\.requestedAcceptance) == lengths)
    for r in report.results {
        #expect(r.rounds == rounds)
        // 20 rounds are whole periods of all three schedules: the mean is the request exactly.
        #expect(r.tokens == Int((Double(rounds) * r.requestedAcceptance).rounded()))
        #expect(abs(r.meanAcceptance - r.requestedAcceptance) < 1e-9)
        #expect(r.histogram.reduce(0, +) == rounds)
        #expect(r.tokensPerSecond > 0 && r.millisecondsPerRound > 0)
        #expect(abs(r.draftMilliseconds + r.verifyMilliseconds + r.otherMilliseconds - r.millisecondsPerRound) < 1e-6)
    }
    // Every round: one drafter block forward and one verify of a whole block, both through
    // argmax (no [B, vocab] logits), and one drafter context update; plus a prefill per run.
    let runs = lengths.count * 2, allRounds = lengths.count * (warmup + rounds)
    let t = setup.target.calls, d = setup.drafterCalls
    #expect(t.argmaxes.count == allRounds && t.argmaxes.allSatisfy { $0.tokens == block })
    #expect(t.tokenForwards.count == runs && t.tokenForwards.allSatisfy { $0.tokens == context && $0.logits == .last })
    #expect(d.argmaxes.count == allRounds && d.argmaxes.allSatisfy { $0.tokens == block })
    #expect(d.rowForwards.count == runs + allRounds)
    #expect(d.tokenForwards.isEmpty)
}

/// `--verify-tokens random` (the default): the drafter still runs every round, the target
/// verifies whole blocks of random tokens, and the report counts them as varied (a block of the
/// token and 7 random guesses from the vocabulary: about 8 distinct ids); `drafted` keeps the
/// drafter's own guesses.
@Test func replayCanVerifyRandomTokensInsteadOfTheGuesses() throws {
    let setup = try TinySetup()
    let vocab = setup.target.plan.spec.vocabSize
    try #require(vocab >= 64)
    let (rounds, warmup, context, block) = (20, 2, 16, 8)
    let report = try ReplayBenchmark.run(target: setup.target, drafter: setup.drafter, model: "tiny", drafterName: "tiny drafter",
                                         device: "CPU", acceptance: [6.3], blockSize: block, context: context, rounds: rounds,
                                         warmupRounds: warmup, verifyTokens: .random)
    #expect(report.verifyTokens == .random)
    #expect(report.table.contains("verified tokens: random"))
    let r = try #require(report.results.first)
    #expect(r.tokens == 126 && r.rounds == rounds)
    #expect(r.meanDistinctTokens > 7 && r.meanDistinctTokens <= 8)
    let t = setup.target.calls, d = setup.drafterCalls
    #expect(t.argmaxes.count == warmup + rounds && t.argmaxes.allSatisfy { $0.tokens == block })
    #expect(d.argmaxes.count == warmup + rounds)
    let other = try TinySetup()
    let drafted = try ReplayBenchmark.run(target: other.target, drafter: other.drafter, model: "tiny", drafterName: "tiny drafter",
                                          device: "CPU", acceptance: [6.3], blockSize: block, context: context, rounds: rounds, warmupRounds: warmup,
                                          verifyTokens: .drafted)
    #expect(drafted.verifyTokens == .drafted)
    #expect(drafted.table.contains("verified tokens: the drafter's guesses"))
    #expect(drafted.results.allSatisfy { $0.meanDistinctTokens >= 1 && $0.meanDistinctTokens <= 8 })
}

@Test func replayedRoundsEmitTheScheduleAndRollBackToIt() throws {
    let setup = try TinySetup()
    let prompt = [1, 17, 42, 99, 3]
    let real = try SpeculativeGenerator(target: setup.target, drafter: setup.drafter, blockSize: 8)
        .generate(prompt: prompt, parameters: GenerationParameters(maxTokens: 120), decode: { _ in "" })
    for a in lengths {
        var schedule = try AcceptanceSchedule(mean: a, blockSize: 8)
        let calls = setup.target.calls
        calls.argmaxes = []
        setup.drafterCalls.rowForwards = []
        let generator = try SpeculativeGenerator(target: setup.target, drafter: setup.drafter, blockSize: 8,
                                                 rule: AcceptanceReplay(schedule))
        let r = try generator.generate(prompt: prompt, parameters: GenerationParameters(maxTokens: 121), decode: { _ in "" })
        let stats = try #require(r.speculative)
        // The counts are the schedule's, whatever the drafts were; the real rule, with the
        // same drafter, accepts otherwise.
        let expected = (0..<stats.rounds).map { _ in schedule.next() }
        #expect(Array(stats.acceptanceLengths.dropLast()) == Array(expected.dropLast()), "\(a)")
        #expect(stats.acceptanceLengths.last! <= expected.last!)
        #expect(stats.acceptanceLengths.reduce(0, +) == 120)
        #expect(stats.acceptanceLengths != real.speculative!.acceptanceLengths)
        // Each round verifies at the position the last one rolled back to, and the drafter's
        // context grows by the replayed count.
        var emitted = 1
        for (round, n) in stats.acceptanceLengths.enumerated() {
            #expect(calls.argmaxes[round].length == prompt.count + emitted - 1, "\(a), round \(round)")
            #expect(setup.drafterCalls.rowForwards[round + 1] == n)
            emitted += n
        }
        #expect(setup.target.length == prompt.count + 120)
    }
}

// MARK: Greedy verify through argmax

@Test(arguments: ["gpt_oss", "qwen3"])
func greedyVerifyUsesArgmaxAndStillMatchesPlainGreedy(architecture: String) throws {
    let model = try Model(path: Fixtures.path("models/\(architecture)"))
    let prompt = [1, 200, 7, 7, 7, 150, 31, 64, 9, 88, 120, 5]
    let parameters = GenerationParameters(maxTokens: 100)
    let expected = try Generator(executor: CPUExecutor(plan: model.plan)).generate(prompt: prompt, parameters: parameters, decode: { _ in "" })
    for logprobs in [nil, 2] as [Int?] {
        let target = CountingExecutor(CPUExecutor(plan: model.plan))
        let drafter = try DFlashDrafter(directory: Fixtures.path("drafters/\(architecture)"), target: model,
                                        maxPositions: target.maxPositions, maxStepTokens: target.maxStepTokens)
        var p = parameters
        p.topLogprobs = logprobs
        let r = try SpeculativeGenerator(target: target, drafter: drafter, blockSize: 8).generate(prompt: prompt, parameters: p, decode: { _ in "" })
        #expect(r.tokens == expected.tokens, "\(architecture), logprobs \(String(describing: logprobs))")
        let rounds = try #require(r.speculative).rounds
        // Log-probabilities need the logits; otherwise only the greedy ids are asked for.
        let verifiesWithLogits = target.calls.tokenForwards.filter { $0.logits == .all }.count
        #expect(logprobs == nil ? target.calls.argmaxes.count == rounds && verifiesWithLogits == 0
                                : target.calls.argmaxes.isEmpty && verifiesWithLogits == rounds)
    }
}

@Test func defaultArgmaxReturnsTheLastStepsGreedyChoices() throws {
    let model = try Model(path: Fixtures.path("models/llama"))
    let tokens = [1, 17, 42, 99, 3, 8, 9]
    let reference = CPUExecutor(plan: model.plan, maxStepTokens: 4)
    let logits = try reference.forward(tokens, logits: .all)
    let vocab = reference.vocabSize
    let greedy = (0..<tokens.count).map { Sampler.argmax(Array(logits[($0 * vocab)..<(($0 + 1) * vocab)])) }
    let executor: any Executor = CPUExecutor(plan: model.plan, maxStepTokens: 4)
    #expect(try executor.argmax(Array(tokens.prefix(3))) == Array(greedy.prefix(3)))
    executor.reset()
    #expect(try executor.argmax(tokens) == Array(greedy.suffix(3)))  // steps of 4, then 3
    #expect(try executor.argmax([]) == [])
}
