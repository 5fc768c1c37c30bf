import Foundation
import Testing
@testable import Fulgur

// A missing, truncated or corrupt file, a wrong dtype or shape, an unknown architecture:
// each gives a FulgurError that names the file, the tensor or field, and what was expected.

// MARK: GGUF files

/// A small GGUF with metadata and two tensors, the last ending the file.
private func smallGGUF() -> [UInt8] {
    gguf([("general.architecture", .string("llama")), ("general.name", .strings(["x", "y"]))],
         tensors: [.f32("a.weight", [4, 2]), .f32("b.weight", [8])])
}

@Test func randomBytesAreNotAGGUF() throws {
    var rng = SeededGenerator(seed: 1)
    let path = try temporaryFile("random.gguf", (0..<256).map { _ in UInt8.random(in: 0...255, using: &rng) })
    expectError([path, "not a GGUF file", "'GGUF'"]) { _ = try GGUFFile(path: path) }
}

@Test func unsupportedGGUFVersionIsNamed() throws {
    let path = try temporaryFile("v7.gguf", gguf([], version: 7))
    expectError([path, "version 7", "expected 2 or 3"]) { _ = try GGUFFile(path: path) }
}

@Test func everyTruncationOfAGGUFIsAnError() throws {
    let bytes = smallGGUF()
    let dir = try temporaryDirectory()
    _ = try GGUFFile(path: try temporaryFile("whole.gguf", bytes))
    for length in 0..<bytes.count {
        let path = dir + "/cut-\(length).gguf"
        try Data(bytes[..<length]).write(to: URL(fileURLWithPath: path))
        expectError([path]) { _ = try GGUFFile(path: path) }
    }
}

@Test func ggufTensorDataPastTheEndNamesTheTensor() throws {
    let path = try temporaryFile("short.gguf", Array(smallGGUF().dropLast(4)))
    expectError([path, "'b.weight'", "runs past the end of the file", "truncated"]) { _ = try GGUFFile(path: path) }
}

@Test func unsupportedGGMLTypeNamesTensorAndType() throws {
    let q5k = GGUFTestTensor(name: "blk.0.attn_q.weight", type: 13, dims: [256], data: Array(repeating: 0, count: 176))
    let path = try temporaryFile("q5k.gguf", gguf([], tensors: [q5k]))
    expectError([path, "'blk.0.attn_q.weight'", "ggml type 13", "supported: F32"]) { _ = try GGUFFile(path: path) }
}

@Test func rowLengthNotAMultipleOfTheBlockIsAnError() throws {
    let q8 = GGUFTestTensor(name: "w", type: 8, dims: [31, 2], data: Array(repeating: 0, count: 68))
    let path = try temporaryFile("rows.gguf", gguf([], tensors: [q8]))
    expectError([path, "'w'", "row length 31", "block size 32"]) { _ = try GGUFFile(path: path) }
}

@Test func ggufShapeTooLargeToAddressIsAnError() throws {
    let huge = GGUFTestTensor(name: "huge", type: 0, dims: [1 << 39, 1 << 39], data: [0, 0, 0, 0])
    let path = try temporaryFile("huge.gguf", gguf([], tensors: [huge]))
    expectError([path, "'huge'", "too large"]) { _ = try GGUFFile(path: path) }
}

@Test func emptyDirectoryAndMissingPathsAreErrors() throws {
    let empty = try temporaryFile("empty.gguf", [])
    expectError([empty, "empty"]) { _ = try GGUFFile(path: empty) }
    let dir = try temporaryDirectory()
    expectError([dir, "is a directory"]) { _ = try GGUFFile(path: dir) }
    expectError(["/nonexistent/model.gguf", "No such file"]) { _ = try GGUFFile(path: "/nonexistent/model.gguf") }
    expectError(["/nonexistent/model.gguf", "no such file"]) { _ = try Model(path: "/nonexistent/model.gguf") }
    expectError([empty, "empty"]) { _ = try Model(path: empty) }
}

