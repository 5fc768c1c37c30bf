#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Python `str` operations. Searching works on UTF-8 bytes: a valid UTF-8 needle can only
/// match on code point boundaries, so this is exactly Python's code point semantics, free of
/// Swift's grapheme and canonical-equivalence rules, and fast on long message contents.

/// Python's `str.isspace`, which governs `strip()`, `split()` and jinja2's `\s`.
func isPythonWhitespace(_ c: Unicode.Scalar) -> Bool {
    c.properties.isWhitespace || (0x1C...0x1F).contains(c.value)
}

func byteIndex(of needle: [UInt8], in haystack: [UInt8], from start: Int = 0) -> Int? {
    guard start >= 0, start + needle.count <= haystack.count else { return nil }
    if needle.isEmpty { return start }
    return haystack.withUnsafeBufferPointer { h in
        needle.withUnsafeBufferPointer { n in
            for i in start...(h.count - n.count) where h[i] == n[0] {
                if memcmp(h.baseAddress! + i, n.baseAddress!, n.count) == 0 { return i }
            }
            return nil
        }
    }
}

func pyContains(_ haystack: String, _ needle: String) -> Bool {
    byteIndex(of: Array(needle.utf8), in: Array(haystack.utf8)) != nil
}

func pyStartsWith(_ s: String, _ prefix: String) -> Bool { s.utf8.starts(with: prefix.utf8) }

func pyEndsWith(_ s: String, _ suffix: String) -> Bool {
    s.utf8.count >= suffix.utf8.count && s.utf8.suffix(suffix.utf8.count).elementsEqual(suffix.utf8)
}

/// `str.find(sub, start)`, in code points.
func pyFind(_ s: String, _ sub: String, start: Int) -> Int {
    let bytes = Array(s.utf8)
    let scalarCount = s.unicodeScalars.count
    let from = start < 0 ? max(0, start + scalarCount) : min(start, scalarCount)
    // Code point offset -> byte offset: skip `from` scalar heads.
    var byte = 0
    for _ in 0..<from {
        byte += 1
        while byte < bytes.count, bytes[byte] & 0xC0 == 0x80 { byte += 1 }
    }
    guard let found = byteIndex(of: Array(sub.utf8), in: bytes, from: byte) else { return -1 }
    return bytes[..<found].reduce(0) { $0 + ($1 & 0xC0 == 0x80 ? 0 : 1) }
}

func pyStrip(_ s: String, chars: String?, leading: Bool, trailing: Bool) -> String {
    let drop: (Unicode.Scalar) -> Bool = chars.map { set in { set.unicodeScalars.contains($0) } } ?? isPythonWhitespace
    let view = s.unicodeScalars
    var low = view.startIndex, high = view.endIndex
    if leading { while low < high, drop(view[low]) { low = view.index(after: low) } }
    if trailing {
        while high > low {
            let previous = view.index(before: high)
            guard drop(view[previous]) else { break }
            high = previous
        }
    }
    return String(view[low..<high])
}

func pySplit(_ s: String, _ separator: String?, maxSplit: Int) throws -> [String] {
    var parts: [String] = []
    guard let separator else {
        let view = s.unicodeScalars
        var i = view.startIndex
        while true {
            while i < view.endIndex, isPythonWhitespace(view[i]) { i = view.index(after: i) }
            if i == view.endIndex { return parts }
            if maxSplit >= 0 && parts.count == maxSplit {
                parts.append(String(view[i...]))
                return parts
            }
            let start = i
            while i < view.endIndex, !isPythonWhitespace(view[i]) { i = view.index(after: i) }
            parts.append(String(view[start..<i]))
        }
    }
    let bytes = Array(s.utf8), needle = Array(separator.utf8)
    guard !needle.isEmpty else { throw TemplateFailure("empty separator") }
    var start = 0
    while maxSplit < 0 || parts.count < maxSplit, let found = byteIndex(of: needle, in: bytes, from: start) {
        parts.append(String(decoding: bytes[start..<found], as: UTF8.self))
        start = found + needle.count
    }
    parts.append(String(decoding: bytes[start...], as: UTF8.self))
    return parts
}

func pyReplace(_ s: String, _ old: String, _ new: String, count: Int) -> String {
    if old.isEmpty {
        // Python inserts the replacement around every code point.
        var out = ""
        var replaced = 0
        for c in s.unicodeScalars {
            if count < 0 || replaced < count { out += new; replaced += 1 }
            out.unicodeScalars.append(c)
        }
        if count < 0 || replaced < count { out += new }
        return out
    }
    let bytes = Array(s.utf8), needle = Array(old.utf8)
    var out: [UInt8] = []
    var replaced = 0, start = 0
    while count < 0 || replaced < count, let found = byteIndex(of: needle, in: bytes, from: start) {
        out += bytes[start..<found]
        out += new.utf8
        start = found + needle.count
        replaced += 1
    }
    out += bytes[start...]
    return String(decoding: out, as: UTF8.self)
}

func pyCapitalize(_ s: String) -> String {
    let view = s.unicodeScalars
    guard let first = view.first else { return s }
    return first.properties.titlecaseMapping + String(view[view.index(after: view.startIndex)...]).lowercased()
}

/// Python's `str.title()`: a cased letter after an uncased one starts a word.
func pyTitle(_ s: String) -> String {
    var out = ""
    var previousCased = false
    for c in s.unicodeScalars {
        out += previousCased ? c.properties.lowercaseMapping : c.properties.titlecaseMapping
        previousCased = c.properties.isCased
    }
    return out
}

/// jinja2's `title` filter: words start after whitespace, `-`, and opening brackets.
func jinjaTitle(_ s: String) -> String {
    var out = ""
    var atWordStart = true
    for c in s.unicodeScalars {
        let isBoundary = isPythonWhitespace(c) || "-({[<".unicodeScalars.contains(c)
        if isBoundary {
            out.unicodeScalars.append(c)
        } else {
            out += atWordStart ? c.properties.uppercaseMapping : c.properties.lowercaseMapping
        }
        atWordStart = isBoundary
    }
    return out
}

/// `s[start:stop:step]` over code points, given the code point offsets the slice selects.
func pySlice(_ s: String, _ offsets: [Int], step: Int) -> String {
    let view = s.unicodeScalars
    guard let first = offsets.first else { return "" }
    if step == 1 {
        let low = view.index(view.startIndex, offsetBy: first)
        return String(view[low..<view.index(low, offsetBy: offsets.count)])
    }
    let scalars = Array(view)
    var out = String.UnicodeScalarView()
    for i in offsets { out.append(scalars[i]) }
    return String(out)
}
