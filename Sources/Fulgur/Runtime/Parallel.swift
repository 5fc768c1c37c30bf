import Dispatch
#if canImport(Glibc)
import Glibc
#endif

/// Splits work over the machine's cores. Small jobs run inline: below a few hundred thousand
/// multiply-adds a thread hand-off costs more than it saves.
public enum Parallel {
    public static let coreCount: Int = {
        if let s = getenv("FULGUR_THREADS"), let n = Int(String(cString: s)), n > 0 { return n }
        return max(1, sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    }()

    /// Calls `body(range)` over disjoint chunks covering 0..<count.
    public static func chunks(_ count: Int, work: Int, _ body: (Range<Int>) -> Void) {
        let threads = min(coreCount, count, max(1, work / 50_000))
        if threads <= 1 { body(0..<count); return }
        let per = (count + threads - 1) / threads
        DispatchQueue.concurrentPerform(iterations: threads) { t in
            let lo = t * per, hi = min(count, lo + per)
            if lo < hi { body(lo..<hi) }
        }
    }
}
