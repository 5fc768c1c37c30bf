/// A JSON document as Python's `json` module sees it: integers stay `Int`, other numbers are
/// `Double`, and objects keep their keys in insertion order. Chat templates print tool schemas
/// with `tojson`, so the serializer reproduces `json.dumps(..., ensure_ascii=False)` byte for byte.
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)
}

public typealias JSONObject = OrderedDictionary<JSONValue>

extension JSONValue {
    public subscript(key: String) -> JSONValue? {
        if case .object(let object) = self { return object[key] }
        return nil
    }

    public var string: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var bool: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    public var array: [JSONValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    public var object: JSONObject? {
        if case .object(let o) = self { return o }
        return nil
    }
}

extension JSONValue: ExpressibleByStringLiteral, ExpressibleByIntegerLiteral, ExpressibleByFloatLiteral,
    ExpressibleByBooleanLiteral, ExpressibleByArrayLiteral, ExpressibleByDictionaryLiteral, ExpressibleByNilLiteral
{
    public init(stringLiteral value: String) { self = .string(value) }
    public init(integerLiteral value: Int) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(arrayLiteral elements: JSONValue...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSONValue)...) { self = .object(JSONObject(elements)) }
    public init(nilLiteral: ()) { self = .null }
}

// MARK: - Parsing

extension JSONValue {
    /// Nesting limit: deep enough for any real request, shallow enough that a hostile body
    /// cannot exhaust the stack of the recursive parser.
    public static let maxDepth = 512

    public init(parsing text: String) throws {
        var parser = JSONParser(bytes: Array(text.utf8))
        self = try parser.parseDocument()
    }

    /// Strict RFC 8259: rejects invalid UTF-8, comments, trailing commas, lone surrogates,
    /// unescaped control characters and anything after the top-level value.
    public init(parsing bytes: some Collection<UInt8>) throws {
        let bytes = Array(bytes)
        try JSONParser.validateUTF8(bytes)
        var parser = JSONParser(bytes: bytes)
        self = try parser.parseDocument()
    }
}

private struct JSONParser {
    let bytes: [UInt8]
    var pos = 0
    var depth = 0

    static func validateUTF8(_ bytes: [UInt8]) throws {
        var iterator = bytes.makeIterator()
        var parser = Unicode.UTF8.ForwardParser()
        var offset = 0
        while true {
            switch parser.parseScalar(from: &iterator) {
            case .valid(let encoded): offset += encoded.count
            case .emptyInput: return
            case .error: throw JSONParser(bytes: bytes, pos: offset).error("invalid UTF-8")
            }
        }
    }

    mutating func parseDocument() throws -> JSONValue {
        skipWhitespace()
        let value = try parseValue()
        skipWhitespace()
        if pos < bytes.count { throw error("expected end of input after the top-level value") }
        return value
    }

    func error(_ what: String) -> FulgurError {
        var line = 1, column = 1
        for byte in bytes[..<min(pos, bytes.count)] {
            if byte == UInt8(ascii: "\n") { line += 1; column = 1 } else if byte & 0xC0 != 0x80 { column += 1 }
        }
        let found = pos < bytes.count ? describe(bytes[pos]) : "end of input"
        return FulgurError(.format, "JSON: \(what), found \(found) at line \(line), column \(column) (byte \(pos))")
    }

    private func describe(_ byte: UInt8) -> String {
        (0x21...0x7E).contains(byte) ? "'\(Character(Unicode.Scalar(byte)))'" : "byte 0x" + String(byte, radix: 16)
    }

    mutating func skipWhitespace() {
        while pos < bytes.count, [0x20, 0x0A, 0x0D, 0x09].contains(bytes[pos]) { pos += 1 }
    }

    mutating func parseValue() throws -> JSONValue {
        guard pos < bytes.count else { throw error("expected a value") }
        switch bytes[pos] {
        case UInt8(ascii: "{"): return try parseObject()
        case UInt8(ascii: "["): return try parseArray()
        case UInt8(ascii: "\""): return .string(try parseString())
        case UInt8(ascii: "t"): return try literal("true", .bool(true))
        case UInt8(ascii: "f"): return try literal("false", .bool(false))
        case UInt8(ascii: "n"): return try literal("null", .null)
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
        default: throw error("expected a value")
        }
    }

    mutating func literal(_ word: String, _ value: JSONValue) throws -> JSONValue {
        for byte in word.utf8 {
            guard pos < bytes.count, bytes[pos] == byte else { throw error("expected '\(word)'") }
            pos += 1
        }
        return value
    }

    mutating func enter() throws {
        depth += 1
        if depth > JSONValue.maxDepth { throw error("nesting deeper than \(JSONValue.maxDepth) levels") }
    }

    mutating func parseArray() throws -> JSONValue {
        try enter()
        pos += 1
        var items: [JSONValue] = []
        skipWhitespace()
        if pos < bytes.count, bytes[pos] == UInt8(ascii: "]") {
            pos += 1
        } else {
            while true {
                skipWhitespace()
                items.append(try parseValue())
                skipWhitespace()
                if try expectEither(",", "]", in: "array") { break }
            }
        }
        depth -= 1
        return .array(items)
    }

