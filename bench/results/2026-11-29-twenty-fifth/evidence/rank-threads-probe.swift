import Foundation
final class Box: @unchecked Sendable { var v = [Int](repeating: 0, count: 8); let lock = NSLock() }
func spawn(_ n: Int, _ body: @escaping @Sendable (Int) -> Void) {
    let done = DispatchGroup()
    for r in 0..<n { done.enter(); let t = Thread { body(r); done.leave() }; t.stackSize = 8 << 20; t.start() }
    done.wait()
}
final class Pool: @unchecked Sendable {
    let n: Int; var work: (@Sendable (Int) -> Void)? = nil
    let go: [DispatchSemaphore]; let done = DispatchSemaphore(value: 0)
    init(_ n: Int) {
        self.n = n; go = (0..<n).map { _ in DispatchSemaphore(value: 0) }
        for r in 0..<n { let t = Thread { [unowned self] in while true { self.go[r].wait(); self.work!(r); self.done.signal() } }; t.start() }
    }
    func run(_ body: @escaping @Sendable (Int) -> Void) { work = body; for r in 0..<n { go[r].signal() }; for _ in 0..<n { done.wait() } }
}
let box = Box()
for n in [2, 4] {
    let iters = 2000
    var t0 = DispatchTime.now().uptimeNanoseconds
    for _ in 0..<iters { spawn(n) { r in box.lock.lock(); box.v[r] += 1; box.lock.unlock() } }
    var t1 = DispatchTime.now().uptimeNanoseconds
    print("spawn \(n): \(Double(t1 - t0) / Double(iters) / 1000) us a call")
    let p = Pool(n)
    t0 = DispatchTime.now().uptimeNanoseconds
    for _ in 0..<iters { p.run { r in box.lock.lock(); box.v[r] += 1; box.lock.unlock() } }
    t1 = DispatchTime.now().uptimeNanoseconds
    print("pool \(n): \(Double(t1 - t0) / Double(iters) / 1000) us a call")
}
