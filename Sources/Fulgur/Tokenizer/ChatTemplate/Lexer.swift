/// Splits a Jinja template into text and tags, applying whitespace control exactly as
/// jinja2's lexer does under transformers' settings (`trim_blocks=True`, `lstrip_blocks=True`,
/// `keep_trailing_newline=False`), and tokenizes the inside of `{{ }}` and `{% %}` tags.
/// Comments vanish here; only their whitespace effects remain.

enum Token: Equatable {
    case name(String)
    case string(String)
    case int(Int)
    case float(Double)
    case op(String)

    var display: String {
        switch self {
        case .name(let n): return "'\(n)'"
        case .string(let s): return "string '\(s)'"
        case .int(let i): return "'\(i)'"
        case .float(let d): return "'\(pythonFloatRepr(d))'"
        case .op(let o): return "'\(o)'"
        }
    }
}

struct Tag {
    let tokens: [Token]
    /// Line of each token, for error messages.
    let lines: [Int]
    let line: Int
}

enum Segment {
    case text(String)
    case output(Tag)
    case statement(Tag)
}

struct Lexer {
    private enum TagKind { case variable, block, comment }

    private var src: [Unicode.Scalar]
    private var pos = 0
    private var line = 1
    /// jinja2 lets `lstrip_blocks` strip the indentation before the very first tag and before
    /// a tag that follows one whose end swallowed a newline.
    private var lineStarting = true
    private var segments: [Segment] = []

    static func segments(_ source: String) throws -> [Segment] {
        var lexer = Lexer(src: normalizedNewlines(source))
        try lexer.run()
        return lexer.segments
    }

