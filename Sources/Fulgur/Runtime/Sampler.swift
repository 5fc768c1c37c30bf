import Foundation

/// How the next token is chosen. Temperature 0 is greedy. Filters apply in the order
/// Hugging Face's generate applies them: temperature, top-k, top-p, min-p.
public struct SamplingParameters: Sendable, Equatable {
    public var temperature: Float = 0
    public var topK: Int = 0          // 0: off
    public var topP: Float = 1        // 1: off
    public var minP: Float = 0        // 0: off
    public var seed: UInt64? = nil

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, minP: Float = 0, seed: UInt64? = nil) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.minP = minP
        self.seed = seed
    }

    public func validate() throws {
        guard temperature >= 0, temperature.isFinite else { throw FulgurError(.usage, "temperature must be >= 0, got \(temperature)") }
        guard topK >= 0 else { throw FulgurError(.usage, "top-k must be >= 0, got \(topK)") }
        guard topP > 0, topP <= 1 else { throw FulgurError(.usage, "top-p must be in (0, 1], got \(topP)") }
        guard minP >= 0, minP <= 1 else { throw FulgurError(.usage, "min-p must be in [0, 1], got \(minP)") }
    }
}

/// SplitMix64-seeded xoshiro256**: fast, and the same sequence on every platform, so a seed
/// reproduces a generation exactly.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var x = seed
        func splitmix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3
        s.2 ^= t
        s.3 = (s.3 << 45) | (s.3 >> 19)
        return result
    }

    /// Uniform in [0, 1).
    public mutating func nextUnit() -> Double { Double(next() >> 11) * 0x1p-53 }
}

public struct Sampler {
    public let parameters: SamplingParameters
    private var rng: SeededGenerator

    public init(_ parameters: SamplingParameters) {
        self.parameters = parameters
        rng = SeededGenerator(seed: parameters.seed ?? UInt64.random(in: 0...UInt64.max))
    }

    /// The first largest logit's index; NaN never wins; 0 when nothing is above -inf.
    public static func argmax(_ logits: UnsafeBufferPointer<Float>) -> Int { SlicedArgmax.candidate(logits, start: 0).token }

    public static func argmax(_ logits: [Float]) -> Int { logits.withUnsafeBufferPointer { argmax($0) } }

    /// The probabilities the sampler draws from, after every filter, as (token, p) pairs.
    public func distribution(_ logits: [Float]) -> [(token: Int, p: Double)] {
        let p = parameters
        if p.temperature == 0 { return [(Self.argmax(logits), 1)] }
        var candidates = logits.indices.map { (token: $0, logit: Double(logits[$0]) / Double(p.temperature)) }
        candidates.sort { $0.logit > $1.logit || ($0.logit == $1.logit && $0.token < $1.token) }
        if p.topK > 0, p.topK < candidates.count { candidates.removeLast(candidates.count - p.topK) }
        let maxLogit = candidates[0].logit
        var probs = candidates.map { exp($0.logit - maxLogit) }
        var total = probs.reduce(0, +)
        if p.topP < 1 {
            // Keep the smallest prefix whose mass reaches top-p (always at least one token).
            var mass = 0.0
            var keep = candidates.count
            for (i, q) in probs.enumerated() {
                mass += q / total
                if mass >= Double(p.topP) { keep = i + 1; break }
            }
            candidates.removeLast(candidates.count - keep); probs.removeLast(probs.count - keep)
            total = probs.reduce(0, +)
        }
        if p.minP > 0 {
            let threshold = Double(p.minP) * probs[0]
            let keep = max(1, probs.firstIndex { $0 < threshold } ?? probs.count)
            candidates.removeLast(candidates.count - keep); probs.removeLast(probs.count - keep)
            total = probs.reduce(0, +)
        }
        return zip(candidates, probs).map { ($0.token, $1 / total) }
    }

    public mutating func sample(_ logits: [Float]) -> Int {
        if parameters.temperature == 0 { return Self.argmax(logits) }
        let dist = distribution(logits)
        var u = rng.nextUnit()
        for (token, p) in dist {
            u -= p
            if u < 0 { return token }
        }
        return dist.last!.token
    }
}
