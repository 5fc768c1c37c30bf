import Foundation

/// A Hugging Face `config.json` (or `generation_config.json`), read with typed accessors whose
/// errors name the file and the field.
public struct HFConfig: @unchecked Sendable {
    public let path: String
    public let values: [String: Any]

    public init(path: String) throws {
        self.path = path
        guard let data = FileManager.default.contents(atPath: path) else {
            throw FulgurError(.io, "\(path): cannot read file")
        }
        do {
            guard let v = try JSONSerialization.jsonObject(with: data) as? [String: Any] else {
                throw FulgurError.format(path, "expected a JSON object")
            }
            values = v
        } catch let e as FulgurError {
            throw e
        } catch {
            throw FulgurError.format(path, "not valid JSON (\(error.localizedDescription))")
        }
    }

    public init(path: String, values: [String: Any]) {
        self.path = path
        self.values = values
    }

    public func has(_ key: String) -> Bool { values[key] != nil && !(values[key] is NSNull) }

    /// Every integer Fulgur reads from a config is a size or a count, so negatives are errors.
    public func int(_ key: String) throws -> Int {
        guard let v = optionalInt(key), v >= 0 else { throw missing(key, "a non-negative integer") }
        return v
    }
    public func int(_ key: String, default d: Int) throws -> Int {
        has(key) ? try int(key) : d
    }
    public func optionalInt(_ key: String) -> Int? {
        guard let n = values[key] as? NSNumber else { return nil }
        let d = n.doubleValue
        return d == d.rounded() ? n.intValue : nil
    }
    public func double(_ key: String) throws -> Double {
        guard let n = values[key] as? NSNumber else { throw missing(key, "a number") }
        return n.doubleValue
    }
    public func double(_ key: String, default d: Double) throws -> Double {
        has(key) ? try double(key) : d
    }
    public func bool(_ key: String, default d: Bool) throws -> Bool {
        guard has(key) else { return d }
        guard let b = values[key] as? Bool else { throw missing(key, "true or false") }
        return b
    }
    public func string(_ key: String) throws -> String {
        guard let s = values[key] as? String else { throw missing(key, "a string") }
        return s
    }
    public func strings(_ key: String) throws -> [String]? {
        guard has(key) else { return nil }
        guard let a = values[key] as? [String] else { throw missing(key, "a list of strings") }
        return a
    }
    public func object(_ key: String) throws -> HFConfig? {
        guard has(key) else { return nil }
        guard let o = values[key] as? [String: Any] else { throw missing(key, "an object") }
        return HFConfig(path: "\(path) (\(key))", values: o)
    }
    /// An id or a list of ids (`eos_token_id` is either).
    public func ids(_ key: String) -> [Int] {
        if let n = values[key] as? NSNumber { return [n.intValue] }
        if let a = values[key] as? [NSNumber] { return a.map(\.intValue) }
        return []
    }

    func missing(_ key: String, _ expected: String) -> FulgurError {
        if has(key) {
            return FulgurError(.config, "\(path): field '\(key)' is \(values[key]!), expected \(expected)")
        }
        return FulgurError(.config, "\(path): field '\(key)' is missing, expected \(expected)")
    }
}
