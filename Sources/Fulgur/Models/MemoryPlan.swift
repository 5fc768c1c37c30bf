import Foundation

/// Where a preset's weights and KV cache go when Plan.shard splits it over `gpus` GPUs,
/// from tensor shapes alone (no weights are made): `fulgur bench --dry-run`. Experts, q/o,
/// dense MLPs and the LM head divide by the GPU count; key/value projections and the KV cache
/// divide by it while there are enough key/value heads, else each GPU keeps one head;
/// embedding, router, norms, sinks and biases are on every GPU. The KV cache is f32, as the
/// CUDA executor keeps it; a sliding layer keeps its window plus 16 positions.
public struct MemoryPlan: Sendable {
    public struct Row: Sendable {
        public let part: String
        public let total: Double
        public let perGPU: Double
    }
    public let model: String
    public let gpus: Int
    public let context: Int
    public let parameters: Int
    public let rows: [Row]
    public var perGPU: Double { rows.reduce(0) { $0 + $1.perGPU } }

    /// Bytes the driver and the executor's workspace take per GPU beyond the model (an
    /// estimate: a CUDA context is about 0.5 GB, plus activations, logits and kernel scratch).
    public static let overhead = 1.0e9

    public init(_ model: RandomModel, gpus: Int, context: Int) throws {
        let spec = try model.spec()
        var parts: [String: (total: Double, perGPU: Double)] = [:], order: [String] = []
        func add(_ part: String, _ bytes: Double, share: Double) {
            if parts[part] == nil { order.append(part) }
            let p = parts[part] ?? (0, 0)
            parts[part] = (p.total + bytes, p.perGPU + bytes * share)
        }
        func kvShare(_ layer: Int) -> Double {
            let kv = spec.layers[layer].attention.kvHeads
            return kv % gpus == 0 ? 1 / Double(gpus) : 1 / Double(kv)
        }
        let split = 1 / Double(gpus)
        for e in try model.entries() {
            let n = e.name, bytes = Double(e.byteCount)
            let layer = n.components(separatedBy: "layers.").dropFirst().first.flatMap { Int($0.prefix { $0.isNumber }) }
            if n.contains("experts") { add("experts", bytes, share: split) }
            else if n.contains("embed_tokens") { add("embedding (on every GPU)", bytes, share: 1) }
            else if n.hasPrefix("lm_head") { add("LM head", bytes, share: split) }
            else if n.contains("q_proj") || n.contains("o_proj") { add("attention q and o", bytes, share: split) }
            else if n.contains("k_proj") || n.contains("v_proj"), let layer { add("attention k and v", bytes, share: kvShare(layer)) }
            else if n.contains("gate_proj") || n.contains("up_proj") || n.contains("down_proj") { add("dense MLP", bytes, share: split) }
            else if n.contains("mlp.gate") || n.contains("router") || n.contains("correction") { add("routers (on every GPU)", bytes, share: 1) }
            else { add("norms, sinks, biases (on every GPU)", bytes, share: 1) }
        }
        for (i, l) in spec.layers.enumerated() {
            let a = l.attention, positions = Double(a.window.map { min($0 + 16, context) } ?? context)
            add("KV cache, f32, \(context) positions", Double(a.kvHeads * (a.headDim + a.valueHeadDim) * 4) * positions, share: kvShare(i))
        }
        add("CUDA context and workspace (estimate)", Self.overhead * Double(gpus), share: split)
        self.model = model.description
        self.gpus = gpus
        self.context = context
        parameters = try model.parameterCount()
        rows = order.map { Row(part: $0, total: parts[$0]!.total, perGPU: parts[$0]!.perGPU) }
    }

    /// Device memory of the cards this project runs on, as nvidia-smi reported it (MiB * 2^20).
    public static let cards: [(name: String, bytes: Double)] = [("H100 80GB HBM3", 81559 * 1048576), ("H200", 143771 * 1048576)]

    public var table: String {
        var lines = [String(format: "memory plan: %@, %.3f T parameters, over %d GPUs (tensor parallel), context %d", model, Double(parameters) / 1e12, gpus, context),
                     "part                                          total GB   per GPU GB"]
        for r in rows {
            lines.append(r.part.padding(toLength: 44, withPad: " ", startingAt: 0) + String(format: "%10.1f   %10.2f", r.total / 1e9, r.perGPU / 1e9))
        }
        lines.append("per GPU".padding(toLength: 44, withPad: " ", startingAt: 0) + String(format: "%10s   %10.2f", "", perGPU / 1e9))
        for card in Self.cards {
            let left = card.bytes - perGPU
            lines.append(String(format: "%d x %@ (%.1f GB each): %@ %.1f GB a GPU", gpus, card.name, card.bytes / 1e9,
                                left >= 0 ? "fits, leaving" : "does NOT fit, short by", abs(left) / 1e9))
        }
        return lines.joined(separator: "\n")
    }
}
