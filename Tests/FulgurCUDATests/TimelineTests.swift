import Foundation
import Fulgur
import Testing
@testable import FulgurCUDA

@Suite struct TimelineTests {
    /// Three steps of three kernels; every kernel has two blocks, and each kernel's blocks
    /// enter before the previous kernel ends (programmatic launch), as on the GPU. Times in ns.
    @Test func groupsBlocksIntoLaunchesAndReadsEachKernelsShare() throws {
        var records: [Timeline.Record] = []
        var grid: UInt64 = 1000
        var t: UInt64 = 10_000
        var ends: [UInt64] = []
        for _ in 0..<3 {
            for (length, early) in [(UInt64(4000), UInt64(500)), (6000, 1000), (2000, 0)] {
                let start = (ends.last ?? t) - early
                // Block 1 enters 200 ns after block 0 and leaves last.
                records.append(.init(grid: grid, start: start + 200, end: start + length, marks: (start + 1200, 0), block: 1))
                records.append(.init(grid: grid, start: start, end: start + length - 300, block: 0))
                ends.append(start + length)
                grid = grid == 1000 ? 2000 : grid == 2000 ? 1000 : grid + 7  // ids may come back once a grid is done
            }
            t = ends.last!
        }
        let timeline = try Timeline(records: records.shuffled(), names: [("norm", "a"), ("moe", "b"), ("moe", "c")], steps: 3, tokens: 1)
        #expect(timeline.kernels.map(\.name) == ["a", "b", "c"])
        #expect(timeline.steps == 2)
        // Kernel b: enters 1000 ns before a ends, ends 6000 ns after it entered.
        let b = timeline.kernels[1]
        #expect(b.blocks == 2)
        #expect(abs(b.lead - -1.0) < 1e-9)
        #expect(abs(b.span - 6.0) < 1e-9)
        #expect(abs(b.adds - 5.0) < 1e-9)
        #expect(abs(b.blockMedian - 5.8) < 1e-9)  // the two blocks: 5.7 and 5.8 us; the upper median
        #expect(abs(b.blockMax - 5.8) < 1e-9)
        #expect(abs(b.entrySpread - 0.2) < 1e-9)  // block 1 enters 200 ns after block 0
        #expect(b.longestMarks[0].map { abs($0 - 1.0) < 1e-9 } == true && b.longestMarks[1] == nil)  // the longest block's mark 0
        // a: its first block enters 500 ns before the previous step's c ends.
        #expect(abs(timeline.kernels[0].adds - 3.5) < 1e-9)
        #expect(abs(timeline.kernels[2].adds - 2.0) < 1e-9)
        #expect(abs(timeline.stepMicros - 10.5) < 1e-9)
        #expect(abs(timeline.kernels.reduce(0) { $0 + $1.adds } - timeline.stepMicros) < 1e-9)
        let byFamily = timeline.totals { $0.family }
        #expect(byFamily.map(\.key) == ["moe", "norm"])
        #expect(byFamily[0].launches == 2 && abs(byFamily[0].adds - 7.0) < 1e-9)
        #expect(timeline.table().contains("by family"))
    }

    /// A launch that recorded nothing (a kernel without FULGUR_TRACE_KERNEL) must not be
    /// matched to the wrong names.
    @Test func aMissingLaunchIsAnErrorNotAShiftedTable() {
        var records: [Timeline.Record] = []
        for i in 0..<5 {
            let start = UInt64(1000 * i)
            records.append(Timeline.Record(grid: UInt64(i), start: start, end: start + 900))
        }
        #expect(throws: FulgurError.self) { try Timeline(records: records, names: [("a", "a"), ("b", "b")], steps: 3, tokens: 1) }
    }

    /// Every kernel entry point a decode step can launch records itself in a trace build;
    /// otherwise `fulgur bench --timeline` fails on the launch count.
    @Test func everyStepKernelStartsWithTheTraceScope() throws {
        let folder = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Kernels").standardized
        // Weight fillers, the L2 prefetch side branch and the test helper run outside decode steps.
        let outside: Set<String> = ["random_codes", "random_block_scales", "random_tile_scales", "random_bf16", "random_moe_tiled",
                                    "hold_stream", "prefetch_l2"]
        var entries = 0
        for name in try FileManager.default.contentsOfDirectory(atPath: folder.path) where name.hasSuffix(".cu") {
            let source = try String(contentsOf: folder.appendingPathComponent(name), encoding: .utf8)
            var rest = source[...]
            while let r = rest.range(of: "extern \"C\" __global__") {
                let body = rest[r.upperBound...]
                guard let brace = body.firstIndex(of: "{") else { break }
                let head = body[..<brace].replacingOccurrences(of: "\\\n", with: " ")
                let kernel = head.split(separator: "(").first!.split(separator: " ").last.map(String.init) ?? ""
                let after = body[body.index(after: brace)...].drop { $0 == " " || $0 == "\n" }
                if !outside.contains(kernel) {
                    #expect(after.hasPrefix("FULGUR_TRACE_KERNEL;"), "\(name): \(kernel) does not start with FULGUR_TRACE_KERNEL")
                    entries += 1
                }
                rest = body[brace...]
            }
        }
        #expect(entries >= 30)
    }
}
