import Foundation
import Testing
@testable import Fulgur

/// The DFlash drafter that comes with Fulgur for the default model (Drafters/): found from a
/// build in the checkout, lossless, trained (it accepts far more than a random drafter's one
/// token a round), and chosen by default only where it is faster.
@Suite(.serialized) struct BundledDrafterTests {
    /// Found by the default model's file name, wherever the file is (FULGUR_DEFAULT_MODEL may
    /// point this run's default model elsewhere).
    @Test func theDefaultModelsDrafterIsFoundAndOthersHaveNone() throws {
        let directory = try #require(BundledDrafter.directory(forModel: "/models/" + DefaultModel.fileName))
        #expect(directory.hasSuffix("Drafters/SmolLM2-135M-Instruct-DFlash"))
        #expect(BundledDrafter.directory(forModel: Fixtures.path("models/llama")) == nil)
    }

    @Test func itIsChosenByDefaultOnAGPUOnly() throws {
        let b = "/d/bundled"
        let gpu = try BundledDrafter.choice(explicit: nil, disabled: false, blockSize: nil, onGPU: true, bundled: b)
        #expect(gpu?.directory == b && gpu?.blockSize == BundledDrafter.defaultBlockSize)
        #expect(try BundledDrafter.choice(explicit: nil, disabled: false, blockSize: nil, onGPU: false, bundled: b) == nil)
        #expect(try BundledDrafter.choice(explicit: nil, disabled: true, blockSize: nil, onGPU: true, bundled: b) == nil)
        #expect(try BundledDrafter.choice(explicit: nil, disabled: false, blockSize: nil, onGPU: true, bundled: nil) == nil)
        let asked = try BundledDrafter.choice(explicit: "/d/mine", disabled: false, blockSize: 8, onGPU: false, bundled: b)
        #expect(asked?.directory == "/d/mine" && asked?.blockSize == 8)
        let own = try BundledDrafter.choice(explicit: "/d/mine", disabled: false, blockSize: nil, onGPU: true, bundled: b)
        #expect(own?.directory == "/d/mine" && own?.blockSize == nil)
        let sized = try BundledDrafter.choice(explicit: nil, disabled: false, blockSize: 16, onGPU: false, bundled: b)
        #expect(sized?.directory == b && sized?.blockSize == 16)
        expectError(["--no-speculative"]) { _ = try BundledDrafter.choice(explicit: "/d/mine", disabled: true, blockSize: nil, onGPU: true, bundled: b) }
        expectError(["no bundled drafter"]) { _ = try BundledDrafter.choice(explicit: nil, disabled: false, blockSize: 8, onGPU: true, bundled: nil) }
    }

    /// Greedy, on the CPU, at block 4 (the default, 2, caps a round at 2 tokens): the same 96
    /// tokens as plain decoding, at 2-3 tokens a round on a coding prompt (with this prompt at
    /// block 4: 2.65 on the GPU with the drafter bundled before 2026-11-28, 3.06 on the CPU with
    /// the one bundled now, 200 tokens; a random drafter of the same shape gets about 1).
    /// Only where the default model is the one the drafter was trained for (FULGUR_DEFAULT_MODEL
    /// may name another model, whose vocabulary the drafter does not share).
    @Test(.enabled(if: URL(fileURLWithPath: DefaultModel.path).lastPathComponent == DefaultModel.fileName,
                   "FULGUR_DEFAULT_MODEL names a model other than the one the bundled drafter was trained for"))
    func itIsLosslessAndAcceptsSeveralTokensARound() throws {
        let path = DefaultModel.path
        guard FileManager.default.fileExists(atPath: path) else {
            throw FulgurError(.io, "default model not found at \(path): run `swift run fulgur pull` (or set FULGUR_DEFAULT_MODEL)")
        }
        let engine = try Engine(modelPath: path, contextLength: 512)
        let prompt = try engine.renderChat([ChatMessage(role: "user", content: "Write a Python function that checks whether a number is prime.")],
                                           addGenerationPrompt: true)
        let parameters = GenerationParameters(maxTokens: 96, sampling: SamplingParameters(temperature: 0), stopTokenIds: [])
        let plain = try engine.generate(text: prompt, parameters: parameters)
        try engine.useDrafter(directory: try #require(BundledDrafter.directory(forModel: path)), blockSize: 4)
        let fast = try engine.generate(text: prompt, parameters: parameters)
        #expect(fast.tokens == plain.tokens && fast.tokens.count == 96)
        let stats = try #require(fast.speculative)
        #expect(stats.meanAcceptance >= 2, "mean acceptance \(stats.meanAcceptance) tokens a round")
    }
}
