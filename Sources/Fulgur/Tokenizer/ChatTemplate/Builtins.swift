#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Filters, tests, methods and global functions, each behaving like the jinja2 filter or
/// Python method of the same name. Strings are handled as code points, as Python does.

extension Interpreter {
    static let globalFunctions: Set<String> = ["raise_exception", "strftime_now", "namespace", "range", "dict"]
    /// Checked at parse time, as jinja2 does, so a template that needs a missing filter or
    /// test fails when it is loaded rather than on the one conversation that reaches it.
    static let filterNames: Set<String> = [
        "safe", "string", "trim", "upper", "lower", "capitalize", "title", "length", "count", "first", "last",
        "reverse", "list", "join", "default", "d", "items", "map", "select", "reject", "selectattr", "rejectattr",
        "replace", "int", "float", "abs", "round", "unique", "sort", "tojson",
    ]
    static let testNames: Set<String> = [
        "defined", "undefined", "none", "boolean", "true", "false", "integer", "float", "number", "string",
        "mapping", "callable", "iterable", "sequence", "even", "odd", "divisibleby", "eq", "equalto", "==", "ne",
        "!=", "lt", "lessthan", "<", "le", "<=", "gt", "greaterthan", ">", "ge", ">=", "in", "sameas", "lower",
        "upper",
    ]

    // MARK: Filters

    func applyFilter(_ name: String, _ value: Value, _ args: CallArguments) throws -> Value {
        switch name {
        case "safe":
            return value
        case "string":
            return .string(value.text)
        case "trim":
            return .string(pyStrip(value.text, chars: try optionalString(args.value(0, "chars")), leading: true, trailing: true))
        case "upper":
            return .string(value.text.uppercased())
        case "lower":
            return .string(value.text.lowercased())
        case "capitalize":
            return .string(pyCapitalize(value.text))
        case "title":
            return .string(jinjaTitle(value.text))
        case "length", "count":
            return .int(try length(value))
        case "first":
            return try iterate(value).first ?? .undefined("first item of an empty sequence")
        case "last":
            return try iterate(value).last ?? .undefined("last item of an empty sequence")
        case "reverse":
            if case .string(let s) = value {
                var reversed = String.UnicodeScalarView()
                for c in s.unicodeScalars.reversed() { reversed.append(c) }
                return .string(String(reversed))
            }
            return .list(try iterate(value).reversed())
        case "list":
            return .list(try iterate(value))
        case "join":
            var items = try iterate(value)
            if let attribute = args.value(1, "attribute") { items = items.map { lookup($0, attribute) } }
            return .string(items.map(\.text).joined(separator: args.value(0, "d")?.text ?? ""))
        case "default", "d":
            let useFallback = args.value(1, "boolean")?.isTruthy == true ? !value.isTruthy : value.isUndefined
            return useFallback ? args.value(0, "default_value") ?? .string("") : value
        case "items":
            switch value {
            case .dict(let dict): return .list(dict.map { .list([.string($0.key), $0.value]) })
            case .undefined: return .list([])
            default: throw TemplateFailure("'items' needs a mapping, not \(value.typeName)")
            }
        case "map":
            let items = try iterate(value)
            if let attribute = args.keyword["attribute"] {
                return .list(items.map { item in
                    let found = lookup(item, attribute)
                    return found.isUndefined ? args.keyword["default"] ?? found : found
                })
            }
            guard case .string(let filter)? = args.positional.first else {
                throw TemplateFailure("'map' needs a filter name or attribute=")
            }
            let rest = CallArguments(positional: Array(args.positional.dropFirst()), keyword: args.keyword)
            return .list(try items.map { try applyFilter(filter, $0, rest) })
        case "select", "reject", "selectattr", "rejectattr":
            let byAttribute = name.hasSuffix("attr")
            var positional = args.positional
            let attribute = byAttribute ? (positional.isEmpty ? nil : positional.removeFirst()) : nil
            if byAttribute && attribute == nil { throw TemplateFailure("'\(name)' needs an attribute name") }
            let test = positional.isEmpty ? nil : positional.removeFirst()
            let keep = name.hasPrefix("select")
            return .list(try iterate(value).filter { item in
                let subject = attribute.map { lookup(item, $0) } ?? item
                guard let test else { return subject.isTruthy == keep }
                let passed = try applyTest(test.text, subject, CallArguments(positional: positional, keyword: args.keyword))
                return passed == keep
            })
        case "replace":
            guard let old = args.value(0, "old"), let new = args.value(1, "new") else {
                throw TemplateFailure("'replace' needs the old and new strings")
            }
            return .string(pyReplace(value.text, old.text, new.text, count: args.value(2, "count")?.integer ?? -1))
        case "int":
            return toInt(value) ?? args.value(0, "default") ?? .int(0)
        case "float":
            return toDouble(value).map(Value.double) ?? args.value(0, "default") ?? .double(0)
        case "abs":
            switch value {
            case .double(let d): return .double(abs(d))
            default:
                guard let i = value.integer, i != .min else { throw TemplateFailure("bad operand type for abs(): '\(value.typeName)'") }
                return .int(abs(i))
            }
        case "round":
            return try round(value, precision: args.value(0, "precision")?.integer ?? 0, method: args.value(1, "method")?.text ?? "common")
        case "unique":
            let caseSensitive = args.value(0, "case_sensitive")?.isTruthy ?? false
            let attribute = args.value(1, "attribute")
            var seen: [Value] = []
            var result: [Value] = []
            for item in try iterate(value) {
                let key = sortKey(attribute.map { lookup(item, $0) } ?? item, caseSensitive: caseSensitive)
                if !seen.contains(where: { $0.equals(key) }) {
                    seen.append(key)
                    result.append(item)
                }
            }
            return .list(result)
        case "sort":
            let reverse = args.value(0, "reverse")?.isTruthy ?? false
            let caseSensitive = args.value(1, "case_sensitive")?.isTruthy ?? false
            let attribute = args.value(2, "attribute")
            let keyed = try iterate(value).map { item in
                (sortKey(attribute.map { lookup(item, $0) } ?? item, caseSensitive: caseSensitive), item)
            }
            var failure: Error?
            let sorted = keyed.sorted { a, b in
                do { return try compare(reverse ? b.0 : a.0, reverse ? a.0 : b.0) < 0 } catch {
                    failure = error
                    return false
                }
            }
            if let failure { throw failure }
            return .list(sorted.map(\.1))
        case "tojson":
            return .string(try toJSON(value, args))
        default:
            throw TemplateFailure("the filter '\(name)' is not supported")
        }
    }

