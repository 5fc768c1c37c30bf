/// Turns ids arriving one at a time into text. A byte-level token can end inside a
/// multi-byte character (one emoji often spans several tokens), so bytes of an unfinished
/// character are held back until a later token completes it; what `append` returns is always
/// whole characters, and all returned pieces concatenate to `decode` of the same ids.
public struct StreamingDetokenizer: Sendable {
    private let tokenizer: Tokenizer
    private let skipSpecialTokens: Bool
    private var pending: [UInt8] = []

    public init(tokenizer: Tokenizer, skipSpecialTokens: Bool = false) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
    }

    /// The text that `id` completes; empty while a character is still unfinished.
    public mutating func append(_ id: Int) -> String {
        tokenizer.appendBytes(of: id, skipSpecialTokens: skipSpecialTokens, to: &pending)
        let complete = Self.completePrefixLength(pending)
        guard complete > 0 else { return "" }
        let text = String(decoding: pending[..<complete], as: UTF8.self)
        pending.removeSubrange(..<complete)
        return text
    }

    /// Whatever is still held back, at the end of generation; a character that never
    /// completed becomes U+FFFD.
    public mutating func finish() -> String {
        defer { pending = [] }
        return String(decoding: pending, as: UTF8.self)
    }

    /// Length of `bytes` without a trailing sequence that is the valid start of a character
    /// whose remaining bytes have not arrived yet.
    static func completePrefixLength(_ bytes: [UInt8]) -> Int {
        let n = bytes.count
        // A character is at most 4 bytes, so an unfinished one starts within the last 3.
        var start = n - 1
        while start >= max(0, n - 3) {
            let b = bytes[start]
            if b & 0xC0 != 0x80 {
                let length = b >= 0xF0 && b <= 0xF4 ? 4 : b >= 0xE0 ? 3 : b >= 0xC2 && b < 0xE0 ? 2 : 1
                return length > n - start && secondByteFits(bytes, lead: start) ? start : n
            }
            start -= 1
        }
        return n
    }

    /// Whether the byte after a lead byte (if it arrived) is allowed there, per the
    /// well-formed UTF-8 table (no overlong forms, surrogates or values past U+10FFFF).
    private static func secondByteFits(_ bytes: [UInt8], lead: Int) -> Bool {
        guard lead + 1 < bytes.count else { return true }
        let second = bytes[lead + 1]
        switch bytes[lead] {
        case 0xE0: return (0xA0...0xBF).contains(second)
        case 0xED: return (0x80...0x9F).contains(second)
        case 0xF0: return (0x90...0xBF).contains(second)
        case 0xF4: return (0x80...0x8F).contains(second)
        default: return (0x80...0xBF).contains(second)
        }
    }
}
