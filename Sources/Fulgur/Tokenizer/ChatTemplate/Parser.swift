/// Recursive-descent parser with jinja2's precedence: conditional < or < and < not <
/// comparison < `+ -` < `~` < `* / // %` < `**` < unary minus < primary with postfix,
/// then filters and tests bind to the operand they follow (`messages|length - 1`).

/// Nesting limit for expressions and for blocks: far beyond real templates, and low enough
/// that a hostile template cannot overflow the stack of the recursive parser and evaluator.
let maxTemplateNesting = 200

struct TokenStream {
    let tag: Tag
    var pos = 0
    private var depth = 0

    init(_ tag: Tag) { self.tag = tag }

    var current: Token? { pos < tag.tokens.count ? tag.tokens[pos] : nil }
    var line: Int { tag.lines.isEmpty ? tag.line : tag.lines[min(pos, tag.lines.count - 1)] }

    func fail(_ message: String) -> FulgurError {
        FulgurError(.template, "chat template line \(line): \(message)")
    }

    func isOp(_ op: String) -> Bool { current == .op(op) }
    func isName(_ name: String) -> Bool { current == .name(name) }

    mutating func skipOp(_ op: String) -> Bool {
        guard isOp(op) else { return false }
        pos += 1
        return true
    }

    mutating func skipName(_ name: String) -> Bool {
        guard isName(name) else { return false }
        pos += 1
        return true
    }

    mutating func expectOp(_ op: String) throws {
        guard skipOp(op) else { throw fail("expected '\(op)', found \(current?.display ?? "end of tag")") }
    }

    mutating func expectName(_ name: String) throws {
        guard skipName(name) else { throw fail("expected '\(name)', found \(current?.display ?? "end of tag")") }
    }

    mutating func identifier() throws -> String {
        guard case .name(let name) = current else {
            throw fail("expected a name, found \(current?.display ?? "end of tag")")
        }
        pos += 1
        return name
    }

    func expectEnd() throws {
        if let current { throw fail("unexpected \(current.display), expected end of tag") }
    }

    // MARK: Expressions

    private mutating func nest() throws {
        depth += 1
        if depth > maxTemplateNesting { throw fail("expression nested deeper than \(maxTemplateNesting) levels") }
    }

    mutating func parseExpression() throws -> Expr {
        try nest()
        defer { depth -= 1 }
        var expr = try parseOr()
        while skipName("if") {
            let condition = try parseOr()
            let otherwise = skipName("else") ? try parseExpression() : nil
            expr = .conditional(condition: condition, then: expr, otherwise: otherwise)
        }
        return expr
    }

    /// An expression where a trailing comma makes a tuple (`set a = 1, 2`).
    mutating func parseTuple() throws -> Expr {
        let first = try parseExpression()
        guard isOp(",") else { return first }
        var items = [first]
        while skipOp(",") {
            if current == nil || isOp(")") { break }
            items.append(try parseExpression())
        }
        return .list(items)
    }

    mutating func parseOr() throws -> Expr {
        var expr = try parseAnd()
        while skipName("or") { expr = .or(expr, try parseAnd()) }
        return expr
    }

    mutating func parseAnd() throws -> Expr {
        var expr = try parseNot()
        while skipName("and") { expr = .and(expr, try parseNot()) }
        return expr
    }

    mutating func parseNot() throws -> Expr {
        try nest()
        defer { depth -= 1 }
        if skipName("not") { return .not(try parseNot()) }
        return try parseComparison()
    }

    mutating func parseComparison() throws -> Expr {
        var expr = try parseSum()
        while true {
            if case .op(let op) = current, let binary = BinaryOperator(rawValue: op),
                [.equal, .notEqual, .less, .lessEqual, .greater, .greaterEqual].contains(binary)
            {
                pos += 1
                expr = .binary(binary, expr, try parseSum())
            } else if skipName("in") {
                expr = .binary(.contains, expr, try parseSum())
            } else if isName("not"), pos + 1 < tag.tokens.count, tag.tokens[pos + 1] == .name("in") {
                pos += 2
                expr = .binary(.notContains, expr, try parseSum())
            } else {
                return expr
            }
        }
    }

