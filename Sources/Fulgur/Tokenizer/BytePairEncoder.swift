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
        while symbols.count > 1 {
            var best = UInt64.max
            var bestAt = -1
            for i in 0..<symbols.count - 1 {
                if let m = merges[Self.pairKey(symbols[i], symbols[i + 1])], m < best {
                    best = m
                    bestAt = i
                }
            }
            if bestAt < 0 { break }
            symbols[bestAt] = Int32(truncatingIfNeeded: best & 0xFFFF_FFFF)
            symbols.remove(at: bestAt + 1)
        }
        return symbols
    }
}
