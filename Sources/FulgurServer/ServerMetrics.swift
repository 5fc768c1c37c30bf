import CoreMetrics
import Fulgur
import Prometheus

/// The server's metrics, in a registry of its own (not the process-wide MetricsSystem, which
/// can be bootstrapped once only) so that every server, tests' included, counts for itself.
/// `GET /metrics` renders them in Prometheus' text format.
public struct ServerMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    private let factory: PrometheusMetricsFactory
    /// Admissions waiting for a lane, and generations running on lanes.
    let queueDepth: CoreMetrics.Gauge
    let running: CoreMetrics.Gauge
    /// Lanes configured, and lanes held by an admission (running, or reserved by a session).
    let lanes: CoreMetrics.Gauge
    let reservedLanes: CoreMetrics.Gauge
    let admissions: CoreMetrics.Counter
    let promptTokens: CoreMetrics.Counter
    let completionTokens: CoreMetrics.Counter
    /// Generations ended because their client went away.
    let cancelled: CoreMetrics.Counter
    let queueWait: CoreMetrics.Timer
    /// From the start of a generation to its first token: prefill, the cost of the prompt.
    let timeToFirstToken: CoreMetrics.Timer
    /// Mean time between the tokens of one generation.
    let interTokenLatency: CoreMetrics.Timer
    /// DFlash decoding: tokens each round emitted (the acceptance length, the target's own
    /// token included), rounds, and the seconds the drafter's block forward (draft) and the
    /// target's verify forward (verify) took in all; draft seconds a round is
    /// rate(draft_seconds_total) / rate(rounds_total).
    let acceptanceLength: CoreMetrics.Recorder
    let speculativeRounds: CoreMetrics.Counter
    let draftSeconds: CoreMetrics.FloatingPointCounter
    let verifySeconds: CoreMetrics.FloatingPointCounter

    public init() {
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10), .milliseconds(25),
            .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1),
            .milliseconds(2500), .seconds(5), .seconds(10), .seconds(30), .seconds(60),
        ]
        // Rounds emit 1 ... block size (at most 16) tokens.
        factory.valueHistogramBuckets["fulgur_speculative_acceptance_length"] = (1...16).map(Double.init)
        self.factory = factory
        queueDepth = CoreMetrics.Gauge(label: "fulgur_queue_depth", factory: factory)
        running = CoreMetrics.Gauge(label: "fulgur_running_generations", factory: factory)
        lanes = CoreMetrics.Gauge(label: "fulgur_lanes", factory: factory)
        reservedLanes = CoreMetrics.Gauge(label: "fulgur_reserved_lanes", factory: factory)
        admissions = CoreMetrics.Counter(label: "fulgur_admissions_total", factory: factory)
        promptTokens = CoreMetrics.Counter(label: "fulgur_prompt_tokens_total", factory: factory)
        completionTokens = CoreMetrics.Counter(label: "fulgur_completion_tokens_total", factory: factory)
        cancelled = CoreMetrics.Counter(label: "fulgur_cancelled_generations_total", factory: factory)
        queueWait = CoreMetrics.Timer(label: "fulgur_queue_wait_seconds", factory: factory)
        timeToFirstToken = CoreMetrics.Timer(label: "fulgur_time_to_first_token_seconds", factory: factory)
        interTokenLatency = CoreMetrics.Timer(label: "fulgur_inter_token_latency_seconds", factory: factory)
        acceptanceLength = CoreMetrics.Recorder(label: "fulgur_speculative_acceptance_length", factory: factory)
        speculativeRounds = CoreMetrics.Counter(label: "fulgur_speculative_rounds_total", factory: factory)
        draftSeconds = CoreMetrics.FloatingPointCounter(label: "fulgur_speculative_draft_seconds_total", factory: factory)
        verifySeconds = CoreMetrics.FloatingPointCounter(label: "fulgur_speculative_verify_seconds_total", factory: factory)
        queueDepth.record(0)
        running.record(0)
        reservedLanes.record(0)
    }

    enum Refusal: String { case quota, queueFull = "queue_full" }

    /// Counts a request turned away before admission.
    func refused(_ reason: Refusal) {
        CoreMetrics.Counter(label: "fulgur_refused_requests_total", dimensions: [("reason", reason.rawValue)], factory: factory)
            .increment()
    }

    /// Counts an ended session by why it ended: `done` (drained at shutdown), `length`, `idle`.
    func sessionEnded(_ reason: Scheduler.SessionEnd) {
        CoreMetrics.Counter(label: "fulgur_sessions_ended_total", dimensions: [("reason", reason.rawValue)], factory: factory)
            .increment()
    }

    /// Records how a generation's speculative decoding went.
    func speculative(_ stats: SpeculativeStats) {
        for length in stats.acceptanceLengths { acceptanceLength.record(length) }
        speculativeRounds.increment(by: stats.rounds)
        draftSeconds.increment(by: stats.draftSeconds)
        verifySeconds.increment(by: stats.verifySeconds)
    }

    /// Counts one answered request by route and status.
    func request(path: String, status: Int) {
        CoreMetrics.Counter(label: "fulgur_http_requests_total", dimensions: [("path", path), ("status", String(status))], factory: factory)
            .increment()
    }

    func render() -> String { registry.emitToString() }
}
