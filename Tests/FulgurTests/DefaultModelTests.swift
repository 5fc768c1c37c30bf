import Foundation
import Testing
@testable import Fulgur

/// The default model (SmolLM2-135M-Instruct, Q4_1 GGUF), fetched by `scripts/setup`.
enum DefaultModel {
    static var path: String {
        if let p = ProcessInfo.processInfo.environment["FULGUR_DEFAULT_MODEL"] { return p }
        return NSHomeDirectory() + "/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    }

    static func load() throws -> Model {
        guard FileManager.default.fileExists(atPath: path) else {
            Issue.record("default model not found at \(path): run scripts/setup (or set FULGUR_DEFAULT_MODEL)")
            throw FulgurError(.io, "missing default model")
        }
        return try Model(path: path)
    }
}

@Suite struct DefaultModelTests {
    @Test func nextTokenAfterCapitalOfFranceIsParis() throws {
        let model = try DefaultModel.load()
        let exec = CPUExecutor(plan: model.plan)
        let logits = try exec.forward([504, 3575, 282, 4649, 314])
        let top = logits.indices.max { logits[$0] < logits[$1] }!
        #expect(top == 7042)  // " Paris", as transformers gives with logit 17.37
        #expect(abs(logits[7042] - 17.3713) < 0.05)
    }
}
