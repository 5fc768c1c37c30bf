import Foundation

/// DFlash drafters that come with Fulgur (the checkout's `Drafters/`), and when a command
/// uses one without being asked.
public enum BundledDrafter {
    /// Drafters by the file name of the model they were trained for.
    static let byModel = [DefaultModel.fileName: "SmolLM2-135M-Instruct-DFlash"]
    /// The block size a bundled drafter runs at by default: on an H200 the default model's
    /// drafter (the eighth, 2026-11-29) gave 1.31-1.69x plain decoding at 2, 1.14-1.89x at 4
    /// and 0.87-1.59x at 8 on three prompts in one run (BENCHMARKS.md); 2 took the least total
    /// time over the three and loses least where it guesses badly. (The split-K plain products
    /// later made verify blocks cheaper, block 4 most; blocks not compared again since.)
    public static let defaultBlockSize = 2

    /// The bundled drafter's directory for the model at `modelPath`: in `$FULGUR_DRAFTERS`,
    /// in `drafters/` next to the executable, or in the checkout's `Drafters/` (the executable
    /// a `swift build` product in it, or the working directory the checkout); nil when the
    /// model has none or it is not found.
    public static func directory(forModel modelPath: String) -> String? {
        guard let name = byModel[URL(fileURLWithPath: modelPath).lastPathComponent] else { return nil }
        let fm = FileManager.default
        let exe = URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath().deletingLastPathComponent()
        var places: [String] = []
        if let env = ProcessInfo.processInfo.environment["FULGUR_DRAFTERS"], !env.isEmpty { places.append(env) }
        places.append(exe.appendingPathComponent("drafters").path)
        // .build/<triple>/release/fulgur -> the checkout is three levels up.
        places.append(exe.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().appendingPathComponent("Drafters").path)
        places.append(fm.currentDirectoryPath + "/Drafters")
        return places.map { $0 + "/" + name }.first { fm.fileExists(atPath: $0 + "/config.json") }
    }

    /// What a command decodes with: the drafter asked for (`explicit`, at `blockSize` or its
    /// own), none with `disabled`, else the bundled one at `defaultBlockSize` where it is
    /// faster than plain decoding, on a GPU (on a CPU decoding is bound by arithmetic and a
    /// verify block costs as much per token as decoding it). `--block-size` without a drafter
    /// picks the bundled one.
    public static func choice(explicit: String?, disabled: Bool, blockSize: Int?, onGPU: Bool, bundled: String?) throws
        -> (directory: String, blockSize: Int?)? {
        if disabled {
            guard explicit == nil, blockSize == nil else {
                throw FulgurError(.usage, "--no-speculative turns DFlash off; it cannot go with --speculative or --block-size")
            }
            return nil
        }
        if let explicit { return (explicit, blockSize) }
        if let blockSize {
            guard let bundled else { throw FulgurError(.usage, "--block-size needs --speculative DRAFTER_DIR (this model has no bundled drafter)") }
            return (bundled, blockSize)
        }
        guard onGPU, let bundled else { return nil }
        return (bundled, defaultBlockSize)
    }
}
