import Fulgur

/// Limits the operator sets on every request.
public struct RequestLimits: Sendable {
    /// The most tokens one request may ask for; also the default when it names none.
    public var maxTokens: Int
    public var maxBodyBytes: Int
    /// Seconds a client has to send a request body (else 408). A connection that stalls
    /// before its request head, or sits idle between requests, is closed after twice this.
    public var requestTimeout: Double

    public init(maxTokens: Int = 4096, maxBodyBytes: Int = 4 << 20, requestTimeout: Double = 30) {
        self.maxTokens = maxTokens
        self.maxBodyBytes = maxBodyBytes
        self.requestTimeout = requestTimeout
    }
}

/// A validated `/v1/chat/completions` or `/v1/completions` request: the prompt as token ids
/// and everything the generation and the response need. Parsing checks every field's type
/// and range and names the field in its error; an unknown field is refused rather than
/// silently ignored, as OpenAI does.
struct CompletionRequest: Sendable {
    enum Endpoint: Sendable { case chat, completion }

    var endpoint: Endpoint
    var prompt: [Int]
    var parameters: GenerationParameters
    var stream = false
    var includeUsage = false

    init(body: some Collection<UInt8>, endpoint: Endpoint, model: ServingModel, limits: RequestLimits) throws(APIError) {
        let json: JSONValue
        do {
            json = try JSONValue(parsing: body)
        } catch {
            let message = (error as? FulgurError)?.message ?? "\(error)"
            throw APIError(.badRequest, "The body is not valid JSON: \(message)", code: "invalid_json")
        }
        guard case .object(let object) = json else {
            throw APIError(.badRequest, "The body must be a JSON object, got \(json.typeName)", code: "invalid_json")
        }
        var fields = Fields(object)
        self.endpoint = endpoint
        parameters = GenerationParameters(stopTokenIds: model.stopTokenIds)

        if let name = try fields.string("model"), name != model.id { throw .unknownModel(name) }
        switch endpoint {
        case .chat:
            let messages = try Self.messages(fields.take("messages"))
            let text: String
            do { text = try model.renderChat(messages) } catch {
                let message = (error as? FulgurError)?.message ?? "\(error)"
                throw APIError(.badRequest, "The model's chat template refused the messages: \(message)", param: "messages")
            }
            prompt = model.encode(text)
        case .completion:
            prompt = try Self.prompt(fields.take("prompt"), model: model)
        }
        guard !prompt.isEmpty else { throw .invalid(endpoint == .chat ? "messages" : "prompt", "The prompt is empty") }

        // Chat's newer name wins when a client sends both.
        let legacyMax = try fields.int("max_tokens")
        let requested = try endpoint == .chat ? fields.int("max_completion_tokens") ?? legacyMax : legacyMax
        let tokensParam = endpoint == .chat ? "max_completion_tokens" : "max_tokens"
        if let requested {
            guard requested >= 1 else { throw .invalid(tokensParam, "'\(tokensParam)' must be at least 1, got \(requested)") }
            guard requested <= limits.maxTokens else {
                throw .invalid(tokensParam, "'\(tokensParam)' is \(requested); this server allows at most \(limits.maxTokens)")
            }
        }
        let room = model.contextLength - prompt.count
        if room < 1 || (requested ?? 1) > room {
            throw APIError(
                .badRequest,
                "This model's maximum context length is \(model.contextLength) tokens; the prompt has \(prompt.count)"
                    + (requested.map { " and \($0) more were requested" } ?? ""),
                param: endpoint == .chat ? "messages" : "prompt", code: "context_length_exceeded")
        }
        parameters.maxTokens = requested ?? min(limits.maxTokens, room)

        var sampling = SamplingParameters(temperature: 1)
        if let t = try fields.number("temperature") {
            guard t >= 0, t <= 2 else { throw .invalid("temperature", "'temperature' must be in [0, 2], got \(t)") }
            sampling.temperature = Float(t)
        }
        if let p = try fields.number("top_p") {
            guard p > 0, p <= 1 else { throw .invalid("top_p", "'top_p' must be in (0, 1], got \(p)") }
            sampling.topP = Float(p)
        }
        if let k = try fields.int("top_k") {
            // vLLM's -1 and our 0 both mean no top-k.
            guard k >= -1 else { throw .invalid("top_k", "'top_k' must be -1 or 0 (off) or positive, got \(k)") }
            sampling.topK = max(k, 0)
        }
        if let p = try fields.number("min_p") {
            guard p >= 0, p <= 1 else { throw .invalid("min_p", "'min_p' must be in [0, 1], got \(p)") }
            sampling.minP = Float(p)
        }
        sampling.seed = try fields.int("seed").map { UInt64(bitPattern: Int64($0)) }
        parameters.sampling = sampling

        parameters.stopStrings = try Self.stop(fields.take("stop"))
        if let n = try fields.int("n"), n != 1 {
            throw .invalid("n", "'n' must be 1: this server generates one choice per request; send several requests instead")
        }
        stream = try fields.bool("stream") ?? false
        if let options = try fields.object("stream_options") {
            guard stream else { throw .invalid("stream_options", "'stream_options' is only allowed when 'stream' is true") }
            var optionFields = Fields(options, prefix: "stream_options.")
            includeUsage = try optionFields.bool("include_usage") ?? false
            try optionFields.refuseRest()
        }
        switch endpoint {
        case .chat:
            let wanted = try fields.bool("logprobs") ?? false
            let top = try fields.int("top_logprobs")
            if let top {
                guard wanted else { throw .invalid("top_logprobs", "'top_logprobs' needs 'logprobs' set to true") }
                guard (0...20).contains(top) else { throw .invalid("top_logprobs", "'top_logprobs' must be in [0, 20], got \(top)") }
            }
            parameters.topLogprobs = wanted ? top ?? 0 : nil
        case .completion:
            if let top = try fields.int("logprobs") {
                guard (0...5).contains(top) else { throw .invalid("logprobs", "'logprobs' must be in [0, 5], got \(top)") }
                parameters.topLogprobs = top
            }
            try fields.onlyDefault("echo", .bool(false), "echoing the prompt is not supported")
            try fields.onlyDefault("best_of", .int(1), "'best_of' must be 1")
            try fields.onlyDefault("suffix", .string(""), "'suffix' (insertion) is not supported")
        }
        // Accepted at their neutral values, which is what clients send when they send them.
        try fields.onlyDefault("frequency_penalty", .int(0), "'frequency_penalty' is not supported; leave it at 0")
        try fields.onlyDefault("presence_penalty", .int(0), "'presence_penalty' is not supported; leave it at 0")
        try fields.onlyDefault("logit_bias", .object([:]), "'logit_bias' is not supported")
        // Bookkeeping fields that do not change the generation.
        for name in ["user", "metadata", "store", "service_tier"] { _ = fields.take(name) }
        try fields.refuseRest()
    }

