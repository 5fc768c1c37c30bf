/// Splits text into the pieces that BPE encodes one at a time. Each case reproduces one regex
/// family of Hugging Face `tokenizers` (Oniguruma semantics: leftmost alternative wins, greedy
/// quantifiers with backtracking) as a hand-written scan over Unicode scalars, because Swift
/// Regex is slow and differs in details such as `\s` and `\p{L}`.
enum PreTokenizer: String, Sendable {
    /// GPT-2's ByteLevel regex:
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    case gpt2
    /// SmolLM: every number scalar is its own piece (`Digits(individual_digits: true)`), then
    /// GPT-2's regex runs on the text between them. This is SmolLM2's own tokenizer.json and
    /// llama.cpp's "smollm". transformers' GGUF loader uses plain `.gpt2` for it instead, which
    /// differs where spaces or superscripts meet digits ("a  1": ["a", "  ", "1"] here).
    case smollm
    /// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|`
    /// ` ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    case llama3
    /// Qwen2, Qwen3 and MiMo: the Llama 3 regex with single-scalar numbers (`\p{N}`).
    case qwen2

    static let llama3Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    /// llama.cpp's `tokenizer.ggml.pre` names for the families above.
    init?(ggufName: String) {
        switch ggufName {
        case "gpt2": self = .gpt2
        case "smollm", "starcoder", "refact": self = .smollm
        case "llama-bpe", "llama3", "llama-v3": self = .llama3
        case "qwen2": self = .qwen2
        default: return nil
        }
    }

    /// Appends the scalar ranges of `text`'s pieces to `pieces`; together they cover `text`.
    func split(_ text: ClassifiedText, into pieces: inout [Range<Int>]) {
        switch self {
        case .gpt2:
            Self.splitGPT2(text, 0..<text.count, into: &pieces)
        case .smollm:
            var start = 0
            for i in 0..<text.count where text.classes[i] == .number {
                Self.splitGPT2(text, start..<i, into: &pieces)
                pieces.append(i..<i + 1)
                start = i + 1
            }
            Self.splitGPT2(text, start..<text.count, into: &pieces)
        case .llama3:
            Self.splitLlama3(text, maxDigits: 3, into: &pieces)
        case .qwen2:
            Self.splitLlama3(text, maxDigits: 1, into: &pieces)
        }
    }

    private static func splitGPT2(_ t: ClassifiedText, _ range: Range<Int>, into pieces: inout [Range<Int>]) {
        let end = range.upperBound
        var i = range.lowerBound
        while i < end {
            let start = i
            let cls = t.classes[i]
            if let n = contraction(t, at: i, end: end, ignoringCase: false) {
                i += n
            } else if t.scalars[i] == 0x20, i + 1 < end, !t.classes[i + 1].isWhitespace {
                // ` ?\p{L}+`, ` ?\p{N}+` or ` ?[^\s\p{L}\p{N}]+`: the space joins the run after it.
                i = t.run(of: t.classes[i + 1], from: i + 1, end: end)
            } else if !cls.isWhitespace {
                i = t.run(of: cls, from: i, end: end)
            } else {
                i = whitespaceRunEnd(t, from: i, end: end)
            }
            pieces.append(start..<i)
        }
    }

    private static func splitLlama3(_ t: ClassifiedText, maxDigits: Int, into pieces: inout [Range<Int>]) {
        let end = t.count
        var i = 0
        while i < end {
            let start = i
            let cls = t.classes[i]
            if let n = contraction(t, at: i, end: end, ignoringCase: true) {
                i += n
            } else if cls == .letter {
                i = t.run(of: .letter, from: i, end: end)
            } else if cls != .newline, cls != .number, i + 1 < end, t.classes[i + 1] == .letter {
                // `[^\r\n\p{L}\p{N}]?\p{L}+`: one space or symbol leads a word.
                i = t.run(of: .letter, from: i + 1, end: end)
            } else if cls == .number {
                var n = 1
                while n < maxDigits, i + n < end, t.classes[i + n] == .number { n += 1 }
                i += n
            } else if cls == .other || (t.scalars[i] == 0x20 && i + 1 < end && t.classes[i + 1] == .other) {
                // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
                i = t.run(of: .other, from: cls == .other ? i : i + 1, end: end)
                i = t.run(of: .newline, from: i, end: end)
            } else {
                // `\s*[\r\n]+` backtracks to end just after the run's last line break.
                let runEnd = t.runOfWhitespace(from: i, end: end)
                if let lastBreak = (i..<runEnd).last(where: { t.classes[$0] == .newline }) {
                    i = lastBreak + 1
                } else {
                    i = whitespaceRunEnd(t, from: i, end: end)
                }
            }
            pieces.append(start..<i)
        }
    }