    private mutating func parseBinary(_ ops: [BinaryOperator], _ operand: (inout TokenStream) throws -> Expr) throws -> Expr {
        var expr = try operand(&self)
        while case .op(let op) = current, let binary = BinaryOperator(rawValue: op), ops.contains(binary) {
            pos += 1
            expr = .binary(binary, expr, try operand(&self))
        }
        return expr
    }

    mutating func parseSum() throws -> Expr { try parseBinary([.add, .subtract]) { try $0.parseConcat() } }
    mutating func parseConcat() throws -> Expr { try parseBinary([.concat]) { try $0.parseProduct() } }
    mutating func parseProduct() throws -> Expr {
        try parseBinary([.multiply, .divide, .floorDivide, .modulo]) { try $0.parsePower() }
    }
    mutating func parsePower() throws -> Expr { try parseBinary([.power]) { try $0.parseUnary() } }

    mutating func parseUnary(withFilters: Bool = true) throws -> Expr {
        try nest()
        defer { depth -= 1 }
        var expr: Expr
        if skipOp("-") {
            expr = .negate(try parseUnary(withFilters: false))
        } else if skipOp("+") {
            expr = try parseUnary(withFilters: false)
        } else {
            expr = try parsePrimary()
        }
        expr = try parsePostfix(expr)
        return withFilters ? try parseFiltersAndTests(expr) : expr
    }

    mutating func parsePrimary() throws -> Expr {
        guard let token = current else { throw fail("expected an expression, found end of tag") }
        pos += 1
        switch token {
        case .name("true"), .name("True"): return .literal(.bool(true))
        case .name("false"), .name("False"): return .literal(.bool(false))
        case .name("none"), .name("None"): return .literal(.null)
        case .name(let name): return .name(name)
        case .string(var s):
            // Adjacent literals concatenate, as in Python.
            while case .string(let more) = current {
                s += more
                pos += 1
            }
            return .literal(.string(s))
        case .int(let i): return .literal(.int(i))
        case .float(let d): return .literal(.double(d))
        case .op("("):
            if skipOp(")") { return .list([]) }
            let expr = try parseTuple()
            try expectOp(")")
            return expr
        case .op("["):
            var items: [Expr] = []
            while !isOp("]") {
                items.append(try parseExpression())
                if !skipOp(",") { break }
            }
            try expectOp("]")
            return .list(items)
        case .op("{"):
            var pairs: [(Expr, Expr)] = []
            while !isOp("}") {
                let key = try parseExpression()
                try expectOp(":")
                pairs.append((key, try parseExpression()))
                if !skipOp(",") { break }
            }
            try expectOp("}")
            return .dict(pairs)
        default:
            pos -= 1
            throw fail("unexpected \(token.display), expected an expression")
        }
    }

    mutating func parsePostfix(_ base: Expr) throws -> Expr {
        var expr = base
        while true {
            if skipOp(".") {
                switch current {
                case .name(let name): expr = .attribute(expr, name)
                case .int(let i): expr = .item(expr, .literal(.int(i)))
                default: throw fail("expected an attribute name after '.', found \(current?.display ?? "end of tag")")
                }
                pos += 1
            } else if skipOp("[") {
                expr = try parseSubscript(expr)
            } else if isOp("(") {
                expr = .call(expr, try parseArguments())
            } else {
                return expr
            }
        }
    }

    mutating func parseSubscript(_ base: Expr) throws -> Expr {
        var start: Expr?
        if !isOp(":") {
            start = try parseExpression()
            if skipOp("]") { return .item(base, start!) }
        }
        try expectOp(":")
        let stop = isOp("]") || isOp(":") ? nil : try parseExpression()
        var step: Expr?
        if skipOp(":"), !isOp("]") { step = try parseExpression() }
        try expectOp("]")
        return .slice(base, start: start, stop: stop, step: step)
    }

