import Foundation

/// What `fulgur inspect` prints: architecture, size, storage types, memory, and the layers.
public struct ModelReport {
    public let model: Model
    public let context: Int?

    public init(model: Model, context: Int? = nil) {
        self.model = model
        self.context = context
    }

    static func bytes(_ n: Int) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = Double(n), u = 0
        while v >= 1024 && u < units.count - 1 { v /= 1024; u += 1 }
        return u == 0 ? "\(n) B" : String(format: "%.1f %@", v, units[u])
    }

    static func formatName(_ f: LinearWeight.Format) -> String {
        switch f {
        case .plain(let d): return d.rawValue
        case .mxfp4: return "mxfp4"
        case .fp8(let tile): return "fp8 e4m3 \(tile)x\(tile)"
        }
    }

    static func count(_ n: Int) -> String {
        n >= 1_000_000_000 ? String(format: "%.2fB", Double(n) / 1e9)
            : n >= 1_000_000 ? String(format: "%.1fM", Double(n) / 1e6) : "\(n)"
    }

    public func render(listTensors: Bool = false) -> String {
        let spec = model.spec, t = model.tensors
        var lines: [String] = []
        lines.append("model:          \(model.path)")
        lines.append("architecture:   \(spec.architecture)")
        lines.append("parameters:     \(Self.count(model.parameterCount))")
        lines.append("weights:        \(Self.bytes(model.weightBytes)) as stored (memory-mapped)")
        var byType: [DType: (tensors: Int, elements: Int, bytes: Int)] = [:]
        for name in t.tensorNames {
            guard let v = t.tensorIfPresent(name) else { continue }
            let e = byType[v.dtype] ?? (0, 0, 0)
            byType[v.dtype] = (e.tensors + 1, e.elements + v.elementCount, e.bytes + v.byteCount)
        }
        lines.append("storage types:")
        for (d, e) in byType.sorted(by: { $0.value.bytes > $1.value.bytes }) {
            lines.append("  \(d.rawValue.padding(toLength: 8, withPad: " ", startingAt: 0)) \(String(e.tensors).leftPad(5)) tensors  \(Self.count(e.elements).leftPad(8)) values  \(Self.bytes(e.bytes))")
        }
        lines.append("matrices by layer kind and format (bytes include scales):")
        var groups: [String: (count: Int, bytes: Int)] = [:]
        var order: [String] = []
        for (kind, w) in model.plan.linearWeights {
            let key = "\(kind) \(Self.formatName(w.format))"
            if groups[key] == nil { order.append(key) }
            let g = groups[key] ?? (0, 0)
            groups[key] = (g.count + 1, g.bytes + w.byteCount)
        }
        for key in order {
            lines.append("  \(key.padding(toLength: 24, withPad: " ", startingAt: 0)) \(String(groups[key]!.count).leftPad(6)) matrices  \(Self.bytes(groups[key]!.bytes))")
        }
        if let q = spec.quantization {
            lines.append("quantization:   \(q.method)\(q.fp8Tile.map { ", FP8 \($0)x\($0) blocks" } ?? "")\(q.allowsMXFP4 ? ", MXFP4 experts" : "")")
        }
        lines.append("vocabulary:     \(spec.vocabSize)")
        lines.append("hidden size:    \(spec.hiddenSize)")
        lines.append("max positions:  \(spec.maxPositions)")
        let ctx = min(context ?? 8192, spec.maxPositions)
        let kv = KVCache.bytes(spec: spec, maxPositions: ctx, maxStepTokens: 64)
        lines.append("KV cache:       \(Self.bytes(kv)) for \(ctx) positions (f32)")
        lines.append("decode step:    reads \(Self.bytes(model.plan.bytesPerDecodeStep)) of weights per token")
        lines.append("layers:         \(spec.layerCount)")
        var layerGroups: [(String, [Int])] = []
        for (i, l) in spec.layers.enumerated() {
            let a = l.attention
            var d = a.window.map { "sliding(\($0))" } ?? "full"
            d += " attention, \(a.heads) q / \(a.kvHeads) kv heads, head dim \(a.headDim)"
            if a.valueHeadDim != a.headDim { d += "/\(a.valueHeadDim)" }
            if a.rope.rotaryDim != a.headDim { d += ", rope on \(a.rope.rotaryDim) dims" }
            if a.hasSinks { d += ", sinks" }
            if a.qkNorm { d += ", q/k norm" }
            switch l.feedForward {
            case .dense(let inter, _): d += "; dense MLP \(inter)"
            case .moe(let m): d += "; MoE \(m.experts) experts x \(m.intermediate), top-\(m.topK)"
            }
            if let last = layerGroups.last, last.0 == d { layerGroups[layerGroups.count - 1].1.append(i) } else { layerGroups.append((d, [i])) }
        }
        for (d, idx) in layerGroups {
            let range = idx.count == 1 ? "\(idx[0])" : "\(idx.first!)-\(idx.last!)"
            lines.append("  \(range.leftPad(7)): \(d)")
        }
        if listTensors {
            // Name the format a tensor is read as where the plan knows better than its dtype
            // (u8 MXFP4 codes, FP8 with tile scales).
            var formats: [String: String] = [:]
            for (_, w) in model.plan.linearWeights { formats[w.name] = Self.formatName(w.format) }
            lines.append("tensors:")
            for name in t.tensorNames {
                guard let v = t.tensorIfPresent(name) else { continue }
                let format = formats[name].map { "  (\($0))" } ?? ""
                lines.append("  \(name)  \(v.dtype.rawValue)  \(v.shape)\(format)")
            }
        }
        return lines.joined(separator: "\n")
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}
