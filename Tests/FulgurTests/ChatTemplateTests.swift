import Foundation
import Testing

@testable import Fulgur

/// Fixtures come from recipes/fixtures/make_chat_template_fixtures.py, which renders the same
/// inputs with transformers 5.17 / jinja2 3.1.
func loadFixture(_ path: String) throws -> JSONValue {
    let url = Bundle.module.url(forResource: "Fixtures", withExtension: nil)!.appendingPathComponent(path)
    return try JSONValue(parsing: Array(try Data(contentsOf: url)))
}

func loadText(_ path: String) throws -> String {
    let url = Bundle.module.url(forResource: "Fixtures", withExtension: nil)!.appendingPathComponent(path)
    return try String(contentsOf: url, encoding: .utf8)
}

/// Points at the first differing character so a failing fixture is quick to diagnose.
func firstDifference(_ a: String, _ b: String) -> String {
    let x = Array(a.unicodeScalars), y = Array(b.unicodeScalars)
    let i = zip(x, y).enumerated().first { $0.element.0 != $0.element.1 }?.offset ?? min(x.count, y.count)
    func around(_ s: [Unicode.Scalar]) -> String {
        String(String.UnicodeScalarView(s[max(0, i - 40)..<min(s.count, i + 40)])).debugDescription
    }
    return "at scalar \(i): got \(around(x)) expected \(around(y))"
}

func expectTemplateError(_ source: String, _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation) {
    do {
        let rendered = try ChatTemplate(source).render(messages: [], addGenerationPrompt: false, extra: ["x": 1])
        Issue.record("expected an error, rendered \(rendered.debugDescription)", sourceLocation: sourceLocation)
    } catch let error as FulgurError {
        #expect(error.kind == .template, sourceLocation: sourceLocation)
        for fragment in fragments {
            #expect(error.message.contains(fragment), "\(error.message) lacks \(fragment)", sourceLocation: sourceLocation)
        }
    } catch {
        Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
    }
}

struct ChatTemplateTests {
    @Test func realTemplatesRenderLikeTransformers() throws {
        let cases = try #require(try loadFixture("chat_templates/cases.json").array)
        #expect(cases.count == 50)
        var templates: [String: ChatTemplate] = [:]
        for c in cases {
            let name = c["template"]!.string!
            if templates[name] == nil { templates[name] = try ChatTemplate(try loadText("chat_templates/\(name).jinja")) }
            let extra = Dictionary(uniqueKeysWithValues: c["extra"]!.object!.map { ($0.key, $0.value) })
            let rendered = try templates[name]!.render(
                messages: c["messages"]!.array!, tools: c["tools"]!.array,
                addGenerationPrompt: c["add_generation_prompt"]!.bool!, extra: extra)
            let expected = c["expected"]!.string!
            #expect(rendered == expected, "\(name)/\(c["name"]!.string!): \(firstDifference(rendered, expected))")
        }
    }

    @Test func featureSnippetsRenderLikeJinja2() throws {
        let snippets = try #require(try loadFixture("chat_templates/snippets.json").array)
        for snippet in snippets {
            let name = snippet["name"]!.string!
            let variables = Dictionary(uniqueKeysWithValues: snippet["variables"]!.object!.map { ($0.key, $0.value) })
            do {
                let rendered = try ChatTemplate(snippet["source"]!.string!).render(
                    messages: [], addGenerationPrompt: false, extra: variables)
                let expected = snippet["expected"]!.string!
                #expect(rendered == expected, "\(name): \(firstDifference(rendered, expected))")
            } catch {
                Issue.record("\(name): \(error)")
            }
        }
    }

    @Test func raiseExceptionCarriesTheTemplateMessage() {
        expectTemplateError(
            "{% if x == 1 %}{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}",
            ["Conversation roles must alternate user/assistant"])
    }

    @Test func unsupportedSyntaxNamesTheConstructAndLine() {
        expectTemplateError("line one\n{% include 'other.jinja' %}", ["'{% include %}'", "not supported", "line 2"])
        expectTemplateError("a\nb\n{% if false %}{{ x|wordwrap(3) }}{% endif %}", ["filter 'wordwrap'", "line 3"])
        expectTemplateError("{{ [1]|map('wordwrap')|list }}", ["filter 'wordwrap'"])
        expectTemplateError("{{ [1]|select('prime')|list }}", ["test 'prime'"])
        expectTemplateError("{{ x is prime }}", ["test 'prime'"])
        expectTemplateError("{% frobnicate %}", ["unknown tag '{% frobnicate %}'"])
        expectTemplateError("{% for x in y recursive %}{% endfor %}", ["recursive"])
        expectTemplateError("{{ f(*args) }}", ["*args"])
    }

