import ArgumentParser
import Foundation
import Fulgur

struct QuantizeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "quantize",
        abstract: "Write a BF16/F16/F32 checkpoint with experts in MXFP4 and other linear layers in FP8 (128x128 blocks).",
        discussion: """
            Embeddings, the LM head, norms, routers, biases and sinks stay as in the source. Prints each \
            quantized tensor's relative error and, when both checkpoints load, the top-1 agreement and KL \
            divergence of the quantized model's next-token distribution against the original's.
            """)

    @Argument(help: "Source Hugging Face checkpoint directory (config.json + safetensors).") var source: String
    @Argument(help: "Destination directory (created).") var destination: String
    @Option(name: .customLong("keep"), help: "Keep tensors whose name contains a match of this regular expression in the source precision (repeatable).")
    var keep: [String] = []
    @Flag(name: .customLong("no-report"), help: "Skip the quality report.") var noReport = false
    @Option(name: .customLong("prompt"), help: "Prompt for the agreement measurement (repeatable; default: three built-in prompts, or random token ids without a tokenizer).")
    var prompts: [String] = []

    static let defaultPrompts = [
        "The capital of France is Paris, and the capital of Germany is",
        "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
        "In 1969, astronauts landed on the Moon for the first time. The mission was called",
    ]

    func run() throws {
        try reportingErrors {
            let quantizer = try Quantizer(source: source, keep: keep)
            let bar = ProgressBar(label: "Quantizing")
            let errors = try quantizer.write(to: destination, progress: { bar.update($0, $1) })
            bar.finish()
            Terminal.status("Wrote \(destination)")
            guard !noReport else { return }
            var report = QuantizationReport(tensors: errors)
            do {
                let original = try Model(path: source), quantized = try Model(path: destination)
                let ids: [[Int]]
                if let tokenizer = try? Engine.loadTokenizer(modelPath: source) {
                    ids = (prompts.isEmpty ? Self.defaultPrompts : prompts).map { tokenizer.encode($0) }
                } else {
                    guard prompts.isEmpty else {
                        throw FulgurError(.usage, "\(source) has no tokenizer.json, so --prompt cannot be tokenized")
                    }
                    ids = QuantizationReport.randomPrompts(vocab: original.spec.vocabSize)
                }
                report.agreement = try QuantizationReport.compare(original: original, quantized: quantized, prompts: ids)
            } catch let e as FulgurError where e.kind != .usage {
                Terminal.status("Next-token agreement not measured: \(e.message)")
            }
            print(report.render())
        }
    }
}
