import ArgumentParser
import Fulgur
import FulgurServer
import Logging

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the model over an OpenAI-compatible HTTP API (chat/completions, completions, models, health, metrics).")

    @OptionGroup var modelOptions: ModelOptions
    @Option(help: "Address to listen on; the default accepts connections from this machine only.") var host = "127.0.0.1"
    @Option(help: "Port to listen on (0: any free port, printed at start).") var port = 8080
    @Option(name: .customLong("api-key"), help: "Require 'Authorization: Bearer KEY' on every route but /health.") var apiKey: String?
    @Option(name: .customLong("max-queue"), help: "Requests that may wait while one generates; more get 503.") var maxQueue = 64
    @Option(name: .customLong("max-tokens-limit"), help: "The most tokens one request may generate (also the default).") var maxTokensLimit = 4096
    @Option(name: .customLong("max-body-bytes"), help: "Largest request body accepted; larger ones get 413.") var maxBodyBytes = 4 << 20

    func run() async throws {
        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        configuration.apiKey = apiKey
        configuration.maxQueue = maxQueue
        configuration.limits = RequestLimits(maxTokens: maxTokensLimit, maxBodyBytes: maxBodyBytes)
        try reportingErrors {
            guard (0...65535).contains(port) else { throw FulgurError(.usage, "--port must be in 0...65535, got \(port)") }
            guard maxQueue >= 0 else { throw FulgurError(.usage, "--max-queue must be >= 0, got \(maxQueue)") }
            guard maxTokensLimit >= 1 else { throw FulgurError(.usage, "--max-tokens-limit must be at least 1, got \(maxTokensLimit)") }
            guard maxBodyBytes >= 1024 else { throw FulgurError(.usage, "--max-body-bytes must be at least 1024, got \(maxBodyBytes)") }
            if apiKey?.isEmpty == true { throw FulgurError(.usage, "--api-key must not be empty") }
        }
        let engine = try reportingErrors { try modelOptions.load() }
        let server = OpenAIServer(model: EngineModel(engine), configuration: configuration)
        var logger = Logger(label: "fulgur.serve")
        logger.logLevel = .info
        let id = server.model.id
        let app = server.application(logger: logger) { address in
            Terminal.status("Serving \(id) on http://\(address)/v1 (Ctrl-C stops)")
        }
        try await app.runService()
        server.scheduler.shutdown()
    }
}
