/// The parsed template: statements (`Node`) holding expressions (`Expr`). Statements keep
/// their source line so runtime errors can point at it.

indirect enum Expr {
    case literal(Value)
    case name(String)
    case list([Expr])
    case dict([(Expr, Expr)])
    case attribute(Expr, String)
    case item(Expr, Expr)
    case slice(Expr, start: Expr?, stop: Expr?, step: Expr?)
    case call(Expr, Arguments)
    case filter(Expr, String, Arguments)
    case test(Expr, String, Arguments, negated: Bool)
    case negate(Expr)
    case not(Expr)
    case binary(BinaryOperator, Expr, Expr)
    case and(Expr, Expr)
    case or(Expr, Expr)
    case conditional(condition: Expr, then: Expr, otherwise: Expr?)
}

struct Arguments {
    var positional: [Expr] = []
    var keyword: [(String, Expr)] = []
}

enum BinaryOperator: String {
    case add = "+", subtract = "-", multiply = "*", divide = "/", floorDivide = "//", modulo = "%", power = "**"
    case concat = "~"
    case equal = "==", notEqual = "!=", less = "<", lessEqual = "<=", greater = ">", greaterEqual = ">="
    case contains = "in", notContains = "not in"
}

enum AssignTarget {
    case names([String])
    case attribute(String, String)
}

struct MacroDefinition {
    let name: String
    let parameters: [(String, Expr?)]
    let body: [Node]
}

indirect enum Node {
    case text(String)
    case output(Expr, line: Int)
    case conditional([(Expr, [Node])], otherwise: [Node], line: Int)
    case loop(targets: [String], iterable: Expr, filter: Expr?, body: [Node], otherwise: [Node], line: Int)
    case assign(AssignTarget, Expr, line: Int)
    case assignBlock(String, body: [Node], line: Int)
    case macro(MacroDefinition, line: Int)
    case breakLoop(line: Int)
    case continueLoop(line: Int)
}
