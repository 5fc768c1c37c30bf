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

/// How admitted generations run on their lanes.
public enum Schedule: Sendable, Equatable {
    /// Latency first: a lane is a thread that runs one generation alone, at single-stream speed.
    case latency
    /// Throughput first (continuous batching): a lane is a KV slot of one engine thread that
    /// advances every admitted generation together, one forward pass at a time, prompts in
    /// pieces of at most `prefillChunk` tokens. Sessions are for latency first only.
    case throughput(prefillChunk: Int)
}

/// Admits generations to lanes by the `AdmissionPolicy` and runs them by the `Schedule`.
/// Generations run on dedicated threads, because they are long blocking loops that must not
/// occupy Swift's cooperative threads: latency first, one thread per lane, each owning one
/// sequence of the model (its KV cache); throughput first, one engine thread for a batch of
/// `lanes` KV slots.
///
/// Every admission is a `Session` (with sessions off, a session of one request): it waits in
/// `queue` until a lane frees, then holds that lane until it ends.
public final class Scheduler: @unchecked Sendable {
    public let policy: AdmissionPolicy
    public let schedule: Schedule
    let metrics: ServerMetrics

    // Guarded by `condition`; lanes and submitters wait on it.
    private let condition = NSCondition()
    private var queue: [Session] = []
    /// The session holding each lane.
    private var lanes: [Session?]
    /// Sessions by key, waiting or on a lane (sessions on only).
    private var sessions: [String: Session] = [:]
    private var quota: QuotaBook
    private var running = 0
    /// Set by `drain`: no new admissions; running generations stop at `graceDeadline`.
    private var draining = false
    private var graceDeadline = Double.infinity
    private var stopped = false

    private var sessionsOn: Bool { policy.sessionLength != nil }

    public init(model: ServingModel, policy: AdmissionPolicy, schedule: Schedule = .latency, metrics: ServerMetrics) throws {
        precondition(policy.lanes >= 1, "a scheduler needs at least one lane")
        precondition(schedule == .latency || policy.sessionLength == nil, "sessions reserve lanes of the latency-first schedule")
        self.policy = policy
        self.schedule = schedule
        self.metrics = metrics
        lanes = Array(repeating: nil, count: policy.lanes)
        quota = try QuotaBook(limit: policy.keyQuota, file: policy.quotaFile)
        // The threads keep the scheduler alive until `shutdown`.
        switch schedule {
        case .latency:
            let sequences = try model.makeSequences(policy.lanes)
            for index in 0..<policy.lanes {
                let lane = Thread { [self] in runLane(index, on: sequences[index]) }
                lane.name = "fulgur-lane-\(index)"
                lane.start()
            }
        case .throughput(let prefillChunk):
            let batch = try model.makeBatch(slots: policy.lanes, prefillChunk: prefillChunk)
            let engine = Thread { [self] in runBatch(batch) }
            engine.name = "fulgur-engine"
            engine.start()
        }
        metrics.lanes.record(policy.lanes)
    }

    /// Queues a generation for `key` (nil without API keys); its events arrive on the ticket.
    /// Throws at once when the key's quota is used up or the queue is full, so that the client
    /// hears it before any stream starts.
    func submit(prompt: [Int], parameters: GenerationParameters, key: String? = nil) throws(APIError) -> Ticket {
        let (events, continuation) = AsyncStream.makeStream(of: GenerationEvent.self)
        let job = Job(prompt: prompt, parameters: parameters, continuation: continuation)
        condition.lock()
        defer { condition.unlock() }
        guard !draining else { throw .shuttingDown }
        let session: Session
        if sessionsOn, let key, let own = sessions[key], isLive(own) {
            session = own
        } else {
            let free = lanes.firstIndex { $0 == nil }
            guard free != nil || queue.count < policy.maxQueue else {
                metrics.refused(.queueFull)
                throw .queueFull(policy.maxQueue)
            }
            let day: Int
            do { day = try quota.charge(key) } catch {
                metrics.refused(.quota)
                throw error
            }
            session = Session(key: key, chargedDay: day)
            if sessionsOn, let key { sessions[key] = session }
            if let free {
                admit(session, to: free)
            } else {
                queue.append(session)
                metrics.queueDepth.record(queue.count)
            }
        }
        job.session = session
        session.jobs.append(job)
        // A stream dropped unread (a response that was never written) cancels its job too.
        continuation.onTermination = { [self, job] _ in cancel(job) }
        let position = queue.firstIndex { $0 === session }.map { $0 + 1 } ?? 0
        if position > 0 { continuation.yield(.queued(position: position)) }
        condition.broadcast()
        return Ticket(events: events, position: position) { [self, job] in cancel(job) }
    }

