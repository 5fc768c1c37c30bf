import Foundation
import Fulgur
import Hummingbird
import Logging
import NIOCore

/// How `fulgur serve` runs.
public struct ServerConfiguration: Sendable {
    /// Loopback unless the operator opens it up.
    public var host = "127.0.0.1"
    public var port = 8080
    /// When set, every route but /health needs `Authorization: Bearer <apiKey>`.
    public var apiKey: String?
    public var maxQueue = 64
    public var limits = RequestLimits()

    public init() {}
}

/// The OpenAI-compatible HTTP API over one model: routes, authentication and error mapping.
/// Generations go through the `Scheduler`; this type only translates HTTP to and from it.
public struct OpenAIServer: Sendable {
    public let model: ServingModel
    public let configuration: ServerConfiguration
    public let scheduler: Scheduler
    let metrics: ServerMetrics
    let started = Int(Date().timeIntervalSince1970)

    /// The routes the server answers, for telling an unknown route (404) from a wrong method (405).
    static let routes: [String: HTTPRequest.Method] = [
        "/v1/chat/completions": .post, "/v1/completions": .post, "/v1/models": .get, "/health": .get, "/metrics": .get,
    ]

    public init(model: ServingModel, configuration: ServerConfiguration) {
        self.model = model
        self.configuration = configuration
        metrics = ServerMetrics()
        scheduler = Scheduler(model: model, maxQueue: configuration.maxQueue, metrics: metrics)
    }

    /// `onListening` gets the bound address, so that port 0 (any free port) can be used.
    public func application(logger: Logger, onListening: @escaping @Sendable (String) -> Void = { _ in }) -> some ApplicationProtocol {
        Application(
            router: router(),
            configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "fulgur"),
            onServerRunning: { channel in
                let address = channel.localAddress
                onListening("\(address?.ipAddress ?? configuration.host):\(address?.port ?? configuration.port)")
            },
            logger: logger)
    }

    func router() -> Router<BasicRequestContext> {
        let router = Router()
        router.add(middleware: ErrorMiddleware(metrics: metrics, maxBodyBytes: configuration.limits.maxBodyBytes))
        if let key = configuration.apiKey { router.add(middleware: BearerAuthMiddleware(key: key)) }
        router.get("/health") { _, _ in json(["status": "ok"]) }
        router.get("/metrics") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                     body: .init(byteBuffer: ByteBuffer(string: metrics.render())))
        }
        router.get("/v1/models") { _, _ in json(["object": "list", "data": [modelJSON]]) }
        router.get("/v1/models/{id}") { _, context in
            let id = context.parameters.get("id") ?? ""
            guard id == model.id else { throw APIError.unknownModel(id) }
            return json(modelJSON)
        }
        router.post("/v1/chat/completions") { request, context in try await complete(request, context, .chat) }
        router.post("/v1/completions") { request, context in try await complete(request, context, .completion) }
        return router
    }

    private var modelJSON: JSONValue {
        ["id": .string(model.id), "object": "model", "created": .int(started), "owned_by": "fulgur",
         "context_length": .int(model.contextLength)]
    }

    private func complete(_ request: Request, _ context: BasicRequestContext, _ endpoint: CompletionRequest.Endpoint) async throws -> Response {
        var request = request
        let body = try await request.collectBody(upTo: configuration.limits.maxBodyBytes)
        let parsed = try CompletionRequest(body: body.readableBytesView, endpoint: endpoint, model: model, limits: configuration.limits)
        let ticket = try scheduler.submit(prompt: parsed.prompt, parameters: parsed.parameters)
        let builder = ResponseBuilder(endpoint: endpoint, model: model, wantsLogprobs: parsed.parameters.topLogprobs != nil)
        let logger = context.logger
        logger.info("generation queued", metadata: [
            "endpoint": "\(endpoint)", "prompt_tokens": "\(parsed.prompt.count)",
            "max_tokens": "\(parsed.parameters.maxTokens)", "stream": "\(parsed.stream)",
        ])
        guard parsed.stream else {
            defer { ticket.cancel() }
            var text = ""
            var logprobs: [TokenLogprobs] = []
            for await event in ticket.events {
                switch event {
                case .queued: break
                case .token(_, let lp): if let lp { logprobs.append(lp) }
                case .text(let piece): text += piece
                case .finished(let result):
                    logFinished(result, logger)
                    return json(builder.completion(text: text, logprobs: logprobs, result: result))
                case .failed(let error): throw error
                }
            }
            throw APIError(.serviceUnavailable, "The generation ended without a result", type: "server_error")
        }
        let includeUsage = parsed.includeUsage
        return Response(
            status: .ok,
            headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"],
            body: ResponseBody { writer in
                // A write that fails means the client left: the deferred cancel stops the
                // generation at its next token, or takes it out of the queue.
                defer { ticket.cancel() }
                func send(_ value: JSONValue) async throws { try await writer.write(ByteBuffer(string: "data: \(value.serialized(separators: (",", ":")))\n\n")) }
                if endpoint == .chat { try await send(builder.chunk(text: "", role: true, includeUsage: includeUsage)) }
                var pending: [TokenLogprobs] = []
                events: for await event in ticket.events {
                    switch event {
                    case .queued(let position):
                        try await writer.write(ByteBuffer(string: ": queue position \(position)\n\n"))
                    case .token(_, let lp):
                        if let lp { pending.append(lp) }
                    case .text(let piece):
                        try await send(builder.chunk(text: piece, logprobs: pending, includeUsage: includeUsage))
                        pending.removeAll()
                    case .finished(let result):
                        logFinished(result, logger)
                        try await send(builder.chunk(text: nil, logprobs: pending, finish: result, includeUsage: includeUsage))
                        if includeUsage { try await send(builder.usageChunk(result)) }
                        break events
                    case .failed(let error):
                        // The status line has gone out: the error travels as an event, as OpenAI's do.
                        try await send(error.json)
                        break events
                    }
                }
                try await writer.write(ByteBuffer(string: "data: [DONE]\n\n"))
                try await writer.finish(nil)
            })
    }

    private func logFinished(_ result: GenerationResult, _ logger: Logger) {
        logger.info("generation finished", metadata: [
            "finish_reason": "\(result.finishReason)", "prompt_tokens": "\(result.promptTokens)",
            "completion_tokens": "\(result.tokens.count)",
            "ttft_s": "\(String(format: "%.3f", result.timeToFirstToken))",
            "tokens_per_s": "\(String(format: "%.1f", result.decodeTokensPerSecond))",
        ])
    }
}

