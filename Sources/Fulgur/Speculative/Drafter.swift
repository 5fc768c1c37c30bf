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
    /// Proposes `count` tokens to follow `token`, which sits at position `contextLength`.
    func propose(after token: Int, count: Int) throws -> [Int]
}
