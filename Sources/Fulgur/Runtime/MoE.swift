import Foundation

/// Mixture-of-experts feed-forward on the CPU: route every token, then run each selected
/// expert once over all the tokens that chose it (so a verify block or prefill chunk reads
/// each touched expert's weights once), and add the weighted outputs. In a batched step
/// (`rows`: several sequences), each sequence's rows take the kernels they would take alone.
public enum MoE {
    /// The experts and weights one token is routed to.
    public static func route(_ logits: [Float], _ m: MoEWeights) -> [(expert: Int, weight: Float)] {
        let k = m.spec.topK
        func topK(_ scores: [Float], _ k: Int) -> [Int] {
            // Stable: among equal scores the lower index wins, as torch.topk does on CPU.
            Array(scores.indices.sorted { scores[$0] > scores[$1] || (scores[$0] == scores[$1] && $0 < $1) }.prefix(k))
        }
        switch m.spec.routing {
        case .softmaxTopK(let normalize):
            let mx = logits.max()!
            let e = logits.map { exp($0 - mx) }
            let sum = e.reduce(0, +)
            let probs = e.map { $0 / sum }
            let idx = topK(probs, k)
            var w = idx.map { probs[$0] }
            if normalize { let s = w.reduce(0, +); w = w.map { $0 / s } }
            return zip(idx, w).map { ($0, $1) }
        case .topKSoftmax:
            let idx = topK(logits, k)
            let mx = idx.map { logits[$0] }.max()!
            let e = idx.map { exp(logits[$0] - mx) }
            let sum = e.reduce(0, +)
            return zip(idx, e).map { ($0, $1 / sum) }
        case .sigmoidWithBias(let normalize, let scaling, let groups, let topKGroups):
            let scores = logits.map { 1 / (1 + exp(-$0)) }
            var choice = zip(scores, m.correctionBias!).map { $0 + $1 }
            if groups > 1 {
                let per = choice.count / groups
                let groupScores = (0..<groups).map { g -> Float in
                    let top2 = topK(Array(choice[(g * per)..<((g + 1) * per)]), 2)
                    return top2.reduce(0) { $0 + choice[g * per + $1] }
                }
                let keep = Set(topK(groupScores, topKGroups))
                for g in 0..<groups where !keep.contains(g) {
                    for i in (g * per)..<((g + 1) * per) { choice[i] = -.infinity }
                }
            }
            let idx = topK(choice, k)
            var w = idx.map { scores[$0] }
            if normalize { let s = w.reduce(0, +) + 1e-20; w = w.map { $0 / s } }
            return zip(idx, w).map { ($0, $1 * scaling) }
        }
    }

    public static func run(_ m: MoEWeights, x: UnsafeMutablePointer<Float>, tokens T: Int, hidden: Int, out: UnsafeMutablePointer<Float>) {
        run(m, x: x, tokens: T, hidden: hidden, out: out, rows: StepRows(segments: [0..<T]))
    }

    static func run(_ m: MoEWeights, x: UnsafeMutablePointer<Float>, tokens T: Int, hidden: Int, out: UnsafeMutablePointer<Float>, rows: StepRows) {
        let E = m.spec.experts, inter = m.spec.intermediate
        var logits = [Float](repeating: 0, count: T * E)
        logits.withUnsafeMutableBufferPointer { l in
            if let b = m.routerBias {
                b.withUnsafeBufferPointer { m.router.apply(x, tokens: T, bias: $0.baseAddress!, into: l.baseAddress!, decodeOnceFrom: rows.decodeOnceFrom) }
            } else {
                m.router.apply(x, tokens: T, into: l.baseAddress!, decodeOnceFrom: rows.decodeOnceFrom)
            }
        }
        var assigned = [[(token: Int, weight: Float)]](repeating: [], count: E)
        for t in 0..<T {
            for (e, w) in route(Array(logits[(t * E)..<((t + 1) * E)]), m) { assigned[e].append((t, w)) }
        }
        var segmentOf = [Int](repeating: 0, count: T)
        for (s, r) in rows.segments.enumerated() { for t in r { segmentOf[t] = s } }
        out.update(repeating: 0, count: T * hidden)
        for e in 0..<E where !assigned[e].isEmpty {
            // An expert decodes its rows once for the sequences that route enough rows to it;
            // the others' rows come first, through the per-token kernels.
            var routed = [Int: Int]()
            for u in assigned[e] { routed[segmentOf[u.token], default: 0] += 1 }
            let few = assigned[e].filter { !StepRows.decodesOnce(routed[segmentOf[$0.token]]!) }
            let users = few + assigned[e].filter { StepRows.decodesOnce(routed[segmentOf[$0.token]]!) }
            let ex = m.experts[e], n = users.count, split = few.count
            var xs = [Float](repeating: 0, count: n * hidden)
            for (r, u) in users.enumerated() {
                for i in 0..<hidden { xs[r * hidden + i] = x[u.token * hidden + i] }
            }
            var gate = [Float](repeating: 0, count: n * inter), up = gate
            if let gu = ex.gateUp {
                var both = [Float](repeating: 0, count: n * 2 * inter)
                if let b = ex.gateUpBias {
                    b.withUnsafeBufferPointer { gu.apply(xs, tokens: n, bias: $0.baseAddress!, into: &both, decodeOnceFrom: split) }
                } else {
                    gu.apply(xs, tokens: n, into: &both, decodeOnceFrom: split)
                }
                for r in 0..<n {
                    for i in 0..<inter {
                        let row = r * 2 * inter
                        if ex.interleaved {
                            gate[r * inter + i] = both[row + 2 * i]; up[r * inter + i] = both[row + 2 * i + 1]
                        } else {
                            gate[r * inter + i] = both[row + i]; up[r * inter + i] = both[row + inter + i]
                        }
                    }
                }
            } else {
                ex.gate!.apply(xs, tokens: n, into: &gate, decodeOnceFrom: split)
                ex.up!.apply(xs, tokens: n, into: &up, decodeOnceFrom: split)
            }
            var act = [Float](repeating: 0, count: n * inter)
            for i in 0..<(n * inter) { act[i] = Activations.glu(gate[i], up[i], m.spec.activation) }
            var y = [Float](repeating: 0, count: n * hidden)
            if let b = ex.downBias {
                b.withUnsafeBufferPointer { ex.down.apply(act, tokens: n, bias: $0.baseAddress!, into: &y, decodeOnceFrom: split) }
            } else {
                ex.down.apply(act, tokens: n, into: &y, decodeOnceFrom: split)
            }
            for (r, u) in users.enumerated() {
                for i in 0..<hidden { out[u.token * hidden + i] += u.weight * y[r * hidden + i] }
            }
        }
    }
}
