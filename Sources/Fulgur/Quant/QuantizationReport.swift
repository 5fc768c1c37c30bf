import Foundation

/// How much a quantized checkpoint departs from its source: the relative error of every
/// tensor, and how often the quantized model's next-token choice agrees with the original's
/// (top-1 agreement) and how far its distribution moved (KL(original || quantized)).
public struct QuantizationReport: Sendable {
    public struct TensorError: Sendable, Equatable {
        public let name: String
        public let kind: Quantizer.Kind
        public let elements: Int
        public let sourceBytes: Int
        public let storedBytes: Int
        /// ||W - deq(Q(W))|| / ||W||; 0 for tensors kept as they were.
        public let relativeError: Double
    }

    public struct Agreement: Sendable, Equatable {
        public let positions: Int
        /// Fraction of positions where both models pick the same most likely token.
        public let top1: Double
        /// Mean over positions of KL(original || quantized), in nats.
        public let meanKL: Double
        public let maxKL: Double
    }

    public var tensors: [TensorError]
    public var agreement: Agreement?

    public init(tensors: [TensorError], agreement: Agreement? = nil) {
        self.tensors = tensors
        self.agreement = agreement
    }

    /// Runs both models over every prompt and compares the next-token distributions at every
    /// position. The models must share a vocabulary.
    public static func compare(original: Model, quantized: Model, prompts: [[Int]]) throws -> Agreement {
        let vocab = original.spec.vocabSize
        guard quantized.spec.vocabSize == vocab else {
            throw FulgurError(.shape, "\(quantized.path): vocabulary of \(quantized.spec.vocabSize) tokens, the original has \(vocab)")
        }
        var positions = 0, agree = 0, klSum = 0.0, klMax = 0.0
        for ids in prompts where !ids.isEmpty {
            let p = try CPUExecutor(plan: original.plan).forward(ids, logits: .all)
            let q = try CPUExecutor(plan: quantized.plan).forward(ids, logits: .all)
            for t in 0..<ids.count {
                let lp = logSoftmax(p[(t * vocab)..<((t + 1) * vocab)]), lq = logSoftmax(q[(t * vocab)..<((t + 1) * vocab)])
                var kl = 0.0
                for i in 0..<vocab { kl += exp(lp[i]) * (lp[i] - lq[i]) }
                // Rounding can leave an identical pair a hair below zero.
                kl = max(kl, 0)
                klSum += kl
                klMax = max(klMax, kl)
                if argmax(lp) == argmax(lq) { agree += 1 }
                positions += 1
            }
        }
        guard positions > 0 else { throw FulgurError(.usage, "the quality report needs at least one non-empty prompt") }
        return Agreement(positions: positions, top1: Double(agree) / Double(positions), meanKL: klSum / Double(positions), maxKL: klMax)
    }

    /// `count` fixed pseudo-random sequences of `length` ids below `vocab`, for models
    /// without a tokenizer; the same every run.
    public static func randomPrompts(vocab: Int, count: Int = 3, length: Int = 32) -> [[Int]] {
        var state: UInt64 = 0x5EED
        return (0..<count).map { _ in
            (0..<length).map { _ in
                // SplitMix64.
                state &+= 0x9E37_79B9_7F4A_7C15
                var z = state
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                return Int((z ^ (z >> 31)) % UInt64(vocab))
            }
        }
    }

    static func logSoftmax(_ x: ArraySlice<Float>) -> [Double] {
        let m = Double(x.max() ?? 0)
        let logSum = log(x.reduce(0.0) { $0 + exp(Double($1) - m) }) + m
        return x.map { Double($0) - logSum }
    }

    static func argmax(_ x: [Double]) -> Int {
        x.indices.max { x[$0] < x[$1] || (x[$0] == x[$1] && $0 > $1) } ?? 0
    }

    /// Totals per kind: tensors, parameters, bytes before and after, worst and
    /// parameter-weighted mean relative error.
    public struct KindSummary: Sendable, Equatable {
        public let kind: Quantizer.Kind
        public let tensors: Int
        public let elements: Int
        public let sourceBytes: Int
        public let storedBytes: Int
        public let meanError: Double
        public let maxError: Double
    }

    public var summary: [KindSummary] {
        Quantizer.Kind.allCases.compactMap { kind in
            let ts = tensors.filter { $0.kind == kind }
            guard !ts.isEmpty else { return nil }
            let elements = ts.reduce(0) { $0 + $1.elements }
            return KindSummary(
                kind: kind, tensors: ts.count, elements: elements, sourceBytes: ts.reduce(0) { $0 + $1.sourceBytes },
                storedBytes: ts.reduce(0) { $0 + $1.storedBytes },
                meanError: ts.reduce(0.0) { $0 + $1.relativeError * Double($1.elements) } / Double(max(elements, 1)),
                maxError: ts.map(\.relativeError).max() ?? 0)
        }
    }

    /// The report as text: the `worst` quantized tensors by relative error, the summary by
    /// kind, and the agreement when measured.
    public func render(worst: Int = 20) -> String {
        var lines: [String] = []
        let quantized = tensors.filter { $0.kind != .kept }.sorted { ($0.relativeError, $0.name) > ($1.relativeError, $1.name) }
        let width = max(6, quantized.prefix(worst).map(\.name.count).max() ?? 0)
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
        lines.append("Relative error ||W - deq(Q(W))|| / ||W||, worst \(min(worst, quantized.count)) of \(quantized.count) quantized tensors:")
        lines.append("  " + pad("tensor", width) + "  format  rel. error")
        for t in quantized.prefix(worst) {
            lines.append("  " + pad(t.name, width) + "  " + pad(t.kind.rawValue, 6) + String(format: "  %.4e", t.relativeError))
        }
        lines.append("")
        lines.append("By kind:")
        lines.append("  kind    tensors   parameters    source MB    stored MB   mean error    max error")
        for s in summary {
            lines.append(String(format: "  %@ %9d %12d %12.2f %12.2f   %.4e   %.4e", pad(s.kind.rawValue, 6), s.tensors, s.elements,
                                Double(s.sourceBytes) / 1e6, Double(s.storedBytes) / 1e6, s.meanError, s.maxError))
        }
        if let a = agreement {
            lines.append("")
            lines.append(String(format: "Next-token agreement over %d positions: top-1 %.2f%%, KL(original || quantized) mean %.3e, max %.3e nats",
                                a.positions, a.top1 * 100, a.meanKL, a.maxKL))
        }
        return lines.joined(separator: "\n")
    }
}
