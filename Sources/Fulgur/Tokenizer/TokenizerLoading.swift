import Foundation

extension Tokenizer {
    /// From llama.cpp metadata: `tokenizer.ggml.model` must be "gpt2" (byte-level BPE);
    /// `tokenizer.ggml.pre` names the pre-tokenizer. Token type 3 (control) becomes a special
    /// added token, 4 (user-defined) a plain added token, both matched verbatim in text.
    public convenience init(gguf: GGUFFile) throws {
        try self.init(Self.definition(gguf: gguf), source: gguf.path)
    }

    static func definition(gguf: GGUFFile) throws -> Definition {
        let path = gguf.path
        let meta = gguf.metadata
        func missing(_ key: String, _ expected: String) -> FulgurError {
            FulgurError(.tokenizer, "\(path): metadata '\(key)' is missing or not \(expected)")
        }
        guard let model = meta["tokenizer.ggml.model"]?.string else { throw missing("tokenizer.ggml.model", "a string") }
        guard model == "gpt2" else {
            throw FulgurError(.unsupported, "\(path): tokenizer.ggml.model is '\(model)'; Fulgur reads only 'gpt2' (byte-level BPE)")
        }
        guard let tokens = meta["tokenizer.ggml.tokens"]?.strings, !tokens.isEmpty else {
            throw missing("tokenizer.ggml.tokens", "an array of strings")
        }
        guard let mergeLines = meta["tokenizer.ggml.merges"]?.strings else {
            throw missing("tokenizer.ggml.merges", "an array of strings")
        }
        guard let preName = meta["tokenizer.ggml.pre"]?.string else { throw missing("tokenizer.ggml.pre", "a string") }
        guard let pre = PreTokenizer(ggufName: preName) else {
            throw FulgurError(.unsupported, "\(path): pre-tokenizer '\(preName)' (tokenizer.ggml.pre) is not implemented; Fulgur knows gpt2, smollm, starcoder, refact, llama-bpe, qwen2")
        }
        var merges: [(String, String)] = []
        merges.reserveCapacity(mergeLines.count)
        for (i, line) in mergeLines.enumerated() {
            guard let space = line.firstIndex(of: " ") else {
                throw FulgurError(.tokenizer, "\(path): tokenizer.ggml.merges[\(i)] is '\(line)', expected two tokens separated by a space")
            }
            merges.append((String(line[..<space]), String(line[line.index(after: space)...])))
        }
        var added: [AddedToken] = []
        if let types = meta["tokenizer.ggml.token_type"]?.array {
            guard types.count == tokens.count else {
                throw FulgurError(.tokenizer, "\(path): tokenizer.ggml.token_type has \(types.count) entries for \(tokens.count) tokens")
            }
            for (id, type) in types.enumerated() where type.int == 3 || type.int == 4 {
                added.append(AddedToken(content: tokens[id], id: id, special: type.int == 3))
            }
        }
        func tokenId(_ key: String) throws -> Int? {
            guard let value = meta[key] else { return nil }
            guard let id = value.int, id >= 0, id < tokens.count else {
                throw FulgurError(.tokenizer, "\(path): \(key) is \(value), not a token id below \(tokens.count)")
            }
            return id
        }
        var d = Definition(tokens: tokens, merges: merges, added: added, preTokenizer: pre)
        // llama.cpp's defaults: Llama 3 vocabularies add BOS and look whole pieces up first.
        d.ignoreMerges = pre == .llama3
        d.bosTokenId = try tokenId("tokenizer.ggml.bos_token_id")
        let eos = try tokenId("tokenizer.ggml.eos_token_id")
        d.eosTokenIds = try [eos, tokenId("tokenizer.ggml.eot_token_id"), tokenId("tokenizer.ggml.eom_token_id")]
            .compactMap { $0 }.uniqued()
        d.unknownToken = try tokenId("tokenizer.ggml.unknown_token_id").map { tokens[$0] }
        if meta["tokenizer.ggml.add_bos_token"]?.bool ?? (pre == .llama3), let bos = d.bosTokenId { d.prefixIds = [bos] }
        if meta["tokenizer.ggml.add_eos_token"]?.bool ?? false, let eos { d.suffixIds = [eos] }
        return d
    }

    /// From a Hugging Face `tokenizer.json`, with `tokenizer_config.json` (optional) naming the
    /// BOS and EOS tokens and overriding whether BOS/EOS are added (`add_bos_token`).
    public convenience init(tokenizerJSON path: String, configPath: String? = nil) throws {
        let root = try JSONFile(path: path)
        let config = try configPath.map { try JSONFile(path: $0) }
        try self.init(Self.definition(tokenizerJSON: root, config: config), source: path)
    }

