import Foundation
import Fulgur
import Testing
@testable import FulgurServer

// Per-key quotas kept in a file (`--quota-file`): read back after a restart, reset by a new
// day (the clock is injected), and never reset when the file is not one.

private func quotaFile() -> String {
    FileManager.default.temporaryDirectory.appendingPathComponent("fulgur-quota-\(UUID()).json").path
}

@Test func quotaCountsSurviveARestartThroughTheQuotaFile() throws {
    let file = quotaFile()
    defer { try? FileManager.default.removeItem(atPath: file) }
    var book = try QuotaBook(limit: 2, file: file, today: { 20000 })
    for _ in 0..<2 { _ = try book.charge("a") }
    #expect(throws: APIError.self) { try book.charge("a") }
    // A restart reads the counts back: a is still out of admissions today, b is not.
    var restarted = try QuotaBook(limit: 2, file: file, today: { 20000 })
    #expect(restarted.used == ["a": 2])
    #expect(throws: APIError.self) { try restarted.charge("a") }
    #expect(try restarted.charge("b") == 20000)
    // A refund is written too.
    restarted.refund("b", day: 20000)
    #expect(try QuotaBook(limit: 2, file: file, today: { 20000 }).used == ["a": 2, "b": 0])
    // The file is only the owner's: it holds the keys.
    let permissions = try FileManager.default.attributesOfItem(atPath: file)[.posixPermissions] as? Int
    #expect(permissions == 0o600)
}

@Test func aNewDayResetsTheCountsOfTheQuotaFile() throws {
    let file = quotaFile()
    defer { try? FileManager.default.removeItem(atPath: file) }
    let clock = Clock(day: 20000)
    var book = try QuotaBook(limit: 1, file: file, today: { clock.day })
    _ = try book.charge("a")
    #expect(throws: APIError.self) { try book.charge("a") }
    // A restart on the next day starts from the file's counts of yesterday: none.
    clock.day = 20001
    let restarted = try QuotaBook(limit: 1, file: file, today: { clock.day })
    #expect(restarted.used.isEmpty)
    // A server running across midnight resets too, and writes the new day.
    #expect(try book.charge("a") == 20001)
    #expect(try QuotaBook.read(file).day == 20001)
}

/// A day that tests move on.
private final class Clock: @unchecked Sendable {
    private let lock = NSLock()
    private var value: Int
    init(day: Int) { value = day }
    var day: Int {
        get { lock.withLock { value } }
        set { lock.withLock { value = newValue } }
    }
}

@Test func aCorruptQuotaFileIsAnErrorNeverAReset() throws {
    let file = quotaFile()
    defer { try? FileManager.default.removeItem(atPath: file) }
    for text in ["not json", "[1, 2]", #"{"format": "fulgur-key-quota-1", "day": 20000, "used": {"a": "two"}}"#,
                 #"{"day": 20000, "used": {}}"#] {
        try text.write(toFile: file, atomically: true, encoding: .utf8)
        do {
            _ = try QuotaBook(limit: 2, file: file, today: { 20000 })
            Issue.record("\(text) was read as a quota file")
        } catch let error as FulgurError {
            #expect(error.message.contains(file), "\(error.message)")
            #expect(error.message.contains("not a quota file"), "\(error.message)")
        }
        // Left as it was, for the operator to look at.
        #expect(try String(contentsOfFile: file, encoding: .utf8) == text)
    }
}
