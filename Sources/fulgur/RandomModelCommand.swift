import ArgumentParser
import Foundation
import Fulgur

extension RandomModel.ExpertFormat: ExpressibleByArgument {}
extension RandomModel.LinearFormat: ExpressibleByArgument {}
extension RandomModel.Reader: ExpressibleByArgument {}

struct RandomModelCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "random-model",
        abstract: "Build a model with random weights at the shape of a published one, or export it as a checkpoint.",
        discussion: """
            Presets: \(RandomModel.presets.joined(separator: ", ")). Without --export the model is built in \
            memory and planned, and its size and build time are printed. With --export the same weights are \
            written (made while writing, so memory stays small): for transformers 5.17 by default (BF16, \
            gpt-oss experts MXFP4), or with --for fulgur exactly as held (MXFP4 experts, FP8 layers). \
            `fulgur bench` by default makes other random weights of the same shapes and distributions, on the GPU \
            (its --random-weights device); its --random-weights host gives the weights made here.
            """)

    @Argument(help: "Preset name.") var preset: String
    @Option(help: "Keep only the first N layers (default: all).") var layers: Int?
    @Option(help: "Seed of the weights.") var seed: UInt64 = 0
    @Option(help: "Expert weights: mxfp4 or bf16.") var experts: RandomModel.ExpertFormat = .mxfp4
    @Option(help: "Other linear layers: fp8 (128x128 block scales) or bf16.") var linear: RandomModel.LinearFormat = .fp8
    @Option(help: "Write the checkpoint into this directory (created) instead of building in memory.") var export: String?
    @Option(name: .customLong("for"), help: "Who reads the export: transformers or fulgur.") var reader: RandomModel.Reader = .transformers
    @Option(name: .customLong("shard-gb"), help: "Largest shard of an export, in GB.") var shardGB: Double = 5
    @Option(name: .customLong("compare-logits"), help: "A safetensors file with input_ids and logits [T, vocab] (recipes/peer/transformers_decode.py --logits-out): run the ids on the CPU executor and print the agreement.")
    var compareLogits: String?

    func run() throws {
        try reportingErrors {
            let random = try RandomModel(preset: preset, layers: layers, seed: seed, experts: experts, linear: linear)
            let start = Date()
            if let export {
                let bar = ProgressBar(label: "Writing")
                try random.export(to: export, for: reader, shardBytes: Int(shardGB * 1e9), progress: { bar.update($0, $1) })
                bar.finish()
                let written = reader == .transformers ? random.transformersTwin : random
                Terminal.status(String(format: "Wrote %@ for %@: %@ in %.1f s", export, reader.rawValue, written.description,
                                       Date().timeIntervalSince(start)))
            } else {
                let bar = ProgressBar(label: "Building")
                let model = try random.build(progress: { bar.update($0, $1) })
                bar.finish()
                let seconds = Date().timeIntervalSince(start)
                func size(_ n: Int, _ unit: String) -> String {
                    n >= 1_000_000_000 ? String(format: "%.2f G%@", Double(n) / 1e9, unit) : String(format: "%.2f M%@", Double(n) / 1e6, unit)
                }
                print("\(random.description): \(size(try random.parameterCount(), "")) parameters, \(size(model.weightBytes, "B")) of weights, "
                      + "\(size(model.plan.bytesPerDecodeStep, "B")) read per decode step; built in \(String(format: "%.1f", seconds)) s")
                if let compareLogits { try compareLogitsFile(compareLogits, CPUExecutor(plan: model.plan, maxStepTokens: 16), vocab: model.spec.vocabSize) }
            }
        }
    }
}

/// Fulgur's logits for a file's ids against the file's logits (recipes/peer/transformers_decode.py
/// --logits-out): per-position relative error (‖got − want‖ / ‖want‖) and how often the argmax
/// agrees, printed.
func compareLogitsFile(_ path: String, _ executor: any Executor, vocab: Int) throws {
    let file = try SafetensorsFile(path: path)
    let ids = try file.tensor("input_ids").floats().map { Int($0) }, want = try file.tensor("logits").floats()
    guard want.count == ids.count * vocab else {
        throw FulgurError(.shape, "\(path): logits hold \(want.count) values, expected \(ids.count) x \(vocab) for this model")
    }
    executor.reset()
    let got = try executor.forward(ids, logits: .all)
    var errors: [Double] = [], argmaxAgree = 0
    for t in 0..<ids.count {
        let g = got[(t * vocab)..<((t + 1) * vocab)], w = want[(t * vocab)..<((t + 1) * vocab)]
        let diff = zip(g, w).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        errors.append((diff / w.reduce(0.0) { $0 + Double($1) * Double($1) }).squareRoot())
        if g.indices.max(by: { g[$0] < g[$1] }) == w.indices.max(by: { w[$0] < w[$1] }) { argmaxAgree += 1 }
    }
    print(String(format: "logits vs %@: relative error max %.2e, mean %.2e over %d positions; argmax agrees at %d of %d",
                 path, errors.max() ?? 0, errors.reduce(0, +) / Double(max(errors.count, 1)), ids.count, argmaxAgree, ids.count))
}

struct RandomDrafterCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "random-drafter",
        abstract: "Write a DFlash drafter with random weights that fits a model, for tests of speculative decoding.",
        discussion: """
            The drafter (config.json and model.safetensors, the published format that --speculative reads) \
            has the model's hidden size, vocabulary and attention heads, reads up to 5 of its layers, and \
            drafts noise: about one token a round is accepted. Speculative output stays the model's own, \
            so it serves tests that speculative decoding is lossless (the server's among them), not speed.
            """)

    @Option(name: .shortAndLong, help: "The target: a .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct).")
    var model: String?
    @Option(help: "Write the drafter into this directory (created).") var export: String
    @Option(help: "Drafter layers.") var layers = 1
    @Option(help: "Seed of the weights.") var seed: UInt64 = 0

    func run() throws {
        try reportingErrors {
            let path = try model ?? DefaultModel.ensure(log: { Terminal.status($0) })
            let spec = try Model(path: path).spec
            let config = try RandomDrafter.export(matching: spec, layers: layers, seed: seed, to: export)
            let read = config["dflash_config"]?["target_layer_ids"]
            Terminal.status("Wrote a random DFlash drafter for \(URL(fileURLWithPath: path).lastPathComponent) to \(export): "
                            + "\(layers) layer(s), seed \(seed), reading target layers \(read?.serialized() ?? "?")")
        }
    }
}