    /// transformers replaces jinja2's HTML-safe `tojson` with plain `json.dumps(x,
    /// ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`.
    private func toJSON(_ value: Value, _ args: CallArguments) throws -> String {
        var indent: String?
        switch args.value(1, "indent") {
        case .string(let s)?: indent = s
        case let v? where v.integer != nil: indent = String(repeating: " ", count: max(v.integer!, 0))
        default: indent = nil
        }
        var separators: (String, String)?
        if let given = args.value(2, "separators"), case .list(let pair) = given {
            guard pair.count == 2, case .string(let item) = pair[0], case .string(let key) = pair[1] else {
                throw TemplateFailure("tojson separators must be two strings")
            }
            separators = (item, key)
        }
        return try value.json().serialized(
            indent: indent, separators: separators,
            sortKeys: args.value(3, "sort_keys")?.isTruthy ?? false,
            ensureASCII: args.value(0, "ensure_ascii")?.isTruthy ?? false)
    }

    /// jinja2's attribute lookup for `map`, `selectattr`, `sort`: dotted paths and indices.
    private func lookup(_ item: Value, _ attribute: Value) -> Value {
        if let index = attribute.integer { return (try? self.item(item, .int(index))) ?? .undefined("[\(index)]") }
        return attribute.text.split(separator: ".").reduce(item) { value, part in
            if let index = Int(part) { return (try? self.item(value, .int(index))) ?? .undefined(String(part)) }
            return self.attribute(value, String(part))
        }
    }

    private func sortKey(_ value: Value, caseSensitive: Bool) -> Value {
        if !caseSensitive, case .string(let s) = value { return .string(s.lowercased()) }
        return value
    }

    private func length(_ value: Value) throws -> Int {
        switch value {
        case .string(let s): return s.unicodeScalars.count
        case .list(let items): return items.count
        case .dict(let dict): return dict.count
        case .undefined: return 0
        default: throw TemplateFailure("object of type '\(value.typeName)' has no len()")
        }
    }

