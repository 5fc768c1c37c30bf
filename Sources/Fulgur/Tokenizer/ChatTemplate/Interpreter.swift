#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Executes the parsed template. Scoping follows jinja2 where chat templates can tell the
/// difference: `if` shares its scope, each loop iteration and each macro call gets a fresh
/// one, and only `namespace()` objects carry assignments out of a loop.

final class Scope {
    var variables: [String: Value] = [:]
    let parent: Scope?

    init(parent: Scope?) { self.parent = parent }

    func lookup(_ name: String) -> Value? { variables[name] ?? parent?.lookup(name) }
}

struct CallArguments {
    var positional: [Value] = []
    var keyword: [String: Value] = [:]

    /// The argument given at `index` or as `name`, as Python binds parameters.
    func value(_ index: Int, _ name: String) -> Value? {
        index < positional.count ? positional[index] : keyword[name]
    }
}

final class Interpreter {
    private enum Flow { case normal, breakLoop, continueLoop }

    let root: Scope
    /// Line of the statement being executed, for error messages.
    private(set) var line = 1
    private var macroDepth = 0
    private static let maxMacroDepth = 64

    init(variables: [String: Value]) {
        root = Scope(parent: nil)
        root.variables = variables
    }

    func render(_ nodes: [Node]) throws -> String {
        var out = ""
        do {
            if try execute(nodes, in: root, into: &out) != .normal {
                throw TemplateFailure("'break' or 'continue' outside a loop")
            }
        } catch let failure as TemplateFailure {
            throw FulgurError(.template, "chat template line \(line): \(failure.message)")
        }
        return out
    }

    private func execute(_ nodes: [Node], in scope: Scope, into out: inout String) throws -> Flow {
        for node in nodes {
            switch node {
            case .text(let text):
                out += text
            case .output(let expr, let line):
                self.line = line
                out += try evaluate(expr, in: scope).text
            case .conditional(let branches, let otherwise, let line):
                self.line = line
                var chosen = otherwise
                for (condition, body) in branches where try evaluate(condition, in: scope).isTruthy {
                    chosen = body
                    break
                }
                let flow = try execute(chosen, in: scope, into: &out)
                if flow != .normal { return flow }
            case .loop(let targets, let iterable, let filter, let body, let otherwise, let line):
                self.line = line
                var items = try iterate(try evaluate(iterable, in: scope))
                if let filter {
                    items = try items.filter { item in
                        let itemScope = Scope(parent: scope)
                        try bind(targets, to: item, in: itemScope)
                        return try evaluate(filter, in: itemScope).isTruthy
                    }
                }
                if items.isEmpty {
                    let flow = try execute(otherwise, in: scope, into: &out)
                    if flow != .normal { return flow }
                }
                for (index, item) in items.enumerated() {
                    let itemScope = Scope(parent: scope)
                    try bind(targets, to: item, in: itemScope)
                    itemScope.variables["loop"] = loopVariable(index, items)
                    if try execute(body, in: itemScope, into: &out) == .breakLoop { break }
                }
            case .assign(let target, let expr, let line):
                self.line = line
                let value = try evaluate(expr, in: scope)
                switch target {
                case .names(let names):
                    try bind(names, to: value, in: scope)
                case .attribute(let object, let attribute):
                    guard case .namespace(let namespace) = scope.lookup(object) else {
                        throw TemplateFailure("cannot assign attribute '\(attribute)' on '\(object)': only namespace() objects can be modified")
                    }
                    namespace.values[attribute] = value
                }
            case .assignBlock(let name, let body, let line):
                self.line = line
                var captured = ""
                _ = try execute(body, in: scope, into: &captured)
                scope.variables[name] = .string(captured)
            case .macro(let definition, _):
                scope.variables[definition.name] = .macro(definition)
            case .breakLoop:
                return .breakLoop
            case .continueLoop:
                return .continueLoop
            }
        }
        return .normal
    }

    private func bind(_ names: [String], to value: Value, in scope: Scope) throws {
        if names.count == 1 {
            scope.variables[names[0]] = value
            return
        }
        let items = try iterate(value)
        guard items.count == names.count else {
            throw TemplateFailure("cannot unpack \(items.count) values into \(names.count) names (\(names.joined(separator: ", ")))")
        }
        for (name, item) in zip(names, items) { scope.variables[name] = item }
    }

    private func loopVariable(_ index: Int, _ items: [Value]) -> Value {
        var loop: OrderedDictionary<Value> = [
            "index": .int(index + 1), "index0": .int(index),
            "revindex": .int(items.count - index), "revindex0": .int(items.count - index - 1),
            "first": .bool(index == 0), "last": .bool(index == items.count - 1),
            "length": .int(items.count), "depth": .int(1), "depth0": .int(0),
        ]
        if index > 0 { loop["previtem"] = items[index - 1] }
        if index + 1 < items.count { loop["nextitem"] = items[index + 1] }
        return .dict(loop)
    }

