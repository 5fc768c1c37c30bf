import ArgumentParser
import Foundation
import Fulgur
import FulgurServer
import Logging

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve the model over an OpenAI-compatible HTTP API (chat/completions, completions, models, health, metrics).",
        discussion: """
            Admission (latency first): --lanes generations run at once, each on its own KV cache over \
            the shared weights. A request that finds every lane taken waits in a FIFO queue of at most \
            --max-queue and learns its place (SSE comments ': queue position N', and the X-Queue-Position \
            header on arrival); a full queue answers 503. With API keys: --key-quota caps admissions per \
            key per UTC day (a request that takes a lane or a place in the queue is one; a place given up \
            before its turn is given back), answering 429. --session-length makes an admission reserve \
            its lane for its key for that many seconds: the key's further requests run on it without \
            queueing or quota, a generation still running at the end is stopped with a 'session_expired' \
            error, and --idle-release frees the lane early once the key has had nothing running or waiting \
            for that long. The seed's trial: --lanes 1 --key-quota 10 --session-length 1800 --idle-release 300.

            Throughput first (--schedule throughput, CPU or one GPU): one engine loop runs up to --max-batch \
            generations together, each on a KV slot of its own, one forward pass over all of them a step \
            (a token from each that is decoding; prompts in pieces of at most --prefill-chunk tokens a \
            step, so that a long prompt does not stall the others). Further requests queue as above, \
            with the same --max-queue, --key-quota and 503/429 answers; sessions are for latency first.

            DFlash (--speculative DRAFTER_DIR, latency first): every lane decodes speculatively with a \
            drafter cache of its own; output is plain decoding's, token for token (a fixed seed gives the \
            same text). Responses carry the statistics in a top-level "fulgur": {"speculative": {...}} \
            object (the whole answer, or a stream's finishing chunk), and /metrics the acceptance \
            histogram and draft/verify seconds. Batching (--schedule throughput) does not decode \
            speculatively and refuses --speculative.

            --quota-file PATH keeps --key-quota's counts in a JSON file, rewritten (a temporary file, \
            then renamed over it) at every admission, and read at start, so that a restart does not \
            reset them; a file that cannot be read as one is an error, never reset.

            SIGTERM or SIGINT: new requests get 503, running generations get --shutdown-grace seconds and \
            then end with an error event and [DONE]; the process exits 0.
            """)

    @OptionGroup var modelOptions: ModelOptions
    @Option(help: "Address to listen on; the default accepts connections from this machine only.") var host = "127.0.0.1"
    @Option(help: "Port to listen on (0: any free port, printed at start).") var port = 8080
    @Option(name: .customLong("api-key"), help: "Require 'Authorization: Bearer KEY' on every route but /health (repeatable: any of the keys).")
    var apiKeys: [String] = []
    @Option(name: .customLong("api-keys-file"), help: "A file of API keys, one a line ('#' starts a comment line); adds to --api-key.")
    var apiKeysFile: String?
    @Option(help: "latency: each lane runs one generation alone at single-stream speed; throughput: generations share forward passes (continuous batching).")
    var schedule: ScheduleChoice = .latency
    @Option(help: "Generations that run at once, each on its own KV cache (size them to the cores: lanes share them); latency first. (default: 1)")
    var lanes: Int?
    @Option(name: .customLong("max-batch"), help: "Generations batched together, each on a KV slot of its own; throughput first. (default: 32)")
    var maxBatch: Int?
    @Option(name: .customLong("prefill-chunk"), help: "Most prompt tokens one batched step runs, so a long prompt does not stall the other streams; throughput first. (default: 32)")
    var prefillChunk: Int?
    @Option(name: .customLong("max-queue"), help: "Admissions that may wait for a lane; more get 503.") var maxQueue = 64
    @Option(name: .customLong("key-quota"), help: "Admissions one API key may make per UTC day; more get 429 (needs API keys).") var keyQuota: Int?
    @Option(name: .customLong("quota-file"), help: "Keep --key-quota's counts in this JSON file (read at start, rewritten at every admission), so that they survive a restart.")
    var quotaFile: String?
    @Option(help: "Decode speculatively with the DFlash drafter in this directory, on every lane (latency first).")
    var speculative: String?
    @Option(name: .customLong("block-size"), parsing: .unconditional, help: "Tokens per speculative block, 2...16 (default: the drafter's, at most 16).")
    var blockSize: Int?
    @Option(name: .customLong("session-length"), help: "Seconds an admission reserves its lane for its key (needs API keys; default: one request).")
    var sessionLength: Double?
    @Option(name: .customLong("idle-release"), help: "Seconds after which a reserved lane its key leaves idle is released (needs --session-length).")
    var idleRelease: Double?
    @Option(name: .customLong("max-tokens-limit"), help: "The most tokens one request may generate (also the default).") var maxTokensLimit = 4096
    @Option(name: .customLong("max-body-bytes"), help: "Largest request body accepted; larger ones get 413.") var maxBodyBytes = 4 << 20
    @Option(name: .customLong("request-timeout"), help: "Seconds a client has to send its request body (408 after); a connection idle for twice this is closed.")
    var requestTimeout = 30.0
    @Option(name: .customLong("shutdown-grace"), help: "Seconds running generations may go on after SIGTERM/SIGINT.") var shutdownGrace = 10.0

    func run() async throws {
        let keys = try reportingErrors { try allKeys() }
        var configuration = ServerConfiguration()
        configuration.host = host
        configuration.port = port
        configuration.apiKeys = keys
        let lanes = schedule == .latency ? self.lanes ?? 1 : maxBatch ?? 32
        configuration.schedule = schedule == .latency ? .latency : .throughput(prefillChunk: prefillChunk ?? 32)
        configuration.admission = AdmissionPolicy(lanes: lanes, maxQueue: maxQueue, keyQuota: keyQuota,
                                                  sessionLength: sessionLength, idleRelease: idleRelease, quotaFile: quotaFile)
        configuration.limits = RequestLimits(maxTokens: maxTokensLimit, maxBodyBytes: maxBodyBytes, requestTimeout: requestTimeout)
        configuration.shutdownGrace = shutdownGrace
        try reportingErrors {
            guard (0...65535).contains(port) else { throw FulgurError(.usage, "--port must be in 0...65535, got \(port)") }
            switch schedule {
            case .latency:
                guard (1...256).contains(lanes) else { throw FulgurError(.usage, "--lanes must be in 1...256, got \(lanes)") }
                for (flag, value) in [("--max-batch", maxBatch), ("--prefill-chunk", prefillChunk)] where value != nil {
                    throw FulgurError(.usage, "\(flag) sizes batches, which only --schedule throughput runs")
                }
            case .throughput:
                guard self.lanes == nil else { throw FulgurError(.usage, "--lanes is for --schedule latency; throughput first batches up to --max-batch generations") }
                guard (1...256).contains(lanes) else { throw FulgurError(.usage, "--max-batch must be in 1...256, got \(lanes)") }
                if let prefillChunk, !(1...1024).contains(prefillChunk) {
                    throw FulgurError(.usage, "--prefill-chunk must be in 1...1024, got \(prefillChunk)")
                }
                guard sessionLength == nil else {
                    throw FulgurError(.usage, "--session-length reserves a lane for a key's requests, one after another, which is latency first; with --schedule throughput every request takes a KV slot of its own")
                }
                guard speculative == nil else {
                    throw FulgurError(.usage, "--speculative decodes on the lanes of --schedule latency; --schedule throughput batches one token per generation a step and does not decode speculatively (use --schedule latency --lanes N)")
                }
            }
            if blockSize != nil, speculative == nil { throw FulgurError(.usage, "--block-size needs --speculative DRAFTER_DIR") }
            if quotaFile != nil, keyQuota == nil { throw FulgurError(.usage, "--quota-file keeps --key-quota's counts: give --key-quota too") }
            guard maxQueue >= 0 else { throw FulgurError(.usage, "--max-queue must be >= 0, got \(maxQueue)") }
            guard maxTokensLimit >= 1 else { throw FulgurError(.usage, "--max-tokens-limit must be at least 1, got \(maxTokensLimit)") }
            guard maxBodyBytes >= 1024 else { throw FulgurError(.usage, "--max-body-bytes must be at least 1024, got \(maxBodyBytes)") }
            guard requestTimeout > 0 else { throw FulgurError(.usage, "--request-timeout must be positive, got \(requestTimeout)") }
            guard shutdownGrace >= 0 else { throw FulgurError(.usage, "--shutdown-grace must be >= 0, got \(shutdownGrace)") }
            if let keyQuota {
                guard keyQuota >= 1 else { throw FulgurError(.usage, "--key-quota must be at least 1, got \(keyQuota)") }
                guard !keys.isEmpty else { throw FulgurError(.usage, "--key-quota counts per API key: give keys with --api-key or --api-keys-file") }
            }
            if let sessionLength {
                guard sessionLength > 0 else { throw FulgurError(.usage, "--session-length must be positive, got \(sessionLength)") }
                guard !keys.isEmpty else { throw FulgurError(.usage, "--session-length reserves a lane per API key: give keys with --api-key or --api-keys-file") }
            }
            if let idleRelease {
                guard idleRelease > 0 else { throw FulgurError(.usage, "--idle-release must be positive, got \(idleRelease)") }
                guard sessionLength != nil else { throw FulgurError(.usage, "--idle-release releases reserved lanes: it needs --session-length") }
            }
        }
        let engine = try reportingErrors { try modelOptions.load() }
        if let speculative { try reportingErrors { try engine.useDrafter(directory: speculative, blockSize: blockSize) } }
        let server = try reportingErrors { try OpenAIServer(model: EngineModel(engine), configuration: configuration) }
        var logger = Logger(label: "fulgur.serve")
        logger.logLevel = .info
        let id = server.model.id
        try await server.run(logger: logger) { address in
            Terminal.status("Serving \(id) on http://\(address)/v1 (Ctrl-C stops)")
        }
    }

    enum ScheduleChoice: String, ExpressibleByArgument, CaseIterable { case latency, throughput }

    private func allKeys() throws -> [String] {
        var keys = apiKeys
        if let apiKeysFile {
            let text: String
            do { text = try String(contentsOfFile: apiKeysFile, encoding: .utf8) } catch {
                throw FulgurError(.io, "--api-keys-file \(apiKeysFile): cannot read it (\(error.localizedDescription))")
            }
            keys += text.split(whereSeparator: \.isNewline).map { $0.trimmingCharacters(in: .whitespaces) }
                .filter { !$0.isEmpty && !$0.hasPrefix("#") }
            if keys.isEmpty { throw FulgurError(.usage, "--api-keys-file \(apiKeysFile) holds no keys") }
        }
        for key in keys where key.isEmpty || key.contains(where: { $0.isWhitespace }) {
            throw FulgurError(.usage, "API keys must be non-empty and without spaces, got '\(key)'")
        }
        return keys
    }
}
