import Foundation
import Testing
@testable import Fulgur

// Hand-made logits whose softmax is exactly `probabilities`, in an order the filters must sort.
private let probabilities: [Double] = [0.1, 0.5, 0.15, 0.25]
private let logits = probabilities.map { Float(log($0)) }

private func distribution(_ parameters: SamplingParameters) -> [Int: Double] {
    Dictionary(uniqueKeysWithValues: Sampler(parameters).distribution(logits).map { ($0.token, $0.p) })
}

/// The expected distribution: `probabilities` restricted to `tokens` and renormalized.
private func renormalized(_ tokens: [Int]) -> [Int: Double] {
    let total = tokens.reduce(0) { $0 + probabilities[$1] }
    return Dictionary(uniqueKeysWithValues: tokens.map { ($0, probabilities[$0] / total) })
}

private func expectClose(_ got: [Int: Double], _ want: [Int: Double], sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(Set(got.keys) == Set(want.keys), "\(got) vs \(want)", sourceLocation: sourceLocation)
    for (token, p) in want {
        #expect(abs((got[token] ?? -1) - p) < 1e-6, "token \(token): \(got[token] ?? -1) vs \(p)", sourceLocation: sourceLocation)
    }
}

private func randomLogits(_ count: Int, seed: UInt64) -> [Float] {
    var rng = SeededGenerator(seed: seed)
    return (0..<count).map { _ in Float(rng.nextUnit() * 10 - 5) }
}

@Test func greedyTakesTheArgmax() {
    var sampler = Sampler(SamplingParameters(temperature: 0))
    #expect(sampler.sample(logits) == 1)
    for seed in 0..<20 as Range<UInt64> {
        let l = randomLogits(100, seed: seed)
        #expect(sampler.sample(l) == l.indices.max { l[$0] < l[$1] }!)
    }
    expectClose(distribution(SamplingParameters(temperature: 0)), [1: 1])
}

@Test func topKOfOneIsGreedy() {
    var sampler = Sampler(SamplingParameters(temperature: 1.5, topK: 1, seed: 7))
    for seed in 0..<50 as Range<UInt64> {
        let l = randomLogits(64, seed: seed)
        #expect(sampler.sample(l) == Sampler.argmax(l))
    }
}

@Test func sameSeedSameTokensDifferentSeedDifferentTokens() {
    func draws(_ seed: UInt64) -> [Int] {
        var sampler = Sampler(SamplingParameters(temperature: 1, seed: seed))
        let l = randomLogits(50, seed: 99).map { $0 / 4 }  // flat enough that draws vary
        return (0..<100).map { _ in sampler.sample(l) }
    }
    #expect(draws(42) == draws(42))
    #expect(draws(42) != draws(43))
    #expect(Set(draws(42)).count > 10)
}

@Test func temperatureOneKeepsTheSoftmax() {
    expectClose(distribution(SamplingParameters(temperature: 1)), renormalized([0, 1, 2, 3]))
}

@Test func temperatureDividesTheLogits() {
    // At temperature 2 each probability becomes proportional to its square root.
    let roots = probabilities.map { $0.squareRoot() }
    let total = roots.reduce(0, +)
    expectClose(distribution(SamplingParameters(temperature: 2)),
                Dictionary(uniqueKeysWithValues: roots.enumerated().map { ($0, $1 / total) }))
    let cold = distribution(SamplingParameters(temperature: 0.1))
    #expect(cold[1]! > 0.999)
}

@Test func topKKeepsTheKMostLikely() {
    expectClose(distribution(SamplingParameters(temperature: 1, topK: 2)), renormalized([1, 3]))
    expectClose(distribution(SamplingParameters(temperature: 1, topK: 3)), renormalized([1, 3, 2]))
    expectClose(distribution(SamplingParameters(temperature: 1, topK: 10)), renormalized([0, 1, 2, 3]))
}

@Test func topPKeepsTheSmallestSetReachingP() {
    expectClose(distribution(SamplingParameters(temperature: 1, topP: 0.4)), renormalized([1]))
    expectClose(distribution(SamplingParameters(temperature: 1, topP: 0.7)), renormalized([1, 3]))
    expectClose(distribution(SamplingParameters(temperature: 1, topP: 0.8)), renormalized([1, 3, 2]))
    expectClose(distribution(SamplingParameters(temperature: 1, topP: 0.95)), renormalized([0, 1, 2, 3]))
}

@Test func minPDropsTokensBelowAFractionOfTheBest() {
    // Thresholds: 0.4 * 0.5 = 0.2 keeps 0.5 and 0.25; 0.25 * 0.5 = 0.125 also keeps 0.15.
    expectClose(distribution(SamplingParameters(temperature: 1, minP: 0.4)), renormalized([1, 3]))
    expectClose(distribution(SamplingParameters(temperature: 1, minP: 0.25)), renormalized([1, 3, 2]))
    expectClose(distribution(SamplingParameters(temperature: 1, minP: 0.9)), renormalized([1]))
}

@Test func filtersCompose() {
    // top-k 3 leaves {1, 3, 2}; top-p 0.8 of that (0.5/0.9 + 0.25/0.9 = 0.83) leaves {1, 3}.
    expectClose(distribution(SamplingParameters(temperature: 1, topK: 3, topP: 0.8)), renormalized([1, 3]))
}

/// Draw frequencies must follow `distribution`: a chi-square test at p = 0.001 with a fixed
/// seed, which a sampler ignoring a filter or drawing off by one token fails by far.
@Test(arguments: [
    SamplingParameters(temperature: 1, seed: 1),
    SamplingParameters(temperature: 1, topP: 0.8, seed: 2),
    SamplingParameters(temperature: 0.7, topK: 2, seed: 3),
    SamplingParameters(temperature: 1.3, minP: 0.25, seed: 4),
])
func sampleFrequenciesMatchTheDistribution(_ parameters: SamplingParameters) {
    var sampler = Sampler(parameters)
    let expected = sampler.distribution(logits)
    let draws = 20_000
    var counts = [Int](repeating: 0, count: logits.count)
    for _ in 0..<draws { counts[sampler.sample(logits)] += 1 }
    let kept = Set(expected.map(\.token))
    for token in logits.indices where !kept.contains(token) { #expect(counts[token] == 0, "token \(token) was filtered out") }
    let chiSquare = expected.reduce(0.0) { sum, e in
        let want = e.p * Double(draws)
        return sum + (Double(counts[e.token]) - want) * (Double(counts[e.token]) - want) / want
    }
    let critical: [Int: Double] = [1: 10.83, 2: 13.82, 3: 16.27]  // chi-square quantiles at 0.999
    #expect(chiSquare < critical[max(1, expected.count - 1)]!, "counts \(counts), expected \(expected)")
}

@Test func invalidParametersAreRejected() throws {
    let invalid = [
        SamplingParameters(temperature: -1), SamplingParameters(temperature: .nan), SamplingParameters(temperature: .infinity),
        SamplingParameters(topK: -1), SamplingParameters(topP: 0), SamplingParameters(topP: 1.5), SamplingParameters(topP: .nan),
        SamplingParameters(minP: -0.1), SamplingParameters(minP: 1.1), SamplingParameters(minP: .nan),
    ]
    for p in invalid {
        #expect(throws: FulgurError.self, "\(p)") { try p.validate() }
    }
    try SamplingParameters().validate()
    try SamplingParameters(temperature: 0.7, topK: 40, topP: 0.9, minP: 0.05, seed: 1).validate()
}