    static func definition(tokenizerJSON json: JSONFile, config: JSONFile?) throws -> Definition {
        let model = try json.object(json.root, "model")
        if let type = model["type"] as? String, type != "BPE" {
            throw FulgurError(.unsupported, "\(json.path): model.type is '\(type)'; Fulgur reads only byte-level 'BPE'")
        }
        let vocab = try json.object(model, "vocab", in: "model")
        var tokens: [String?] = []
        for (token, value) in vocab {
            guard let id = value as? Int, id >= 0, id < 1 << 24 else {
                throw json.error("model.vocab['\(token)'] is \(value), expected a token id")
            }
            if id >= tokens.count { tokens += [String?](repeating: nil, count: id + 1 - tokens.count) }
            tokens[id] = token
        }
        guard let mergeList = model["merges"] as? [Any] else { throw json.error("field 'model.merges' is missing or not an array") }
        var merges: [(String, String)] = []
        merges.reserveCapacity(mergeList.count)
        for (i, entry) in mergeList.enumerated() {
            // Older files write "a b", newer ones ["a", "b"].
            if let pair = entry as? [String], pair.count == 2 {
                merges.append((pair[0], pair[1]))
            } else if let line = entry as? String, let space = line.firstIndex(of: " ") {
                merges.append((String(line[..<space]), String(line[line.index(after: space)...])))
            } else {
                throw json.error("model.merges[\(i)] is \(entry), expected \"a b\" or [\"a\", \"b\"]")
            }
        }
        var added: [AddedToken] = []
        for (i, entry) in (json.root["added_tokens"] as? [[String: Any]] ?? []).enumerated() {
            guard let id = entry["id"] as? Int, let content = entry["content"] as? String else {
                throw json.error("added_tokens[\(i)] needs an integer 'id' and a string 'content'")
            }
            // These change which text a match swallows; refuse rather than give other ids.
            for option in ["lstrip", "rstrip", "single_word"] where entry[option] as? Bool == true {
                throw FulgurError(.unsupported, "\(json.path): added token '\(content)' sets \(option), which Fulgur does not implement")
            }
            added.append(AddedToken(content: content, id: id, special: entry["special"] as? Bool ?? false))
        }

        var d = Definition(tokens: tokens, merges: merges, added: added,
                           preTokenizer: try preTokenizer(json.root["pre_tokenizer"], json))
        d.normalizesToNFC = try normalizesToNFC(json.root["normalizer"], json)
        d.ignoreMerges = model["ignore_merges"] as? Bool ?? false
        d.unknownToken = model["unk_token"] as? String
        (d.prefixIds, d.suffixIds) = try template(json.root["post_processor"], json)

        func id(ofConfigToken key: String) throws -> Int? {
            guard let config, let value = config.root[key], !(value is NSNull) else { return nil }
            guard let name = value as? String ?? (value as? [String: Any])?["content"] as? String else {
                throw config.error("'\(key)' is \(value), expected a token or {\"content\": token}")
            }
            guard let id = added.first(where: { $0.content == name })?.id ?? vocab[name] as? Int else {
                throw config.error("'\(key)' is '\(name)', which is not in the vocabulary of \(json.path)")
            }
            return id
        }
        d.bosTokenId = try id(ofConfigToken: "bos_token")
        d.eosTokenIds = try id(ofConfigToken: "eos_token").map { [$0] } ?? []
        if let addBOS = config?.root["add_bos_token"] as? Bool, let bos = d.bosTokenId {
            d.prefixIds = addBOS ? [bos] : d.prefixIds.filter { $0 != bos }
        }
        if let addEOS = config?.root["add_eos_token"] as? Bool, let eos = d.eosTokenIds.first {
            d.suffixIds = addEOS ? [eos] : d.suffixIds.filter { $0 != eos }
        }
        return d
    }