    /// Python's `iter()` as loops and filters see it: dicts yield keys, strings code points.
    func iterate(_ value: Value) throws -> [Value] {
        switch value {
        case .list(let items): return items
        case .dict(let dict): return dict.keys.map { .string($0) }
        case .string(let s): return s.unicodeScalars.map { .string(String($0)) }
        case .undefined: return []
        default: throw TemplateFailure("'\(value.typeName)' object is not iterable")
        }
    }

    // MARK: Expressions

    func evaluate(_ expr: Expr, in scope: Scope) throws -> Value {
        switch expr {
        case .literal(let value):
            return value
        case .name(let name):
            return scope.lookup(name) ?? .undefined(name)
        case .list(let items):
            return .list(try items.map { try evaluate($0, in: scope) })
        case .dict(let pairs):
            var dict = OrderedDictionary<Value>()
            for (keyExpr, valueExpr) in pairs {
                guard case .string(let key) = try evaluate(keyExpr, in: scope) else {
                    throw TemplateFailure("dict literal keys must be strings")
                }
                dict[key] = try evaluate(valueExpr, in: scope)
            }
            return .dict(dict)
        case .attribute(let base, let name):
            return attribute(try evaluate(base, in: scope), name)
        case .item(let base, let index):
            return try item(try evaluate(base, in: scope), try evaluate(index, in: scope))
        case .slice(let base, let start, let stop, let step):
            func bound(_ e: Expr?) throws -> Int? {
                guard let e else { return nil }
                let v = try evaluate(e, in: scope)
                if case .null = v { return nil }
                guard let i = v.integer else { throw TemplateFailure("slice indices must be integers or None") }
                return i
            }
            return try slice(try evaluate(base, in: scope), try bound(start), try bound(stop), try bound(step) ?? 1)
        case .call(let callee, let arguments):
            let args = try evaluate(arguments, in: scope)
            if case .attribute(let baseExpr, let name) = callee {
                let base = try evaluate(baseExpr, in: scope)
                if let result = try callMethod(base, name, args) { return result }
                let callee = attribute(base, name)
                if case .undefined = callee {
                    if case .undefined(let baseName) = base { throw TemplateFailure("'\(baseName)' is undefined, so '.\(name)()' cannot be called on it") }
                    throw TemplateFailure("'\(base.typeName)' object has no method '\(name)'")
                }
                return try call(callee, args)
            }
            return try call(try evaluate(callee, in: scope), args)
        case .filter(let base, let name, let arguments):
            return try applyFilter(name, try evaluate(base, in: scope), try evaluate(arguments, in: scope))
        case .test(let base, let name, let arguments, let negated):
            let result = try applyTest(name, try evaluate(base, in: scope), try evaluate(arguments, in: scope))
            return .bool(result != negated)
        case .negate(let operand):
            switch try evaluate(operand, in: scope) {
            case .double(let d): return .double(-d)
            case let v:
                guard let i = v.integer, i != .min else { throw TemplateFailure("bad operand type for unary -: '\(v.typeName)'") }
                return .int(-i)
            }
        case .not(let operand):
            return .bool(!(try evaluate(operand, in: scope).isTruthy))
        case .binary(let op, let lhs, let rhs):
            return try binary(op, try evaluate(lhs, in: scope), try evaluate(rhs, in: scope))
        case .and(let lhs, let rhs):
            let left = try evaluate(lhs, in: scope)
            return left.isTruthy ? try evaluate(rhs, in: scope) : left
        case .or(let lhs, let rhs):
            let left = try evaluate(lhs, in: scope)
            return left.isTruthy ? left : try evaluate(rhs, in: scope)
        case .conditional(let condition, let then, let otherwise):
            if try evaluate(condition, in: scope).isTruthy { return try evaluate(then, in: scope) }
            return try otherwise.map { try evaluate($0, in: scope) } ?? .undefined("conditional expression without else")
        }
    }

    private func evaluate(_ arguments: Arguments, in scope: Scope) throws -> CallArguments {
        var args = CallArguments()
        args.positional = try arguments.positional.map { try evaluate($0, in: scope) }
        for (name, expr) in arguments.keyword { args.keyword[name] = try evaluate(expr, in: scope) }
        return args
    }

    /// Attribute access never fails: a missing attribute (even on an undefined value) is
    /// undefined, which prints as nothing and tests false.
    func attribute(_ base: Value, _ name: String) -> Value {
        switch base {
        case .dict(let dict): return dict[name] ?? .undefined(name)
        case .namespace(let namespace): return namespace.values[name] ?? .undefined(name)
        default: return .undefined(name)
        }
    }