    private func toInt(_ value: Value) -> Value? {
        switch value {
        case .double(let d): return d.isFinite ? .int(Int(d)) : nil
        case .string(let s):
            let trimmed = String(pyStrip(s, chars: nil, leading: true, trailing: true).filter { $0 != "_" })
            if let i = Int(trimmed) { return .int(i) }
            return Double(trimmed).flatMap { $0.isFinite ? .int(Int($0)) : nil }
        default: return value.integer.map(Value.int)
        }
    }

    private func toDouble(_ value: Value) -> Double? {
        if case .string(let s) = value { return Double(pyStrip(s, chars: nil, leading: true, trailing: true)) }
        return value.number
    }

    private func round(_ value: Value, precision: Int, method: String) throws -> Value {
        guard let number = value.number else { throw TemplateFailure("'round' needs a number, not \(value.typeName)") }
        let rule: FloatingPointRoundingRule
        switch method {
        case "common":
            // Python's round(): an int stays an int, halves go to even.
            if let i = value.integer, precision >= 0 { return .int(i) }
            rule = .toNearestOrEven
        case "floor": rule = .down
        case "ceil": rule = .up
        default: throw TemplateFailure("round method must be 'common', 'ceil' or 'floor'")
        }
        let scale = pow(10.0, Double(precision))
        return .double((number * scale).rounded(rule) / scale)
    }

    // MARK: Tests

    func applyTest(_ name: String, _ value: Value, _ args: CallArguments) throws -> Bool {
        func other() throws -> Value {
            guard let v = args.value(0, "other") ?? args.value(0, "value") else {
                throw TemplateFailure("the test '\(name)' needs an argument")
            }
            return v
        }
        switch name {
        case "defined": return !value.isUndefined
        case "undefined": return value.isUndefined
        case "none": if case .null = value { return true } else { return false }
        case "boolean": if case .bool = value { return true } else { return false }
        case "true": if case .bool(true) = value { return true } else { return false }
        case "false": if case .bool(false) = value { return true } else { return false }
        case "integer": if case .int = value { return true } else { return false }
        case "float": if case .double = value { return true } else { return false }
        case "number": return value.number != nil
        case "string": if case .string = value { return true } else { return false }
        case "mapping": if case .dict = value { return true } else { return false }
        case "callable":
            switch value {
            case .macro, .builtin: return true
            default: return false
            }
        case "iterable", "sequence":
            switch value {
            case .list, .dict, .string: return true
            case .undefined: return name == "iterable"
            default: return false
            }
        case "even", "odd":
            guard let i = value.integer else { throw TemplateFailure("the test '\(name)' needs an integer") }
            return (i % 2 == 0) == (name == "even")
        case "divisibleby":
            guard let i = value.integer, let n = try other().integer, n != 0 else {
                throw TemplateFailure("'divisibleby' needs non-zero integers")
            }
            return i % n == 0
        case "eq", "equalto", "==": return value.equals(try other())
        case "ne", "!=": return !value.equals(try other())
        case "lt", "lessthan", "<": return try compare(value, try other()) < 0
        case "le", "<=": return try compare(value, try other()) <= 0
        case "gt", "greaterthan", ">": return try compare(value, try other()) > 0
        case "ge", ">=": return try compare(value, try other()) >= 0
        case "in": return try contains(try other(), value)
        case "sameas":
            let o = try other()
            switch (value, o) {
            case (.namespace(let a), .namespace(let b)): return a === b
            case (.null, .null): return true
            case (.bool(let a), .bool(let b)): return a == b
            default: return false
            }
        case "lower", "upper":
            guard case .string(let s) = value else { return false }
            let cased = s.unicodeScalars.filter { $0.properties.isCased }
            return !cased.isEmpty
                && cased.allSatisfy { name == "lower" ? $0.properties.isLowercase : $0.properties.isUppercase }
        default:
            throw TemplateFailure("the test '\(name)' is not supported")
        }
    }

    // MARK: Methods

    /// Python methods on str and dict; nil when the value has no such method.
    func callMethod(_ base: Value, _ name: String, _ args: CallArguments) throws -> Value? {
        switch base {
        case .string(let s): return try stringMethod(s, name, args)
        case .dict(let dict):
            switch name {
            case "get":
                guard let key = args.value(0, "key") else { throw TemplateFailure("get() needs a key") }
                if case .string(let k) = key, let found = dict[k] { return found }
                return args.value(1, "default") ?? .null
            case "items": return .list(dict.map { .list([.string($0.key), $0.value]) })
            case "keys": return .list(dict.keys.map(Value.string))
            case "values": return .list(dict.values)
            default: return nil
            }
        default: return nil
        }
    }

