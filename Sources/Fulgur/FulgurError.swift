/// Every failure a user can hit is a value with a message that says which file, tensor or
/// field was wrong and what was expected. The CLI prints `description` and exits non-zero.
public struct FulgurError: Error, CustomStringConvertible, Equatable {
    public enum Kind: String, Sendable {
        case io, format, unsupported, shape, config, tokenizer, template, usage
    }
    public let kind: Kind
    public let message: String

    public init(_ kind: Kind, _ message: String) {
        self.kind = kind
        self.message = message
    }

    public var description: String { message }

    public static func format(_ file: String, _ what: String) -> FulgurError {
        FulgurError(.format, "\(file): \(what)")
    }
}