// MARK: GGUF models

private func tinyLlama(_ name: String, metadata: [(String, GGUFTestValue)] = TinyLlamaGGUF.metadata,
                       tensors: [GGUFTestTensor] = TinyLlamaGGUF.tensors) throws -> String {
    try temporaryFile(name, gguf(metadata, tensors: tensors))
}

@Test func tinyLlamaGGUFLoadsAndRuns() throws {
    let model = try Model(path: try tinyLlama("tiny.gguf"))
    #expect(model.spec.layerCount == 1)
    #expect(try CPUExecutor(plan: model.plan).forward([1, 2, 3]).count == 8)
}

@Test func ggufArchitectureOtherThanLlamaIsNamed() throws {
    var metadata = TinyLlamaGGUF.metadata
    metadata[0] = ("general.architecture", .string("qwen2"))
    let qwen2 = try tinyLlama("qwen2.gguf", metadata: metadata)
    expectError([qwen2, "'qwen2'", "not supported", "supported: llama"]) { _ = try Model(path: qwen2) }
    let none = try tinyLlama("none.gguf", metadata: Array(metadata.dropFirst()))
    expectError([none, "'general.architecture'", "missing"]) { _ = try Model(path: none) }
}

@Test func ggufMissingLayerTensorIsNamed() throws {
    let path = try tinyLlama("missing.gguf", tensors: TinyLlamaGGUF.tensors.filter { $0.name != "blk.0.attn_k.weight" })
    expectError([path, "'blk.0.attn_k.weight'", "missing"]) { _ = try Model(path: path) }
}

@Test func ggufWrongTensorShapeNamesActualAndExpected() throws {
    let tensors = TinyLlamaGGUF.tensors.map { $0.name == "blk.0.ffn_down.weight" ? .f32($0.name, [32, 64]) : $0 }
    let path = try tinyLlama("shape.gguf", tensors: tensors)
    expectError([path, "'blk.0.ffn_down.weight'", "has shape [64, 32]", "expected [32, 64]"]) { _ = try Model(path: path) }
}

@Test func ggufBadHeadCountsAreNamed() throws {
    var zeroHeads = TinyLlamaGGUF.metadata
    zeroHeads[2] = ("llama.attention.head_count", .uint32(0))
    let zero = try tinyLlama("zero.gguf", metadata: zeroHeads)
    expectError([zero, "'llama.attention.head_count'", "positive integer"]) { _ = try Model(path: zero) }
    let ragged = try tinyLlama("ragged.gguf", metadata: TinyLlamaGGUF.metadata + [("llama.attention.head_count_kv", .uint32(3))])
    expectError([ragged, "layer 0", "3 key/value heads", "dividing attention heads"]) { _ = try Model(path: ragged) }
}

// MARK: safetensors files

private func safetensorsFile(_ header: String, data: [UInt8] = [], headerLength: UInt64? = nil) throws -> String {
    var bytes: [UInt8] = []
    withUnsafeBytes(of: (headerLength ?? UInt64(header.utf8.count)).littleEndian) { bytes += $0 }
    bytes += header.utf8
    bytes += data
    return try temporaryFile("model.safetensors", bytes)
}

@Test func truncatedSafetensorsCheckpointIsNamed() throws {
    let dir = try copyOfFixtureModel("llama")
    let file = dir + "/model.safetensors"
    let whole = try Data(contentsOf: URL(fileURLWithPath: file))
    for length in [4, 100, whole.count / 2, whole.count - 1] {
        try whole.prefix(length).write(to: URL(fileURLWithPath: file))
        expectError([file]) { _ = try Model(path: dir) }
    }
    try whole.prefix(whole.count / 2).write(to: URL(fileURLWithPath: file))
    expectError([file, "outside the data section", "truncated or corrupt"]) { _ = try Model(path: dir) }
}