    static func messages(_ value: JSONValue?) throws(APIError) -> [ChatMessage] {
        guard let value else { throw APIError(.badRequest, "'messages' is required", param: "messages", code: "missing_required_parameter") }
        guard case .array(let items) = value else { throw .wrongType("messages", expected: "an array", got: value) }
        guard !items.isEmpty else { throw .invalid("messages", "'messages' must hold at least one message") }
        var messages: [ChatMessage] = []
        for (i, item) in items.enumerated() {
            let param = "messages[\(i)]"
            guard case .object(let object) = item else { throw .wrongType(param, expected: "an object", got: item) }
            var fields = Fields(object, prefix: param + ".")
            guard let role = try fields.string("role") else {
                throw APIError(.badRequest, "'\(param).role' is required", param: param + ".role", code: "missing_required_parameter")
            }
            guard ["system", "user", "assistant", "tool"].contains(role) else {
                throw .invalid(param + ".role", "'\(param).role' must be one of system, user, assistant, tool; got '\(role)'")
            }
            let content = try Self.content(fields.take("content"), param: param + ".content")
            guard content != nil || role == "assistant" else {
                throw APIError(.badRequest, "'\(param).content' is required for role '\(role)'",
                               param: param + ".content", code: "missing_required_parameter")
            }
            _ = fields.take("name")
            _ = fields.take("tool_call_id")
            try fields.refuseRest()
            messages.append(ChatMessage(role: role, content: content))
        }
        return messages
    }

    /// A string, or OpenAI's list of content parts of which only text ones carry meaning here.
    static func content(_ value: JSONValue?, param: String) throws(APIError) -> String? {
        switch value {
        case nil, .null: return nil
        case .string(let s): return s
        case .array(let parts):
            var text = ""
            for (i, part) in parts.enumerated() {
                let partParam = "\(param)[\(i)]"
                guard case .object(let object) = part else { throw .wrongType(partParam, expected: "an object", got: part) }
                var fields = Fields(object, prefix: partParam + ".")
                guard try fields.string("type") == "text" else {
                    throw .invalid(partParam + ".type", "Only content parts of type 'text' are supported")
                }
                guard let piece = try fields.string("text") else {
                    throw APIError(.badRequest, "'\(partParam).text' is required", param: partParam + ".text", code: "missing_required_parameter")
                }
                try fields.refuseRest()
                text += piece
            }
            return text
        case .some(let other): throw .wrongType(param, expected: "a string or an array of content parts", got: other)
        }
    }

