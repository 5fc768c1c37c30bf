import Foundation
import Fulgur

/// Builds the JSON bodies of completions, in OpenAI's shapes: `chat.completion` and
/// `chat.completion.chunk` for chat, `text_completion` (whole or streamed) for completions.
struct ResponseBuilder: Sendable {
    let endpoint: CompletionRequest.Endpoint
    let model: ServingModel
    let id: String
    let created: Int
    let wantsLogprobs: Bool

    init(endpoint: CompletionRequest.Endpoint, model: ServingModel, wantsLogprobs: Bool) {
        self.endpoint = endpoint
        self.model = model
        self.wantsLogprobs = wantsLogprobs
        id = (endpoint == .chat ? "chatcmpl-" : "cmpl-") + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        created = Int(Date().timeIntervalSince1970)
    }

    /// The whole answer of a request that did not stream.
    func completion(text: String, logprobs: [TokenLogprobs], result: GenerationResult) -> JSONValue {
        var choice: JSONObject = ["index": 0]
        switch endpoint {
        case .chat: choice["message"] = ["role": "assistant", "content": .string(text)]
        case .completion: choice["text"] = .string(text)
        }
        choice["logprobs"] = logprobsJSON(logprobs)
        choice["finish_reason"] = finishReason(result)
        return envelope(object: endpoint == .chat ? "chat.completion" : "text_completion",
                        choices: [.object(choice)], usage: usage(result), fulgur: fulgur(result))
    }

    /// A streamed piece. Chat's first chunk carries the role; the last carries the finish
    /// reason and no text.
    func chunk(text: String?, role: Bool = false, logprobs: [TokenLogprobs] = [], finish: GenerationResult? = nil,
               includeUsage: Bool) -> JSONValue {
        var choice: JSONObject = ["index": 0]
        switch endpoint {
        case .chat:
            var delta: JSONObject = [:]
            if role { delta["role"] = "assistant" }
            if let text { delta["content"] = .string(text) }
            choice["delta"] = .object(delta)
        case .completion:
            choice["text"] = .string(text ?? "")
        }
        choice["logprobs"] = logprobsJSON(logprobs)
        choice["finish_reason"] = finish.map(finishReason) ?? .null
        // With include_usage, OpenAI sends `"usage": null` on every chunk but the last.
        return envelope(object: endpoint == .chat ? "chat.completion.chunk" : "text_completion",
                        choices: [.object(choice)], usage: includeUsage ? .some(.null) : .none, fulgur: finish.flatMap(fulgur))
    }

    /// The extra chunk `stream_options.include_usage` asks for: no choices, the usage.
    func usageChunk(_ result: GenerationResult) -> JSONValue {
        envelope(object: endpoint == .chat ? "chat.completion.chunk" : "text_completion", choices: [], usage: usage(result))
    }

    private func envelope(object: String, choices: [JSONValue], usage: JSONValue?, fulgur: JSONValue? = nil) -> JSONValue {
        var body: JSONObject = [
            "id": .string(id), "object": .string(object), "created": .int(created), "model": .string(model.id),
            "choices": .array(choices),
        ]
        if let usage { body["usage"] = usage }
        if let fulgur { body["fulgur"] = fulgur }
        return .object(body)
    }

    /// Fulgur's extension field, on the whole answer and on a stream's finishing chunk: one
    /// top-level key that OpenAI's clients keep as an extra (`model_extra` in Python) and
    /// others ignore. Present when the generation decoded speculatively. `mean_acceptance`
    /// is tokens emitted a round, the target's own token included (at least 1);
    /// `accepted_tokens` the drafter's guesses the target accepted; the first token, from the
    /// prompt's forward pass, is in no round.
    private func fulgur(_ result: GenerationResult) -> JSONValue? {
        guard let s = result.speculative else { return nil }
        let emitted = s.acceptanceLengths.reduce(0, +)
        return ["speculative": [
            "block_size": .int(s.blockSize), "rounds": .int(s.rounds), "emitted_tokens": .int(emitted),
            "accepted_tokens": .int(emitted - s.rounds), "mean_acceptance": .double(s.meanAcceptance),
            "acceptance_histogram": .array(s.histogram.map { .int($0) }),
            "draft_seconds": .double(s.draftSeconds), "verify_seconds": .double(s.verifySeconds),
        ]]
    }

    private func usage(_ result: GenerationResult) -> JSONValue {
        ["prompt_tokens": .int(result.promptTokens), "completion_tokens": .int(result.tokens.count),
         "total_tokens": .int(result.promptTokens + result.tokens.count)]
    }

    private func finishReason(_ result: GenerationResult) -> JSONValue {
        result.finishReason == .stop ? "stop" : "length"
    }

    private func logprobsJSON(_ entries: [TokenLogprobs]) -> JSONValue {
        guard wantsLogprobs else { return .null }
        switch endpoint {
        case .chat:
            return ["content": .array(entries.map { entry in
                var item = tokenJSON(entry.token, entry.logprob)
                item["top_logprobs"] = .array(entry.top.map { .object(tokenJSON($0.token, $0.logprob)) })
                return .object(item)
            })]
        case .completion:
            // The legacy format: parallel lists, alternatives as {token: logprob}.
            var offsets: [JSONValue] = []
            var offset = 0
            for entry in entries {
                offsets.append(.int(offset))
                offset += text(of: entry.token).count
            }
            return [
                "tokens": .array(entries.map { .string(text(of: $0.token)) }),
                "token_logprobs": .array(entries.map { .double(Double($0.logprob)) }),
                "top_logprobs": .array(entries.map { entry in
                    .object(JSONObject(entry.top.map { (text(of: $0.token), JSONValue.double(Double($0.logprob))) }))
                }),
                "text_offset": .array(offsets),
            ]
        }
    }

    private func tokenJSON(_ token: Int, _ logprob: Float) -> JSONObject {
        ["token": .string(text(of: token)), "logprob": .double(Double(logprob)),
         "bytes": .array(model.bytes(of: token).map { .int(Int($0)) })]
    }

    /// A token's own text; a token that ends inside a UTF-8 sequence shows U+FFFD, and its
    /// `bytes` say exactly what it is.
    private func text(of token: Int) -> String { String(decoding: model.bytes(of: token), as: UTF8.self) }
}
