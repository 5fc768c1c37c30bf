import Dispatch
import Foundation
import Fulgur
import Testing
@testable import FulgurServer

// The throughput-first schedule on a fake model: admission, the queue, cancellation and
// shutdown are the scheduler's, shared with latency first; what differs is that admitted
// generations advance together, a batched step at a time.

private func throughput(_ model: FakeModel, slots: Int, maxQueue: Int = 8, metrics: ServerMetrics = ServerMetrics()) throws -> Scheduler {
    try Scheduler(model: model, policy: AdmissionPolicy(lanes: slots, maxQueue: maxQueue), schedule: .throughput(prefillChunk: 16), metrics: metrics)
}

private func text(_ ticket: Ticket) async -> (text: String, result: GenerationResult?, error: APIError?) {
    var text = "", result: GenerationResult?, error: APIError?
    for await event in ticket.events {
        switch event {
        case .text(let t): text += t
        case .finished(let r): result = r
        case .failed(let e): error = e
        case .queued, .token: break
        }
    }
    return (text, result, error)
}

/// A sample's value in the metrics' text, e.g. "fulgur_reserved_lanes".
private func metric(_ metrics: ServerMetrics, _ name: String) -> Double? {
    for line in metrics.render().split(separator: "\n") where line.hasPrefix(name + " ") {
        return Double(line.split(separator: " ")[1])
    }
    return nil
}

@Test(.timeLimit(.minutes(1)))
func admittedGenerationsAdvanceTogetherInBatchedSteps() async throws {
    let model = FakeModel(reply: "abcdef", tokenDelay: .milliseconds(20))
    let scheduler = try throughput(model, slots: 4)
    defer { scheduler.shutdown() }
    let tickets = try (1...4).map { try scheduler.submit(prompt: [$0], parameters: GenerationParameters()) }
    #expect(tickets.map(\.position) == [0, 0, 0, 0] as [Int])
    for ticket in tickets {
        let (t, result, error) = await text(ticket)
        #expect(t == "abcdef" && result?.finishReason == .stop && error == nil)
    }
    // Six tokens each, one a step: 24 tokens in fewer than 24 steps, some shared.
    #expect(model.stepSizes.reduce(0, +) == 24, "\(model.stepSizes)")
    #expect(model.stepSizes.max() ?? 0 > 1, "\(model.stepSizes)")
}

@Test(.timeLimit(.minutes(1)))
func aFullBatchQueuesAndAFullQueueRefusesAtOnce() async throws {
    let gate = DispatchSemaphore(value: 0)
    let scheduler = try throughput(FakeModel(reply: "ab", gate: gate), slots: 1, maxQueue: 1)
    defer { scheduler.shutdown(); gate.signal(); gate.signal() }
    let running = try scheduler.submit(prompt: [1], parameters: GenerationParameters())
    let waiting = try scheduler.submit(prompt: [2], parameters: GenerationParameters())
    #expect([running.position, waiting.position] == [0, 1] as [Int])
    #expect(throws: APIError.queueFull(1)) { try scheduler.submit(prompt: [3], parameters: GenerationParameters()) }
    gate.signal()
    gate.signal()
    #expect(await text(running).text == "ab")
    #expect(await text(waiting).text == "ab")
}

@Test(.timeLimit(.minutes(1)))
func aClientThatLeavesFreesItsSlotForTheNextInLine() async throws {
    let metrics = ServerMetrics()
    let model = FakeModel(reply: String(repeating: "x", count: 10_000), tokenDelay: .milliseconds(5))
    let scheduler = try throughput(model, slots: 1, metrics: metrics)
    defer { scheduler.shutdown() }
    let leaving = try scheduler.submit(prompt: [1], parameters: GenerationParameters(maxTokens: 10_000))
    let next = try scheduler.submit(prompt: [2], parameters: GenerationParameters(maxTokens: 3))
    #expect(next.position == 1)
    // The first streams, then its client leaves.
    for await event in leaving.events { if case .text = event { break } }
    leaving.cancel()
    let (t, result, _) = await text(next)
    #expect(t == "xxx" && result?.finishReason == .length)
    #expect(metric(metrics, "fulgur_cancelled_generations_total") == 1)
    var reserved = metric(metrics, "fulgur_reserved_lanes")
    for _ in 0..<100 where reserved != 0 {
        try await Task.sleep(for: .milliseconds(10))
        reserved = metric(metrics, "fulgur_reserved_lanes")
    }
    #expect(reserved == 0)
    #expect(metric(metrics, "fulgur_running_generations") == 0)
}

@Test(.timeLimit(.minutes(1)))
func shutdownEndsRunningGenerationsWithAnErrorAndWaitingOnesAtOnce() async throws {
    let model = FakeModel(reply: String(repeating: "x", count: 10_000), tokenDelay: .milliseconds(5))
    let scheduler = try throughput(model, slots: 1)
    let running = try scheduler.submit(prompt: [1], parameters: GenerationParameters(maxTokens: 10_000))
    let waiting = try scheduler.submit(prompt: [2], parameters: GenerationParameters())
    for await event in running.events { if case .text = event { break } }
    await scheduler.drain(grace: 0.05)
    #expect(await text(running).error == .shuttingDown)
    #expect(await text(waiting).error == .shuttingDown)
    #expect(throws: APIError.shuttingDown) { try scheduler.submit(prompt: [3], parameters: GenerationParameters()) }
    scheduler.shutdown()
}
