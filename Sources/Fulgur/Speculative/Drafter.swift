/// What speculative decoding needs from a drafter: it follows the accepted text (tokens and
/// the target's hidden states for them) and proposes the tokens after the last one.
public protocol Drafter: AnyObject {
    /// The target layers whose output hidden states `extend` receives.
    var targetLayerIds: [Int] { get }
    /// Positions of context the drafter holds; the next `extend` starts here.
    var contextLength: Int { get }
    func reset()
    /// Appends accepted tokens with their features (`[tokens.count, targetLayerIds.count * hidden]`).
    func extend(tokens: [Int], features: [Float]) throws
    /// The same, with the features the first `tokens.count` rows `target` captured in its last
    /// forward: a drafter that can read them where they are (on the GPU) does not bring them
    /// to the host.
    func extend(tokens: [Int], capturedBy target: any Executor) throws
    /// Proposes `count` tokens to follow `token`, which sits at position `contextLength`.
    func propose(after token: Int, count: Int) throws -> [Int]
}

extension Drafter {
    /// Through the host: `target.capturedFeatures`' first `tokens.count` rows.
    public func extend(tokens: [Int], capturedBy target: any Executor) throws {
        try extend(tokens: tokens, features: try hostFeatures(capturedBy: target, rows: tokens.count))
    }

    /// The first `rows` rows of `target.capturedFeatures`, as `extend(tokens:features:)` takes them.
    public func hostFeatures(capturedBy target: any Executor, rows: Int) throws -> [Float] {
        let width = targetLayerIds.count * target.plan.spec.hiddenSize
        let features = try target.capturedFeatures
        guard features.count >= rows * width else {
            throw FulgurError(.usage, "the target captured \(features.count / max(width, 1)) rows of features; the drafter needs \(rows)")
        }
        return Array(features[0..<(rows * width)])
    }
}
