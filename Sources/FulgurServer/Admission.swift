import Foundation
import Fulgur

/// How requests reach lanes: latency first, each admitted generation runs at the speed of a
/// single stream on a lane of its own, and the rest wait their turn.
///
/// - A node has `lanes` lanes; a lane runs one generation at a time.
/// - An *admission* gives a lane to a request (or, with sessions, to its API key). When no lane
///   is free the admission waits in a FIFO queue of at most `maxQueue` entries; entries are
///   admitted strictly in arrival order and each learns its position (1 = next).
/// - `keyQuota`: admissions one API key may make per UTC day. Taking a place in the queue or a
///   lane uses one; a place given up before its turn (the client left) gives it back. With
///   `quotaFile`, the counts survive a restart.
/// - `sessionLength`: when set, an admission reserves its lane for the key for at most this
///   long (a *session*): the key's further requests run on that lane, one after another,
///   without queueing or using quota. At the end of the session a running generation is
///   stopped with a `session_expired` error; the key's next request is a new admission.
///   When nil, every request is an admission of its own and frees its lane when it ends.
/// - `idleRelease`: a reserved lane on which the key has nothing running or waiting for this
///   long is released early, to the next in the queue.
///
/// The seed's trial runs `lanes: 1, keyQuota: 10, sessionLength: 1800, idleRelease: 300`:
/// ten queue entries a day, each a lane for up to 30 minutes, released after 5 idle minutes.
public struct AdmissionPolicy: Sendable {
    public var lanes = 1
    public var maxQueue = 64
    public var keyQuota: Int?
    /// Seconds.
    public var sessionLength: Double?
    /// Seconds; only with sessions.
    public var idleRelease: Double?
    /// Where `keyQuota`'s counts are kept across restarts (see `QuotaBook`); nil: in memory.
    public var quotaFile: String?

    public init(lanes: Int = 1, maxQueue: Int = 64, keyQuota: Int? = nil, sessionLength: Double? = nil, idleRelease: Double? = nil,
                quotaFile: String? = nil) {
        self.lanes = lanes
        self.maxQueue = maxQueue
        self.keyQuota = keyQuota
        self.sessionLength = sessionLength
        self.idleRelease = idleRelease
        self.quotaFile = quotaFile
    }
}

/// Admissions per API key in the current UTC day. In memory, and with a `file` also on disk,
/// so that a restart does not hand every key a fresh quota: the file is read at start and
/// rewritten after every change (a temporary file renamed over it, so that a crash leaves the
/// old counts or the new ones, never half a file).
///
/// The file holds the keys themselves, as an --api-keys-file does: it is created readable by
/// its owner only.
struct QuotaBook {
    let limit: Int?
    let file: String?
    /// The UTC day number (days since 1970-01-01); tests set the clock.
    let today: @Sendable () -> Int
    private(set) var day = -1
    private(set) var used: [String: Int] = [:]

    static let format = "fulgur-key-quota-1"

    /// Reads `file` when it exists; counts of an earlier day are dropped (a new day resets
    /// them). Throws when the file exists but is not a quota file: resetting it would give
    /// every key its quota again.
    init(limit: Int?, file: String? = nil, today: @escaping @Sendable () -> Int = QuotaBook.utcDay) throws {
        self.limit = limit
        self.file = file
        self.today = today
        guard let file, FileManager.default.fileExists(atPath: file) else { return }
        let (fileDay, fileUsed) = try Self.read(file)
        if fileDay == today() {
            day = fileDay
            used = fileUsed
        }
    }

    @Sendable static func utcDay() -> Int { Int(Date().timeIntervalSince1970 / 86400) }

    /// Uses one admission of `key`'s quota; returns the day it counts against. Throws 503
    /// when the count cannot be written to the file (an admission the file does not hold
    /// would come back after a restart).
    mutating func charge(_ key: String?) throws(APIError) -> Int {
        let now = today()
        if now != day { day = now; used = [:] }
        guard let limit, let key else { return now }
        let n = used[key, default: 0]
        guard n < limit else { throw .quotaExceeded(limit: limit) }
        used[key] = n + 1
        do { try save() } catch {
            used[key] = n
            throw APIError(.serviceUnavailable, "The server cannot record this admission in its quota file: \(error)",
                           type: "server_error", code: "quota_file_unwritable")
        }
        return now
    }

