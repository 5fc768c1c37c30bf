import Fulgur
import Testing
@testable import FulgurServer

private let model = FakeModel()

private func parse(_ body: String, _ endpoint: CompletionRequest.Endpoint = .chat,
                   limits: RequestLimits = RequestLimits(maxTokens: 32)) throws(APIError) -> CompletionRequest {
    try CompletionRequest(body: Array(body.utf8), endpoint: endpoint, model: model, limits: limits)
}

private func refusal(_ body: String, _ endpoint: CompletionRequest.Endpoint = .chat) -> APIError? {
    do { _ = try parse(body, endpoint); return nil } catch { return error }
}

@Test func chatRequestRendersTheTemplateAndReadsEveryParameter() throws {
    let r = try parse("""
        {"model": "fake", "messages": [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]}],
         "max_tokens": 3, "max_completion_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "min_p": 0.1,
         "seed": -1, "stop": ["x", "yz"], "n": 1, "stream": true, "stream_options": {"include_usage": true},
         "logprobs": true, "top_logprobs": 2, "user": "u1", "frequency_penalty": 0, "presence_penalty": 0.0}
        """)
    #expect(r.prompt == model.encode("system: Be brief.\nuser: Hi!\n"))
    #expect(r.parameters.maxTokens == 5)
    #expect(r.parameters.sampling == SamplingParameters(temperature: 0.5, topK: 0, topP: 0.9, minP: 0.1, seed: UInt64.max))
    #expect(r.parameters.stopStrings == ["x", "yz"])
    #expect(r.parameters.stopTokenIds == [0])
    #expect(r.parameters.topLogprobs == 2)
    #expect(r.stream && r.includeUsage)
}

