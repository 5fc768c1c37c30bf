/// A model's Jinja chat template, rendered the way Hugging Face transformers'
/// `apply_chat_template(..., tokenize=False)` renders it, so prompts match the ones the model
/// was trained on byte for byte.
///
///     let template = try ChatTemplate(source)
///     let prompt = try template.render(
///         messages: [["role": "user", "content": "Hi"]], addGenerationPrompt: true,
///         extra: ["enable_thinking": false])
public struct ChatTemplate: @unchecked Sendable {
    // The parsed tree is never mutated after init; it is only unchecked because literal
    // values share the enum that also holds mutable namespace() objects at render time.
    private let nodes: [Node]

    /// Parses the template; syntax errors and unsupported tags are reported with their line.
    public init(_ source: String) throws {
        nodes = try TemplateParser.parse(source)
    }

    /// - Parameters:
    ///   - messages: OpenAI-style message objects (`role`, `content`, `tool_calls`, ...).
    ///   - tools: JSON schemas of the callable tools; nil renders as Python's `None`.
    ///   - addGenerationPrompt: end with the header that opens the assistant's reply.
    ///   - extra: further template variables such as `bos_token`, `eos_token`,
    ///     `enable_thinking`; they override the ones above.
    public func render(
        messages: [JSONValue], tools: [JSONValue]? = nil, addGenerationPrompt: Bool,
        extra: [String: JSONValue] = [:]
    ) throws -> String {
        var variables: [String: Value] = [:]
        for name in Interpreter.globalFunctions { variables[name] = .builtin(name) }
        variables["messages"] = .list(messages.map(Value.init))
        variables["tools"] = tools.map { .list($0.map(Value.init)) } ?? .null
        variables["documents"] = Value.null
        variables["add_generation_prompt"] = .bool(addGenerationPrompt)
        for (name, value) in extra { variables[name] = Value(value) }
        return try Interpreter(variables: variables).render(nodes)
    }
}