    /// Ends admissions and lets running generations go on for `grace` seconds; those still
    /// running then end with a `server_shutting_down` error, as do the ones that waited.
    /// Returns when every lane is free.
    public func drain(grace: Double) async {
        beginDrain(grace: grace)
        while !isIdle { try? await Task.sleep(for: .milliseconds(20)) }
    }

    /// Stops the lanes once their current generation ends, at its next token; jobs still
    /// waiting fail.
    public func shutdown() {
        condition.lock()
        stopped = true
        condition.unlock()
        beginDrain(grace: 0)
    }

    private func beginDrain(grace: Double) {
        condition.lock()
        draining = true
        graceDeadline = min(graceDeadline, now() + grace)
        var dropped = queue.flatMap(\.jobs)
        for session in queue { forget(session) }
        queue.removeAll()
        for case let session? in lanes {
            dropped += session.jobs
            session.jobs.removeAll()
        }
        for job in dropped { job.done = true }
        metrics.queueDepth.record(0)
        condition.broadcast()
        condition.unlock()
        for job in dropped {
            job.continuation.yield(.failed(.shuttingDown))
            job.continuation.finish()
        }
    }

    public var isDraining: Bool {
        condition.lock()
        defer { condition.unlock() }
        return draining
    }

    private var isIdle: Bool {
        condition.lock()
        defer { condition.unlock() }
        return lanes.allSatisfy { $0 == nil }
    }

    /// A waiting job leaves at once; a running one stops at its next token.
    private func cancel(_ job: Job) {
        condition.lock()
        guard !job.cancelled, !job.done, let session = job.session else { condition.unlock(); return }
        job.cancelled = true
        metrics.cancelled.increment()
        let index = session.jobs.firstIndex { $0 === job }
        if let index {
            session.jobs.remove(at: index)
            // A session that waited for nothing else leaves the queue and gets its admission back.
            if session.jobs.isEmpty, let place = queue.firstIndex(where: { $0 === session }) {
                queue.remove(at: place)
                forget(session)
                quota.refund(session.key, day: session.chargedDay)
                reportPositions(from: place)
                metrics.queueDepth.record(queue.count)
            }
        }
        condition.broadcast()
        condition.unlock()
        // Outside the lock: finishing runs onTermination, which cancels again.
        if index != nil { job.continuation.finish() }
    }

    // MARK: - Under the lock

    /// Whether a session can take another request: not past its end, although its lane may
    /// not have noticed yet.
    private func isLive(_ session: Session) -> Bool {
        let t = now()
        guard t < session.deadline else { return false }
        guard let idle = policy.idleRelease, session.lane != nil, session.jobs.isEmpty, !session.running else { return true }
        return t < session.lastActive + idle
    }

    private func admit(_ session: Session, to lane: Int) {
        let t = now()
        lanes[lane] = session
        session.lane = lane
        session.deadline = policy.sessionLength.map { t + $0 } ?? .infinity
        session.lastActive = t
        metrics.admissions.increment()
        metrics.reservedLanes.record(lanes.filter { $0 != nil }.count)
    }

    /// Frees the session's lane and gives it to the first in the queue.
    private func end(_ session: Session, reason: SessionEnd) {
        guard let lane = session.lane else { return }
        lanes[lane] = nil
        forget(session)
        if sessionsOn { metrics.sessionEnded(reason) }
        if !draining, !queue.isEmpty {
            admit(queue.removeFirst(), to: lane)
            reportPositions(from: 0)
            metrics.queueDepth.record(queue.count)
        }
        metrics.reservedLanes.record(lanes.filter { $0 != nil }.count)
    }

