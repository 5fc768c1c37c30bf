import Foundation
import Fulgur
import Hummingbird
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import Testing
@testable import FulgurServer

/// Collects a response body, or fails after `failAfter` writes as a client that left would.
private struct Collector: ResponseBodyWriter {
    let sink: NIOLockedValueBox<[UInt8]>
    let failAfter: Int?
    var writes = 0

    mutating func write(_ buffer: ByteBuffer) async throws {
        writes += 1
        if let failAfter, writes > failAfter { throw CancellationError() }
        sink.withLockedValue { $0 += buffer.readableBytesView }
    }

    consuming func finish(_ trailingHeaders: HTTPFields?) async throws {}
}

/// Drives the server's router in process, without a socket.
private struct TestClient {
    let server: OpenAIServer
    let responder: RouterResponder<BasicRequestContext>

    init(model: ServingModel = FakeModel(), configure: (inout ServerConfiguration) -> Void = { _ in }) {
        var configuration = ServerConfiguration()
        configure(&configuration)
        server = try! OpenAIServer(model: model, configuration: configuration)
        responder = server.router().buildResponder()
    }

    func send(_ method: HTTPRequest.Method, _ path: String, body: [UInt8] = [], headers: HTTPFields = [:],
              failAfter: Int? = nil) async throws -> (status: Int, headers: HTTPFields, body: String) {
        let head = HTTPRequest(method: method, scheme: "http", authority: "localhost", path: path, headerFields: headers)
        let request = Request(head: head, body: RequestBody(buffer: ByteBuffer(bytes: body)))
        let context = BasicRequestContext(source: .init(channel: EmbeddedChannel(), logger: Logger(label: "test")))
        let response = try await responder.respond(to: request, context: context)
        let sink = NIOLockedValueBox<[UInt8]>([])
        do { try await response.body.write(Collector(sink: sink, failAfter: failAfter)) } catch is CancellationError {}
        return (response.status.code, response.headers, String(decoding: sink.withLockedValue { $0 }, as: UTF8.self))
    }

    func post(_ path: String, _ json: String, headers: HTTPFields = [:], failAfter: Int? = nil) async throws -> (status: Int, headers: HTTPFields, body: String) {
        try await send(.post, path, body: Array(json.utf8), headers: headers, failAfter: failAfter)
    }
}

private func errorCode(_ body: String) throws -> String? {
    try JSONValue(parsing: body)["error"]?["code"]?.string
}