    mutating func parseObject() throws -> JSONValue {
        try enter()
        pos += 1
        var object = JSONObject()
        skipWhitespace()
        if pos < bytes.count, bytes[pos] == UInt8(ascii: "}") {
            pos += 1
        } else {
            while true {
                skipWhitespace()
                guard pos < bytes.count, bytes[pos] == UInt8(ascii: "\"") else { throw error("expected a string key") }
                let key = try parseString()
                skipWhitespace()
                guard pos < bytes.count, bytes[pos] == UInt8(ascii: ":") else { throw error("expected ':' after key") }
                pos += 1
                skipWhitespace()
                object[key] = try parseValue()
                skipWhitespace()
                if try expectEither(",", "}", in: "object") { break }
            }
        }
        depth -= 1
        return .object(object)
    }

    /// Consumes `separator` (returns false) or `close` (returns true).
    mutating func expectEither(_ separator: Unicode.Scalar, _ close: Unicode.Scalar, in what: String) throws -> Bool {
        guard pos < bytes.count else { throw error("expected '\(separator)' or '\(close)' in \(what)") }
        if bytes[pos] == UInt8(ascii: separator) { pos += 1; return false }
        if bytes[pos] == UInt8(ascii: close) { pos += 1; return true }
        throw error("expected '\(separator)' or '\(close)' in \(what)")
    }

    mutating func parseString() throws -> String {
        pos += 1
        var out: [UInt8] = []
        while true {
            guard pos < bytes.count else { throw error("unterminated string") }
            let byte = bytes[pos]
            switch byte {
            case UInt8(ascii: "\""):
                pos += 1
                return String(decoding: out, as: UTF8.self)
            case UInt8(ascii: "\\"):
                pos += 1
                guard pos < bytes.count else { throw error("unterminated escape") }
                let escape = bytes[pos]
                pos += 1
                switch escape {
                case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"): out.append(escape)
                case UInt8(ascii: "b"): out.append(0x08)
                case UInt8(ascii: "f"): out.append(0x0C)
                case UInt8(ascii: "n"): out.append(0x0A)
                case UInt8(ascii: "r"): out.append(0x0D)
                case UInt8(ascii: "t"): out.append(0x09)
                case UInt8(ascii: "u"): out.append(contentsOf: try parseUnicodeEscape().utf8)
                default:
                    pos -= 1
                    throw error("invalid escape")
                }
            case 0..<0x20:
                throw error("unescaped control character in string")
            default:
                out.append(byte)
                pos += 1
            }
        }
    }

    /// Called after `\u`; joins a UTF-16 surrogate pair written as two escapes.
    mutating func parseUnicodeEscape() throws -> String {
        let first = try hex4()
        if (0xD800..<0xDC00).contains(first) {
            guard pos + 1 < bytes.count, bytes[pos] == UInt8(ascii: "\\"), bytes[pos + 1] == UInt8(ascii: "u") else {
                throw error("unpaired UTF-16 surrogate")
            }
            pos += 2
            let second = try hex4()
            guard (0xDC00..<0xE000).contains(second) else { throw error("unpaired UTF-16 surrogate") }
            let scalar = Unicode.Scalar(0x10000 + ((first - 0xD800) << 10) + (second - 0xDC00))!
            return String(Character(scalar))
        }
        guard let scalar = Unicode.Scalar(first) else { throw error("unpaired UTF-16 surrogate") }
        return String(Character(scalar))
    }

    mutating func hex4() throws -> UInt32 {
        var value: UInt32 = 0
        for _ in 0..<4 {
            guard pos < bytes.count, let digit = Character(Unicode.Scalar(bytes[pos])).hexDigitValue else {
                throw error("expected 4 hex digits after \\u")
            }
            value = value << 4 | UInt32(digit)
            pos += 1
        }
        return value
    }

    mutating func parseNumber() throws -> JSONValue {
        let start = pos
        func digits() -> Int {
            let from = pos
            while pos < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[pos]) { pos += 1 }
            return pos - from
        }
        if bytes[pos] == UInt8(ascii: "-") { pos += 1 }
        if pos < bytes.count, bytes[pos] == UInt8(ascii: "0") {
            pos += 1
        } else if digits() == 0 {
            throw error("expected a digit")
        }
        var isInteger = true
        if pos < bytes.count, bytes[pos] == UInt8(ascii: ".") {
            isInteger = false
            pos += 1
            if digits() == 0 { throw error("expected a digit after '.'") }
        }
        if pos < bytes.count, bytes[pos] == UInt8(ascii: "e") || bytes[pos] == UInt8(ascii: "E") {
            isInteger = false
            pos += 1
            if pos < bytes.count, bytes[pos] == UInt8(ascii: "+") || bytes[pos] == UInt8(ascii: "-") { pos += 1 }
            if digits() == 0 { throw error("expected a digit in exponent") }
        }
        let text = String(decoding: bytes[start..<pos], as: UTF8.self)
        // Integers beyond Int64 fall back to Double; Python would keep them exact.
        if isInteger, let int = Int(text) { return .int(int) }
        guard let double = Double(text), double.isFinite else {
            pos = start
            throw error("number out of range")
        }
        return .double(double)
    }
}