    private func forget(_ session: Session) {
        if let key = session.key, sessions[key] === session { sessions[key] = nil }
    }

    private func reportPositions(from index: Int) {
        for i in index..<queue.count {
            for job in queue[i].jobs { job.continuation.yield(.queued(position: i + 1)) }
        }
    }

    // MARK: - Lanes

    private func runLane(_ index: Int, on sequence: any ModelSequence) {
        condition.lock()
        while true {
            guard let session = lanes[index] else {
                if stopped { break }
                condition.wait()
                continue
            }
            let t = now()
            if t >= session.deadline {
                let expired = session.jobs
                session.jobs.removeAll()
                for job in expired { job.done = true }
                end(session, reason: .length)
                condition.unlock()
                for job in expired {
                    job.continuation.yield(.failed(.sessionExpired(length: policy.sessionLength ?? 0)))
                    job.continuation.finish()
                }
                condition.lock()
                continue
            }
            if !session.jobs.isEmpty {
                let job = session.jobs.removeFirst()
                session.running = true
                running += 1
                metrics.running.record(running)
                condition.unlock()
                run(job, on: sequence, in: session)
                condition.lock()
                session.running = false
                session.lastActive = now()
                running -= 1
                metrics.running.record(running)
                continue
            }
            // Nothing to run: one request's admission ends with it; a session may idle.
            if !sessionsOn || draining {
                end(session, reason: .done)
                continue
            }
            let idleEnd = policy.idleRelease.map { session.lastActive + $0 } ?? .infinity
            if t >= idleEnd {
                end(session, reason: .idle)
                continue
            }
            let wake = min(session.deadline, idleEnd)
            if wake.isFinite { _ = condition.wait(until: Date(timeIntervalSinceNow: wake - t)) } else { condition.wait() }
        }
        condition.unlock()
    }

    /// Whether the job may take another token; records why not.
    private func mayContinue(_ job: Job, _ session: Session) -> Bool {
        condition.lock()
        defer { condition.unlock() }
        if job.cancelled { return false }
        let t = now()
        if t >= session.deadline { job.stop = .sessionExpired } else if t >= graceDeadline { job.stop = .shuttingDown }
        return job.stop == nil
    }

    private func run(_ job: Job, on sequence: any ModelSequence, in session: Session) {
        let events = job.continuation
        metrics.queueWait.recordNanoseconds(DispatchTime.now().uptimeNanoseconds - job.submitted)
        complete(job, Result {
            try sequence.generate(
                prompt: job.prompt, parameters: job.parameters,
                onToken: { events.yield(.token($0, $1)) },
                onText: { text in
                    events.yield(.text(text))
                    return mayContinue(job, session)
                })
        })
    }

    /// Counts a generation's end in the metrics and sends its last event.
    private func complete(_ job: Job, _ outcome: Result<GenerationResult, Error>) {
        let event: GenerationEvent
        switch outcome {
        case .success(let result):
            metrics.promptTokens.increment(by: result.promptTokens)
            metrics.completionTokens.increment(by: result.tokens.count)
            metrics.timeToFirstToken.recordSeconds(result.timeToFirstToken)
            if result.tokens.count > 1 { metrics.interTokenLatency.recordSeconds(result.decodeSeconds / Double(result.tokens.count - 1)) }
            if let stats = result.speculative { metrics.speculative(stats) }
            switch job.stop {
            case .sessionExpired: event = .failed(.sessionExpired(length: policy.sessionLength ?? 0))
            case .shuttingDown: event = .failed(.shuttingDown)
            case nil: event = .finished(result)
            }
        case .failure(let error):
            event = .failed(.engine(error))
        }
        // Marked before the last event goes out, so that the handler's cancel on its way out
        // is not counted as a cancellation.
        condition.lock()
        job.done = true
        condition.unlock()
        job.continuation.yield(event)
        job.continuation.finish()
    }

