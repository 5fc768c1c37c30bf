import Foundation
import Testing
@testable import Fulgur

// DFlash speculative decoding against plain decoding: greedy output token for token on every
// architecture, sampled output in distribution, and the edges (stops, limits) in between.

private let architectures = ["llama", "qwen3", "qwen3_moe", "mimo_v2_flash", "gpt_oss"]
private let prompts = [[1, 17, 42, 99, 3], [1, 200, 7, 7, 7, 150, 31, 64, 9, 88, 120, 5]]

private func target(_ name: String) throws -> Model { try Model(path: Fixtures.path("models/\(name)")) }

private func dflash(_ name: String, for model: Model, executor: CPUExecutor) throws -> DFlashDrafter {
    try DFlashDrafter(directory: Fixtures.path("drafters/\(name)"), target: model,
                      maxPositions: executor.cache.maxPositions, maxStepTokens: executor.maxStepTokens)
}

private func plain(_ model: Model, _ prompt: [Int], _ parameters: GenerationParameters) throws -> GenerationResult {
    try Generator(executor: CPUExecutor(plan: model.plan)).generate(prompt: prompt, parameters: parameters, decode: { "<\($0)>" })
}

/// Proposes the target's own greedy continuation, from a second copy of the target: every
/// guess is right under greedy decoding.
private final class OracleDrafter: Drafter {
    let executor: CPUExecutor
    let targetLayerIds: [Int] = []
    /// Proposes a token other than the target's choice, so that every guess is wrong.
    let wrong: Bool

    init(_ model: Model, wrong: Bool = false) {
        executor = CPUExecutor(plan: model.plan, maxPositions: 512)
        self.wrong = wrong
    }

    var contextLength: Int { executor.cache.length }
    func reset() { executor.cache.reset() }
    func extend(tokens: [Int], features: [Float]) throws { _ = try executor.forward(tokens, logits: .none) }

    func propose(after token: Int, count: Int) throws -> [Int] {
        let start = executor.cache.length
        var last = token, out: [Int] = []
        for _ in 0..<count {
            let best = Sampler.argmax(try executor.forward([last]))
            out.append(wrong ? (best + 1) % executor.vocabSize : best)
            last = best
        }
        executor.cache.truncate(to: start)
        return out
    }
}

private func speculative(_ model: Model, drafter: (CPUExecutor) throws -> Drafter, blockSize: Int,
                         rule: AcceptanceRule = TargetSampling()) throws -> SpeculativeGenerator {
    let executor = CPUExecutor(plan: model.plan)
    return try SpeculativeGenerator(target: executor, drafter: drafter(executor), blockSize: blockSize, rule: rule)
}

// MARK: Done-means 1: greedy, token for token

// The sweeps below (200 tokens, two prompts, blocks 2, 8 and 16, five architectures) take
// seconds in the release suite and many minutes in a debug build: run them with `-c release`.

@Test(arguments: architectures)
func greedySpeculativeMatchesPlainGreedy(architecture: String) throws {
    let model = try target(architecture)
    let parameters = GenerationParameters(maxTokens: 200)
    for prompt in prompts {
        let expected = try plain(model, prompt, parameters)
        #expect(expected.tokens.count == 200)
        for blockSize in [2, 8, 16] {
            let generator = try speculative(model, drafter: { try dflash(architecture, for: model, executor: $0) }, blockSize: blockSize)
            let r = try generator.generate(prompt: prompt, parameters: parameters, decode: { "<\($0)>" })
            #expect(r.tokens == expected.tokens, "\(architecture), block \(blockSize), prompt \(prompt)")
            #expect(r.text == expected.text)
            #expect(r.finishReason == expected.finishReason)
            let stats = try #require(r.speculative)
            #expect(stats.acceptanceLengths.reduce(0, +) == 199)  // the first token comes from the prefill
            #expect(stats.histogram.count == blockSize)
        }
    }
}

