import ArgumentParser
import Fulgur
import FulgurCUDA
import Foundation

@main
struct FulgurCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fulgur",
        abstract: "Fast inference of Mixture-of-Experts language models.",
        subcommands: [Generate.self, Chat.self, Serve.self, Bench.self, Tokenize.self, Inspect.self, QuantizeCommand.self, Pull.self,
                      RandomModelCommand.self, RandomDrafterCommand.self])
}

/// Options every command that loads a model shares.
struct ModelOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: "A .gguf file or a Hugging Face checkpoint directory (default: SmolLM2-135M-Instruct, fetched on first use).")
    var model: String?

    @Option(help: "Context length in tokens (default: the model's, at most 8192).")
    var context: Int?

    @Flag(help: "Read the whole checkpoint into memory at load instead of on first use.")
    var prefault = false

    @Option(help: "Where to run: auto (the GPU when there is one and its kernels are built), cpu or cuda.")
    var device: DeviceChoice = .auto

    func load() throws -> Engine {
        let path = try model ?? DefaultModel.ensure(log: { Terminal.status($0) })
        let bar = ProgressBar(label: "Loading \(URL(fileURLWithPath: path).lastPathComponent)")
        let engine = try Engine(modelPath: path, contextLength: context, progress: { bar.update($0, $1) },
                                executor: device.executorFactory(log: { Terminal.status($0) }))
        bar.finish()
        if prefault { engine.model.prefault() }
        return engine
    }
}

/// DFlash options of generate and chat. The model's bundled drafter runs by default on a GPU.
struct SpeculativeOptions: ParsableArguments {
    @Option(help: "Decode speculatively with the DFlash drafter in this directory (default: the model's bundled drafter, on a GPU); prints acceptance and timing after the text.")
    var speculative: String?
    @Option(name: .customLong("block-size"), parsing: .unconditional, help: "Tokens per speculative block, 2...16 (default: the drafter's; \(BundledDrafter.defaultBlockSize) for a bundled one).")
    var blockSize: Int?
    @Flag(name: .customLong("no-speculative"), help: "Decode plainly, without the bundled DFlash drafter.")
    var disabled = false

    func validate() throws {
        if disabled && (speculative != nil || blockSize != nil) {
            throw ValidationError("--no-speculative turns DFlash off; it cannot go with --speculative or --block-size")
        }
    }

    /// Loads the drafter the options and the device choose into `engine`, if any, and says so.
    func apply(to engine: Engine) throws {
        let bundled = BundledDrafter.directory(forModel: engine.model.path)
        guard let choice = try BundledDrafter.choice(explicit: speculative, disabled: disabled, blockSize: blockSize,
                                                     onGPU: !(engine.generator.executor is CPUExecutor), bundled: bundled) else { return }
        try engine.useDrafter(directory: choice.directory, blockSize: choice.blockSize)
        if speculative == nil, blockSize == nil {
            Terminal.status("DFlash with the bundled drafter \(URL(fileURLWithPath: choice.directory).lastPathComponent), blocks of \(BundledDrafter.defaultBlockSize) (--no-speculative turns it off)")
        }
    }
}

// Numbers are parsed unconditionally so that `--temperature -1` reaches `validate` and gets
// its message, instead of the "-1" being taken for an option.
struct SamplingOptions: ParsableArguments {
    @Option(parsing: .unconditional, help: "Sampling temperature; 0 is greedy.") var temperature: Float = 0.7
    @Option(name: .customLong("top-k"), parsing: .unconditional, help: "Keep the k most likely tokens (0: off).") var topK: Int = 0
    @Option(name: .customLong("top-p"), parsing: .unconditional, help: "Keep the smallest set of tokens with this much probability.") var topP: Float = 0.9
    @Option(name: .customLong("min-p"), parsing: .unconditional, help: "Drop tokens less likely than min-p times the most likely one.") var minP: Float = 0
    @Option(help: "Random seed, for reproducible sampling.") var seed: UInt64?
    @Option(name: .customLong("max-tokens"), parsing: .unconditional, help: "Generate at most this many tokens.") var maxTokens: Int = 256
    @Option(name: .customLong("stop"), help: "Stop when the output contains this string (repeatable).") var stop: [String] = []
    @Flag(name: .customLong("ignore-eos"), help: "Keep generating past end-of-sequence tokens (for benchmarks).") var ignoreEOS = false

    /// The sampling parameters, checked before any model is loaded.
    func sampling() throws -> SamplingParameters {
        let s = SamplingParameters(temperature: temperature, topK: topK, topP: topP, minP: minP, seed: seed)
        try s.validate()
        guard maxTokens >= 1 else { throw FulgurError(.usage, "--max-tokens must be at least 1, got \(maxTokens)") }
        return s
    }

    func parameters(_ sampling: SamplingParameters, _ engine: Engine) -> GenerationParameters {
        GenerationParameters(maxTokens: maxTokens, sampling: sampling, stopStrings: stop,
                             stopTokenIds: ignoreEOS ? [] : Set(engine.stopTokenIds))
    }
}

