import Foundation
import Fulgur

/// Output for people: generated text to stdout, unbuffered; status and errors to stderr.
enum Terminal {
    static func out(_ s: String) {
        FileHandle.standardOutput.write(Data(s.utf8))
    }

    static func status(_ s: String) {
        FileHandle.standardError.write(Data((s + "\n").utf8))
    }

    static func error(_ s: String) {
        FileHandle.standardError.write(Data(("error: " + s + "\n").utf8))
    }

    static func summary(_ r: GenerationResult) -> String {
        String(format: "[%d prompt tokens, %d generated, time to first token %.0f ms, %.1f tokens/s, finish: %@]",
               r.promptTokens, r.tokens.count, r.timeToFirstToken * 1000, r.decodeTokensPerSecond, r.finishReason.rawValue)
    }
}

/// A one-line progress bar on stderr, drawn only when stderr is a terminal.
final class ProgressBar {
    let label: String
    let enabled = isatty(2) != 0
    var lastDrawn = -1

    init(label: String) { self.label = label }

    func update(_ done: Int, _ total: Int) {
        guard enabled, total > 0 else { return }
        let percent = done * 100 / total
        guard percent != lastDrawn else { return }
        lastDrawn = percent
        let width = 30, filled = width * done / total
        let bar = String(repeating: "█", count: filled) + String(repeating: "░", count: width - filled)
        FileHandle.standardError.write(Data("\r\(label) \(bar) \(percent)%".utf8))
    }

    func finish() {
        if enabled && lastDrawn >= 0 { FileHandle.standardError.write(Data("\r\u{1B}[K".utf8)) }
    }
}