// MARK: - Serialization

extension JSONValue {
    /// `json.dumps(self, ensure_ascii=ensureASCII, indent=indent, separators=separators,
    /// sort_keys=sortKeys)`. `indent` is the string repeated per level (Python turns an int n
    /// into n spaces); with an indent the default item separator drops its trailing space.
    public func serialized(
        indent: String? = nil, separators: (item: String, key: String)? = nil,
        sortKeys: Bool = false, ensureASCII: Bool = false
    ) -> String {
        var writer = JSONWriter(
            indent: indent, item: separators?.item ?? (indent == nil ? ", " : ","), key: separators?.key ?? ": ",
            sortKeys: sortKeys, ensureASCII: ensureASCII)
        writer.write(self, level: 0)
        return writer.out
    }
}

private struct JSONWriter {
    let indent: String?
    let item: String
    let key: String
    let sortKeys: Bool
    let ensureASCII: Bool
    var out = ""

    mutating func write(_ value: JSONValue, level: Int) {
        switch value {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .int(let i): out += String(i)
        case .double(let d): out += pythonFloatRepr(d, json: true)
        case .string(let s): writeString(s)
        case .array(let items):
            writeContainer("[", "]", items, level: level) { writer, item, level in writer.write(item, level: level) }
        case .object(let object):
            var pairs = Array(object)
            if sortKeys { pairs.sort { $0.key.unicodeScalars.lexicographicallyPrecedes($1.key.unicodeScalars) } }
            writeContainer("{", "}", pairs, level: level) { writer, pair, level in
                writer.writeString(pair.key)
                writer.out += writer.key
                writer.write(pair.value, level: level)
            }
        }
    }

    mutating func writeContainer<T>(
        _ open: String, _ close: String, _ items: [T], level: Int, each: (inout JSONWriter, T, Int) -> Void
    ) {
        guard !items.isEmpty else { out += open + close; return }
        out += open
        let newline = indent.map { "\n" + String(repeating: $0, count: level + 1) } ?? ""
        for (i, element) in items.enumerated() {
            out += i == 0 ? newline : item + newline
            each(&self, element, level + 1)
        }
        if let indent { out += "\n" + String(repeating: indent, count: level) }
        out += close
    }

    mutating func writeString(_ s: String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case _ where scalar.value < 0x20 || (ensureASCII && scalar.value > 0x7E):
                for unit in String(scalar).utf16 { out += "\\u" + hex4(unit) }
            default: out.unicodeScalars.append(scalar)
            }
        }
        out += "\""
    }

    private func hex4(_ unit: UInt16) -> String {
        let digits = String(unit, radix: 16)
        return String(repeating: "0", count: 4 - digits.count) + digits
    }
}

/// Python's `repr(float)`: the shortest digits that round-trip (Swift computes the same
/// digits), laid out in positional form when the decimal exponent is in [-4, 16), else as
/// `1e-05` / `1.5e+16`. `json: true` spells non-finite values as `json.dumps` does.
func pythonFloatRepr(_ value: Double, json: Bool = false) -> String {
    if value.isNaN { return json ? "NaN" : "nan" }
    if value.isInfinite { return value < 0 ? (json ? "-Infinity" : "-inf") : (json ? "Infinity" : "inf") }
    let sign = value.sign == .minus ? "-" : ""
    let text = value.magnitude.description
    let parts = text.split(separator: "e")
    let exponent = parts.count == 2 ? Int(parts[1])! : 0
    let mantissa = parts[0].split(separator: ".", omittingEmptySubsequences: false)
    var digits = Array(mantissa[0] + (mantissa.count > 1 ? mantissa[1] : ""))
    var point = mantissa[0].count + exponent
    while digits.first == "0" { digits.removeFirst(); point -= 1 }
    while digits.last == "0" { digits.removeLast() }
    if digits.isEmpty { return sign + "0.0" }
    if point <= -4 || point > 16 {
        let exp = point - 1
        let expDigits = String(abs(exp))
        let tail = digits.count > 1 ? "." + String(digits[1...]) : ""
        return sign + String(digits[0]) + tail + "e" + (exp < 0 ? "-" : "+")
            + (expDigits.count < 2 ? "0" : "") + expDigits
    }
    if point <= 0 { return sign + "0." + String(repeating: "0", count: -point) + String(digits) }
    if point >= digits.count { return sign + String(digits) + String(repeating: "0", count: point - digits.count) + ".0" }
    return sign + String(digits[..<point]) + "." + String(digits[point...])
}