@Test func safetensorsHeaderErrorsAreNamed() throws {
    let long = try safetensorsFile("{}", headerLength: 1000)
    expectError([long, "header length 1000", "does not fit the file"]) { _ = try SafetensorsFile(path: long) }
    let notJSON = try safetensorsFile("{not json")
    expectError([notJSON, "header is not valid JSON"]) { _ = try SafetensorsFile(path: notJSON) }
    let list = try safetensorsFile("[1, 2]")
    expectError([list, "not a JSON object"]) { _ = try SafetensorsFile(path: list) }
    let noOffsets = try safetensorsFile(#"{"w": {"dtype": "F32", "shape": [1]}}"#, data: [0, 0, 0, 0])
    expectError([noOffsets, "'w'", "data_offsets"]) { _ = try SafetensorsFile(path: noOffsets) }
}

@Test func safetensorsOffsetsOutsideTheDataAreNamed() throws {
    let path = try safetensorsFile(#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, data: [UInt8](repeating: 0, count: 8))
    expectError([path, "'w'", "[0, 16]", "outside the data section (8 bytes)"]) { _ = try SafetensorsFile(path: path) }
}

@Test func safetensorsByteCountMustMatchDtypeAndShape() throws {
    let path = try safetensorsFile(#"{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}"#, data: [UInt8](repeating: 0, count: 12))
    expectError([path, "'w'", "should take 16 bytes", "span 12"]) { _ = try SafetensorsFile(path: path) }
    let huge = try safetensorsFile(#"{"w": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}}"#, data: [0, 0, 0, 0])
    expectError([huge, "'w'", "too large"]) { _ = try SafetensorsFile(path: huge) }
}

@Test func unsupportedSafetensorsDtypeIsNamed() throws {
    let path = try safetensorsFile(#"{"w": {"dtype": "F64", "shape": [1], "data_offsets": [0, 8]}}"#, data: [UInt8](repeating: 0, count: 8))
    expectError([path, "'w'", "dtype F64", "supported: F32"]) { _ = try SafetensorsFile(path: path) }
}

// MARK: safetensors checkpoints

/// A copy of the tiny llama with its tensors rewritten by `edit`.
private func editedLlama(_ edit: (inout [SafetensorsTestTensor]) -> Void) throws -> String {
    let dir = try copyOfFixtureModel("llama")
    var tensors = try safetensorsTensors(dir + "/model.safetensors")
    edit(&tensors)
    try Data(safetensors(tensors)).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
    return dir
}

@Test func rewrittenTinyLlamaStillLoads() throws {
    let dir = try editedLlama { _ in }
    #expect(try Model(path: dir).spec.layerCount == 2)
}

@Test func missingCheckpointTensorIsNamed() throws {
    let dir = try editedLlama { $0.removeAll { $0.name == "model.layers.1.mlp.down_proj.weight" } }
    expectError([dir, "'model.layers.1.mlp.down_proj.weight'", "missing"]) { _ = try Model(path: dir) }
}

@Test func wrongCheckpointShapeNamesActualAndExpected() throws {
    let dir = try editedLlama { ts in
        let i = ts.firstIndex { $0.name == "model.layers.0.mlp.down_proj.weight" }!
        ts[i].shape = [128, 64]
    }
    expectError([dir, "'model.layers.0.mlp.down_proj.weight'", "has shape [128, 64]", "expected [64, 128]"]) { _ = try Model(path: dir) }
}

/// An FP8 tensor in a checkpoint whose config declares no quantization, or where FP8 makes
/// no sense (norms, embeddings), is refused at load with the tensor's name.
@Test func fp8WeightsWithoutQuantizationConfigAreRefusedAtLoad() throws {
    func asFP8(_ name: String) throws -> String {
        try editedLlama { ts in
            let i = ts.firstIndex { $0.name == name }!
            ts[i].dtype = "F8_E4M3"
            ts[i].data = Array(repeating: 0x38, count: ts[i].shape.reduce(1, *))
        }
    }
    let linear = try asFP8("model.layers.0.self_attn.q_proj.weight")
    expectError([linear, "'model.layers.0.self_attn.q_proj.weight'", "F8_E4M3", "no quantization_config"]) { _ = try Model(path: linear) }
    let norm = try asFP8("model.norm.weight")
    expectError([norm, "'model.norm.weight'", "fp8e4m3", "cannot convert to f32"]) { _ = try Model(path: norm) }
    let embedding = try asFP8("model.embed_tokens.weight")
    expectError([embedding, "'model.embed_tokens.weight'", "fp8e4m3"]) { _ = try Model(path: embedding) }
}

/// Splits the tiny llama's tensors over two shards with an index, as large checkpoints come.
private func shardedLlama(extraIndexEntries: [String: String] = [:]) throws -> String {
    let dir = try copyOfFixtureModel("llama")
    let tensors = try safetensorsTensors(dir + "/model.safetensors")
    try FileManager.default.removeItem(atPath: dir + "/model.safetensors")
    let names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    let half = tensors.count / 2
    let shards = [Array(tensors[..<half]), Array(tensors[half...])]
    var weightMap = extraIndexEntries
    for (name, shard) in zip(names, shards) {
        try Data(safetensors(shard)).write(to: URL(fileURLWithPath: dir + "/" + name))
        for t in shard { weightMap[t.name] = name }
    }
    let index = try JSONSerialization.data(withJSONObject: ["metadata": [String: String](), "weight_map": weightMap])
    try index.write(to: URL(fileURLWithPath: dir + "/model.safetensors.index.json"))
    return dir
}

@Test func shardedCheckpointGivesTheSameLogitsAsOneFile() throws {
    let single = try Model(path: Fixtures.path("models/llama"))
    let sharded = try Model(path: try shardedLlama())
    #expect((sharded.tensors as? SafetensorsCheckpoint)?.shards.count == 2)
    let ids = [1, 17, 42, 99, 3, 250]
    let a = try CPUExecutor(plan: single.plan).forward(ids, logits: .all)
    let b = try CPUExecutor(plan: sharded.plan).forward(ids, logits: .all)
    #expect(a == b)
}

@Test func indexNamingAMissingShardIsAnError() throws {
    let dir = try shardedLlama(extraIndexEntries: ["model.extra.weight": "model-00003-of-00002.safetensors"])
    expectError([dir + "/model.safetensors.index.json", "'model-00003-of-00002.safetensors'", "missing"]) { _ = try Model(path: dir) }
}

@Test func indexNamingATensorAbsentFromItsShardIsAnError() throws {
    let dir = try shardedLlama(extraIndexEntries: ["model.extra.weight": "model-00001-of-00002.safetensors"])
    expectError([dir + "/model-00001-of-00002.safetensors", "'model.extra.weight'", "not in the shard"]) { _ = try Model(path: dir) }
}

@Test func indexThatIsNotJSONIsAnError() throws {
    let dir = try shardedLlama()
    let index = dir + "/model.safetensors.index.json"
    try Data("{ not json".utf8).write(to: URL(fileURLWithPath: index))
    expectError([index, "weight_map"]) { _ = try Model(path: dir) }
}

// MARK: config.json

/// A copy of a tiny checkpoint whose config.json is rewritten by `edit`.
private func editedConfig(_ model: String = "llama", _ edit: (inout [String: Any]) -> Void) throws -> String {
    let dir = try copyOfFixtureModel(model)
    let path = dir + "/config.json"
    var config = try #require(try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any])
    edit(&config)
    try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: path))
    return dir
}

@Test func missingOrUnreadableConfigIsNamed() throws {
    let missing = try copyOfFixtureModel("llama")
    try FileManager.default.removeItem(atPath: missing + "/config.json")
    expectError([missing + "/config.json", "cannot read"]) { _ = try Model(path: missing) }
    let notJSON = try copyOfFixtureModel("llama")
    try Data("{\"hidden_size\": ".utf8).write(to: URL(fileURLWithPath: notJSON + "/config.json"))
    expectError([notJSON + "/config.json", "not valid JSON"]) { _ = try Model(path: notJSON) }
}

@Test func missingOrMistypedConfigFieldIsNamed() throws {
    let missing = try editedConfig { $0["hidden_size"] = nil }
    expectError([missing + "/config.json", "'hidden_size'", "missing", "expected a non-negative integer"]) { _ = try Model(path: missing) }
    let string = try editedConfig { $0["hidden_size"] = "64" }
    expectError([string + "/config.json", "'hidden_size'", "is 64", "expected a non-negative integer"]) { _ = try Model(path: string) }
    let negative = try editedConfig { $0["num_hidden_layers"] = -2 }
    expectError([negative + "/config.json", "'num_hidden_layers'", "expected a non-negative integer"]) { _ = try Model(path: negative) }
    let zeroHeads = try editedConfig { $0["num_attention_heads"] = 0 }
    expectError([zeroHeads + "/config.json", "'num_attention_heads'", "positive integer"]) { _ = try Model(path: zeroHeads) }
    let flag = try editedConfig { $0["tie_word_embeddings"] = "yes" }
    expectError([flag + "/config.json", "'tie_word_embeddings'", "true or false"]) { _ = try Model(path: flag) }
}

@Test func unknownArchitectureListsTheSupportedOnes() throws {
    let dir = try editedConfig { $0["architectures"] = ["Qwen2ForCausalLM"] }
    expectError([dir + "/config.json", "'Qwen2ForCausalLM'", "not supported", "LlamaForCausalLM", "Qwen3MoeForCausalLM"]) {
        _ = try Model(path: dir)
    }
    let none = try editedConfig { $0["architectures"] = nil }
    expectError([none + "/config.json", "'architectures'", "missing"]) { _ = try Model(path: none) }
}

@Test func layerTypesOfTheWrongCountAreAnError() throws {
    let dir = try editedConfig("qwen3") {
        $0["use_sliding_window"] = true
        $0["sliding_window"] = 8
        $0["layer_types"] = ["full_attention"]
    }
    expectError([dir + "/config.json", "'layer_types' has 1 entries", "num_hidden_layers = 2"]) { _ = try Model(path: dir) }
}

// MARK: the command line

private struct CLIResult {
    let status: Int32
    let exitedNormally: Bool
    let stderr: String
}

/// Runs the built `fulgur` executable, which `swift build` puts next to the test bundle.
private func runCLI(_ arguments: [String]) throws -> CLIResult {
    let executable = Bundle.module.bundleURL.deletingLastPathComponent().appendingPathComponent("fulgur")
    try #require(FileManager.default.isExecutableFile(atPath: executable.path), "build the CLI first: swift build")
    let process = Process()
    process.executableURL = executable
    process.arguments = arguments
    var environment = ProcessInfo.processInfo.environment
    // Nothing may fall back to (or download) the default model.
    environment["FULGUR_CACHE"] = try temporaryDirectory()
    environment["FULGUR_DEFAULT_MODEL"] = nil
    process.environment = environment
    let errors = Pipe()
    process.standardError = errors
    process.standardOutput = FileHandle.nullDevice
    try process.run()
    let data = errors.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return CLIResult(status: process.terminationStatus, exitedNormally: process.terminationReason == .exit,
                     stderr: String(decoding: data, as: UTF8.self))
}

private func expectCLIError(_ arguments: [String], _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation) throws {
    let r = try runCLI(arguments)
    #expect(r.exitedNormally, "killed by signal \(r.status): \(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.status == 1, "\(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.stderr.hasPrefix("error: "), "\(r.stderr)", sourceLocation: sourceLocation)
    for f in fragments { #expect(r.stderr.contains(f), "\(r.stderr)", sourceLocation: sourceLocation) }
}

@Test func cliReportsMissingAndCorruptModels() throws {
    try expectCLIError(["generate", "-m", "/nonexistent/model.gguf", "hi"], ["/nonexistent/model.gguf", "no such file"])
    try expectCLIError(["inspect", "-m", "/nonexistent/model.gguf"], ["/nonexistent/model.gguf", "no such file"])
    let corrupt = try temporaryFile("corrupt.gguf", Array(smallGGUF().dropLast(4)))
    try expectCLIError(["inspect", "-m", corrupt], [corrupt, "'b.weight'", "runs past the end"])
    let random = try temporaryFile("random.gguf", Array(repeating: 0x5A, count: 64))
    try expectCLIError(["generate", "-m", random, "hi"], [random, "not a GGUF file"])
}

/// Options are checked before the model is loaded, so a bad one is reported as itself.
@Test func cliRejectsBadSamplingOptions() throws {
    let missing = "/nonexistent/model.gguf"
    try expectCLIError(["generate", "-m", missing, "--temperature", "-1", "hi"], ["temperature must be >= 0, got -1"])
    try expectCLIError(["generate", "-m", missing, "--top-p", "0", "hi"], ["top-p must be in (0, 1], got 0"])
    try expectCLIError(["generate", "-m", missing, "--min-p", "2", "hi"], ["min-p must be in [0, 1], got 2"])
    try expectCLIError(["generate", "-m", missing, "--top-k", "-3", "hi"], ["top-k must be >= 0, got -3"])
    try expectCLIError(["generate", "-m", missing, "--max-tokens", "0", "hi"], ["--max-tokens must be at least 1"])
}

@Test func cliRejectsTokenIdsOutsideTheVocabulary() throws {
    let tokenizer = try temporaryFile("tokenizer.gguf", gguf([
        ("tokenizer.ggml.model", .string("gpt2")), ("tokenizer.ggml.tokens", .strings(["a", "b", "c"])),
        ("tokenizer.ggml.merges", .strings([])), ("tokenizer.ggml.pre", .string("gpt2")),
    ]))
    try expectCLIError(["tokenize", "-m", tokenizer, "--decode", "[1, 99999999]"], ["token id 99999999", "outside the vocabulary (0..<3)"])
    try expectCLIError(["tokenize", "-m", tokenizer, "--decode", "[1, \"a\"]"], ["--decode expects a JSON list of token ids"])
}

/// Unknown or inconsistent quantization metadata on a quantized checkpoint: a clear error
/// that names the file and the field or tensor.
@Test func unknownOrInconsistentQuantizationMetadataIsRefused() throws {
    func edited(_ edit: (inout [String: Any]) -> Void) throws -> String {
        let dir = try copyOfFixtureModel("mimo_v2_flash_quantized")
        let path = dir + "/config.json"
        var config = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as! [String: Any]
        var q = config["quantization_config"] as! [String: Any]
        var wrapper: [String: Any] = ["q": q]
        edit(&wrapper)
        q = wrapper["q"] as? [String: Any] ?? [:]
        if wrapper["q"] == nil { config.removeValue(forKey: "quantization_config") } else { config["quantization_config"] = q }
        try JSONSerialization.data(withJSONObject: config).write(to: URL(fileURLWithPath: path))
        return dir
    }
    func setting(_ key: String, _ value: Any) throws -> String {
        try edited { w in var q = w["q"] as! [String: Any]; q[key] = value; w["q"] = q }
    }
    let unknownMethod = try setting("quant_method", "awq")
    expectError([unknownMethod, "quant_method 'awq'", "not supported"]) { _ = try Model(path: unknownMethod) }
    let oblong = try setting("weight_block_size", [128, 64])
    expectError([oblong, "weight_block_size", "square"]) { _ = try Model(path: oblong) }
    let format = try setting("fmt", "e5m2")
    expectError([format, "fmt 'e5m2'"]) { _ = try Model(path: format) }
    let noMXFP4 = try setting("store_dtype", "fp8")
    expectError([noMXFP4, "MXFP4", "store_dtype: mxfp4"]) { _ = try Model(path: noMXFP4) }
    let missing = try edited { $0["q"] = nil }
    expectError([missing, "F8_E4M3", "no quantization_config"]) { _ = try Model(path: missing) }
}