    mutating func parseArguments() throws -> Arguments {
        try expectOp("(")
        var args = Arguments()
        while !isOp(")") {
            if isOp("*") || isOp("**") { throw fail("'*args' and '**kwargs' in calls are not supported") }
            if case .name(let name) = current, pos + 1 < tag.tokens.count, tag.tokens[pos + 1] == .op("=") {
                pos += 2
                args.keyword.append((name, try parseExpression()))
            } else {
                if !args.keyword.isEmpty { throw fail("positional argument follows keyword argument") }
                args.positional.append(try parseExpression())
            }
            if !skipOp(",") { break }
        }
        try expectOp(")")
        return args
    }

    mutating func dottedName() throws -> String {
        var name = try identifier()
        while skipOp(".") { name += "." + (try identifier()) }
        return name
    }

    mutating func parseFiltersAndTests(_ base: Expr) throws -> Expr {
        var expr = base
        while true {
            if skipOp("|") {
                let name = try dottedName()
                guard Interpreter.filterNames.contains(name) else { throw fail("the filter '\(name)' is not supported") }
                expr = .filter(expr, name, isOp("(") ? try parseArguments() : Arguments())
            } else if skipName("is") {
                let negated = skipName("not")
                let name = try dottedName()
                guard Interpreter.testNames.contains(name) else { throw fail("the test '\(name)' is not supported") }
                var args = Arguments()
                if isOp("(") {
                    args = try parseArguments()
                } else if let token = current, startsPrimary(token) {
                    if isName("is") { throw fail("tests cannot be chained with 'is'") }
                    args.positional = [try parsePostfix(try parsePrimary())]
                }
                expr = .test(expr, name, args, negated: negated)
            } else if isOp("(") {
                expr = .call(expr, try parseArguments())
            } else {
                return expr
            }
        }
    }

    /// jinja2 lets a test take one bare argument (`x is divisibleby 3`) unless the next word
    /// continues the surrounding expression.
    private func startsPrimary(_ token: Token) -> Bool {
        switch token {
        case .name(let n): return !["else", "or", "and"].contains(n)
        case .string, .int, .float: return true
        case .op(let o): return ["(", "[", "{"].contains(o)
        }
    }
}

// MARK: - Statements

struct TemplateParser {
    private let segments: [Segment]
    private var index = 0
    private var depth = 0

    static func parse(_ source: String) throws -> [Node] {
        var parser = TemplateParser(segments: try Lexer.segments(source))
        return try parser.parseBody(until: [], opener: nil).nodes
    }

    private init(segments: [Segment]) { self.segments = segments }

    private static let blockEnds: Set<String> = [
        "elif", "else", "endif", "endfor", "endset", "endmacro", "endgeneration",
    ]
    private static let unsupported: Set<String> = [
        "call", "filter", "raw", "include", "import", "from", "extends", "block", "with", "do", "autoescape", "trans",
    ]

    /// Parses until one of `terminators` and returns it with the rest of its tag.
    private mutating func parseBody(until terminators: Set<String>, opener: (String, Int)?) throws -> (
        nodes: [Node], end: String, rest: TokenStream?
    ) {
        var nodes: [Node] = []
        while index < segments.count {
            let segment = segments[index]
            index += 1
            switch segment {
            case .text(let text):
                nodes.append(.text(text))
            case .output(let tag):
                var stream = TokenStream(tag)
                let expr = try stream.parseTuple()
                try stream.expectEnd()
                nodes.append(.output(expr, line: tag.line))
            case .statement(let tag):
                var stream = TokenStream(tag)
                guard case .name(let keyword) = stream.current else {
                    throw stream.fail("expected a tag name such as 'if', 'for' or 'set'")
                }
                stream.pos += 1
                if terminators.contains(keyword) { return (nodes, keyword, stream) }
                depth += 1
                defer { depth -= 1 }
                if depth > maxTemplateNesting {
                    throw stream.fail("blocks nested deeper than \(maxTemplateNesting) levels")
                }
                nodes += try parseStatement(keyword, &stream, opener: opener)
            }
        }
        if let (name, line) = opener {
            let expected = terminators.sorted().map { "'{% \($0) %}'" }.joined(separator: " or ")
            throw FulgurError(
                .template, "chat template line \(line): '{% \(name) %}' is never closed; expected \(expected)")
        }
        return (nodes, "", nil)
    }

