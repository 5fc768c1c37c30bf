import Foundation
import Synchronization

/// One long-lived thread a rank for a tensor-parallel executor (CPUTensorParallel,
/// CUDATensorParallel). Every call of a split model runs all of its ranks at once (their
/// all-reduces wait for each other); starting a thread a rank a call put the threads' start
/// between every phase of a decode (a DFlash round over a split target and drafter makes three
/// such calls: the draft, the verify, the drafter's context). These threads wait on a semaphore
/// between calls and end with the object. `FULGUR_RANK_THREADS=spawn` starts threads a call
/// instead (`CPUTensorParallel.onEveryRank`, the way before), for measuring one against the other.
public final class RankThreads: @unchecked Sendable {
    public let count: Int
    private let workers: Workers?
    private let serial = NSLock()

    static let spawnPerCall = ProcessInfo.processInfo.environment["FULGUR_RANK_THREADS"] == "spawn"

    /// `spinNanoseconds`: how long a thread spins for the next call, and a call for its threads,
    /// before sleeping (Workers); 0 sleeps at once, as CPU ranks should (a spinning thread takes a
    /// core from the ranks' arithmetic).
    public init(count: Int, spinNanoseconds: UInt64 = 0) {
        precondition(count >= 1 && count < Int.bitWidth, "RankThreads takes 1 to \(Int.bitWidth - 1) ranks")
        self.count = count
        workers = Self.spawnPerCall ? nil : Workers(count: count, spinNanoseconds: spinNanoseconds)
    }

    deinit { workers?.stop() }

    /// `body(rank)` for every rank at once, one thread each; the results in rank order, or the
    /// first rank's error. Calls from several threads take turns.
    public func run<R>(_ body: @escaping @Sendable (Int) throws -> R) throws -> [R] {
        guard let workers else { return try CPUTensorParallel.onEveryRank(count, body) }
        serial.lock()
        defer { serial.unlock() }
        let results = RankResults<R>(count: count)
        workers.run { rank in results.set(rank, Result { try body(rank) }) }
        return try results.all.map { try $0!.get() }
    }
}

/// The threads: each waits for its go signal, runs the job for its rank, signals done. With
/// `spinNanoseconds` (GPU ranks) a thread spins that long for the next call before it sleeps,
/// and the caller spins for its threads through up to 50 ms of a call: a DFlash round over split
/// models makes several calls back to back, and semaphore wake-ups cost about 0.1-0.2 ms a call
/// on the GPU machine (a verify's ranks launched their graphs 40-50 us after the call began, and
/// the call returned about 0.15 ms after the GPUs were done; Kernels/NOTES.md, twenty-ninth
/// session). A call that comes later finds its threads asleep and wakes them.
private final class Workers: @unchecked Sendable {
    let count: Int
    let spinNanoseconds: UInt64
    static let callSpinNanoseconds: UInt64 = 50_000_000
    private let go: [DispatchSemaphore]
    private let done = DispatchSemaphore(value: 0)
    /// Calls begun (the threads run call n when it reaches n) and ranks finished in this call.
    private let generation = Atomic<Int>(0), finished = Atomic<Int>(0)
    /// Bit r: rank r is asleep on its go semaphore (or about to be); whoever clears a bit owes
    /// (the caller) or takes (the rank) one signal.
    private let asleep = Atomic<Int>(0)
    // Written before the generation advances, read by the threads after they see it (the
    // atomics' acquire and release order it).
    private var job: ((Int) -> Void)?
    private var stopping = false

    init(count: Int, spinNanoseconds: UInt64) {
        self.count = count
        self.spinNanoseconds = spinNanoseconds
        go = (0..<count).map { _ in DispatchSemaphore(value: 0) }
        for rank in 0..<count {
            // The thread holds the workers until stop() lets it end.
            let thread = Thread { [self] in
                var seen = 0
                while true {
                    waitForCall(after: seen, rank: rank)
                    seen += 1
                    if stopping { return }
                    job!(rank)
                    finished.add(1, ordering: .releasing)
                    done.signal()
                }
            }
            thread.stackSize = 8 << 20
            thread.start()
        }
    }

    /// Returns once call `seen + 1` has begun: spins a while, then sleeps on the rank's semaphore.
    private func waitForCall(after seen: Int, rank: Int) {
        let start = DispatchTime.now().uptimeNanoseconds
        while generation.load(ordering: .acquiring) == seen {
            if DispatchTime.now().uptimeNanoseconds - start >= spinNanoseconds {
                let bit = 1 << rank
                asleep.bitwiseOr(bit, ordering: .sequentiallyConsistent)
                if generation.load(ordering: .sequentiallyConsistent) != seen {
                    // The call began meanwhile: if its caller cleared the bit it signalled; take it.
                    if asleep.bitwiseAnd(~bit, ordering: .sequentiallyConsistent).oldValue & bit == 0 { go[rank].wait() }
                    return
                }
                go[rank].wait()
                return
            }
        }
    }

    func run(_ job: @escaping (Int) -> Void) {
        self.job = job
        finished.store(0, ordering: .relaxed)
        generation.add(1, ordering: .sequentiallyConsistent)
        wake()
        // Every rank signals done as well; once all have finished, the waits below do not block.
        // The caller spins through a whole decode call (a step takes milliseconds), a longer one
        // (a prefill) ends asleep.
        let start = DispatchTime.now().uptimeNanoseconds, limit = spinNanoseconds == 0 ? 0 : Self.callSpinNanoseconds
        while finished.load(ordering: .acquiring) < count && DispatchTime.now().uptimeNanoseconds - start < limit {}
        for _ in 0..<count { done.wait() }
        self.job = nil
    }

    func stop() {
        stopping = true
        generation.add(1, ordering: .sequentiallyConsistent)
        wake()
    }

    /// Signals every rank that went to sleep, clearing its bit.
    private func wake() {
        let sleeping = asleep.exchange(0, ordering: .sequentiallyConsistent)
        for rank in 0..<count where sleeping & (1 << rank) != 0 { go[rank].signal() }
    }
}