    func item(_ base: Value, _ key: Value) throws -> Value {
        switch (base, key) {
        case (.dict(let dict), .string(let k)): return dict[k] ?? .undefined(k)
        case (.namespace(let namespace), .string(let k)): return namespace.values[k] ?? .undefined(k)
        case (.list(let items), _):
            guard let i = key.integer else { throw TemplateFailure("list indices must be integers, not \(key.typeName)") }
            let index = i < 0 ? i + items.count : i
            return items.indices.contains(index) ? items[index] : .undefined("[\(i)]")
        case (.string(let s), _):
            guard let i = key.integer else { throw TemplateFailure("string indices must be integers, not \(key.typeName)") }
            let view = s.unicodeScalars
            let index = i < 0 ? i + view.count : i
            guard index >= 0, let position = view.index(view.startIndex, offsetBy: index, limitedBy: view.endIndex),
                position < view.endIndex
            else { return .undefined("[\(i)]") }
            return .string(String(view[position]))
        default:
            return .undefined(key.text)
        }
    }

    private func slice(_ base: Value, _ start: Int?, _ stop: Int?, _ step: Int) throws -> Value {
        guard step != 0 else { throw TemplateFailure("slice step cannot be zero") }
        func indices(_ count: Int) -> StrideTo<Int> {
            func clamp(_ i: Int, _ low: Int, _ high: Int) -> Int { min(max(i < 0 ? i + count : i, low), high) }
            if step > 0 {
                return stride(from: clamp(start ?? 0, 0, count), to: clamp(stop ?? count, 0, count), by: step)
            }
            let from = start.map { clamp($0, -1, count - 1) } ?? count - 1
            let to = stop.map { clamp($0, -1, count - 1) } ?? -1
            return stride(from: from, to: to, by: step)
        }
        switch base {
        case .list(let items): return .list(indices(items.count).map { items[$0] })
        case .string(let s): return .string(pySlice(s, Array(indices(s.unicodeScalars.count)), step: step))
        case .undefined: return base
        default: throw TemplateFailure("'\(base.typeName)' object is not subscriptable")
        }
    }

    func call(_ callee: Value, _ args: CallArguments) throws -> Value {
        switch callee {
        case .macro(let definition): return try callMacro(definition, args)
        case .builtin(let name): return try callGlobal(name, args)
        case .undefined(let name): throw TemplateFailure("'\(name)' is undefined and cannot be called")
        default: throw TemplateFailure("'\(callee.typeName)' object is not callable")
        }
    }

    private func callMacro(_ macro: MacroDefinition, _ args: CallArguments) throws -> Value {
        guard macroDepth < Interpreter.maxMacroDepth else {
            throw TemplateFailure("macro '\(macro.name)' nested deeper than \(Interpreter.maxMacroDepth) calls")
        }
        guard args.positional.count <= macro.parameters.count else {
            throw TemplateFailure("macro '\(macro.name)' takes \(macro.parameters.count) arguments, got \(args.positional.count)")
        }
        if let unknown = args.keyword.keys.first(where: { name in !macro.parameters.contains { $0.0 == name } }) {
            throw TemplateFailure("macro '\(macro.name)' has no parameter '\(unknown)'")
        }
        let scope = Scope(parent: root)
        for (index, (name, defaultValue)) in macro.parameters.enumerated() {
            if let value = args.value(index, name) {
                scope.variables[name] = value
            } else {
                scope.variables[name] = try defaultValue.map { try evaluate($0, in: scope) } ?? .undefined(name)
            }
        }
        macroDepth += 1
        defer { macroDepth -= 1 }
        let callerLine = line
        var out = ""
        _ = try execute(macro.body, in: scope, into: &out)
        line = callerLine
        return .string(out)
    }

    // MARK: Operators