/// Runs a command body, turning Fulgur errors into a one-line message and exit status 1.
@discardableResult
func reportingErrors<T>(_ body: () throws -> T) throws -> T {
    do {
        return try body()
    } catch let e as FulgurError {
        Terminal.error(e.message)
        throw ExitCode(1)
    } catch let e as CUDAError {
        Terminal.error(e.message)
        throw ExitCode(1)
    }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Continue a prompt and stream the text.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var sampling: SamplingOptions
    @Flag(help: "Wrap the prompt in the model's chat template as a user message.") var chat = false
    @Option(help: "System message (with --chat).") var system: String?
    @OptionGroup var speculative: SpeculativeOptions
    @Argument(help: "The prompt.") var prompt: String

    func run() throws {
        try reportingErrors {
            let samplingParameters = try sampling.sampling()
            let engine = try modelOptions.load()
            try speculative.apply(to: engine)
            let text = chat
                ? try engine.renderChat([ChatMessage(role: "system", content: system)].filter { $0.content != nil }
                    + [ChatMessage(role: "user", content: prompt)], addGenerationPrompt: true)
                : prompt
            if !chat { Terminal.out(prompt) }
            let result = try engine.generate(text: text, parameters: sampling.parameters(samplingParameters, engine)) { piece in
                Terminal.out(piece)
                return true
            }
            Terminal.out("\n")
            Terminal.status(Terminal.summary(result))
            if let stats = result.speculative { Terminal.status(stats.summary) }
        }
    }
}

struct Chat: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Talk with the model; /reset clears the history, /exit or Ctrl-D quits.")

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var sampling: SamplingOptions
    @Option(help: "System message.") var system: String?
    @Flag(help: "Print speed (and DFlash acceptance) after each answer.") var stats = false
    @OptionGroup var speculative: SpeculativeOptions

    func run() throws {
        try reportingErrors {
            let samplingParameters = try sampling.sampling()
            let engine = try modelOptions.load()
            try speculative.apply(to: engine)
            let parameters = sampling.parameters(samplingParameters, engine)
            var history: [ChatMessage] = system.map { [ChatMessage(role: "system", content: $0)] } ?? []
            Terminal.status("Chatting with \(engine.name). /reset clears the history, /exit or Ctrl-D quits.")
            while true {
                Terminal.out("> ")
                guard let line = readLine() else { Terminal.out("\n"); return }
                let input = line.trimmingCharacters(in: .whitespaces)
                if input.isEmpty { continue }
                if input == "/exit" || input == "/quit" { return }
                if input == "/reset" { history = history.filter { $0.role == "system" }; continue }
                history.append(ChatMessage(role: "user", content: input))
                do {
                    let prompt = try engine.renderChat(history, addGenerationPrompt: true)
                    let result = try engine.generate(text: prompt, parameters: parameters) { Terminal.out($0); return true }
                    Terminal.out("\n")
                    history.append(ChatMessage(role: "assistant", content: result.text))
                    if stats {
                        Terminal.status(Terminal.summary(result))
                        if let s = result.speculative { Terminal.status(s.summary) }
                    }
                } catch let e as FulgurError {
                    history.removeLast()
                    Terminal.error(e.message)
                }
            }
        }
    }
}

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Text in, token ids out as JSON; --decode does the reverse.")

    @OptionGroup var modelOptions: ModelOptions
    @Flag(help: "Read a JSON list of ids and print the text.") var decode = false
    @Flag(name: .customLong("no-special"), help: "Do not add the tokenizer's special tokens (BOS).") var noSpecial = false
    @Argument(help: "Text to tokenize, or a JSON list of ids with --decode; read from standard input when absent.") var input: String?

    func run() throws {
        try reportingErrors {
            let path = try modelOptions.model ?? DefaultModel.ensure(log: { Terminal.status($0) })
            let tokenizer = try Engine.loadTokenizer(modelPath: path)
            let text = input ?? String(decoding: FileHandle.standardInput.readDataToEndOfFile(), as: UTF8.self)
            if decode {
                guard let data = text.data(using: .utf8),
                      let ids = try? JSONSerialization.jsonObject(with: data) as? [Int] else {
                    throw FulgurError(.usage, "--decode expects a JSON list of token ids, e.g. [504, 3575]")
                }
                for id in ids where id < 0 || id >= tokenizer.vocabularySize {
                    throw FulgurError(.usage, "token id \(id) is outside the vocabulary (0..<\(tokenizer.vocabularySize))")
                }
                print(tokenizer.decode(ids))
            } else {
                let ids = tokenizer.encode(text, addSpecialTokens: !noSpecial)
                print("[" + ids.map(String.init).joined(separator: ", ") + "]")
            }
        }
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show a model's architecture, size, types, memory and layers.")

    @OptionGroup var modelOptions: ModelOptions
    @Flag(help: "List every tensor.") var tensors = false

    func run() throws {
        try reportingErrors {
            let path = try modelOptions.model ?? DefaultModel.ensure(log: { Terminal.status($0) })
            let model = try Model(path: path)
            print(ModelReport(model: model, context: modelOptions.context).render(listTensors: tensors))
        }
    }
}

struct Pull: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Fetch the default model into the cache (done automatically on first use).")

    func run() throws {
        try reportingErrors {
            print(try DefaultModel.ensure(log: { Terminal.status($0) }))
        }
    }
}