    /// `\s+(?!\S)|\s+` at a whitespace scalar: the run minus its last scalar when a
    /// non-space follows (that scalar then prefixes the next word), else the whole run.
    private static func whitespaceRunEnd(_ t: ClassifiedText, from i: Int, end: Int) -> Int {
        let runEnd = t.runOfWhitespace(from: i, end: end)
        return runEnd < end && runEnd - i >= 2 ? runEnd - 1 : runEnd
    }

    /// Length of `'s|'t|'re|'ve|'m|'ll|'d` at `i`. Case-insensitive matching follows Unicode
    /// simple case folding, under which U+017F (long s) also matches `s`.
    private static func contraction(_ t: ClassifiedText, at i: Int, end: Int, ignoringCase: Bool) -> Int? {
        guard t.scalars[i] == 0x27, i + 1 < end else { return nil }
        func letter(_ k: Int) -> UInt32 {
            guard k < end else { return 0 }
            let c = t.scalars[k]
            guard ignoringCase else { return c }
            if c >= 0x41 && c <= 0x5A { return c + 0x20 }
            return c == 0x17F ? 0x73 : c
        }
        switch letter(i + 1) {
        case 0x73, 0x74, 0x6D, 0x64: return 2  // s t m d
        case 0x72, 0x76: return letter(i + 2) == 0x65 ? 3 : nil  // re ve
        case 0x6C: return letter(i + 2) == 0x6C ? 3 : nil  // ll
        default: return nil
        }
    }
}

/// The character classes the pre-tokenizer regexes distinguish.
enum ScalarClass: UInt8 {
    case letter  // \p{L}
    case number  // \p{N}
    case newline  // \r and \n, which the Llama 3 regex treats apart from other whitespace
    case space  // the rest of \s (Unicode White_Space)
    case other

    var isWhitespace: Bool { self == .newline || self == .space }

    static func of(_ scalar: Unicode.Scalar) -> ScalarClass {
        let v = scalar.value
        if v < 0x80 {
            switch v {
            case 0x0A, 0x0D: return .newline
            case 0x09, 0x0B, 0x0C, 0x20: return .space
            case 0x30...0x39: return .number
            case 0x41...0x5A, 0x61...0x7A: return .letter
            default: return .other
            }
        }
        switch scalar.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter:
            return .letter
        case .decimalNumber, .letterNumber, .otherNumber:
            return .number
        default:
            return scalar.properties.isWhitespace ? .space : .other
        }
    }
}

/// A piece of text as Unicode scalars with their classes and UTF-8 offsets, so that
/// pre-tokenizer ranges map straight back to the bytes BPE works on.
struct ClassifiedText {
    var scalars: [UInt32] = []
    var classes: [ScalarClass] = []
    /// `utf8Offsets[i]` is where scalar `i` starts; one extra entry marks the end.
    var utf8Offsets: [Int] = [0]

    init(_ text: Substring.UnicodeScalarView) {
        scalars.reserveCapacity(text.count)
        classes.reserveCapacity(text.count)
        var offset = 0
        for scalar in text {
            scalars.append(scalar.value)
            classes.append(ScalarClass.of(scalar))
            offset += UTF8.width(scalar)
            utf8Offsets.append(offset)
        }
    }

    var count: Int { scalars.count }

    func run(of cls: ScalarClass, from i: Int, end: Int) -> Int {
        var j = i
        while j < end && classes[j] == cls { j += 1 }
        return j
    }

    func runOfWhitespace(from i: Int, end: Int) -> Int {
        var j = i
        while j < end && classes[j].isWhitespace { j += 1 }
        return j
    }
}
