import Fulgur
import Hummingbird

/// A failure the client is told about, as OpenAI's error object
/// `{"error": {"message", "type", "param", "code"}}` with its HTTP status. Every refusal the
/// server makes is one of these, so clients written for OpenAI read our errors as theirs.
public struct APIError: Error, Equatable, Sendable {
    public var status: HTTPResponse.Status
    public var message: String
    public var type: String
    public var param: String?
    public var code: String?

    public init(_ status: HTTPResponse.Status, _ message: String, type: String = "invalid_request_error",
                param: String? = nil, code: String? = nil) {
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
    }

    public var json: JSONValue {
        ["error": [
            "message": .string(message), "type": .string(type),
            "param": param.map { .string($0) } ?? .null, "code": code.map { .string($0) } ?? .null,
        ]]
    }

    /// A parameter with a value the server cannot use.
    static func invalid(_ param: String, _ message: String) -> APIError {
        APIError(.badRequest, message, param: param, code: "invalid_value")
    }

    /// A parameter of the wrong JSON type.
    static func wrongType(_ param: String, expected: String, got value: JSONValue) -> APIError {
        APIError(.badRequest, "'\(param)' must be \(expected), got \(value.typeName)", param: param, code: "invalid_type")
    }

    static func unknownModel(_ name: String) -> APIError {
        APIError(.notFound, "The model '\(name)' does not exist; GET /v1/models lists the one this server runs",
                 param: "model", code: "model_not_found")
    }

    static let unauthorized = APIError(
        .unauthorized, "Missing or incorrect API key; send it as 'Authorization: Bearer KEY'",
        code: "invalid_api_key")

    /// The queue is full: the server is busy, not the client over a quota (429 is kept for
    /// per-key quotas), so 503 with Retry-After, which OpenAI clients retry.
    static func queueFull(_ limit: Int) -> APIError {
        APIError(.serviceUnavailable, "The server is busy: \(limit) requests are already waiting; retry shortly",
                 type: "server_error", code: "queue_full")
    }

    static func tooLarge(_ limit: Int) -> APIError {
        APIError(.contentTooLarge, "The request body is larger than the server's limit of \(limit) bytes",
                 code: "request_too_large")
    }

    static func requestTimeout(_ seconds: Double) -> APIError {
        APIError(.requestTimeout, "The request body did not arrive within \(Self.seconds(seconds)); send the whole request at once",
                 code: "request_timeout")
    }

    /// "30 s", "0.5 s".
    static func seconds(_ s: Double) -> String {
        s == s.rounded() && abs(s) < 1e15 ? "\(Int(s)) s" : "\(s) s"
    }

    /// A generation that failed inside the engine after it was admitted.
    static func engine(_ error: Error) -> APIError {
        let message = (error as? FulgurError)?.message ?? "\(error)"
        return APIError(.internalServerError, "The generation failed: \(message)", type: "server_error")
    }
}

extension JSONValue {
    /// The JSON type's name, for error messages.
    var typeName: String {
        switch self {
        case .null: "null"
        case .bool: "a boolean"
        case .int: "an integer"
        case .double: "a number"
        case .string: "a string"
        case .array: "an array"
        case .object: "an object"
        }
    }
}
