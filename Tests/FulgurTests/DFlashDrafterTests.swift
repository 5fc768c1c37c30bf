import Foundation
import Testing
@testable import Fulgur

/// The DFlash drafter's forward pass against recipes/dflash/model.py (PyTorch, float64), which
/// matches z-lab's published DFlashDraftModel: a tiny random drafter over the tiny qwen3
/// target (recipes/fixtures/make_drafter_reference.py), two rounds of context then a block, as
/// decoding runs them. The greedy tests cannot see a wrong drafter (output is lossless with
/// any drafts); this one can.
@Test func drafterForwardMatchesTorchReference() throws {
    let model = try Model(path: Fixtures.path("models/qwen3"))
    let directory = Fixtures.path("drafters/torch_reference")
    let drafter = try DFlashDrafter(directory: directory, target: model, maxPositions: 64, maxStepTokens: 16)
    let reference = try SafetensorsFile(path: directory + "/reference.safetensors")
    let vocab = model.spec.vocabSize
    for round in 0..<2 {
        let features = try reference.tensor("features_\(round)").floats()
        let block = try reference.tensor("block_\(round)").floats().map { Int($0) }
        let want = try reference.tensor("logits_\(round)").floats()
        let width = drafter.targetLayerIds.count * model.spec.hiddenSize
        try drafter.extend(tokens: Array(repeating: 0, count: features.count / width), features: features)

        let start = drafter.contextLength
        let got = try drafter.block.forward(block, logits: .all)
        drafter.block.truncate(to: start)
        #expect(got.count == want.count)
        for t in 0..<block.count {
            let g = got[(t * vocab)..<((t + 1) * vocab)], w = want[(t * vocab)..<((t + 1) * vocab)]
            let err = zip(g, w).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot()
            let norm = w.map { $0 * $0 }.reduce(0, +).squareRoot()
            #expect(err / norm <= 1e-4, "round \(round), block position \(t): relative error \(err / norm)")
        }
        // What decoding uses: the argmax at every position after the given token.
        let expected = (1..<block.count).map { Sampler.argmax(Array(want[($0 * vocab)..<(($0 + 1) * vocab)])) }
        #expect(try drafter.propose(after: block[0], count: block.count - 1) == expected, "round \(round)")
        #expect(drafter.contextLength == start)
    }
}