    /// Gives back an admission charged on `day` that never got its turn.
    mutating func refund(_ key: String?, day chargedDay: Int) {
        guard limit != nil, let key, chargedDay == day, let n = used[key], n > 0 else { return }
        used[key] = n - 1
        // Should the write fail, the file keeps one admission too many: the key loses one,
        // which is the safe side.
        try? save()
    }

    private func save() throws {
        guard let file else { return }
        let body: JSONValue = ["format": .string(Self.format), "day": .int(day),
                               "used": .object(JSONObject(used.sorted { $0.key < $1.key }.map { ($0.key, JSONValue.int($0.value)) }))]
        let temporary = file + ".tmp"
        guard FileManager.default.createFile(atPath: temporary, contents: Data((body.serialized() + "\n").utf8),
                                             attributes: [.posixPermissions: 0o600]) else {
            throw FulgurError(.io, "\(temporary): cannot write it")
        }
        guard rename(temporary, file) == 0 else {
            let reason = String(cString: strerror(errno))
            throw FulgurError(.io, "\(file): cannot rename \(temporary) over it (\(reason))")
        }
    }

    /// The day and counts in a quota file; a clear error for anything else.
    static func read(_ file: String) throws -> (day: Int, used: [String: Int]) {
        func corrupt(_ why: String) -> FulgurError {
            FulgurError(.format, "--quota-file \(file): \(why); it is not a quota file this server wrote. Fix it, or move it away to start every key's count from 0 (nothing is reset silently)")
        }
        let data: Data
        do { data = try Data(contentsOf: URL(fileURLWithPath: file)) } catch {
            throw FulgurError(.io, "--quota-file \(file): cannot read it (\(error.localizedDescription))")
        }
        let object: Any
        do { object = try JSONSerialization.jsonObject(with: data) } catch { throw corrupt("not JSON") }
        guard let top = object as? [String: Any] else { throw corrupt("not a JSON object") }
        guard top["format"] as? String == format else { throw corrupt("\"format\" is not \"\(format)\"") }
        guard let day = top["day"] as? Int else { throw corrupt("\"day\" is not a whole number") }
        guard let counts = top["used"] as? [String: Any] else { throw corrupt("\"used\" is not an object of counts by key") }
        var used: [String: Int] = [:]
        for (key, value) in counts {
            guard let n = value as? Int, n >= 0 else { throw corrupt("the count of a key is not a whole number >= 0") }
            used[key] = n
        }
        return (day, used)
    }
}

extension APIError {
    /// 429 with OpenAI's quota type; `x-should-retry: false` (set by the error middleware)
    /// keeps OpenAI's clients from retrying what only tomorrow can fix.
    static func quotaExceeded(limit: Int) -> APIError {
        let now = Date().timeIntervalSince1970
        let left = Int(86400 - now.truncatingRemainder(dividingBy: 86400))
        return APIError(
            .tooManyRequests,
            "This API key has used all \(limit) of its admissions for today (a request that takes a lane or a place in the queue is one)."
                + " The quota resets at 00:00 UTC, in \(left / 3600) h \(left % 3600 / 60) min.",
            type: "insufficient_quota", code: "insufficient_quota")
    }

    /// The session's time on its lane ran out; sending the request again is a new admission.
    static func sessionExpired(length: Double) -> APIError {
        APIError(
            .tooManyRequests,
            "This API key's session reached this server's limit of \(seconds(length)) on its lane and ended;"
                + " send the request again to join the queue (a new admission).",
            type: "requests", code: "session_expired")
    }

    static let shuttingDown = APIError(
        .serviceUnavailable, "The server is shutting down; retry on another instance or once it is back",
        type: "server_error", code: "server_shutting_down")
}
