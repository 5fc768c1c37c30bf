import Foundation

/// Byte-level BPE tokenizer giving the same ids as Hugging Face `tokenizers`.
/// Encoding: added tokens are cut out of the text first (leftmost, longest), the rest is
/// normalized, split by the pre-tokenizer and each piece is BPE-encoded from its UTF-8 bytes.
/// Build it from a GGUF file (`Tokenizer(gguf:)`) or a `tokenizer.json`
/// (`Tokenizer(tokenizerJSON:configPath:)`); see TokenizerLoading.swift.
public final class Tokenizer: Sendable {
    /// A token matched verbatim in text before BPE: a control token such as `<|im_end|>` when
    /// `special`, or a user-defined one such as `<tool_call>`.
    struct AddedToken {
        let content: String
        let id: Int
        let special: Bool
    }

    /// Everything a loader extracts from a tokenizer description.
    struct Definition {
        /// Token text by id in the byte-level spelling; nil where the id is unused.
        var tokens: [String?]
        /// Merge pairs in rank order.
        var merges: [(String, String)]
        var added: [AddedToken]
        var preTokenizer: PreTokenizer
        var normalizesToNFC = false
        var ignoreMerges = false
        var unknownToken: String?
        /// Ids put around the text when `addSpecialTokens` is true (usually BOS in front).
        var prefixIds: [Int] = []
        var suffixIds: [Int] = []
        var bosTokenId: Int?
        var eosTokenIds: [Int] = []
    }

    public let bosTokenId: Int?
    /// Ids that end generation (EOS and, where the model has them, end-of-turn tokens).
    public let eosTokenIds: [Int]
    /// One more than the largest id; the model's embedding may be padded beyond it.
    public let vocabularySize: Int

    let preTokenizer: PreTokenizer
    private let normalizesToNFC: Bool
    private let encoder: BytePairEncoder
    private let idsByToken: [String: Int]
    private let bytesById: [[UInt8]]
    private let isSpecial: [Bool]
    /// Added tokens by their first UTF-8 byte, longest first, for leftmost-longest matching.
    private let addedByFirstByte: [[(bytes: [UInt8], id: Int)]]
    private let prefixIds: [Int]
    private let suffixIds: [Int]

    /// `source` names the file in error messages.
    init(_ d: Definition, source: String) throws {
        var idsByToken: [String: Int] = [:]
        idsByToken.reserveCapacity(d.tokens.count + d.added.count)
        for (id, token) in d.tokens.enumerated() {
            if let token { idsByToken[token] = id }
        }
        let size = max(d.tokens.count, (d.added.map(\.id).max() ?? -1) + 1)
        var bytesById = [[UInt8]](repeating: [], count: size)
        var isSpecial = [Bool](repeating: false, count: size)
        for (id, token) in d.tokens.enumerated() {
            if let token { bytesById[id] = ByteLevel.bytes(ofToken: token) }
        }
        var addedByFirstByte = [[(bytes: [UInt8], id: Int)]](repeating: [], count: 256)
        for token in d.added {
            guard token.id >= 0, let first = token.content.utf8.first else {
                throw FulgurError(.tokenizer, "\(source): added token '\(token.content)' has id \(token.id) or is empty")
            }
            idsByToken[token.content] = token.id
            bytesById[token.id] = ByteLevel.bytes(ofToken: token.content)
            isSpecial[token.id] = token.special
            addedByFirstByte[Int(first)].append((Array(token.content.utf8), token.id))
        }
        for b in 0..<256 { addedByFirstByte[b].sort { $0.bytes.count > $1.bytes.count } }

        var byteIds = [Int32](repeating: -1, count: 256)
        for b in 0..<256 {
            if let id = idsByToken[String(Character(ByteLevel.byteToScalar[b]))] { byteIds[b] = Int32(id) }
        }
        var merges: [UInt64: UInt64] = [:]
        merges.reserveCapacity(d.merges.count)
        for (rank, (left, right)) in d.merges.enumerated() {
            guard let l = idsByToken[left], let r = idsByToken[right], let m = idsByToken[left + right] else {
                throw FulgurError(.tokenizer, "\(source): merge #\(rank) '\(left) \(right)' uses a token missing from the vocabulary")
            }
            let key = BytePairEncoder.pairKey(Int32(l), Int32(r))
            // A repeated pair keeps its first (lowest) rank.
            if merges[key] == nil { merges[key] = UInt64(rank) << 32 | UInt64(m) }
        }
        var wholePieceIds: [[UInt8]: Int32]?
        if d.ignoreMerges {
            var map: [[UInt8]: Int32] = [:]
            for (id, token) in d.tokens.enumerated() {
                if let token { map[ByteLevel.bytes(ofToken: token)] = Int32(id) }
            }
            wholePieceIds = map
        }
        let unknownId = d.unknownToken.flatMap { idsByToken[$0] }.map { Int32($0) }
        encoder = BytePairEncoder(byteIds: byteIds, merges: merges, wholePieceIds: wholePieceIds, unknownId: unknownId)

        self.idsByToken = idsByToken
        self.bytesById = bytesById
        self.isSpecial = isSpecial
        self.addedByFirstByte = addedByFirstByte
        preTokenizer = d.preTokenizer
        normalizesToNFC = d.normalizesToNFC
        prefixIds = d.prefixIds
        suffixIds = d.suffixIds
        bosTokenId = d.bosTokenId
        eosTokenIds = d.eosTokenIds
        vocabularySize = size
    }

