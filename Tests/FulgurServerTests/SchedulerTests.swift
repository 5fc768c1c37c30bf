import Dispatch
import Fulgur
import Testing
@testable import FulgurServer

/// Reads the ticket's events until it reports `position`.
private func reaches(_ ticket: Ticket, _ position: Int) async -> Bool {
    for await event in ticket.events {
        if case .queued(let p) = event, p == position { return true }
    }
    return false
}

@Test func aFullQueueRefusesAtOnceWithServerBusy() throws {
    let gate = DispatchSemaphore(value: 0)
    let scheduler = try Scheduler(model: FakeModel(gate: gate), policy: AdmissionPolicy(maxQueue: 1), metrics: ServerMetrics())
    defer { scheduler.shutdown(); gate.signal(); gate.signal() }
    // Held: a ticket dropped unread cancels its generation.
    let running = try scheduler.submit(prompt: [1], parameters: GenerationParameters())
    let waiting = try scheduler.submit(prompt: [1], parameters: GenerationParameters())
    #expect(throws: APIError.queueFull(1)) { try scheduler.submit(prompt: [1], parameters: GenerationParameters()) }
    #expect(APIError.queueFull(1).status == .serviceUnavailable)
    waiting.cancel()
    #expect(throws: Never.self) { _ = try scheduler.submit(prompt: [1], parameters: GenerationParameters()) }
    running.cancel()
}

@Test(.timeLimit(.minutes(1)))
func waitingRequestsLearnTheirPositionAndMoveUpWhenOneAheadLeaves() async throws {
    let gate = DispatchSemaphore(value: 0)
    let scheduler = try Scheduler(model: FakeModel(reply: "ab", gate: gate), policy: AdmissionPolicy(maxQueue: 4), metrics: ServerMetrics())
    defer { scheduler.shutdown() }
    let first = try scheduler.submit(prompt: [1], parameters: GenerationParameters())
    let second = try scheduler.submit(prompt: [1], parameters: GenerationParameters())
    let third = try scheduler.submit(prompt: [1], parameters: GenerationParameters())
    // Once the lane holds the first request, the others are first and second in line.
    #expect(await reaches(second, 1))
    #expect(await reaches(third, 2))
    second.cancel()
    #expect(await reaches(third, 1))
    gate.signal()
    gate.signal()
    var text = ""
    for await event in first.events { if case .text(let t) = event { text += t } }
    #expect(text == "ab")
    var finished = false
    for await event in third.events { if case .finished(let r) = event { finished = r.text == "ab" } }
    #expect(finished)
}