    private static func normalizedNewlines(_ source: String) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        var previousCR = false
        for scalar in source.unicodeScalars {
            if scalar == "\r" {
                out.append("\n")
                previousCR = true
                continue
            }
            if !(scalar == "\n" && previousCR) { out.append(scalar) }
            previousCR = false
        }
        if out.last == "\n" { out.removeLast() }
        return out
    }

    private init(src: [Unicode.Scalar]) { self.src = src }

    private func starts(with s: String, at i: Int) -> Bool {
        var j = i
        for scalar in s.unicodeScalars {
            guard j < src.count, src[j] == scalar else { return false }
            j += 1
        }
        return true
    }

    private func nextTag(from start: Int) -> (Int, TagKind)? {
        var i = start
        while i + 1 < src.count {
            if src[i] == "{" {
                switch src[i + 1] {
                case "{": return (i, .variable)
                case "%": return (i, .block)
                case "#": return (i, .comment)
                default: break
                }
            }
            i += 1
        }
        return nil
    }

    private mutating func run() throws {
        while pos < src.count {
            guard let (tagStart, kind) = nextTag(from: pos) else {
                segments.append(.text(String(String.UnicodeScalarView(src[pos...]))))
                return
            }
            var text = src[pos..<tagStart]
            line += text.filter { $0 == "\n" }.count
            var i = tagStart + 2
            var sign: Unicode.Scalar?
            if i < src.count, src[i] == "-" || src[i] == "+" {
                sign = src[i]
                i += 1
            }
            if sign == "-" {
                while let last = text.last, isPythonWhitespace(last) { text.removeLast() }
            } else if sign != "+" && kind != .variable {
                let lineStart = (text.lastIndex(of: "\n").map { $0 + 1 }) ?? text.startIndex
                if lineStart > text.startIndex || lineStarting {
                    let tail = text[lineStart...]
                    if !tail.isEmpty && tail.allSatisfy(isPythonWhitespace) { text = text[..<lineStart] }
                }
            }
            if !text.isEmpty { segments.append(.text(String(String.UnicodeScalarView(text)))) }
            pos = i
            switch kind {
            case .comment: try skipComment(openedAt: line)
            case .variable, .block: try lexTag(kind)
            }
            lineStarting = pos > 0 && src[pos - 1] == "\n"
        }
    }

    private mutating func skipComment(openedAt openLine: Int) throws {
        while pos < src.count {
            if starts(with: "+#}", at: pos) { pos += 3; return }
            if starts(with: "-#}", at: pos) { pos += 3; skipWhitespace(); return }
            if starts(with: "#}", at: pos) {
                pos += 2
                if pos < src.count, src[pos] == "\n" { pos += 1; line += 1 }
                return
            }
            if src[pos] == "\n" { line += 1 }
            pos += 1
        }
        throw FulgurError(.template, "chat template line \(openLine): comment '{#' is never closed with '#}'")
    }

    private mutating func skipWhitespace() {
        while pos < src.count, isPythonWhitespace(src[pos]) {
            if src[pos] == "\n" { line += 1 }
            pos += 1
        }
    }

    /// Tries the closing delimiter first at every position, as jinja2 does, but only outside
    /// brackets so that `{{ {'a': 1} }}` closes at the right `}}`.
    private mutating func closeTag(_ kind: TagKind) -> Bool {
        let close = kind == .block ? "%}" : "}}"
        if kind == .block, starts(with: "+" + close, at: pos) { pos += 3; return true }
        if starts(with: "-" + close, at: pos) { pos += 3; skipWhitespace(); return true }
        if starts(with: close, at: pos) {
            pos += 2
            if kind == .block, pos < src.count, src[pos] == "\n" { pos += 1; line += 1 }
            return true
        }
        return false
    }

    private mutating func lexTag(_ kind: TagKind) throws {
        let openLine = line
        var tokens: [Token] = []
        var lines: [Int] = []
        var depth = 0
        while true {
            guard pos < src.count else {
                let what = kind == .block ? "'{%' is never closed with '%}'" : "'{{' is never closed with '}}'"
                throw FulgurError(.template, "chat template line \(openLine): \(what)")
            }
            if depth == 0, closeTag(kind) { break }
            let c = src[pos]
            if isPythonWhitespace(c) {
                if c == "\n" { line += 1 }
                pos += 1
                continue
            }
            let token = try lexToken()
            if case .op(let o) = token {
                if ["(", "[", "{"].contains(o) { depth += 1 }
                if [")", "]", "}"].contains(o) { depth = max(0, depth - 1) }
            }
            tokens.append(token)
            lines.append(line)
        }
        let tag = Tag(tokens: tokens, lines: lines, line: openLine)
        segments.append(kind == .block ? .statement(tag) : .output(tag))
    }

    private static let operators = [
        "//", "**", "==", "!=", ">=", "<=", "+", "-", "*", "/", "%", "~", "<", ">", "=", "(", ")", "[", "]", "{",
        "}", ".", ",", ":", "|",
    ]

    private mutating func lexToken() throws -> Token {
        let c = src[pos]
        if c == "_" || c.properties.isAlphabetic {
            let start = pos
            while pos < src.count, src[pos] == "_" || src[pos].properties.isAlphabetic || isDigit(src[pos]) { pos += 1 }
            return .name(String(String.UnicodeScalarView(src[start..<pos])))
        }
        if isDigit(c) { return try lexNumber() }
        if c == "'" || c == "\"" { return try lexString(quote: c) }
        for op in Lexer.operators where starts(with: op, at: pos) {
            pos += op.unicodeScalars.count
            return .op(op)
        }
        throw FulgurError(.template, "chat template line \(line): unexpected character '\(Character(c))' inside a tag")
    }

    private func isDigit(_ c: Unicode.Scalar) -> Bool { ("0"..."9").contains(c) }

    private mutating func digitRun() -> String {
        var out = ""
        while pos < src.count, isDigit(src[pos]) || (src[pos] == "_" && pos + 1 < src.count && isDigit(src[pos + 1])) {
            if src[pos] != "_" { out.unicodeScalars.append(src[pos]) }
            pos += 1
        }
        return out
    }

    private mutating func lexNumber() throws -> Token {
        var text = digitRun()
        var isFloat = false
        if pos + 1 < src.count, src[pos] == ".", isDigit(src[pos + 1]) {
            pos += 1
            text += "." + digitRun()
            isFloat = true
        }
        // jinja2 only accepts a lowercase exponent marker.
        if pos < src.count, src[pos] == "e" {
            var j = pos + 1
            if j < src.count, src[j] == "+" || src[j] == "-" { j += 1 }
            if j < src.count, isDigit(src[j]) {
                let sign = src[pos + 1] == "-" ? "-" : ""
                pos = j
                text += "e" + sign + digitRun()
                isFloat = true
            }
        }
        if isFloat, let d = Double(text) { return .float(d) }
        guard let i = Int(text) else {
            throw FulgurError(.template, "chat template line \(line): number \(text) does not fit in 64 bits")
        }
        return .int(i)
    }

    /// Escapes follow Python's `unicode-escape` codec, which is what jinja2 applies to literals.
    private mutating func lexString(quote: Unicode.Scalar) throws -> Token {
        let openLine = line
        pos += 1
        var out = String.UnicodeScalarView()
        while true {
            guard pos < src.count else {
                throw FulgurError(.template, "chat template line \(openLine): string literal is never closed")
            }
            let c = src[pos]
            pos += 1
            if c == quote { return .string(String(out)) }
            if c == "\n" { line += 1 }
            guard c == "\\", pos < src.count else {
                out.append(c)
                continue
            }
            let e = src[pos]
            pos += 1
            switch e {
            case "n": out.append("\n")
            case "t": out.append("\t")
            case "r": out.append("\r")
            case "\\", "'", "\"": out.append(e)
            case "a": out.append("\u{07}")
            case "b": out.append("\u{08}")
            case "f": out.append("\u{0C}")
            case "v": out.append("\u{0B}")
            case "\n": line += 1
            case "0"..."7":
                var value = e.value - 48
                var count = 1
                while count < 3, pos < src.count, ("0"..."7").contains(src[pos]) {
                    value = value * 8 + src[pos].value - 48
                    pos += 1
                    count += 1
                }
                out.append(Unicode.Scalar(value)!)
            case "x", "u", "U":
                let width = e == "x" ? 2 : e == "u" ? 4 : 8
                var value: UInt32 = 0
                for _ in 0..<width {
                    guard pos < src.count, let digit = Character(src[pos]).hexDigitValue else {
                        throw FulgurError(.template, "chat template line \(line): truncated \\\(e) escape in string")
                    }
                    value = value << 4 | UInt32(digit)
                    pos += 1
                }
                guard let scalar = Unicode.Scalar(value) else {
                    throw FulgurError(.template, "chat template line \(line): invalid code point in \\\(e) escape")
                }
                out.append(scalar)
            default:
                out.append("\\")
                out.append(e)
            }
        }
    }
}
