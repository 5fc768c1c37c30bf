import Foundation
import Testing
@testable import Fulgur

/// Tiny random checkpoints made by Hugging Face transformers 5.17 (recipes/fixtures/
/// make_tiny_models.py): Fulgur's logits at every prompt position and its greedy
/// continuation must match transformers'. Prompts (24 tokens) are longer than the sliding
/// window (8), so ring caches wrap.
@Suite struct ArchitectureParityTests {
    static let models = ["llama", "qwen3", "qwen3_moe", "mimo_v2_flash", "gpt_oss"]

    struct Reference {
        let inputIds: [Int]
        let logits: [Float]
        let greedy: [Int]
    }

    static func reference(_ name: String) throws -> Reference {
        let f = try SafetensorsFile(path: Fixtures.path("models/\(name)/reference.safetensors"))
        func ints(_ t: TensorView) -> [Int] { t.floats().map { Int($0) } }
        return Reference(inputIds: ints(try f.tensor("input_ids")), logits: try f.tensor("logits").floats(),
                         greedy: ints(try f.tensor("greedy")))
    }

    @Test(arguments: models)
    func logitsMatchTransformersAtEveryPosition(_ name: String) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let ref = try Self.reference(name)
        let exec = CPUExecutor(plan: model.plan, maxStepTokens: 8)  // several chunks: exercises the cache
        let logits = try exec.forward(ref.inputIds, logits: .all)
        #expect(logits.count == ref.logits.count)
        let vocab = model.spec.vocabSize
        for t in 0..<ref.inputIds.count {
            let got = logits[(t * vocab)..<((t + 1) * vocab)], want = ref.logits[(t * vocab)..<((t + 1) * vocab)]
            let err = zip(got, want).map { ($0 - $1) * ($0 - $1) }.reduce(0, +).squareRoot()
            let norm = want.map { $0 * $0 }.reduce(0, +).squareRoot()
            #expect(err / norm <= 1e-3, "\(name): position \(t) relative error \(err / norm)")
        }
    }

    @Test(arguments: models)
    func greedyTokensMatchTransformers(_ name: String) throws {
        let model = try Model(path: Fixtures.path("models/\(name)"))
        let ref = try Self.reference(name)
        let gen = Generator(executor: CPUExecutor(plan: model.plan, maxStepTokens: 16))
        let result = try gen.generate(prompt: ref.inputIds, parameters: GenerationParameters(maxTokens: ref.greedy.count),
                                      decode: { _ in "" })
        #expect(result.tokens == ref.greedy)
    }
}
