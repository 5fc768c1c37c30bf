import Foundation
import Fulgur
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import NIOHTTP1
import ServiceLifecycle

/// How `fulgur serve` runs.
public struct ServerConfiguration: Sendable {
    /// Loopback unless the operator opens it up.
    public var host = "127.0.0.1"
    public var port = 8080
    /// When not empty, every route but /health needs `Authorization: Bearer <one of them>`,
    /// and the key is what quotas and sessions count by.
    public var apiKeys: [String] = []
    public var admission = AdmissionPolicy()
    /// Latency first (a lane runs one generation alone) or throughput first (the lanes are KV
    /// slots of one batched engine loop).
    public var schedule = Schedule.latency
    public var limits = RequestLimits()
    /// Seconds running generations may go on after SIGTERM or SIGINT before they are ended.
    public var shutdownGrace = 10.0

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

    /// Throws when the model cannot run `configuration.admission.lanes` sequences (or batch
    /// that many, throughput first).
    public init(model: ServingModel, configuration: ServerConfiguration) throws {
        self.model = model
        self.configuration = configuration
        metrics = ServerMetrics()
        scheduler = try Scheduler(model: model, policy: configuration.admission, schedule: configuration.schedule, metrics: metrics)
    }

    /// Serves until SIGTERM or SIGINT, then shuts down gracefully: admissions end (new
    /// requests get 503 `server_shutting_down`, /health too), running generations get
    /// `shutdownGrace` seconds to finish and are then ended with an error event, and once the
    /// lanes are free the HTTP server stops, after the last responses are written.
    public func run(logger: Logger, onListening: @escaping @Sendable (String) -> Void = { _ in }) async throws {
        // A group shuts its services down last to first: the scheduler drains before the
        // HTTP server waits for its open responses.
        let group = ServiceGroup(configuration: .init(
            services: [application(logger: logger, onListening: onListening), DrainService(server: self, logger: logger)],
            gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }

    /// `onListening` gets the bound address, so that port 0 (any free port) can be used.
    public func application(logger: Logger, onListening: @escaping @Sendable (String) -> Void = { _ in }) -> some ApplicationProtocol {
        Application(
            router: router(),
            // The idle timeout closes connections that stall before their request head is
            // read, or sit idle between requests. Twice the request timeout, so that a body
            // that stalls gets its 408 first.
            server: .http1(configuration: .init(idleTimeout: .milliseconds(Int64(configuration.limits.requestTimeout * 2000)))),
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
        if !configuration.apiKeys.isEmpty { router.add(middleware: BearerAuthMiddleware(keys: configuration.apiKeys)) }
        router.get("/health") { _, _ in
            scheduler.isDraining ? json(["status": "shutting_down"], status: .serviceUnavailable) : json(["status": "ok"])
        }
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
        // The request with its body collected, which still holds the connection's stream for
        // `untilClientLeaves` to watch.
        let request = try await collectBody(request)
        let body = try await request.body.collect(upTo: .max)
        let parsed = try CompletionRequest(body: body.readableBytesView, endpoint: endpoint, model: model, limits: configuration.limits)
        let key = configuration.apiKeys.isEmpty ? nil : BearerAuthMiddleware.bearer(request)
        let ticket = try scheduler.submit(prompt: parsed.prompt, parameters: parsed.parameters, key: key)
        // The place in the queue on arrival (0: admitted at once); streams also get it as it changes.
        let admissionHeaders: HTTPFields = [Self.queuePosition: String(ticket.position)]
        let builder = ResponseBuilder(endpoint: endpoint, model: model, wantsLogprobs: parsed.parameters.topLogprobs != nil)
        let logger = context.logger
        logger.info("generation queued", metadata: [
            "endpoint": "\(endpoint)", "prompt_tokens": "\(parsed.prompt.count)",
            "max_tokens": "\(parsed.parameters.maxTokens)", "stream": "\(parsed.stream)",
        ])
        guard parsed.stream else {
            defer { ticket.cancel() }
            let left = ClientLeft()
            var response = try await untilClientLeaves(request, onLeaving: { left.set(); ticket.cancel() }) {
                var text = ""
                var logprobs: [TokenLogprobs] = []
                for await event in ticket.events {
                    switch event {
                    case .queued: break
                    case .token(_, let lp): if let lp { logprobs.append(lp) }
                    case .text(let piece): text += piece
                    case .finished(let result):
                        logFinished(result, logger)
                        // Stopped early because its client left: nobody is there to read it.
                        if left.isSet { throw APIError.clientLeft }
                        return json(builder.completion(text: text, logprobs: logprobs, result: result))
                    case .failed(let error): throw error
                    }
                }
                // The stream ends without a last event only when the job was cancelled.
                throw left.isSet ? APIError.clientLeft : APIError(.serviceUnavailable, "The generation ended without a result", type: "server_error")
            }
            response.headers.append(contentsOf: admissionHeaders)
            return response
        }
        let includeUsage = parsed.includeUsage
        return Response(
            status: .ok,
            headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"] + admissionHeaders,
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

    static let queuePosition = HTTPField.Name("X-Queue-Position")!

    /// Runs `operation` (a generation that answers only at its end) and calls `onLeaving` as
    /// soon as the client closes its connection, so that the generation stops at its next
    /// token instead of running to max_tokens for nobody. A stream learns that its client left
    /// when a write fails; an answer that is written only at the end has nothing to write
    /// before, so this watches the connection's inbound side instead: Hummingbird's
    /// `consumeWithInboundCloseHandler` reads what follows the request (all of it already
    /// collected) and reports the end of the input (a FIN or a reset).
    ///
    /// Its cost: the watcher takes over the connection's reading, so the connection closes
    /// after this response (the next request opens another; the response says
    /// `Connection: close`). The alternatives were worse: sending the headers early and
    /// writing JSON-legal whitespace as a heartbeat (a failed write means the client left)
    /// fixes the status at 200 before the generation can fail, so that queue, quota or
    /// session errors found later could not carry their HTTP status; and polling the socket
    /// needs the channel, which Hummingbird's router does not hand to handlers.
    ///
    /// Hummingbird's watcher needs a body collected by `Request.collectBody` from the
    /// connection's stream, which it keeps, and stops the process on any other (a test
    /// framework's buffer, or a stream read to its end elsewhere); a request with another body
    /// runs to its end unwatched.
    private func untilClientLeaves(_ request: Request, onLeaving: @escaping @Sendable () -> Void,
                                   _ operation: () async throws -> Response) async throws -> Response {
        guard Self.keepsConnectionStream(request.body) else { return try await operation() }
        var response = try await request.body.consumeWithInboundCloseHandler({ _ in try await operation() }, onInboundClosed: onLeaving)
        // Saying so keeps a client from sending its next request on a closing connection.
        response.headers[.connection] = "close"
        return response
    }

    /// Whether `body` is a collected buffer that keeps the connection's stream
    /// (`.byteBuffer(buffer, original)` in Hummingbird's storage). Hummingbird has no public
    /// way to ask; its storage's shape says it. Should a later Hummingbird change that shape,
    /// this says no and non-streaming requests run to their end unwatched (the server tests'
    /// disconnect test then fails), never a crash.
    static func keepsConnectionStream(_ body: RequestBody) -> Bool {
        guard let backing = Mirror(reflecting: body).children.first(where: { $0.label == "_backing" })?.value,
              let stored = Mirror(reflecting: backing).children.first, stored.label == "byteBuffer",
              let original = Mirror(reflecting: stored.value).children.dropFirst().first?.value else { return false }
        let optional = Mirror(reflecting: original)
        return optional.displayStyle == .optional && optional.children.count == 1
    }

    /// The body, within the size limit and within `requestTimeout` seconds: a client that
    /// trickles its body (slowloris) gets 408 instead of holding a connection forever.
    private func collectBody(_ request: Request) async throws -> Request {
        let limits = configuration.limits
        return try await withThrowingTaskGroup(of: Request.self) { group in
            group.addTask {
                var request = request
                _ = try await request.collectBody(upTo: limits.maxBodyBytes)
                return request
            }
            group.addTask {
                try await Task.sleep(for: .milliseconds(Int(limits.requestTimeout * 1000)))
                throw APIError.requestTimeout(limits.requestTimeout)
            }
            defer { group.cancelAll() }
            return try await group.next()!
        }
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

/// Set once, from the connection's watcher, when a non-streaming client closed its connection.
final class ClientLeft: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false

    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

extension APIError {
    /// nginx's 499: nobody reads it, but the request metrics and logs tell why the request ended.
    static let clientLeft = APIError(HTTPResponse.Status(code: 499, reasonPhrase: "Client Closed Request"),
                                     "The client closed its connection before the answer was ready; the generation was cancelled",
                                     code: "client_closed_request")
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
            if apiError.code == "insufficient_quota" { r.headers[HTTPField.Name("x-should-retry")!] = "false" }
            // The rest of a body that did not arrive in time would be read as the next request.
            if apiError.code == "request_timeout" { r.headers[.connection] = "close" }
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
        case let e as HTTPParserError:
            return APIError(.badRequest, "The request is not valid HTTP/1.1: \(e)", code: "invalid_http")
        case let e as HTTPResponseError where e.status == .contentTooLarge:
            return .tooLarge(maxBodyBytes)
        case let e as HTTPResponseError:
            return APIError(e.status, e.status.reasonPhrase, type: e.status.code < 500 ? "invalid_request_error" : "server_error")
        default:
            return APIError(.internalServerError, "Internal error: \(error)", type: "server_error")
        }
    }
}

/// `Authorization: Bearer <key>` with one of the server's keys on every route but /health,
/// which load balancers probe.
struct BearerAuthMiddleware: RouterMiddleware {
    typealias Context = BasicRequestContext
    let keys: [[UInt8]]

    init(keys: [String]) { self.keys = keys.map { Array($0.utf8) } }

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        guard request.uri.path != "/health" else { return try await next(request, context) }
        let given = Array((Self.bearer(request) ?? "").utf8)
        // Every key is compared, so the time taken does not tell which one came close.
        var matched = false
        for key in keys where Self.constantTimeEqual(given, key) { matched = true }
        guard matched else { throw APIError.unauthorized }
        return try await next(request, context)
    }

    static func bearer(_ request: Request) -> String? {
        guard let header = request.headers[.authorization], header.hasPrefix("Bearer ") else { return nil }
        return String(header.dropFirst(7))
    }

    /// Compares without an early exit, so response time does not reveal how much of a guess was right.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        guard a.count == b.count else { return false }
        var difference: UInt8 = 0
        for (x, y) in zip(a, b) { difference |= x ^ y }
        return difference == 0
    }
}

/// Waits for the service group's graceful shutdown, then drains the scheduler.
struct DrainService: Service {
    let server: OpenAIServer
    let logger: Logger

    func run() async throws {
        do { try await gracefulShutdown() } catch {
            server.scheduler.shutdown()  // cancelled: the group is going down without grace
            return
        }
        let grace = server.configuration.shutdownGrace
        logger.info("shutting down: no new admissions; running generations get \(grace) s to finish")
        await server.scheduler.drain(grace: grace)
        server.scheduler.shutdown()
        logger.info("lanes free; closing connections once their responses are written")
    }
}