@Test(arguments: architectures)
func oracleDraftsAreAcceptedWholeAndWrongDraftsOneTokenAtATime(architecture: String) throws {
    let model = try target(architecture)
    let parameters = GenerationParameters(maxTokens: 200)
    let expected = try plain(model, prompts[1], parameters)
    for blockSize in [2, 8, 16] {
        let oracle = try speculative(model, drafter: { _ in OracleDrafter(model) }, blockSize: blockSize)
        let r = try oracle.generate(prompt: prompts[1], parameters: parameters, decode: { "<\($0)>" })
        #expect(r.tokens == expected.tokens, "\(architecture), oracle, block \(blockSize)")
        // The first token comes from the prefill; the rest in full blocks but the last.
        let lengths = try #require(r.speculative).acceptanceLengths
        #expect(lengths.dropLast().allSatisfy { $0 == blockSize }, "\(lengths)")
        #expect(lengths.reduce(0, +) == 199)

        let wrong = try speculative(model, drafter: { _ in OracleDrafter(model, wrong: true) }, blockSize: blockSize)
        let w = try wrong.generate(prompt: prompts[1], parameters: parameters, decode: { "<\($0)>" })
        #expect(w.tokens == expected.tokens, "\(architecture), always wrong, block \(blockSize)")
        #expect(try #require(w.speculative).acceptanceLengths.allSatisfy { $0 == 1 })
    }
}

@Test func slidingWindowDrafterWithSinksIsLossless() throws {
    let model = try target("mimo_v2_flash")
    let parameters = GenerationParameters(maxTokens: 200)
    let expected = try plain(model, prompts[1], parameters)
    for blockSize in [2, 8, 16] {
        let generator = try speculative(model, drafter: { try dflash("mimo_v2_flash_swa", for: model, executor: $0) }, blockSize: blockSize)
        #expect(try generator.generate(prompt: prompts[1], parameters: parameters, decode: { _ in "" }).tokens == expected.tokens)
    }
}

/// The default model (SmolLM2, Q4_1 GGUF) has no trained drafter yet: the oracle and the
/// always-wrong drafters exercise verify and rollback on it. Release suite only, like
/// DefaultModelTests.
@Test func defaultModelSpeculativeMatchesPlainGreedy() throws {
    let model = try DefaultModelTests.model()
    let prompt = try Tokenizer(gguf: model.gguf!).encode("The capital of France is", addSpecialTokens: true)
    let expected = try DefaultModelTests.greedy(model, prompt, 48)
    for wrong in [false, true] {
        let executor = CPUExecutor(plan: model.plan, maxPositions: 512)
        let generator = try SpeculativeGenerator(target: executor, drafter: OracleDrafter(model, wrong: wrong), blockSize: 8)
        let r = try generator.generate(prompt: prompt, parameters: GenerationParameters(maxTokens: 48), decode: { _ in "" })
        #expect(r.tokens == expected, "wrong drafts: \(wrong)")
    }
}

// MARK: Stops and limits inside a block

@Test func stopsAndLimitsLandingInsideABlockEndLikePlainDecoding() throws {
    let model = try target("qwen3")
    let greedy = try plain(model, prompts[0], GenerationParameters(maxTokens: 40)).tokens
    let cases: [GenerationParameters] = [
        GenerationParameters(maxTokens: 13),                                  // limit mid-block
        GenerationParameters(maxTokens: 40, stopTokenIds: [greedy[11]]),       // EOS inside an accepted block
        GenerationParameters(maxTokens: 40, stopStrings: ["<\(greedy[9])><\(greedy[10])>"]),  // stop string across tokens
        GenerationParameters(maxTokens: 1),
        GenerationParameters(maxTokens: 0),
    ]
    for parameters in cases {
        let expected = try plain(model, prompts[0], parameters)
        var streamed = ""
        let generator = try speculative(model, drafter: { _ in OracleDrafter(model) }, blockSize: 8)
        let r = try generator.generate(prompt: prompts[0], parameters: parameters, decode: { "<\($0)>" },
                                       onText: { streamed += $0; return true })
        #expect(r.tokens == expected.tokens, "\(parameters.maxTokens) \(parameters.stopTokenIds) \(parameters.stopStrings)")
        #expect(r.text == expected.text)
        #expect(streamed == r.text)
        #expect(r.finishReason == expected.finishReason)
    }
}