@Test func chatCompletionHasOpenAIsShapeAndUsage() async throws {
    let client = TestClient()
    let r = try await client.post("/v1/chat/completions", #"{"model": "fake", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5}"#)
    #expect(r.status == 200)
    let body = try JSONValue(parsing: r.body)
    #expect(body["object"] == "chat.completion")
    #expect(body["choices"]?.array?.first?["message"]?["content"] == "Hello")
    #expect(body["choices"]?.array?.first?["finish_reason"] == "length")
    #expect(body["usage"] == ["prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14])
}

@Test func streamedCompletionSendsChunksThenUsageThenDone() async throws {
    let client = TestClient(model: FakeModel(reply: "abc"))
    let r = try await client.post("/v1/completions", #"{"prompt": "x", "stream": true, "stream_options": {"include_usage": true}, "logprobs": 1}"#)
    #expect(r.status == 200)
    #expect(r.headers[.contentType] == "text/event-stream")
    let events = r.body.components(separatedBy: "\n\n").filter { !$0.isEmpty }
    #expect(events.last == "data: [DONE]")
    let chunks = try events.dropLast().map { try JSONValue(parsing: String($0.dropFirst(6))) }
    #expect(chunks.compactMap { $0["choices"]?.array?.first?["text"]?.string }.joined() == "abc")
    #expect(chunks.dropLast().last?["choices"]?.array?.first?["finish_reason"] == "stop")
    #expect(chunks.last?["usage"]?["completion_tokens"] == 3)
    #expect(chunks.first?["choices"]?.array?.first?["logprobs"]?["tokens"] == ["a"])
}

@Test func chatStreamStartsWithTheRoleAndCarriesLogprobs() async throws {
    let client = TestClient(model: FakeModel(reply: "ok"))
    let r = try await client.post("/v1/chat/completions", #"{"messages": [{"role": "user", "content": "Hi"}], "stream": true, "logprobs": true, "top_logprobs": 2}"#)
    let chunks = try r.body.components(separatedBy: "\n\n").filter { $0.hasPrefix("data: {") }.map { try JSONValue(parsing: String($0.dropFirst(6))) }
    #expect(chunks.first?["choices"]?.array?.first?["delta"] == ["role": "assistant", "content": ""])
    let second = chunks[1]["choices"]?.array?.first
    #expect(second?["delta"] == ["content": "o"])
    let entry = second?["logprobs"]?["content"]?.array?.first
    #expect(entry?["token"] == "o")
    #expect(entry?["bytes"] == [111])
    #expect(entry?["top_logprobs"]?.array?.count == 2)
    #expect(chunks.allSatisfy { $0["usage"] == nil })
}

@Test func routesMethodsSizeAndEncodingErrorsAreErrorObjects() async throws {
    let client = TestClient { $0.limits.maxBodyBytes = 2048 }
    let unknown = try await client.send(.get, "/v1/engines")
    #expect(unknown.status == 404)
    #expect(try errorCode(unknown.body) == "unknown_url")
    let method = try await client.send(.get, "/v1/chat/completions")
    #expect(method.status == 405)
    #expect(method.headers[.allow] == "POST")
    let large = try await client.post("/v1/completions", #"{"prompt": "\#(String(repeating: "a", count: 4096))"}"#)
    #expect(large.status == 413)
    #expect(try errorCode(large.body) == "request_too_large")
    let utf8 = try await client.send(.post, "/v1/completions", body: Array(#"{"prompt": "\#u{FF}"}"#.utf8.map { $0 == 0xC3 ? 0xFF : $0 }))
    #expect(utf8.status == 400)
    #expect(try errorCode(utf8.body) == "invalid_json")
    let model = try await client.send(.get, "/v1/models/other")
    #expect(model.status == 404)
    #expect(try errorCode(model.body) == "model_not_found")
}

@Test func apiKeyGuardsEveryRouteButHealth() async throws {
    let client = TestClient { $0.apiKeys = ["secret", "other"] }
    #expect(try await client.send(.get, "/health").status == 200)
    let missing = try await client.send(.get, "/v1/models")
    #expect(missing.status == 401)
    #expect(try errorCode(missing.body) == "invalid_api_key")
    #expect(try await client.send(.get, "/v1/models", headers: [.authorization: "Bearer secrex"]).status == 401)
    let ok = try await client.send(.get, "/v1/models", headers: [.authorization: "Bearer secret"])
    #expect(ok.status == 200)
    #expect(try JSONValue(parsing: ok.body)["data"]?.array?.first?["id"] == "fake")
    #expect(try await client.send(.get, "/v1/models", headers: [.authorization: "Bearer other"]).status == 200)
}

@Test func metricsAreInPrometheusTextFormat() async throws {
    let client = TestClient()
    _ = try await client.post("/v1/completions", #"{"prompt": "x", "max_tokens": 3}"#)
    _ = try await client.send(.get, "/nope")
    let metrics = try await client.send(.get, "/metrics")
    #expect(metrics.status == 200)
    #expect(metrics.body.contains("fulgur_completion_tokens_total 3"))
    #expect(metrics.body.contains(#"fulgur_http_requests_total{path="other",status="404"} 1"#))
    #expect(metrics.body.contains("fulgur_time_to_first_token_seconds_bucket"))
}

/// A client that goes away mid-stream stops its generation; the next request is served.
@Test func aClientThatLeavesMidStreamCancelsItsGeneration() async throws {
    // Long enough that the client's failed write always comes before the end, however slowly
    // the test machine schedules the handler: with the whole suite running on 2 cores, CPU-bound
    // tests held the cooperative threads for over 5 s and a 1000-token reply finished first.
    // A cancelled reply ends at once, so the length costs nothing when things go right.
    let model = FakeModel(reply: String(repeating: "z", count: 12000), contextLength: 16384, tokenDelay: .milliseconds(5))
    let client = TestClient(model: model)
    let left = try await client.post("/v1/completions", #"{"prompt": "x", "stream": true}"#, failAfter: 3)
    #expect(!left.body.contains("[DONE]"))
    let next = try await client.post("/v1/completions", #"{"prompt": "x", "max_tokens": 2}"#)
    #expect(try JSONValue(parsing: next.body)["choices"]?.array?.first?["text"] == "zz")
    #expect(try await client.send(.get, "/metrics").body.contains("fulgur_cancelled_generations_total 1"))
}

/// Only a body collected from a live connection is watched for the client leaving (see
/// `OpenAIServer.untilClientLeaves`); Hummingbird's watcher would stop the process on a
/// plain buffer such as the router tests send.
@Test func aPlainBufferBodyIsNotWatchedForTheClientLeaving() {
    #expect(!OpenAIServer.keepsConnectionStream(RequestBody(buffer: ByteBuffer(string: "{}"))))
}
