import Foundation

/// DFlash drafters that come with Fulgur (the checkout's `Drafters/`), and when a command
/// uses one without being asked.
public enum BundledDrafter {
    /// Drafters by the file name of the model they were trained for.
    static let byModel = [DefaultModel.fileName: "SmolLM2-135M-Instruct-DFlash"]
    /// The block size a bundled drafter runs at by default: on an H200, after the split-K plain
    /// products made verify blocks cheaper, the default model's drafter (the eighth) took 0.335 s
    /// for three prompts' 600 tokens at 4 against 0.350 s at 2 and 0.402 s at 8 (2026-11-29, one
    /// run each; 1.37-2.23x plain decoding at 4; BENCHMARKS.md). Block 4 lost on one of the three
    /// (17 times 23: 1461 against 1547 tokens/s); on the held-out test prompts its guesses of
    /// positions 2 and 3 hold often enough (coding 3.38 tokens a round expected at 4 against 1.90
    /// at 2) to pay for the dearer verify (1.20 against 0.85 ms a round).
    public static let defaultBlockSize = 4

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