    private mutating func parseStatement(_ keyword: String, _ s: inout TokenStream, opener: (String, Int)?) throws
        -> [Node]
    {
        let line = s.tag.line
        switch keyword {
        case "if":
            var branches: [(Expr, [Node])] = []
            var condition = try s.parseExpression()
            try s.expectEnd()
            while true {
                let (body, end, rest) = try parseBody(until: ["elif", "else", "endif"], opener: ("if", line))
                branches.append((condition, body))
                var stream = rest!
                switch end {
                case "elif":
                    condition = try stream.parseExpression()
                    try stream.expectEnd()
                case "else":
                    try stream.expectEnd()
                    let (otherwise, _, endRest) = try parseBody(until: ["endif"], opener: ("if", line))
                    try endRest!.expectEnd()
                    return [.conditional(branches, otherwise: otherwise, line: line)]
                default:
                    try stream.expectEnd()
                    return [.conditional(branches, otherwise: [], line: line)]
                }
            }
        case "for":
            var targets = [try s.identifier()]
            while s.skipOp(",") { targets.append(try s.identifier()) }
            try s.expectName("in")
            let iterable = try s.parseOr()
            let filter = s.skipName("if") ? try s.parseExpression() : nil
            if s.isName("recursive") { throw s.fail("recursive loops are not supported") }
            try s.expectEnd()
            let (body, end, rest) = try parseBody(until: ["else", "endfor"], opener: ("for", line))
            try rest!.expectEnd()
            var otherwise: [Node] = []
            if end == "else" {
                let (elseBody, _, endRest) = try parseBody(until: ["endfor"], opener: ("for", line))
                try endRest!.expectEnd()
                otherwise = elseBody
            }
            return [.loop(targets: targets, iterable: iterable, filter: filter, body: body, otherwise: otherwise, line: line)]
        case "set":
            let first = try s.identifier()
            var target = AssignTarget.names([first])
            if s.skipOp(".") {
                target = .attribute(first, try s.identifier())
            } else if s.isOp(",") {
                var names = [first]
                while s.skipOp(",") { names.append(try s.identifier()) }
                target = .names(names)
            }
            if s.skipOp("=") {
                let value = try s.parseTuple()
                try s.expectEnd()
                return [.assign(target, value, line: line)]
            }
            guard case .names(let names) = target, names.count == 1 else {
                throw s.fail("expected '=' in 'set'")
            }
            if s.isOp("|") { throw s.fail("filters on block 'set' are not supported") }
            try s.expectEnd()
            let (body, _, rest) = try parseBody(until: ["endset"], opener: ("set", line))
            try rest!.expectEnd()
            return [.assignBlock(first, body: body, line: line)]
        case "macro":
            let name = try s.identifier()
            try s.expectOp("(")
            var parameters: [(String, Expr?)] = []
            while !s.isOp(")") {
                let parameter = try s.identifier()
                parameters.append((parameter, s.skipOp("=") ? try s.parseExpression() : nil))
                if !s.skipOp(",") { break }
            }
            try s.expectOp(")")
            try s.expectEnd()
            let (body, _, rest) = try parseBody(until: ["endmacro"], opener: ("macro", line))
            try rest!.expectEnd()
            return [.macro(MacroDefinition(name: name, parameters: parameters, body: body), line: line)]
        case "break", "continue":
            try s.expectEnd()
            return [keyword == "break" ? .breakLoop(line: line) : .continueLoop(line: line)]
        case "generation":
            // transformers' assistant-mask extension: renders its body unchanged.
            try s.expectEnd()
            let (body, _, rest) = try parseBody(until: ["endgeneration"], opener: ("generation", line))
            try rest!.expectEnd()
            return body
        default:
            if TemplateParser.unsupported.contains(keyword) {
                throw s.fail("the '{% \(keyword) %}' tag is not supported by Fulgur's chat template engine")
            }
            if TemplateParser.blockEnds.contains(keyword) {
                let context = opener.map { " inside '{% \($0.0) %}' from line \($0.1)" } ?? ""
                throw s.fail("unexpected '{% \(keyword) %}'\(context)")
            }
            throw s.fail("unknown tag '{% \(keyword) %}'")
        }
    }
}