    @Test func malformedTemplatesFailWithTheOpeningLine() {
        expectTemplateError("hello\n{% if x %}never closed", ["line 2", "'{% if %}' is never closed", "'{% endif %}'"])
        expectTemplateError("{% for m in messages %}\n{{ m }}", ["line 1", "'{% for %}' is never closed"])
        expectTemplateError("a\n\n{{ x ", ["line 3", "'{{' is never closed"])
        expectTemplateError("{% if x", ["'{%' is never closed"])
        expectTemplateError("{# comment", ["comment", "never closed"])
        expectTemplateError("{% for m in messages %}{% endif %}", ["unexpected '{% endif %}'", "'{% for %}' from line 1"])
        expectTemplateError("{% endfor %}", ["unexpected '{% endfor %}'"])
        expectTemplateError("{{ 'open string }}", ["string literal is never closed"])
        expectTemplateError("{{ x + }}", ["expected an expression"])
        expectTemplateError("{{ x y }}", ["unexpected 'y'"])
        expectTemplateError("{{ x @ 1 }}", ["unexpected character '@'"])
        expectTemplateError("{% set %}", ["expected a name"])
    }

    @Test func runtimeErrorsArePythonLike() {
        expectTemplateError("\n{{ 'a' + 1 }}", ["line 2", "unsupported operand types for +: 'str' and 'int'"])
        expectTemplateError("{{ 1 // 0 }}", ["division by zero"])
        expectTemplateError("{{ missing + 1 }}", ["'missing' is undefined"])
        expectTemplateError("{{ missing.strip() }}", ["'missing' is undefined"])
        expectTemplateError("{{ x.nope() }}", ["'int' object has no method 'nope'"])
        expectTemplateError("{% set y = 3 %}{% set y.a = 1 %}", ["only namespace() objects"])
        expectTemplateError("{% for a, b in [1] %}{% endfor %}", ["not iterable"])
        expectTemplateError("{{ [1]|tojson }}{{ x|tojson }}{{ nothing|tojson }}", ["Undefined is not JSON serializable"])
        expectTemplateError("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", ["nested deeper than 64"])
        expectTemplateError("{% break %}", ["outside a loop"])
        expectTemplateError("{{ 'ab' * 10**12 }}", ["too large"])
        expectTemplateError("{{ 3 ** 100 }}", ["integer overflow"])
    }

    @Test func hostileNestingIsRejectedNotOverflowed() {
        expectTemplateError("{{ " + String(repeating: "(", count: 300) + "1" + String(repeating: ")", count: 300) + " }}", ["nested deeper than 200"])
        expectTemplateError("{{ " + String(repeating: "not ", count: 300) + "x }}", ["nested deeper than 200"])
        expectTemplateError(String(repeating: "{% if x %}", count: 300), ["nested deeper than 200"])
    }

    @Test func undefinedValuesAreFalsyAndPrintNothing() throws {
        let template = try ChatTemplate("[{{ nope }}{{ nope.a.b }}{{ nope['k'] }}]{{ nope is defined }}{% if not nope %}!{% endif %}")
        #expect(try template.render(messages: [], addGenerationPrompt: false) == "[]False!")
    }

    @Test func renderUsesTransformersVariables() throws {
        let template = try ChatTemplate(
            "{{ messages|length }} {{ tools }} {{ documents }} {{ add_generation_prompt }} {{ bos_token }}")
        let rendered = try template.render(
            messages: [["role": "user", "content": "hi"]], addGenerationPrompt: true, extra: ["bos_token": "<s>"])
        #expect(rendered == "1 None None True <s>")
    }

    @Test func strftimeNowFormatsTheCurrentTime() throws {
        let year = try ChatTemplate("{{ strftime_now('%Y') }}").render(messages: [], addGenerationPrompt: false)
        #expect(year.count == 4 && Int(year)! >= 2024)
    }
}