@Test func blockSizesOutsideTwoToSixteenAreRefused() throws {
    let model = try target("llama")
    for size in [1, 17] {
        expectError(["block size", "2...16"]) { _ = try speculative(model, drafter: { _ in OracleDrafter(model) }, blockSize: size) }
    }
}

@Test func drafterNamingLayersTheTargetLacksIsRefused() throws {
    let dir = try copyOfFixtureModel("llama")
    let config = try String(contentsOfFile: Fixtures.path("drafters/llama/config.json"), encoding: .utf8)
    try config.replacingOccurrences(of: "\"target_layer_ids\": [\n      0,\n      1\n    ]", with: "\"target_layer_ids\": [0, 5]")
        .write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
    try FileManager.default.copyItem(atPath: Fixtures.path("drafters/llama/model.safetensors"), toPath: dir + "/drafter.safetensors")
    try FileManager.default.removeItem(atPath: dir + "/model.safetensors")
    let model = try target("llama")
    expectError(["target_layer_ids", "0..<2"]) {
        _ = try DFlashDrafter(directory: dir, target: model, maxPositions: 512, maxStepTokens: 64)
    }
}

// MARK: Done-means 2: sampled output keeps the target's distribution

/// A wrong rule on purpose: takes a guess whenever the target gives it probability above 0.1.
private struct AcceptLikelyGuesses: AcceptanceRule {
    func needsLogits(_ sampling: SamplingParameters) -> Bool { true }

    func accept(draft: [Int], target: TargetOutput, sampler: inout Sampler) -> [Int] {
        var out: [Int] = []
        for i in 0...draft.count {
            let row = target.row(i)!
            if i < draft.count, let p = sampler.distribution(row).first(where: { $0.token == draft[i] })?.p, p > 0.1 {
                out.append(draft[i])
                continue
            }
            out.append(sampler.sample(row))
            break
        }
        return out
    }
}

private let sampledPrompt = [1, 17, 42, 99, 3]
private let sampledTokens = 3
private let samplesPerArm = 150

/// Counts of the first tokens' sequences over seeds `seeds`.
private func sequenceCounts(_ seeds: Range<UInt64>, temperature: Float, generate: (GenerationParameters) throws -> [Int]) throws -> [String: Int] {
    var counts: [String: Int] = [:]
    for seed in seeds {
        let parameters = GenerationParameters(maxTokens: sampledTokens, sampling: SamplingParameters(temperature: temperature, seed: seed))
        counts[try generate(parameters).map(String.init).joined(separator: " "), default: 0] += 1
    }
    return counts
}

/// Pearson's two-sample chi-square statistic and its degrees of freedom, pooling sequences
/// too rare for the test into one cell.
private func chiSquare(_ a: [String: Int], _ b: [String: Int]) -> (statistic: Double, df: Int) {
    let na = Double(a.values.reduce(0, +)), nb = Double(b.values.reduce(0, +))
    var cells: [(Double, Double)] = []
    var rare = (0.0, 0.0)
    for key in Set(a.keys).union(b.keys) {
        let x = Double(a[key] ?? 0), y = Double(b[key] ?? 0)
        if x + y < 10 { rare.0 += x; rare.1 += y } else { cells.append((x, y)) }
    }
    if rare.0 + rare.1 > 0 { cells.append(rare) }
    var statistic = 0.0
    for (x, y) in cells {
        let total = x + y
        let ea = total * na / (na + nb), eb = total * nb / (na + nb)
        statistic += (x - ea) * (x - ea) / ea + (y - eb) * (y - eb) / eb
    }
    return (statistic, cells.count - 1)
}