    /// A string, a list of one string, or a list of token ids.
    static func prompt(_ value: JSONValue?, model: ServingModel) throws(APIError) -> [Int] {
        switch value {
        case nil, .null:
            throw APIError(.badRequest, "'prompt' is required", param: "prompt", code: "missing_required_parameter")
        case .string(let s):
            return model.encode(s)
        case .array(let items):
            if items.count == 1, case .string(let s) = items[0] { return model.encode(s) }
            var ids: [Int] = []
            for item in items {
                guard case .int(let id) = item else {
                    throw .invalid("prompt", "'prompt' must be a string, a list of one string, or a list of token ids; several prompts need several requests")
                }
                guard id >= 0, id < model.vocabularySize else {
                    throw .invalid("prompt", "token id \(id) in 'prompt' is outside the vocabulary (0..<\(model.vocabularySize))")
                }
                ids.append(id)
            }
            return ids
        case .some(let other): throw .wrongType("prompt", expected: "a string or an array", got: other)
        }
    }

    static func stop(_ value: JSONValue?) throws(APIError) -> [String] {
        let stops: [String]
        switch value {
        case nil, .null: return []
        case .string(let s): stops = [s]
        case .array(let items):
            stops = try items.map { item throws(APIError) in
                guard case .string(let s) = item else { throw .wrongType("stop", expected: "a string or an array of strings", got: item) }
                return s
            }
        case .some(let other): throw .wrongType("stop", expected: "a string or an array of strings", got: other)
        }
        guard stops.count <= 4 else { throw .invalid("stop", "'stop' holds at most 4 strings, got \(stops.count)") }
        guard !stops.contains("") else { throw .invalid("stop", "'stop' strings must not be empty") }
        return stops
    }
}

/// Takes typed fields out of a JSON object; what is left at the end was not understood.
/// `null` counts as absent, as it does for OpenAI's optional parameters.
struct Fields {
    private var object: JSONObject
    private let prefix: String

    init(_ object: JSONObject, prefix: String = "") {
        self.object = object
        self.prefix = prefix
    }

    mutating func take(_ name: String) -> JSONValue? {
        defer { object[name] = nil }
        if case .null = object[name] { return nil }
        return object[name]
    }

    mutating func string(_ name: String) throws(APIError) -> String? {
        guard let value = take(name) else { return nil }
        guard case .string(let s) = value else { throw .wrongType(prefix + name, expected: "a string", got: value) }
        return s
    }

    mutating func bool(_ name: String) throws(APIError) -> Bool? {
        guard let value = take(name) else { return nil }
        guard case .bool(let b) = value else { throw .wrongType(prefix + name, expected: "a boolean", got: value) }
        return b
    }

    mutating func number(_ name: String) throws(APIError) -> Double? {
        switch take(name) {
        case nil: return nil
        case .int(let i): return Double(i)
        case .double(let d): return d
        case .some(let other): throw .wrongType(prefix + name, expected: "a number", got: other)
        }
    }

    /// An integer; a number with no fraction (`2.0`) counts, as it does in Python.
    mutating func int(_ name: String) throws(APIError) -> Int? {
        switch take(name) {
        case nil: return nil
        case .int(let i): return i
        case .double(let d) where d.rounded() == d && abs(d) < 0x1p62: return Int(d)
        case .some(let other): throw .wrongType(prefix + name, expected: "an integer", got: other)
        }
    }

    mutating func object(_ name: String) throws(APIError) -> JSONObject? {
        guard let value = take(name) else { return nil }
        guard case .object(let o) = value else { throw .wrongType(prefix + name, expected: "an object", got: value) }
        return o
    }

    /// A parameter this server accepts only at its neutral value.
    mutating func onlyDefault(_ name: String, _ neutral: JSONValue, _ message: String) throws(APIError) {
        guard let value = take(name) else { return }
        let same: Bool = switch (value, neutral) {
        case (.double(let d), .int(let i)): d == Double(i)
        default: value == neutral
        }
        guard same else { throw .invalid(prefix + name, message) }
    }

    func refuseRest() throws(APIError) {
        if let name = object.keys.first {
            throw APIError(.badRequest, "Unrecognized request argument supplied: \(prefix + name)",
                           param: prefix + name, code: "unknown_parameter")
        }
    }
}