@Test func defaultsFollowOpenAIAndTheServerLimit() throws {
    let r = try parse(#"{"messages": [{"role": "user", "content": "Hi"}], "logprobs": true}"#)
    #expect(r.parameters.sampling.temperature == 1)
    #expect(r.parameters.maxTokens == 32)
    #expect(r.parameters.topLogprobs == 0)
    #expect(!r.stream)
    // The default is clamped to the room the context leaves.
    let long = try parse(#"{"prompt": "\#(String(repeating: "a", count: 50))"}"#, .completion)
    #expect(long.parameters.maxTokens == 14)
    #expect(try parse(#"{"prompt": [1, 2, 3], "logprobs": 3}"#, .completion).prompt == [1, 2, 3])
    #expect(try parse(#"{"prompt": ["ab"], "max_tokens": 2.0}"#, .completion).parameters.maxTokens == 2)
    // null is absent, as in OpenAI's API.
    #expect(try parse(#"{"prompt": "a", "max_tokens": null, "stop": null, "seed": null}"#, .completion).parameters.maxTokens == 32)
}

/// Every malformed or unusable request gets OpenAI's error object with the field named.
@Test(arguments: [
    (#"{"messages": [{"role": "user", "content": "Hi"}]"#, "invalid_json", nil as String?),
    (#"[1, 2]"#, "invalid_json", nil),
    (#"{"messages": [], }"#, "invalid_json", nil),
    (#"{"model": "gpt-4", "messages": [{"role": "user", "content": "Hi"}]}"#, "model_not_found", "model"),
    (#"{"model": 5, "messages": [{"role": "user", "content": "Hi"}]}"#, "invalid_type", "model"),
    (#"{}"#, "missing_required_parameter", "messages"),
    (#"{"messages": "Hi"}"#, "invalid_type", "messages"),
    (#"{"messages": []}"#, "invalid_value", "messages"),
    (#"{"messages": [{"role": "wizard", "content": "Hi"}]}"#, "invalid_value", "messages[0].role"),
    (#"{"messages": [{"content": "Hi"}]}"#, "missing_required_parameter", "messages[0].role"),
    (#"{"messages": [{"role": "user"}]}"#, "missing_required_parameter", "messages[0].content"),
    (#"{"messages": [{"role": "user", "content": 7}]}"#, "invalid_type", "messages[0].content"),
    (#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}"#, "invalid_value", "messages[0].content[0].type"),
    (#"{"messages": [{"role": "user", "content": "Hi", "mood": "happy"}]}"#, "unknown_parameter", "messages[0].mood"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "temperature": "hot"}"#, "invalid_type", "temperature"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "temperature": 2.5}"#, "invalid_value", "temperature"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "top_p": 0}"#, "invalid_value", "top_p"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "top_k": -2}"#, "invalid_value", "top_k"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "min_p": 1.5}"#, "invalid_value", "min_p"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "seed": 1.5}"#, "invalid_type", "seed"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "n": 2}"#, "invalid_value", "n"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 0}"#, "invalid_value", "max_completion_tokens"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 33}"#, "invalid_value", "max_completion_tokens"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60}"#, "invalid_value", "max_completion_tokens"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "stop": [1]}"#, "invalid_type", "stop"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "stop": ["a", "b", "c", "d", "e"]}"#, "invalid_value", "stop"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "stop": ""}"#, "invalid_value", "stop"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "stream": "yes"}"#, "invalid_type", "stream"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "stream_options": {"include_usage": true}}"#, "invalid_value", "stream_options"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "stream": true, "stream_options": {"extra": 1}}"#, "unknown_parameter", "stream_options.extra"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}"#, "invalid_value", "top_logprobs"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "logprobs": true, "top_logprobs": 21}"#, "invalid_value", "top_logprobs"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "frequency_penalty": 0.5}"#, "invalid_value", "frequency_penalty"),
    (#"{"messages": [{"role": "user", "content": "Hi"}], "tools": []}"#, "unknown_parameter", "tools"),
    (#"{"messages": [{"role": "user", "content": "\#(String(repeating: "a", count: 60))"}]}"#, "context_length_exceeded", "messages"),
])
func badChatRequestsAreRefusedWithTheFieldNamed(body: String, code: String, param: String?) {
    let error = refusal(body)
    #expect(error?.code == code, "\(body)")
    #expect(error?.param == param, "\(body)")
    #expect(error?.status == (code == "model_not_found" ? .notFound : .badRequest))
    #expect(error?.type == "invalid_request_error")
}

@Test(arguments: [
    (#"{"max_tokens": 4}"#, "missing_required_parameter", "prompt"),
    (#"{"prompt": ["a", "b"]}"#, "invalid_value", "prompt"),
    (#"{"prompt": [1, 999]}"#, "invalid_value", "prompt"),
    (#"{"prompt": {"text": "a"}}"#, "invalid_type", "prompt"),
    (#"{"prompt": []}"#, "invalid_value", "prompt"),
    (#"{"prompt": "a", "logprobs": 6}"#, "invalid_value", "logprobs"),
    (#"{"prompt": "a", "logprobs": true}"#, "invalid_type", "logprobs"),
    (#"{"prompt": "a", "echo": true}"#, "invalid_value", "echo"),
    (#"{"prompt": "a", "best_of": 3}"#, "invalid_value", "best_of"),
    (#"{"prompt": "a", "max_completion_tokens": 3}"#, "unknown_parameter", "max_completion_tokens"),
])
func badCompletionRequestsAreRefusedWithTheFieldNamed(body: String, code: String, param: String) {
    let error = refusal(body, .completion)
    #expect(error?.code == code, "\(body)")
    #expect(error?.param == param, "\(body)")
}

@Test func invalidUTF8IsAJSONError() {
    let body: [UInt8] = Array(#"{"prompt": ""#.utf8) + [0xC3, 0x28] + Array(#""}"#.utf8)
    #expect(throws: APIError.self) { try CompletionRequest(body: body, endpoint: .completion, model: model, limits: RequestLimits()) }
    do { _ = try CompletionRequest(body: body, endpoint: .completion, model: model, limits: RequestLimits()) } catch {
        #expect(error.code == "invalid_json")
        #expect(error.message.contains("UTF-8"))
    }
}

@Test func errorObjectHasOpenAIsShape() {
    let e = APIError.invalid("n", "'n' must be 1")
    #expect(e.json.serialized() == #"{"error": {"message": "'n' must be 1", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}}"#)
}
