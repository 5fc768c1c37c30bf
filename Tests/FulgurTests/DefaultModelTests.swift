import Foundation
import Testing
@testable import Fulgur

/// The default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against Hugging Face transformers
/// running the same file dequantized to f32 (recipes/fixtures/make_default_model_reference.py).
/// Needs the model in the cache: `swift run fulgur pull` (.ci/run does it).
@Suite(.serialized) struct DefaultModelTests {
    struct Reference: Decodable {
        struct Logits: Decodable { let ids: [Int]; let values: [Float] }
        struct Case: Decodable {
            let text: String
            let input_ids: [Int]
            let greedy_ids: [Int]
            let greedy_text_until_eos: String
            let last_prompt_logits_top50: Logits
        }
        let chat: Case
        let plain: Case
    }

    static func reference() throws -> Reference {
        let data = try Data(contentsOf: URL(fileURLWithPath: Fixtures.path("default_model/reference.json")))
        return try JSONDecoder().decode(Reference.self, from: data)
    }

    static func model() throws -> Model {
        let path = DefaultModel.path
        guard FileManager.default.fileExists(atPath: path) else {
            throw FulgurError(.io, "default model not found at \(path): run `swift run fulgur pull` (or set FULGUR_DEFAULT_MODEL)")
        }
        return try Model(path: path)
    }

    static func greedy(_ model: Model, _ prompt: [Int], _ count: Int) throws -> [Int] {
        let gen = Generator(executor: CPUExecutor(plan: model.plan, maxPositions: 512))
        return try gen.generate(prompt: prompt, parameters: GenerationParameters(maxTokens: count), decode: { _ in "" }).tokens
    }

    @Test func lastPromptLogitsMatchTransformers() throws {
        let model = try Self.model(), ref = try Self.reference()
        for c in [ref.chat, ref.plain] {
            let logits = try CPUExecutor(plan: model.plan, maxPositions: 512).forward(c.input_ids)
            for (id, want) in zip(c.last_prompt_logits_top50.ids, c.last_prompt_logits_top50.values) {
                #expect(abs(logits[id] - want) <= 1e-3 * max(1, abs(want)) + 2e-3, "token \(id): \(logits[id]) vs \(want)")
            }
        }
    }

    @Test func plainPromptGreedyMatchesTransformersAndSaysParis() throws {
        let model = try Self.model(), ref = try Self.reference().plain
        let tokens = try Self.greedy(model, ref.input_ids, ref.greedy_ids.count)
        #expect(tokens == ref.greedy_ids)
        let tokenizer = try Tokenizer(gguf: model.gguf!)
        #expect(tokenizer.encode(ref.text) == ref.input_ids)
        #expect(tokenizer.decode(tokens).contains("Paris"))
    }

    @Test func chatPromptGreedyMatchesTransformersFor48Tokens() throws {
        let model = try Self.model(), ref = try Self.reference().chat
        let tokenizer = try Tokenizer(gguf: model.gguf!)
        #expect(tokenizer.encode(ref.text, addSpecialTokens: true) == ref.input_ids)
        let tokens = try Self.greedy(model, ref.input_ids, ref.greedy_ids.count)
        #expect(tokens == ref.greedy_ids)
        #expect(tokenizer.decode(Array(tokens.prefix(7))) == ref.greedy_text_until_eos)
    }
}
