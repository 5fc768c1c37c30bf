import Testing

@testable import Fulgur

struct JSONTests {
    @Test func parsedObjectsKeepKeyOrderAndNumberKinds() throws {
        let value = try JSONValue(parsing: #"{"z": 1, "a": 2.0, "m": [true, null, "s"], "z": 3, "big": 12345678901234567890}"#)
        #expect(value.object?.keys == ["z", "a", "m", "big"])
        #expect(value["z"] == .int(3))
        #expect(value["a"] == .double(2))
        #expect(value["m"] == [true, nil, "s"])
        // Beyond Int64, Python keeps an exact int; here it degrades to the nearest Double.
        #expect(value["big"] == .double(12345678901234567890))
    }

    @Test func serializationMatchesPythonJSONDumps() throws {
        let cases = try #require(try loadFixture("json/dumps.json").array)
        #expect(!cases.isEmpty)
        for c in cases {
            let value = try JSONValue(parsing: c["input"]!.string!)
            let indent: String?
            switch c["indent"]! {
            case .int(let n): indent = String(repeating: " ", count: n)
            case .string(let s): indent = s
            default: indent = nil
            }
            let out = value.serialized(indent: indent, sortKeys: c["sort_keys"]!.bool!, ensureASCII: c["ensure_ascii"]!.bool!)
            let expected = c["expected"]!.string!
            #expect(out == expected, "\(firstDifference(out, expected))")
        }
    }

    @Test func serializedJSONParsesBackToTheSameValue() throws {
        let text = try loadText("chat_templates/cases.json")
        let value = try JSONValue(parsing: text)
        for indent in [nil, "  "] {
            let again = try JSONValue(parsing: value.serialized(indent: indent))
            #expect(again == value)
            #expect(again.serialized() == value.serialized())
        }
        #expect(JSONValue.object(["b": 1, "a": [1.5, "x"]]).serialized(separators: (",", ":")) == #"{"b":1,"a":[1.5,"x"]}"#)
    }

    @Test func invalidJSONIsRejectedWithItsPosition() {
        func expectFailure(_ bytes: [UInt8], _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation) {
            do {
                let value = try JSONValue(parsing: bytes)
                Issue.record("parsed \(value)", sourceLocation: sourceLocation)
            } catch let error as FulgurError {
                #expect(error.kind == .format, sourceLocation: sourceLocation)
                for fragment in fragments {
                    #expect(error.message.contains(fragment), "\(error.message) lacks \(fragment)", sourceLocation: sourceLocation)
                }
            } catch {
                Issue.record("unexpected error \(error)", sourceLocation: sourceLocation)
            }
        }
        func expectFailure(_ text: String, _ fragments: [String], sourceLocation: SourceLocation = #_sourceLocation) {
            expectFailure(Array(text.utf8), fragments, sourceLocation: sourceLocation)
        }
        expectFailure("{\"a\": 1} x", ["expected end of input", "found 'x'", "line 1, column 10"])
        expectFailure("[1, 2,]", ["expected a value", "found ']'"])
        expectFailure("{\"a\" 1}", ["expected ':'"])
        expectFailure("{'a': 1}", ["expected a string key"])
        expectFailure("[1 2]", ["expected ',' or ']'"])
        expectFailure("{\n  \"a\": tru\n}", ["expected 'true'", "line 2"])
        expectFailure("01", ["expected end of input"])
        expectFailure("1.", ["expected a digit after '.'"])
        expectFailure("-", ["expected a digit"])
        expectFailure("1e999", ["number out of range"])
        expectFailure("NaN", ["expected a value"])
        expectFailure("\"abc", ["unterminated string"])
        expectFailure("\"a\tb\"", ["unescaped control character"])
        expectFailure("\"\\x\"", ["invalid escape"])
        expectFailure("\"\\ud800\"", ["unpaired UTF-16 surrogate"])
        expectFailure("\"\\udc00\"", ["unpaired UTF-16 surrogate"])
        expectFailure("", ["expected a value", "end of input"])
        expectFailure([0x22, 0x61, 0xC3, 0x28, 0x22], ["invalid UTF-8", "byte 2"])
        expectFailure([0x22, 0xED, 0xA0, 0x80, 0x22], ["invalid UTF-8"])
        expectFailure(String(repeating: "[", count: 513) + String(repeating: "]", count: 513), ["deeper than 512"])
    }

    @Test func nestingUpToTheLimitIsAccepted() throws {
        let deep = String(repeating: "[", count: 512) + String(repeating: "]", count: 512)
        #expect(try JSONValue(parsing: deep).serialized() == deep)
    }

    @Test func escapesAndUnicodeSurviveParsing() throws {
        let value = try JSONValue(parsing: #""\u00e9\ud83d\ude00\n\"\/""#)
        #expect(value == .string("é😀\n\"/"))
        #expect(value.serialized() == #""é😀\n\"/""#)
        #expect(value.serialized(ensureASCII: true) == #""\u00e9\ud83d\ude00\n\"/""#)
    }
}
