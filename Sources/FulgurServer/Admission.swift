import Foundation

/// How requests reach lanes: latency first, each admitted generation runs at the speed of a
/// single stream on a lane of its own, and the rest wait their turn.
///
/// - A node has `lanes` lanes; a lane runs one generation at a time.
/// - An *admission* gives a lane to a request (or, with sessions, to its API key). When no lane
///   is free the admission waits in a FIFO queue of at most `maxQueue` entries; entries are
///   admitted strictly in arrival order and each learns its position (1 = next).
/// - `keyQuota`: admissions one API key may make per UTC day. Taking a place in the queue or a
///   lane uses one; a place given up before its turn (the client left) gives it back.
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

    public init(lanes: Int = 1, maxQueue: Int = 64, keyQuota: Int? = nil, sessionLength: Double? = nil, idleRelease: Double? = nil) {
        self.lanes = lanes
        self.maxQueue = maxQueue
        self.keyQuota = keyQuota
        self.sessionLength = sessionLength
        self.idleRelease = idleRelease
    }
}

/// Admissions per API key in the current UTC day; kept in memory, so a restart forgets them.
struct QuotaBook {
    let limit: Int?
    private var day = -1
    private var used: [String: Int] = [:]

    init(limit: Int?) { self.limit = limit }

    static func today() -> Int { Int(Date().timeIntervalSince1970 / 86400) }

    /// Uses one admission of `key`'s quota; returns the day it counts against.
    mutating func charge(_ key: String?) throws(APIError) -> Int {
        let today = Self.today()
        if today != day { day = today; used = [:] }
        guard let limit, let key else { return today }
        guard used[key, default: 0] < limit else { throw .quotaExceeded(limit: limit) }
        used[key, default: 0] += 1
        return today
    }

    /// Gives back an admission charged on `day` that never got its turn.
    mutating func refund(_ key: String?, day chargedDay: Int) {
        guard limit != nil, let key, chargedDay == day, let n = used[key], n > 0 else { return }
        used[key] = n - 1
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
