import Foundation
import Testing
@testable import Fulgur

/// Xiaomi's MiMo releases fuse q/k/v into one `qkv_proj` stored in row chunks (one per
/// full-attention KV head), each `[q | k | v]` for its share of heads; FP8 scale rows restart
/// at each chunk.

/// The tiny MiMo with its q/k/v rewritten as a fused `qkv_proj` gives the same logits.
@Test func fusedQKVGivesTheLogitsOfSeparateProjections() throws {
    let dir = try copyOfFixtureModel("mimo_v2_flash")
    let config = try HFConfig(path: dir + "/config.json")
    let chunks = try config.int("num_key_value_heads")
    var tensors = try safetensorsTensors(dir + "/model.safetensors")
    let layers = try config.int("num_hidden_layers")
    for i in 0..<layers {
        let p = "model.layers.\(i).self_attn."
        let q = tensors.first { $0.name == p + "q_proj.weight" }!, k = tensors.first { $0.name == p + "k_proj.weight" }!
        let v = tensors.first { $0.name == p + "v_proj.weight" }!
        let rowBytes = q.data.count / q.shape[0]
        func rows(_ t: SafetensorsTestTensor, _ c: Int) -> [UInt8] {
            let per = t.shape[0] / chunks
            return Array(t.data[(c * per * rowBytes)..<((c + 1) * per * rowBytes)])
        }
        var fused: [UInt8] = []
        for c in 0..<chunks { fused += rows(q, c) + rows(k, c) + rows(v, c) }
        tensors.removeAll { [q.name, k.name, v.name].contains($0.name) }
        tensors.append(SafetensorsTestTensor(name: p + "qkv_proj.weight", dtype: q.dtype,
                                             shape: [q.shape[0] + k.shape[0] + v.shape[0], q.shape[1]], data: fused))
    }
    try Data(safetensors(tensors)).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))

    let ids = (0..<24).map { ($0 * 53 + 7) % 256 }
    let fusedModel = try Model(path: dir), separate = try Model(path: Fixtures.path("models/mimo_v2_flash"))
    #expect(fusedModel.plan.ops.contains { if case .fusedQKV = $0 { return true }; return false })
    let got = try CPUExecutor(plan: fusedModel.plan, maxStepTokens: 8).forward(ids, logits: .all)
    let want = try CPUExecutor(plan: separate.plan, maxStepTokens: 8).forward(ids, logits: .all)
    #expect(got == want)
}

/// Two FP8 chunks, each reading its own rows of tile scales: every chunk's product equals
/// the product with codes decoded and scaled by the chunk-relative tile row.
@Test func fusedFP8ChunksReadTheirOwnScaleRows() throws {
    let hidden = 64, tile = 32, chunks = 2
    var attention = AttentionSpec(
        heads: 4, kvHeads: 2, headDim: 24, valueHeadDim: 16, window: nil, hasSinks: false, qkvBias: false,
        outputBias: false, qkNorm: false, valueScale: 1, softmaxScale: 1, rope: .standard(theta: 1e4, rotaryDim: 8))
    attention.qkvChunks = chunks
    let chunkRows = 2 * 24 + 1 * 24 + 1 * 16, perChunk = (chunkRows + tile - 1) / tile, columns = hidden / tile
    var rng = SeededGenerator(seed: 3)
    let codes = (0..<(chunks * chunkRows * hidden)).map { _ -> UInt8 in
        let b = UInt8(truncatingIfNeeded: rng.next()); return b & 0x7F == 0x7F ? b ^ 1 : b
    }
    let scales = (0..<(chunks * perChunk * columns)).map { _ in Float(rng.nextUnit() + 0.5) }
    let source = InMemoryTensors([
        TensorView(name: "qkv.weight", dtype: .fp8e4m3, shape: [chunks * chunkRows, hidden], bytes: codes),
        TensorView(name: "qkv.weight_scale_inv", dtype: .f32, shape: [chunks * perChunk, columns],
                   bytes: scales.withUnsafeBytes { Array($0) }),
    ])
    var spec = ModelSpec(architecture: "test", vocabSize: 1, hiddenSize: hidden, rmsNormEps: 1e-6, tieWordEmbeddings: true,
                         maxPositions: 16, layers: [], names: .huggingFace(), bosTokenId: nil, eosTokenIds: [])
    spec.quantization = QuantizationSpec(method: "fp8", fp8Tile: tile, allowsMXFP4: false)
    guard case .fusedQKV(let weights, 48, 24, 16) = try PlanBuilder.fusedQKV("qkv.weight", attention, spec: spec, tensors: source) else {
        Issue.record("expected a fused q/k/v op with 48/24/16 rows per chunk"); return
    }
    let x = (0..<hidden).map { _ in Float(rng.nextUnit() * 2 - 1) }
    for (c, w) in weights.enumerated() {
        var out = [Float](repeating: 0, count: chunkRows)
        w.apply(x, tokens: 1, into: &out)
        for r in 0..<chunkRows {
            var want = 0.0
            for i in 0..<hidden {
                let scale = scales[(c * perChunk + r / tile) * columns + i / tile]
                want += Double(E4M3.decode(codes[(c * chunkRows + r) * hidden + i]) * scale) * Double(x[i])
            }
            #expect(abs(Double(out[r]) - want) <= 1e-4 * max(1, abs(want)), "chunk \(c) row \(r)")
        }
    }
}

/// Tensors held in memory, for tests that build weights by hand.
final class InMemoryTensors: TensorSource {
    let views: [String: TensorView]
    init(_ list: [TensorView]) { views = Dictionary(uniqueKeysWithValues: list.map { ($0.name, $0) }) }
    var tensorNames: [String] { views.keys.sorted() }
    func tensorIfPresent(_ name: String) -> TensorView? { views[name] }
    var sourceDescription: String { "memory" }
}

extension TensorView {
    /// A view of `bytes`, kept alive by the view.
    init(name: String, dtype: DType, shape: [Int], bytes: [UInt8]) {
        final class Box { let p: UnsafeMutableRawPointer; init(_ n: Int) { p = .allocate(byteCount: max(n, 1), alignment: 64) }; deinit { p.deallocate() } }
        let box = Box(bytes.count)
        bytes.withUnsafeBytes { box.p.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
        self.init(name: name, dtype: dtype, shape: shape, data: UnsafeRawPointer(box.p), byteCount: bytes.count, owner: box)
    }
}
