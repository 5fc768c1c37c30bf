import Dispatch
import Foundation
import Fulgur

/// What a submitted generation tells its client, in order: queue positions while it waits,
/// then each token (before its text) and text as it becomes final, then one `finished` or
/// `failed`.
enum GenerationEvent: Sendable {
    /// 1 is next in line.
    case queued(position: Int)
    case token(Int, TokenLogprobs?)
    case text(String)
    case finished(GenerationResult)
    case failed(APIError)
}

/// Admits generations in arrival order from a bounded queue and runs them on lanes. A lane
/// is a dedicated thread that owns one sequence of the model, because a generation is a long
/// blocking loop that must not occupy Swift's cooperative threads. This first version has one
/// lane, as the Engine holds one KV cache; several lanes (one per KV slot) or continuous
/// batching replace `runLane` and keep `submit` and `Ticket` as they are.
public final class Scheduler: @unchecked Sendable {
    let model: ServingModel
    /// How many requests may wait while the lane is busy.
    public let maxQueue: Int
    let metrics: ServerMetrics

    // Guarded by `condition`.
    private let condition = NSCondition()
    private var waiting: [Job] = []
    private var running: Job?
    private var stopped = false

    public init(model: ServingModel, maxQueue: Int, metrics: ServerMetrics) {
        self.model = model
        self.maxQueue = maxQueue
        self.metrics = metrics
        // The lane keeps the scheduler alive until `shutdown`.
        let lane = Thread { [self] in runLane() }
        lane.name = "fulgur-lane-0"
        lane.start()
    }

    /// Lets the lane finish its current generation and exit; jobs still waiting fail.
    public func shutdown() {
        condition.lock()
        stopped = true
        let dropped = waiting
        for job in dropped { job.done = true }
        waiting.removeAll()
        condition.broadcast()
        condition.unlock()
        for job in dropped {
            job.continuation.yield(.failed(APIError(.serviceUnavailable, "The server is shutting down", type: "server_error")))
            job.continuation.finish()
        }
    }

    /// Queues a generation; its events arrive on the ticket. Throws `queueFull` at once when
    /// `maxQueue` requests already wait, so that the client hears it before any stream starts.
    func submit(prompt: [Int], parameters: GenerationParameters) throws(APIError) -> Ticket {
        let (events, continuation) = AsyncStream.makeStream(of: GenerationEvent.self)
        let job = Job(prompt: prompt, parameters: parameters, continuation: continuation)
        condition.lock()
        defer { condition.unlock() }
        guard !stopped else { throw APIError(.serviceUnavailable, "The server is shutting down", type: "server_error") }
        let ahead = waiting.count + (running == nil ? 0 : 1)
        guard ahead <= maxQueue else { throw .queueFull(maxQueue) }
        // A stream dropped unread (a response that was never written) cancels its job too.
        continuation.onTermination = { [self, job] _ in cancel(job) }
        waiting.append(job)
        if ahead > 0 { continuation.yield(.queued(position: waiting.count)) }
        metrics.queueDepth.record(waiting.count)
        condition.signal()
        return Ticket(events: events) { [self, job] in cancel(job) }
    }

    /// A waiting job leaves the queue at once; a running one stops at its next token.
    private func cancel(_ job: Job) {
        condition.lock()
        guard !job.cancelled, !job.done else { condition.unlock(); return }
        job.cancelled = true
        metrics.cancelled.increment()
        let index = waiting.firstIndex { $0 === job }
        if let index {
            waiting.remove(at: index)
            reportPositions(from: index)
            metrics.queueDepth.record(waiting.count)
        }
        condition.unlock()
        // Outside the lock: finishing runs onTermination, which cancels again.
        if index != nil { job.continuation.finish() }
    }

    private func reportPositions(from index: Int) {
        for i in index..<waiting.count { waiting[i].continuation.yield(.queued(position: i + 1)) }
    }

    private func isCancelled(_ job: Job) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        return job.cancelled
    }

    private func runLane() {
        while true {
            condition.lock()
            while waiting.isEmpty && !stopped { condition.wait() }
            if stopped { condition.unlock(); return }
            let job = waiting.removeFirst()
            running = job
            reportPositions(from: 0)
            metrics.queueDepth.record(waiting.count)
            metrics.running.record(1)
            condition.unlock()
            metrics.queueWait.recordNanoseconds(DispatchTime.now().uptimeNanoseconds - job.submitted)
            run(job)
        }
    }

    /// Marked before the last event goes out, so that the handler's cancel on its way out
    /// is not counted as a cancellation.
    private func finish(_ job: Job) {
        condition.lock()
        running = nil
        job.done = true
        metrics.running.record(0)
        condition.unlock()
    }

    private func run(_ job: Job) {
        let events = job.continuation
        do {
            let result = try model.generate(
                prompt: job.prompt, parameters: job.parameters,
                onToken: { events.yield(.token($0, $1)) },
                onText: { text in
                    events.yield(.text(text))
                    return !isCancelled(job)
                })
            metrics.promptTokens.increment(by: result.promptTokens)
            metrics.completionTokens.increment(by: result.tokens.count)
            metrics.timeToFirstToken.recordSeconds(result.timeToFirstToken)
            if result.tokens.count > 1 { metrics.interTokenLatency.recordSeconds(result.decodeSeconds / Double(result.tokens.count - 1)) }
            finish(job)
            events.yield(.finished(result))
        } catch {
            finish(job)
            events.yield(.failed(.engine(error)))
        }
        events.finish()
    }

    /// `@unchecked Sendable`: `cancelled` and `done` change only under the scheduler's lock.
    final class Job: @unchecked Sendable {
        let prompt: [Int]
        let parameters: GenerationParameters
        let continuation: AsyncStream<GenerationEvent>.Continuation
        let submitted = DispatchTime.now().uptimeNanoseconds
        var cancelled = false
        var done = false

        init(prompt: [Int], parameters: GenerationParameters, continuation: AsyncStream<GenerationEvent>.Continuation) {
            self.prompt = prompt
            self.parameters = parameters
            self.continuation = continuation
        }
    }
}

/// A submitted generation: its events, and a way to give it up. Cancelling after it ended
/// does nothing, so a handler can cancel on every way out.
struct Ticket: Sendable {
    let events: AsyncStream<GenerationEvent>
    let cancel: @Sendable () -> Void
}
