/// Runtime values of the template engine, modelled on the Python objects jinja2 works with,
/// because the expected output is whatever Python's `str()` of them prints.

indirect enum Value {
    /// A missing variable, attribute or item; the string names it for error messages.
    case undefined(String)
    case null
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    /// Python lists and tuples.
    case list([Value])
    case dict(OrderedDictionary<Value>)
    case namespace(Namespace)
    case macro(MacroDefinition)
    case builtin(String)

    init(_ json: JSONValue) {
        switch json {
        case .null: self = .null
        case .bool(let b): self = .bool(b)
        case .int(let i): self = .int(i)
        case .double(let d): self = .double(d)
        case .string(let s): self = .string(s)
        case .array(let items): self = .list(items.map(Value.init))
        case .object(let object): self = .dict(OrderedDictionary(object.map { ($0.key, Value($0.value)) }))
        }
    }

    /// What `json.dumps` accepts; anything else is the TypeError Python would raise.
    func json() throws -> JSONValue {
        switch self {
        case .null: return .null
        case .bool(let b): return .bool(b)
        case .int(let i): return .int(i)
        case .double(let d): return .double(d)
        case .string(let s): return .string(s)
        case .list(let items): return .array(try items.map { try $0.json() })
        case .dict(let dict): return .object(JSONObject(try dict.map { ($0.key, try $0.value.json()) }))
        default: throw TemplateFailure("Object of type \(typeName) is not JSON serializable")
        }
    }

    var typeName: String {
        switch self {
        case .undefined: return "Undefined"
        case .null: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .double: return "float"
        case .string: return "str"
        case .list: return "list"
        case .dict: return "dict"
        case .namespace: return "Namespace"
        case .macro: return "Macro"
        case .builtin: return "builtin_function_or_method"
        }
    }

    var isUndefined: Bool {
        if case .undefined = self { return true }
        return false
    }

    var isTruthy: Bool {
        switch self {
        case .undefined, .null: return false
        case .bool(let b): return b
        case .int(let i): return i != 0
        case .double(let d): return d != 0
        case .string(let s): return !s.isEmpty
        case .list(let items): return !items.isEmpty
        case .dict(let dict): return !dict.isEmpty
        case .namespace, .macro, .builtin: return true
        }
    }

    /// Python's `str()`; undefined prints as nothing, like jinja2's default `Undefined`.
    var text: String {
        switch self {
        case .undefined: return ""
        case .string(let s): return s
        default: return repr
        }
    }

    /// Python's `repr()`, which is what `str()` of a container shows for its elements.
    var repr: String {
        switch self {
        case .undefined: return ""
        case .null: return "None"
        case .bool(let b): return b ? "True" : "False"
        case .int(let i): return String(i)
        case .double(let d): return pythonFloatRepr(d)
        case .string(let s): return pythonStringRepr(s)
        case .list(let items): return "[" + items.map(\.repr).joined(separator: ", ") + "]"
        case .dict(let dict):
            return "{" + dict.map { pythonStringRepr($0.key) + ": " + $0.value.repr }.joined(separator: ", ") + "}"
        case .namespace(let ns):
            return "<Namespace " + ns.values.map { "\($0.key)=\($0.value.repr)" }.joined(separator: ", ") + ">"
        case .macro(let m): return "<Macro '\(m.name)'>"
        case .builtin(let name): return "<built-in function \(name)>"
        }
    }

    /// Numbers as Python sees them: `True` is 1 in arithmetic and comparisons.
    var number: Double? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }

    var integer: Int? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return i
        default: return nil
        }
    }

    /// Python `==`: numbers across types, strings by code point (not Swift's canonical
    /// equivalence), dicts regardless of order.
    func equals(_ other: Value) -> Bool {
        switch (self, other) {
        case (.undefined, .undefined), (.null, .null): return true
        case (.string(let a), .string(let b)): return a.utf8.elementsEqual(b.utf8)
        case (.list(let a), .list(let b)): return a.count == b.count && zip(a, b).allSatisfy { $0.equals($1) }
        case (.dict(let a), .dict(let b)):
            return a.count == b.count && a.allSatisfy { pair in b[pair.key].map { pair.value.equals($0) } ?? false }
        case (.namespace(let a), .namespace(let b)): return a === b
        case (.builtin(let a), .builtin(let b)): return a == b
        default:
            if let x = integer, let y = other.integer { return x == y }
            if let x = number, let y = other.number { return x == y }
            return false
        }
    }
}

/// `namespace()` objects are the one mutable thing templates share across loop scopes.
final class Namespace {
    var values: OrderedDictionary<Value>
    init(_ values: OrderedDictionary<Value>) { self.values = values }
}

/// An error raised while rendering; the interpreter adds the template line.
struct TemplateFailure: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

/// Python's `repr(str)`: single quotes unless the text has a single quote and no double one.
func pythonStringRepr(_ s: String) -> String {
    let quote: Unicode.Scalar = s.unicodeScalars.contains("'") && !s.unicodeScalars.contains("\"") ? "\"" : "'"
    var out = String.UnicodeScalarView([quote])
    for c in s.unicodeScalars {
        switch c {
        case quote, "\\": out.append("\\"); out.append(c)
        case "\n": out.append(contentsOf: "\\n".unicodeScalars)
        case "\r": out.append(contentsOf: "\\r".unicodeScalars)
        case "\t": out.append(contentsOf: "\\t".unicodeScalars)
        default:
            if c.value < 0x20 || (0x7F..<0xA0).contains(c.value) {
                let hex = String(c.value, radix: 16)
                out.append(contentsOf: ("\\x" + String(repeating: "0", count: 2 - hex.count) + hex).unicodeScalars)
            } else {
                out.append(c)
            }
        }
    }
    out.append(quote)
    return String(out)
}