/// The chi-square value a statistic with `df` degrees of freedom exceeds with probability
/// 0.001 (Wilson-Hilferty).
private func criticalValue(df: Int) -> Double {
    let d = Double(df), z = 3.09
    return d * pow(1 - 2 / (9 * d) + z * (2 / (9 * d)).squareRoot(), 3)
}

@Test func sampledSpeculativeOutputFollowsTheTargetsDistribution() throws {
    let model = try target("llama")
    let plainGenerator = Generator(executor: CPUExecutor(plan: model.plan))
    // A low temperature makes the random target peaked, so a wrong rule has something to get wrong.
    let temperature: Float = 0.05
    let reference = try sequenceCounts(0..<UInt64(samplesPerArm), temperature: temperature) {
        try plainGenerator.generate(prompt: sampledPrompt, parameters: $0, decode: { _ in "" }).tokens
    }
    let seeds = UInt64(samplesPerArm)..<UInt64(2 * samplesPerArm)
    let right = try speculative(model, drafter: { _ in OracleDrafter(model) }, blockSize: 4)
    let good = chiSquare(reference, try sequenceCounts(seeds, temperature: temperature) {
        try right.generate(prompt: sampledPrompt, parameters: $0, decode: { _ in "" }).tokens
    })
    let wrongRule = try speculative(model, drafter: { _ in OracleDrafter(model) }, blockSize: 4, rule: AcceptLikelyGuesses())
    let bad = chiSquare(reference, try sequenceCounts(seeds, temperature: temperature) {
        try wrongRule.generate(prompt: sampledPrompt, parameters: $0, decode: { _ in "" }).tokens
    })
    #expect(good.df >= 3, "too few distinct sequences for a test: \(reference)")
    #expect(good.statistic < criticalValue(df: good.df), "right rule: chi-square \(good.statistic), df \(good.df)")
    #expect(bad.statistic > criticalValue(df: bad.df), "wrong rule passed: chi-square \(bad.statistic), df \(bad.df)")
}

@Test func aSeedGivesTheSameSampledTextWithAndWithoutDFlash() throws {
    let model = try target("qwen3")
    let plainGenerator = Generator(executor: CPUExecutor(plan: model.plan))
    let generator = try speculative(model, drafter: { try dflash("qwen3", for: model, executor: $0) }, blockSize: 8)
    let oracle = try speculative(model, drafter: { _ in OracleDrafter(model) }, blockSize: 8)
    for seed in UInt64(0)..<5 {
        let parameters = GenerationParameters(maxTokens: 40, sampling: SamplingParameters(temperature: 1, topP: 0.9, seed: seed))
        let expected = try plainGenerator.generate(prompt: prompts[0], parameters: parameters, decode: { _ in "" }).tokens
        #expect(try generator.generate(prompt: prompts[0], parameters: parameters, decode: { _ in "" }).tokens == expected)
        #expect(try oracle.generate(prompt: prompts[0], parameters: parameters, decode: { _ in "" }).tokens == expected)
    }
}

// MARK: A random drafter for any target, one per sequence