    private func stringMethod(_ s: String, _ name: String, _ args: CallArguments) throws -> Value? {
        func stringArgument(_ index: Int, _ label: String) throws -> String {
            guard case .string(let v)? = args.value(index, label) else {
                throw TemplateFailure("str.\(name)() needs a string argument")
            }
            return v
        }
        switch name {
        case "startswith", "endswith":
            let candidates: [Value]
            switch args.value(0, "prefix") {
            case .list(let items)?: candidates = items
            case let v?: candidates = [v]
            case nil: throw TemplateFailure("str.\(name)() needs an argument")
            }
            return .bool(try candidates.contains { candidate in
                guard case .string(let c) = candidate else { throw TemplateFailure("str.\(name)() needs strings") }
                return name == "startswith" ? pyStartsWith(s, c) : pyEndsWith(s, c)
            })
        case "strip", "lstrip", "rstrip":
            let chars = try optionalString(args.value(0, "chars"))
            return .string(pyStrip(s, chars: chars, leading: name != "rstrip", trailing: name != "lstrip"))
        case "split":
            let separator = try optionalString(args.value(0, "sep"))
            return .list(try pySplit(s, separator, maxSplit: args.value(1, "maxsplit")?.integer ?? -1).map(Value.string))
        case "replace":
            return .string(pyReplace(s, try stringArgument(0, "old"), try stringArgument(1, "new"), count: args.value(2, "count")?.integer ?? -1))
        case "upper": return .string(s.uppercased())
        case "lower": return .string(s.lowercased())
        case "title": return .string(pyTitle(s))
        case "capitalize": return .string(pyCapitalize(s))
        case "find":
            return .int(pyFind(s, try stringArgument(0, "sub"), start: args.value(1, "start")?.integer ?? 0))
        case "join":
            return .string(try iterate(args.value(0, "iterable") ?? .list([])).map { item in
                guard case .string(let text) = item else { throw TemplateFailure("str.join() needs strings, found \(item.typeName)") }
                return text
            }.joined(separator: s))
        default: return nil
        }
    }

    // MARK: Globals

    func callGlobal(_ name: String, _ args: CallArguments) throws -> Value {
        switch name {
        case "raise_exception":
            // The template's own message, meant for the user, is passed through unchanged.
            throw FulgurError(.template, args.value(0, "message")?.text ?? "chat template raised an exception")
        case "strftime_now":
            return .string(strftimeNow(args.value(0, "format")?.text ?? ""))
        case "namespace", "dict":
            var values = OrderedDictionary<Value>()
            if case .dict(let initial)? = args.positional.first { values = initial }
            for key in args.keyword.keys.sorted() { values[key] = args.keyword[key] }
            return name == "dict" ? .dict(values) : .namespace(Namespace(values))
        case "range":
            let bounds = args.positional.compactMap(\.integer)
            guard bounds.count == args.positional.count, (1...3).contains(bounds.count) else {
                throw TemplateFailure("range() takes 1 to 3 integers")
            }
            let (start, stop) = bounds.count == 1 ? (0, bounds[0]) : (bounds[0], bounds[1])
            let step = bounds.count == 3 ? bounds[2] : 1
            guard step != 0 else { throw TemplateFailure("range() step must not be zero") }
            let items = stride(from: start, to: stop, by: step)
            guard items.underestimatedCount <= 100_000 else { throw TemplateFailure("range() of more than 100000 items") }
            return .list(items.map(Value.int))
        default:
            throw TemplateFailure("'\(name)' is not callable")
        }
    }

    private func strftimeNow(_ format: String) -> String {
        var now = time(nil)
        var parts = tm()
        localtime_r(&now, &parts)
        var buffer = [CChar](repeating: 0, count: 512)
        let written = strftime(&buffer, buffer.count, format, &parts)
        return String(decoding: buffer[..<written].map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private func optionalString(_ value: Value?) throws -> String? {
        switch value {
        case nil, .null?: return nil
        case .string(let s)?: return s
        case let v?: throw TemplateFailure("expected a string argument, got \(v.typeName)")
        }
    }
}
