import Foundation
import Testing
@testable import Fulgur

/// Issue 8's model as the `mimo-v2.5-pro` preset, and the memory plan `fulgur bench --dry-run`
/// prints for it: the facts the issue states (about 1.02 T parameters, about 530 GB of MXFP4
/// experts, fits 8 H200 with room and 8 H100 only just), from shapes alone.
@Suite struct MemoryPlanTests {
    @Test func mimoV25ProHasTheStatedShape() throws {
        let random = try RandomModel(preset: "mimo-v2.5-pro")
        let spec = try random.spec()
        #expect(spec.layerCount == 70 && spec.hiddenSize == 6144)
        #expect(spec.layers.filter { $0.attention.window == nil }.count == 10)
        #expect(spec.layers.allSatisfy { $0.attention.heads == 128 && $0.attention.kvHeads == 8 })
        #expect(spec.layers.filter { if case .moe(let m) = $0.feedForward { return m.experts == 384 && m.topK == 8 && m.intermediate == 2048 }; return false }.count == 69)
        let trillions = Double(try random.parameterCount()) / 1e12
        #expect(trillions > 1.0 && trillions < 1.04, "\(trillions) T")
    }

    @Test func planOverEightGPUsMatchesTheIssuesArithmetic() throws {
        let plan = try MemoryPlan(RandomModel(preset: "mimo-v2.5-pro"), gpus: 8, context: 65536)
        let experts = try #require(plan.rows.first { $0.part == "experts" })
        #expect(experts.total > 520e9 && experts.total < 540e9, "\(experts.total / 1e9) GB of experts")
        #expect(abs(experts.perGPU * 8 - experts.total) < 1)
        let h100 = MemoryPlan.cards[0].bytes, h200 = MemoryPlan.cards[1].bytes
        #expect(plan.perGPU < h100 && plan.perGPU > 0.8 * h100, "fits 8 H100 only just: \(plan.perGPU / 1e9) GB a GPU")
        #expect(plan.perGPU < 0.6 * h200)
        // One GPU holds everything: every part whole.
        let one = try MemoryPlan(RandomModel(preset: "mimo-v2.5-pro"), gpus: 1, context: 65536)
        for r in one.rows { #expect(abs(r.perGPU - r.total) < 1, "\(r.part)") }
    }
}