    /// Token ids for `text`. With `addSpecialTokens`, the tokenizer's own prefix and suffix
    /// (BOS where the model wants it) are added; special tokens written in the text are
    /// recognized either way, as in Hugging Face's `encode`.
    public func encode(_ text: String, addSpecialTokens: Bool = true) -> [Int] {
        var ids: [Int] = addSpecialTokens ? prefixIds : []
        let bytes = Array(text.utf8)
        var segmentStart = 0
        var i = 0
        while i < bytes.count {
            if let (length, id) = addedToken(in: bytes, at: i) {
                encodeSegment(bytes[segmentStart..<i], into: &ids)
                ids.append(id)
                i += length
                segmentStart = i
            } else {
                i += 1
            }
        }
        encodeSegment(bytes[segmentStart..<bytes.count], into: &ids)
        if addSpecialTokens { ids += suffixIds }
        return ids
    }

    private func addedToken(in bytes: [UInt8], at i: Int) -> (Int, Int)? {
        for candidate in addedByFirstByte[Int(bytes[i])] {
            let n = candidate.bytes.count
            if i + n <= bytes.count && bytes[i..<i + n].elementsEqual(candidate.bytes) { return (n, candidate.id) }
        }
        return nil
    }

    private func encodeSegment(_ segment: ArraySlice<UInt8>, into ids: inout [Int]) {
        guard !segment.isEmpty else { return }
        var text = String(decoding: segment, as: UTF8.self)
        if normalizesToNFC { text = text.precomposedStringWithCanonicalMapping }
        let utf8 = Array(text.utf8)
        let classified = ClassifiedText(Substring(text).unicodeScalars)
        var pieces: [Range<Int>] = []
        preTokenizer.split(classified, into: &pieces)
        for piece in pieces {
            let bytes = classified.utf8Offsets[piece.lowerBound]..<classified.utf8Offsets[piece.upperBound]
            encoder.encode(utf8[bytes], into: &ids)
        }
    }

    /// Text for `ids`. Invalid UTF-8 (a sequence cut short) becomes U+FFFD; ids outside the
    /// vocabulary (an embedding padded past it) give no text.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        var bytes: [UInt8] = []
        for id in ids { appendBytes(of: id, skipSpecialTokens: skipSpecialTokens, to: &bytes) }
        return String(decoding: bytes, as: UTF8.self)
    }

    func appendBytes(of id: Int, skipSpecialTokens: Bool, to bytes: inout [UInt8]) {
        guard id >= 0, id < bytesById.count, !(skipSpecialTokens && isSpecial[id]) else { return }
        bytes += bytesById[id]
    }

    /// The bytes one token stands for (part of a UTF-8 sequence for some byte-level tokens).
    public func bytes(of id: Int) -> [UInt8] {
        var bytes: [UInt8] = []
        appendBytes(of: id, skipSpecialTokens: false, to: &bytes)
        return bytes
    }

    /// The id of a token spelled as in the vocabulary (`"<|im_end|>"`, `"Ġthe"`).
    public func tokenId(_ token: String) -> Int? { idsByToken[token] }
}
