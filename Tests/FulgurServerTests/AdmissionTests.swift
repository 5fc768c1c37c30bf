import Dispatch
import Fulgur
import Testing
@testable import FulgurServer

/// How a ticket ended: the text it streamed, the positions it was told, and its last event.
private struct Outcome {
    var text = ""
    var positions: [Int] = []
    var result: GenerationResult?
    var error: APIError?
}

private func outcome(_ ticket: Ticket) async -> Outcome {
    var o = Outcome()
    for await event in ticket.events {
        switch event {
        case .queued(let p): o.positions.append(p)
        case .token: break
        case .text(let t): o.text += t
        case .finished(let r): o.result = r
        case .failed(let e): o.error = e
        }
    }
    return o
}

private func submit(_ scheduler: Scheduler, _ prompt: Int, key: String? = nil, maxTokens: Int = 256) throws(APIError) -> Ticket {
    try scheduler.submit(prompt: [prompt], parameters: GenerationParameters(maxTokens: maxTokens), key: key)
}

@Test(.timeLimit(.minutes(1)))
func twoLanesRunTwoGenerationsAtOnceAndTheThirdWaits() async throws {
    let gate = DispatchSemaphore(value: 0)
    let model = FakeModel(reply: "ok", gate: gate)
    let scheduler = try Scheduler(model: model, policy: AdmissionPolicy(lanes: 2, maxQueue: 8), metrics: ServerMetrics())
    defer { scheduler.shutdown() }
    let first = try submit(scheduler, 1), second = try submit(scheduler, 2), third = try submit(scheduler, 3)
    #expect([first.position, second.position, third.position] == [0, 0, 1])
    // Both started while neither could finish: they run at the same time.
    while model.started.count < 2 { try await Task.sleep(for: .milliseconds(5)) }
    #expect(Set(model.started) == [[1], [2]])
    for _ in 0..<3 { gate.signal() }
    for ticket in [first, second, third] { #expect(await outcome(ticket).result?.text == "ok") }
}

@Test(.timeLimit(.minutes(1)))
func theQueueIsAdmittedInArrivalOrderAndAPlaceLeftIsSkipped() async throws {
    let gate = DispatchSemaphore(value: 0)
    let model = FakeModel(reply: "ok", gate: gate)
    let scheduler = try Scheduler(model: model, policy: AdmissionPolicy(lanes: 1, maxQueue: 8), metrics: ServerMetrics())
    defer { scheduler.shutdown() }
    let tickets = try (1...5).map { try submit(scheduler, $0) }
    #expect(tickets.map(\.position) == [0, 1, 2, 3, 4])
    tickets[2].cancel()
    for _ in 0..<4 { gate.signal() }
    for i in [0, 1, 3, 4] { #expect(await outcome(tickets[i]).result?.text == "ok") }
    #expect(model.started == [[1], [2], [4], [5]])
}

@Test(.timeLimit(.minutes(1)))
func aKeyOverItsDailyQuotaGets429AndALeftPlaceIsGivenBack() async throws {
    let gate = DispatchSemaphore(value: 0)
    let scheduler = try Scheduler(model: FakeModel(gate: gate), policy: AdmissionPolicy(lanes: 1, maxQueue: 8, keyQuota: 2),
                              metrics: ServerMetrics())
    defer { scheduler.shutdown(); for _ in 0..<4 { gate.signal() } }
    let running = try submit(scheduler, 1, key: "a")
    let waiting = try submit(scheduler, 2, key: "a")
    do {
        _ = try submit(scheduler, 3, key: "a")
        Issue.record("a third admission within the day was accepted")
    } catch {
        #expect(error.status == .tooManyRequests)
        #expect(error.code == "insufficient_quota")
        #expect(error.message.contains("all 2 of its admissions for today"))
        #expect(error.message.contains("resets at 00:00 UTC"))
    }
    // Quotas are per key.
    let other = try submit(scheduler, 4, key: "b")
    // A place given up before its turn does not count.
    waiting.cancel()
    let again = try submit(scheduler, 5, key: "a")
    #expect(again.position == 2)
    _ = (running, other)
}

@Test(.timeLimit(.minutes(3)))
func aSessionKeepsItsLaneForItsKeyUntilItsLengthRunsOut() async throws {
    // Long enough that the session cannot run out between two submissions while the rest of
    // the suite runs beside this test: with two cores, CPU-bound tests hold the concurrency
    // pool's threads and this test's next line waited 15 s once (0.5 s and 3 s both failed).
    let length = 60.0
    let scheduler = try Scheduler(model: FakeModel(reply: "ok"), policy: AdmissionPolicy(lanes: 1, maxQueue: 8, keyQuota: 1, sessionLength: length),
                              metrics: ServerMetrics())
    defer { scheduler.shutdown() }
    #expect(await outcome(try submit(scheduler, 1, key: "a")).result?.text == "ok")
    // The lane stays a's: b waits although nothing runs, and a's next requests go first
    // without queueing and without using quota (a has 1 admission a day).
    let b = try submit(scheduler, 2, key: "b")
    #expect(b.position == 1)
    let a = try submit(scheduler, 3, key: "a")
    #expect(a.position == 0)
    #expect(await outcome(a).result?.text == "ok")
    // Once a's session is over, b gets the lane.
    let got = await outcome(b)
    #expect(got.result?.text == "ok")
    #expect(got.positions == [1])
    // a's next request is a new admission: over its quota.
    #expect(throws: APIError.self) { try submit(scheduler, 4, key: "a") }
}

@Test(.timeLimit(.minutes(1)))
func aGenerationStillRunningAtTheEndOfItsSessionEndsWithSessionExpired() async throws {
    let model = FakeModel(reply: String(repeating: "z", count: 60000), contextLength: 65536, tokenDelay: .milliseconds(1))
    let scheduler = try Scheduler(model: model, policy: AdmissionPolicy(lanes: 1, sessionLength: 0.3), metrics: ServerMetrics())
    defer { scheduler.shutdown() }
    let long = try scheduler.submit(prompt: [1], parameters: GenerationParameters(maxTokens: 60000), key: "a")
    let next = try submit(scheduler, 2, key: "b", maxTokens: 2)
    let ended = await outcome(long)
    #expect(ended.error?.code == "session_expired")
    #expect(ended.error?.status == .tooManyRequests)
    #expect(ended.result == nil)
    #expect(ended.text.count < 60000)
    // A request right after is a new admission, not one more on the session that ended
    // (whose lane may not have noticed yet): it runs after the next in line. (Its queue
    // position depends on whether that one already finished, so the order is what is checked.)
    let again = try submit(scheduler, 3, key: "a", maxTokens: 2)
    // The lane went to the next in line.
    #expect(await outcome(next).result?.text == "zz")
    #expect(await outcome(again).result?.text == "zz")
    #expect(model.started == [[1], [2], [3]])
}

@Test(.timeLimit(.minutes(3)))
func anIdleReservedLaneIsReleasedToTheQueue() async throws {
    // The idle limit is long for the reason given in the session test above.
    let scheduler = try Scheduler(model: FakeModel(reply: "ok"),
                              policy: AdmissionPolicy(lanes: 1, sessionLength: 3600, idleRelease: 60), metrics: ServerMetrics())
    defer { scheduler.shutdown() }
    #expect(await outcome(try submit(scheduler, 1, key: "a")).result?.text == "ok")
    let b = try submit(scheduler, 2, key: "b")
    #expect(b.position == 1)
    // Without the idle release b would wait for the hour-long session.
    #expect(await outcome(b).result?.text == "ok")
    // a lost its lane: its next request waits for b's session.
    #expect(try submit(scheduler, 3, key: "a").position == 1)
}

@Test(.timeLimit(.minutes(1)))
func drainingEndsWaitingRequestsAtOnceAndRunningOnesAfterTheGrace() async throws {
    let model = FakeModel(reply: String(repeating: "z", count: 60000), contextLength: 65536, tokenDelay: .milliseconds(1))
    let scheduler = try Scheduler(model: model, policy: AdmissionPolicy(lanes: 1), metrics: ServerMetrics())
    let running = try scheduler.submit(prompt: [1], parameters: GenerationParameters(maxTokens: 60000))
    let waiting = try submit(scheduler, 2)
    #expect(waiting.position == 1)
    var events = running.events.makeAsyncIterator()
    // Drained once it runs: its first text has come.
    while let event = await events.next() { if case .text = event { break } }
    await scheduler.drain(grace: 0.2)
    #expect(await outcome(waiting).error == .shuttingDown)
    var last: GenerationEvent?
    while let event = await events.next() { last = event }
    guard case .failed(let error)? = last else { Issue.record("the running generation ended with \(String(describing: last))"); return }
    #expect(error == .shuttingDown)
    #expect(throws: APIError.shuttingDown) { try submit(scheduler, 3) }
    scheduler.shutdown()
}