    /// Recognizes the pre-tokenizer configurations of the families `PreTokenizer` implements.
    private static func preTokenizer(_ value: Any?, _ json: JSONFile) throws -> PreTokenizer {
        func signature(_ step: [String: Any]) -> String {
            switch step["type"] as? String {
            case "ByteLevel":
                if step["add_prefix_space"] as? Bool == true { return "ByteLevel(add_prefix_space)" }
                return step["use_regex"] as? Bool ?? true ? "ByteLevel(regex)" : "ByteLevel"
            case "Digits":
                return step["individual_digits"] as? Bool == true ? "Digits(individual)" : "Digits"
            case "Split":
                let pattern = (step["pattern"] as? [String: Any])?["Regex"] as? String ?? "?"
                let behavior = step["behavior"] as? String
                let invert = step["invert"] as? Bool ?? false
                // Both settings keep exactly the matches when the regex covers all text.
                let keepsMatches = (behavior == "Isolated" && !invert) || (behavior == "Removed" && invert)
                return keepsMatches ? "Split(\(pattern))" : "Split(\(pattern), \(behavior ?? "?"), invert: \(invert))"
            case let type:
                return type ?? "?"
            }
        }
        let step = value as? [String: Any] ?? [:]
        let steps = step["type"] as? String == "Sequence" ? (step["pretokenizers"] as? [[String: Any]] ?? []) : [step]
        switch steps.map(signature) {
        case ["ByteLevel(regex)"]: return .gpt2
        case ["Digits(individual)", "ByteLevel(regex)"]: return .smollm
        case ["Split(\(PreTokenizer.llama3Pattern))", "ByteLevel"]: return .llama3
        case ["Split(\(PreTokenizer.qwen2Pattern))", "ByteLevel"]: return .qwen2
        case let other:
            throw FulgurError(.unsupported, "\(json.path): pre_tokenizer [\(other.joined(separator: ", "))] is not implemented; Fulgur knows GPT-2 ByteLevel, SmolLM Digits+ByteLevel, and the Llama 3 and Qwen2 Split regexes")
        }
    }

    private static func normalizesToNFC(_ value: Any?, _ json: JSONFile) throws -> Bool {
        guard let step = value as? [String: Any] else { return false }
        switch step["type"] as? String {
        case "NFC": return true
        case "Sequence":
            return try (step["normalizers"] as? [Any] ?? []).reduce(false) { try $0 || normalizesToNFC($1, json) }
        case let type:
            throw FulgurError(.unsupported, "\(json.path): normalizer '\(type ?? "?")' is not implemented; Fulgur knows NFC")
        }
    }

    /// Ids the post-processor puts before and after a single sequence.
    private static func template(_ value: Any?, _ json: JSONFile) throws -> ([Int], [Int]) {
        guard let step = value as? [String: Any] else { return ([], []) }
        switch step["type"] as? String {
        case "ByteLevel": return ([], [])  // only adjusts offsets
        case "Sequence":
            var prefix: [Int] = [], suffix: [Int] = []
            for inner in step["processors"] as? [Any] ?? [] {
                let (p, s) = try template(inner, json)
                prefix = p + prefix
                suffix += s
            }
            return (prefix, suffix)
        case "TemplateProcessing":
            let specials = step["special_tokens"] as? [String: [String: Any]] ?? [:]
            var prefix: [Int] = [], suffix: [Int] = []
            var seenSequence = false
            for item in step["single"] as? [[String: Any]] ?? [] {
                if item["Sequence"] != nil {
                    seenSequence = true
                } else if let name = (item["SpecialToken"] as? [String: Any])?["id"] as? String {
                    guard let ids = specials[name]?["ids"] as? [Int] else {
                        throw json.error("post_processor uses '\(name)', which post_processor.special_tokens does not define")
                    }
                    if seenSequence { suffix += ids } else { prefix += ids }
                }
            }
            return (prefix, suffix)
        case let type:
            throw FulgurError(.unsupported, "\(json.path): post_processor '\(type ?? "?")' is not implemented; Fulgur knows ByteLevel and TemplateProcessing")
        }
    }
}

/// A parsed JSON object file; errors name the file.
struct JSONFile {
    let path: String
    let root: [String: Any]

    init(path: String) throws {
        let data: Data
        do {
            data = try Data(contentsOf: URL(fileURLWithPath: path))
        } catch {
            throw FulgurError(.io, "\(path): cannot read (\(error.localizedDescription))")
        }
        guard let root = (try? JSONSerialization.jsonObject(with: data)) as? [String: Any] else {
            throw FulgurError(.format, "\(path): not a JSON object")
        }
        self.path = path
        self.root = root
    }

    func error(_ message: String) -> FulgurError { FulgurError(.tokenizer, "\(path): \(message)") }

    func object(_ parent: [String: Any], _ key: String, in parentName: String? = nil) throws -> [String: Any] {
        guard let value = parent[key] as? [String: Any] else {
            throw error("field '\(parentName.map { "\($0)." } ?? "")\(key)' is missing or not an object")
        }
        return value
    }
}

extension Array where Element: Hashable {
    func uniqued() -> [Element] {
        var seen = Set<Element>()
        return filter { seen.insert($0).inserted }
    }
}
