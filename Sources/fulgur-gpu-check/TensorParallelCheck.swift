// Tensor parallelism on 2 GPUs (issue 7): each tiny MoE checkpoint split by Plan.shard over a
// DeviceGroup (CUDATensorParallel: one CUDAExecutor per GPU, the peer all-reduce of
// Kernels/comm.cu in every step's graph) against the whole model on one GPU: logits at every
// prompt position and 16 greedy tokens, one step at a time.
import Foundation
import Fulgur
import FulgurCUDA

/// Split vs whole, both on GPUs in f32: the shards' partial products are summed in another
/// order (the MoE's expert halves, o_proj's head halves), nothing else differs.
let tensorParallelTolerance = 1e-4

func runTensorParallelChecks() throws -> Bool {
    let visible = try CUDADevice.visibleCount()
    guard visible >= 2 else {
        print("tp: skipped, \(visible) GPU")
        return true
    }
    let group = try DeviceGroup(ordinals: [0, 1])
    var failures = 0
    for name in ["gpt_oss", "gpt_oss_quantized", "mimo_v2_flash", "mimo_v2_flash_quantized", "qwen3_moe", "llama"] {
        let model = try Model(path: "Tests/FulgurTests/Fixtures/models/\(name)")
        let vocab = model.plan.lmHead.outFeatures
        let prompt = (0..<24).map { ($0 * 37 + 11) % vocab }
        try group.makeCurrent(0)
        let whole = try CUDAExecutor(plan: model.plan, device: group.devices[0], module: group.modules[0], maxPositions: 64)
        let split = try CUDATensorParallel(plan: model.plan, group: group, maxPositions: 64)
        let a = try whole.forward(prompt, logits: .all), b = try split.forward(prompt, logits: .all)
        let error = a.count == b.count ? worstRowError(b, a, width: vocab) : .infinity
        var same = true, tokens: [Int] = []
        var la = try whole.forward([prompt.last!]), lb = try split.forward([prompt.last!])
        for _ in 0..<16 {
            let ta = Sampler.argmax(la), tb = Sampler.argmax(lb)
            tokens.append(tb)
            if ta != tb { same = false; break }
            la = try whole.forward([ta]); lb = try split.forward([tb])
        }
        let passed = error <= tensorParallelTolerance && same
        if !passed { failures += 1 }
        print(String(format: "tp: %@ over 2 GPUs: logits vs 1 GPU %.2e (bound %.0e), 16 greedy tokens %@", name, error, tensorParallelTolerance,
                     same ? "identical" : "DIFFER after \(tokens.count - 1)"))
    }
    print(failures == 0 ? "tp PASS: 6 models" : "tp FAIL: \(failures) of 6 models")
    return failures == 0
}