    // MARK: - Throughput first

    /// The engine thread: starts the jobs admitted to slots, stops those cancelled or out of
    /// time, and runs a batched step over the rest, until `shutdown` and every slot is free.
    /// A client that leaves is noticed before the next step.
    private func runBatch(_ batch: any ModelBatch) {
        var active: [Int: (job: Job, session: Session)] = [:]
        condition.lock()
        while true {
            // A slot whose job left before it started is free again (this may admit the next).
            for case let session? in lanes where !session.running && session.jobs.isEmpty { end(session, reason: .done) }
            var starting: [(job: Job, session: Session)] = []
            for case let session? in lanes where !session.running {
                session.running = true
                starting.append((session.jobs.removeFirst(), session))
            }
            if active.isEmpty && starting.isEmpty {
                if stopped { break }
                condition.wait()
                continue
            }
            let pastGrace = now() >= graceDeadline
            let stopping = active.filter { $0.value.job.cancelled || pastGrace }.keys
            for id in stopping where !active[id]!.job.cancelled { active[id]!.job.stop = .shuttingDown }
            running += starting.count
            metrics.running.record(running)
            condition.unlock()

            var ended: [(job: Job, session: Session, outcome: Result<GenerationResult, Error>)] = []
            for (job, session) in starting {
                let events = job.continuation
                metrics.queueWait.recordNanoseconds(DispatchTime.now().uptimeNanoseconds - job.submitted)
                do {
                    let id = try batch.start(prompt: job.prompt, parameters: job.parameters, onToken: { events.yield(.token($0, $1)) },
                                             onText: { events.yield(.text($0)); return true })
                    active[id] = (job, session)
                } catch {
                    ended.append((job, session, .failure(error)))
                }
            }
            for id in stopping {
                let (job, session) = active.removeValue(forKey: id)!
                ended.append((job, session, .success(batch.stop(id))))
            }
            do {
                for (id, result) in try batch.step() {
                    let (job, session) = active.removeValue(forKey: id)!
                    ended.append((job, session, .success(result)))
                }
            } catch {
                ended += active.values.map { ($0.job, $0.session, .failure(error)) }
                active.removeAll()
            }
            for (job, _, outcome) in ended { complete(job, outcome) }

            condition.lock()
            for (_, session, _) in ended {
                session.running = false
                end(session, reason: .done)
            }
            running -= ended.count
            metrics.running.record(running)
        }
        condition.unlock()
    }

    private func now() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

    enum SessionEnd: String { case done, length, idle }

    /// `@unchecked Sendable`: the mutable fields change only under the scheduler's lock.
    final class Job: @unchecked Sendable {
        let prompt: [Int]
        let parameters: GenerationParameters
        let continuation: AsyncStream<GenerationEvent>.Continuation
        let submitted = DispatchTime.now().uptimeNanoseconds
        var session: Session?
        var cancelled = false
        var done = false
        var stop: Stop?

        enum Stop { case sessionExpired, shuttingDown }

        init(prompt: [Int], parameters: GenerationParameters, continuation: AsyncStream<GenerationEvent>.Continuation) {
            self.prompt = prompt
            self.parameters = parameters
            self.continuation = continuation
        }
    }

    /// One admission: waiting in the queue (`lane` nil), then holding a lane until it ends.
    final class Session {
        let key: String?
        /// The day its admission was counted against the key's quota.
        let chargedDay: Int
        var jobs: [Job] = []
        var running = false
        var lane: Int?
        /// Uptime seconds.
        var deadline = Double.infinity
        var lastActive = 0.0

        init(key: String?, chargedDay: Int) {
            self.key = key
            self.chargedDay = chargedDay
        }
    }
}

/// A submitted generation: its events, its place in the queue on arrival (0: admitted at
/// once), and a way to give it up. Cancelling after it ended does nothing, so a handler can
/// cancel on every way out.
struct Ticket: Sendable {
    let events: AsyncStream<GenerationEvent>
    let position: Int
    let cancel: @Sendable () -> Void
}
