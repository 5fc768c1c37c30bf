import Foundation

/// GPT-2's reversible map from bytes to printable characters: byte-level vocabularies spell
/// every token with these characters (a space is "Ġ", a newline "Ċ").
enum ByteLevel {
    static let byteToScalar: [Unicode.Scalar] = {
        var map = [Unicode.Scalar](repeating: " ", count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (33...126).contains(b) || (161...172).contains(b) || (174...255).contains(b)
            if printable {
                map[b] = Unicode.Scalar(UInt32(b))!
            } else {
                map[b] = Unicode.Scalar(next)!
                next += 1
            }
        }
        return map
    }()

    static let scalarToByte: [UInt32: UInt8] = {
        var map: [UInt32: UInt8] = [:]
        for (b, s) in byteToScalar.enumerated() { map[s.value] = UInt8(b) }
        return map
    }()

    /// The bytes a token stands for. Like `tokenizers`' ByteLevel decoder, a token with any
    /// character outside the map (an added token such as "<tool call>" with a plain space)
    /// stands for its own UTF-8.
    static func bytes(ofToken token: String) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(token.unicodeScalars.count)
        for s in token.unicodeScalars {
            guard let b = scalarToByte[s.value] else { return Array(token.utf8) }
            out.append(b)
        }
        return out
    }
}

/// Byte-level BPE over token ids: a piece starts as one id per byte, then the adjacent pair
/// with the lowest merge rank (leftmost on ties) is merged until no pair has a merge, which is
/// the order `tokenizers` applies merges in.
final class BytePairEncoder: @unchecked Sendable {
    private let byteIds: [Int32]
    /// `(left << 32) | right` to `(rank << 32) | merged id`.
    private let merges: [UInt64: UInt64]
    /// Set when the vocabulary asks for whole pieces found in it to skip merging
    /// (`ignore_merges`, Llama 3).
    private let wholePieceIds: [[UInt8]: Int32]?
    private let unknownId: Int32?

    // The cache makes repeated words free; `tokenizers` also caps it at 10,000 entries and
    // stops adding once full. The lock makes the tokenizer safe to share across requests.
    private var cache: [[UInt8]: [Int32]] = [:]
    private let cacheLock = NSLock()
    private static let cacheCapacity = 10_000

    init(byteIds: [Int32], merges: [UInt64: UInt64], wholePieceIds: [[UInt8]: Int32]?, unknownId: Int32?) {
        self.byteIds = byteIds
        self.merges = merges
        self.wholePieceIds = wholePieceIds
        self.unknownId = unknownId
    }

    static func pairKey(_ left: Int32, _ right: Int32) -> UInt64 {
        UInt64(UInt32(bitPattern: left)) << 32 | UInt64(UInt32(bitPattern: right))
    }

    func encode(_ piece: ArraySlice<UInt8>, into out: inout [Int]) {
        let key = Array(piece)
        cacheLock.lock()
        let cached = cache[key]
        cacheLock.unlock()
        if let cached {
            for id in cached { out.append(Int(id)) }
            return
        }
        let ids = merge(key)
        cacheLock.lock()
        if cache.count < Self.cacheCapacity { cache[key] = ids }
        cacheLock.unlock()
        for id in ids { out.append(Int(id)) }
    }

    private func merge(_ bytes: [UInt8]) -> [Int32] {
        if let whole = wholePieceIds?[bytes] { return [whole] }
        // A byte missing from the vocabulary becomes the unknown token, or is dropped when
        // there is none, as `tokenizers` does.
        var symbols: [Int32] = []
        symbols.reserveCapacity(bytes.count)
        for b in bytes {
            let id = byteIds[Int(b)]
            if id >= 0 { symbols.append(id) } else if let unknownId { symbols.append(unknownId) }
        }
        guard symbols.count > 1 else { return symbols }
        // Symbols form a linked list; a heap holds candidate pairs keyed by (rank, position of
        // the left symbol), so each merge costs O(log n) and a long piece (minified code, base64)
        // stays linear-ish instead of quadratic. Entries whose pair has since changed are skipped.
        let n = symbols.count
        var next = Array(1...n)
        var prev = Array(-1..<(n - 1))
        var alive = [Bool](repeating: true, count: n)
        var heap = MinHeap()
        func push(_ left: Int) {
            let right = next[left]
            guard right < n, let m = merges[Self.pairKey(symbols[left], symbols[right])] else { return }
            heap.push((m >> 32) << 32 | UInt64(left))
        }
        for i in 0..<n - 1 { push(i) }
        while let top = heap.pop() {
            let rank = top >> 32
            let left = Int(top & 0xFFFF_FFFF)
            let right = next[left]
            guard alive[left], right < n,
                  let m = merges[Self.pairKey(symbols[left], symbols[right])], m >> 32 == rank else { continue }
            symbols[left] = Int32(truncatingIfNeeded: m & 0xFFFF_FFFF)
            alive[right] = false
            next[left] = next[right]
            if next[left] < n { prev[next[left]] = left }
            if prev[left] >= 0 { push(prev[left]) }
            push(left)
        }
        var out: [Int32] = []
        var i = 0
        while i < n {
            out.append(symbols[i])
            i = next[i]
        }
        return out
    }
}

/// A binary min-heap of packed (rank, position) keys.
private struct MinHeap {
    private var items: [UInt64] = []

    mutating func push(_ item: UInt64) {
        items.append(item)
        var i = items.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if items[parent] <= items[i] { break }
            items.swapAt(parent, i)
            i = parent
        }
    }

    mutating func pop() -> UInt64? {
        guard let top = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var smallest = i
                if l < items.count && items[l] < items[smallest] { smallest = l }
                if r < items.count && items[r] < items[smallest] { smallest = r }
                if smallest == i { break }
                items.swapAt(i, smallest)
                i = smallest
            }
        }
        return top
    }
}