    private func binary(_ op: BinaryOperator, _ a: Value, _ b: Value) throws -> Value {
        switch op {
        case .concat: return .string(a.text + b.text)
        case .equal: return .bool(a.equals(b))
        case .notEqual: return .bool(!a.equals(b))
        case .contains: return .bool(try contains(b, a))
        case .notContains: return .bool(!(try contains(b, a)))
        case .less: return .bool(try compare(a, b, op) < 0)
        case .lessEqual: return .bool(try compare(a, b, op) <= 0)
        case .greater: return .bool(try compare(a, b, op) > 0)
        case .greaterEqual: return .bool(try compare(a, b, op) >= 0)
        default: break
        }
        for operand in [a, b] {
            if case .undefined(let name) = operand { throw TemplateFailure("'\(name)' is undefined") }
        }
        let unsupported = TemplateFailure(
            "unsupported operand types for \(op.rawValue): '\(a.typeName)' and '\(b.typeName)'")
        switch (op, a, b) {
        case (.add, .string(let x), .string(let y)): return .string(x + y)
        case (.add, .list(let x), .list(let y)): return .list(x + y)
        case (.multiply, .string(let s), _), (.multiply, _, .string(let s)):
            guard let n = (a.integer ?? b.integer) else { throw unsupported }
            try checkRepetition(s.utf8.count, n)
            return .string(String(repeating: s, count: max(n, 0)))
        case (.multiply, .list(let items), _), (.multiply, _, .list(let items)):
            guard let n = (a.integer ?? b.integer) else { throw unsupported }
            try checkRepetition(items.count, n)
            return .list(Array([[Value]](repeating: items, count: max(n, 0)).joined()))
        default: break
        }
        if let x = a.integer, let y = b.integer { return try integerArithmetic(op, x, y) }
        guard let x = a.number, let y = b.number else { throw unsupported }
        switch op {
        case .add: return .double(x + y)
        case .subtract: return .double(x - y)
        case .multiply: return .double(x * y)
        case .divide, .floorDivide, .modulo:
            guard y != 0 else { throw TemplateFailure("division by zero") }
            if op == .divide { return .double(x / y) }
            let quotient = (x / y).rounded(.down)
            return .double(op == .floorDivide ? quotient : x - y * quotient)
        default: return .double(pow(x, y))
        }
    }

    /// `'x' * n` is the one way a template can ask for unbounded memory.
    private func checkRepetition(_ size: Int, _ times: Int) throws {
        let (total, overflowed) = size.multipliedReportingOverflow(by: max(times, 0))
        if overflowed || total > 64 << 20 { throw TemplateFailure("repetition of \(size) by \(times) is too large") }
    }

    private func integerArithmetic(_ op: BinaryOperator, _ x: Int, _ y: Int) throws -> Value {
        let overflow = TemplateFailure("integer overflow in \(x) \(op.rawValue) \(y)")
        switch op {
        case .add, .subtract, .multiply:
            let (result, overflowed) =
                op == .add ? x.addingReportingOverflow(y)
                : op == .subtract ? x.subtractingReportingOverflow(y) : x.multipliedReportingOverflow(by: y)
            if overflowed { throw overflow }
            return .int(result)
        case .divide:
            guard y != 0 else { throw TemplateFailure("division by zero") }
            return .double(Double(x) / Double(y))
        case .floorDivide, .modulo:
            guard y != 0 else { throw TemplateFailure("division by zero") }
            var quotient = x / y
            var remainder = x % y
            if remainder != 0 && (remainder < 0) != (y < 0) {
                quotient -= 1
                remainder += y
            }
            return .int(op == .floorDivide ? quotient : remainder)
        default:
            guard y >= 0 else { return .double(pow(Double(x), Double(y))) }
            var (result, base, exponent) = (1, x, y)
            while exponent > 0 {
                if exponent & 1 == 1 {
                    let (next, overflowed) = result.multipliedReportingOverflow(by: base)
                    if overflowed { throw overflow }
                    result = next
                }
                exponent >>= 1
                if exponent > 0 {
                    let (square, overflowed) = base.multipliedReportingOverflow(by: base)
                    if overflowed { throw overflow }
                    base = square
                }
            }
            return .int(result)
        }
    }

    /// Python ordering: numbers with numbers, strings by code point, lists element-wise.
    func compare(_ a: Value, _ b: Value, _ op: BinaryOperator = .less) throws -> Int {
        switch (a, b) {
        case (.string(let x), .string(let y)):
            // UTF-8 byte order is code point order.
            if x.utf8.elementsEqual(y.utf8) { return 0 }
            return x.utf8.lexicographicallyPrecedes(y.utf8) ? -1 : 1
        case (.list(let x), .list(let y)):
            for (p, q) in zip(x, y) where !p.equals(q) { return try compare(p, q, op) }
            return x.count < y.count ? -1 : x.count > y.count ? 1 : 0
        default:
            if let x = a.integer, let y = b.integer { return x < y ? -1 : x > y ? 1 : 0 }
            guard let x = a.number, let y = b.number else {
                throw TemplateFailure("'\(op.rawValue)' not supported between instances of '\(a.typeName)' and '\(b.typeName)'")
            }
            return x < y ? -1 : x > y ? 1 : 0
        }
    }

    func contains(_ container: Value, _ element: Value) throws -> Bool {
        switch container {
        case .string(let haystack):
            guard case .string(let needle) = element else {
                throw TemplateFailure("'in <string>' requires string as left operand, not \(element.typeName)")
            }
            return pyContains(haystack, needle)
        case .list(let items): return items.contains { $0.equals(element) }
        case .dict(let dict):
            if case .string(let key) = element { return dict[key] != nil }
            return false
        case .undefined: return false
        default: throw TemplateFailure("argument of type '\(container.typeName)' is not iterable")
        }
    }
}
