import Foundation

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

    public init(count: Int) {
        precondition(count >= 1, "RankThreads needs at least one rank")
        self.count = count
        workers = Self.spawnPerCall ? nil : Workers(count: count)
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

/// The threads: each waits for its go signal, runs the job for its rank, signals done.
private final class Workers: @unchecked Sendable {
    let count: Int
    private let go: [DispatchSemaphore]
    private let done = DispatchSemaphore(value: 0)
    // Written before the go signals, read by the threads after them (the semaphores order it).
    private var job: ((Int) -> Void)?
    private var stopping = false

    init(count: Int) {
        self.count = count
        go = (0..<count).map { _ in DispatchSemaphore(value: 0) }
        for rank in 0..<count {
            // The thread holds the workers until stop() lets it end.
            let thread = Thread { [self] in
                while true {
                    go[rank].wait()
                    if stopping { return }
                    job!(rank)
                    done.signal()
                }
            }
            thread.stackSize = 8 << 20
            thread.start()
        }
    }

    func run(_ job: @escaping (Int) -> Void) {
        self.job = job
        for g in go { g.signal() }
        for _ in 0..<count { done.wait() }
        self.job = nil
    }

    func stop() {
        stopping = true
        for g in go { g.signal() }
    }
}