/// `RandomDrafter.export(matching:)` writes a drafter in the published format that loads for
/// its target and decodes losslessly, and `withOwnCache` copies run side by side on threads of
/// their own (a server's lanes) without touching each other's caches.
@Test func randomDrafterMatchingATargetIsLosslessAndItsCopiesKeepTheirOwnCaches() throws {
    let model = try target("llama")
    let directory = try temporaryDirectory() + "/drafter"
    let config = try RandomDrafter.export(matching: model.spec, layers: 1, seed: 3, to: directory)
    #expect(config["hidden_size"] == .int(model.spec.hiddenSize))
    #expect(FileManager.default.fileExists(atPath: directory + "/model.safetensors"))
    let parameters = GenerationParameters(maxTokens: 60)
    let expected = try prompts.map { try plain(model, $0, parameters).tokens }
    let first = try speculative(model, drafter: {
        try DFlashDrafter(directory: directory, target: model, maxPositions: $0.cache.maxPositions, maxStepTokens: $0.maxStepTokens)
    }, blockSize: 8)
    let drafter = try #require(first.drafter as? DFlashDrafter)
    let lanes = [first] + (try (0..<2).map { _ in
        try SpeculativeGenerator(target: CPUExecutor(plan: model.plan), drafter: drafter.withOwnCache(), blockSize: 8)
    })
    // The acceptance each prompt gets on a lane of its own, one run after another: greedy, so
    // every lane at once must get the same rounds (a shared or clobbered drafter cache would
    // change the guesses; the tokens, being lossless, would not show it).
    let alone = try SpeculativeGenerator(target: CPUExecutor(plan: model.plan), drafter: drafter.withOwnCache(), blockSize: 8)
    let reference = try prompts.map { try #require(alone.generate(prompt: $0, parameters: parameters, decode: { "<\($0)>" }).speculative).acceptanceLengths }
    let results = ResultBox(count: lanes.count * prompts.count)
    DispatchQueue.concurrentPerform(iterations: lanes.count) { lane in
        for (p, prompt) in prompts.enumerated() {
            results.set(lane * prompts.count + p, Result { try lanes[lane].generate(prompt: prompt, parameters: parameters, decode: { "<\($0)>" }) })
        }
    }
    for lane in lanes.indices {
        for p in prompts.indices {
            let r = try results.get(lane * prompts.count + p)
            #expect(r.tokens == expected[p], "lane \(lane), prompt \(p)")
            #expect(try #require(r.speculative).acceptanceLengths == reference[p], "lane \(lane), prompt \(p): other rounds than alone")
        }
    }
}

private final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Result<GenerationResult, Error>?]
    init(count: Int) { values = Array(repeating: nil, count: count) }
    func set(_ i: Int, _ value: Result<GenerationResult, Error>) { lock.withLock { values[i] = value } }
    func get(_ i: Int) throws -> GenerationResult { try lock.withLock { values[i] }!.get() }
}

/// `extend(tokens:capturedBy:)` (what decoding calls after a verify) takes the first rows the
/// target captured, as `extend(tokens:features:)` given them by hand; asking for more rows
/// than the target's last forward captured is an error that says so, not a read past them.
@Test func drafterExtendsFromTheTargetsCapturedRows() throws {
    let model = try target("qwen3")
    let executor = CPUExecutor(plan: model.plan, maxPositions: 64, maxStepTokens: 8)
    let byHand = try dflash("qwen3", for: model, executor: executor), fromTarget = try dflash("qwen3", for: model, executor: executor)
    executor.captureLayers = byHand.targetLayerIds
    let prompt = [3, 14, 15, 92, 65, 35]
    _ = try executor.forward(prompt, logits: .none)
    let width = byHand.targetLayerIds.count * model.spec.hiddenSize
    try byHand.extend(tokens: Array(prompt.prefix(4)), features: Array(executor.capturedFeatures[0..<(4 * width)]))
    try fromTarget.extend(tokens: Array(prompt.prefix(4)), capturedBy: executor)
    #expect(fromTarget.contextLength == 4)
    let block = [prompt[4]] + Array(repeating: byHand.maskTokenId, count: 5)
    let want = try byHand.block.forward(block, logits: .all), got = try fromTarget.block.forward(block, logits: .all)
    #expect(!want.isEmpty && got.map(\.bitPattern) == want.map(\.bitPattern))
    fromTarget.block.truncate(to: 4)
    #expect(throws: FulgurError.self) { try fromTarget.extend(tokens: Array(repeating: 1, count: prompt.count + 1), capturedBy: executor) }
    #expect(fromTarget.contextLength == 4)
}