func json(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
    Response(status: status, headers: [.contentType: "application/json"],
             body: .init(byteBuffer: ByteBuffer(string: value.serialized())))
}

/// Turns every failure into OpenAI's error object with its status, and counts responses.
struct ErrorMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let metrics: ServerMetrics
    let maxBodyBytes: Int

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        // Counted by route, and unknown paths together, so that a scan cannot grow the label set.
        let path = request.uri.path
        let route = path.hasPrefix("/v1/models/") ? "/v1/models/{id}" : OpenAIServer.routes[path] != nil ? path : "other"
        let response: Response
        do {
            response = try await next(request, context)
        } catch {
            let apiError = apiError(for: error, request: request)
            if apiError.status.code >= 500 { context.logger.error("request failed: \(apiError.message)") }
            var r = json(apiError.json, status: apiError.status)
            if apiError.code == "queue_full" { r.headers[.retryAfter] = "1" }
            if apiError.status == .methodNotAllowed, let allowed = OpenAIServer.routes[request.uri.path] {
                r.headers[.allow] = allowed.rawValue
            }
            response = r
        }
        metrics.request(path: route, status: response.status.code)
        return response
    }

    func apiError(for error: Error, request: Request) -> APIError {
        switch error {
        case let e as APIError: return e
        case let e as HTTPResponseError where e.status == .notFound:
            let path = request.uri.path
            if OpenAIServer.routes[path] != nil {
                return APIError(.methodNotAllowed, "\(request.method) is not allowed on \(path)", code: "method_not_allowed")
            }
            return APIError(.notFound, "Unknown route: \(request.method) \(path)", code: "unknown_url")
        case let e as HTTPResponseError where e.status == .contentTooLarge:
            return .tooLarge(maxBodyBytes)
        case let e as HTTPResponseError:
            return APIError(e.status, e.status.reasonPhrase, type: e.status.code < 500 ? "invalid_request_error" : "server_error")
        default:
            return APIError(.internalServerError, "Internal error: \(error)", type: "server_error")
        }
    }
}

/// `Authorization: Bearer <key>` on every route but /health, which load balancers probe.
struct BearerAuthMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let key: String

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard request.uri.path != "/health" else { return try await next(request, context) }
        let header = request.headers[.authorization] ?? ""
        guard header.hasPrefix("Bearer "), Self.constantTimeEqual(Array(header.utf8.dropFirst(7)), Array(key.utf8)) else {
            throw APIError.unauthorized
        }
        return try await next(request, context)
    }

    /// Compares without an early exit, so response time does not reveal how much of a guess was right.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for (x, y) in zip(a, b) { difference |= x ^ y }
        return difference == 0
    }
}
