import Foundation
import Fulgur

/// Where a replayed decode step's time goes, kernel by kernel, from a timeline build's block
/// records (scripts/build-kernels --trace; Kernels/common.cuh's TraceScope): `fulgur bench
/// --timeline`. Each block of each kernel leaves one record (its launch's %gridid, %globaltimer
/// when its thread 0 entered and left), so inside the step's CUDA graph, with programmatic
/// launches overlapping, each kernel's share of the step can be read off, which neither
/// events around single launches nor leaving a family out of the graph can do.
public struct Timeline: Codable, Sendable {
    /// One block's record as the kernels write it (48 bytes): marks are FULGUR_TRACE_MARK(0)
    /// and (1) inside the block, 0 where the block did not pass them.
    public struct Record: Sendable {
        public var grid: UInt64, start: UInt64, end: UInt64, marks: (UInt64, UInt64)
        public var sm: UInt32, block: UInt32
        public static let bytes = 48
        public init(grid: UInt64, start: UInt64, end: UInt64, marks: (UInt64, UInt64) = (0, 0), sm: UInt32 = 0, block: UInt32 = 0) {
            (self.grid, self.start, self.end, self.marks, self.sm, self.block) = (grid, start, end, marks, sm, block)
        }
    }

    /// One kernel of the step, medians over the traced steps (microseconds).
    public struct Kernel: Codable, Sendable {
        /// The executor's family (`CUDAExecutor.kernelFamilies`) and the kernel's name.
        public let family: String, name: String
        public let blocks: Int
        /// From the previous kernel's last block leaving to this kernel's last block leaving:
        /// what the kernel adds to the step, as the kernels run one after another. The adds of
        /// a step sum to the step's time.
        public let adds: Double
        /// From its first block entering to its last block leaving.
        public let span: Double
        /// From the previous kernel's last block leaving to this kernel's first block entering:
        /// negative when its blocks were resident early (programmatic dependent launch).
        public let lead: Double
        /// The median block's time from entering to leaving, and the longest block's.
        public let blockMedian: Double, blockMax: Double
        /// From the first block entering to the last block entering (blocks that could not be
        /// resident at once enter late).
        public let entrySpread: Double
        /// In the longest block, from its entry to its marks 0 and 1 (nil: not passed).
        public let longestMarks: [Double?]
    }

    public let tokens: Int
    public let steps: Int
    /// The median step, last kernel's end to the next step's last kernel's end.
    public let stepMicros: Double
    public let kernels: [Kernel]

    /// Groups `records` by launch and matches the launches to `names` ((family, kernel) per
    /// launch of one step, in graph order) repeated `steps` times; the first step only gives
    /// the second its starting point. Every block of a launch enters before any block of the
    /// next one (stream order; a programmatic dependent starts only once each block of the
    /// kernel before it has run), so in order of entry a launch is a run of one %gridid. Runs,
    /// not ids, make the groups: the hardware may reuse an id once its grid is done.
    public init(records: [Record], names: [(family: String, kernel: String)], steps: Int, tokens: Int) throws {
        precondition(steps >= 2 && !names.isEmpty)
        var launches: [(grid: UInt64, start: UInt64, end: UInt64, lastStart: UInt64, blocks: Int, durations: [UInt64], longest: Record?)] = []
        for r in records.sorted(by: { ($0.start, $0.grid) < ($1.start, $1.grid) }) {
            if launches.last?.grid != r.grid { launches.append((r.grid, r.start, 0, r.start, 0, [], nil)) }
            let i = launches.count - 1
            launches[i].end = max(launches[i].end, r.end)
            launches[i].lastStart = r.start
            launches[i].blocks += 1
            launches[i].durations.append(r.end &- r.start)
            if launches[i].longest.map({ r.end &- r.start > $0.end &- $0.start }) ?? true { launches[i].longest = r }
        }
        guard launches.count == names.count * steps else {
            throw FulgurError(.format, "timeline: \(launches.count) launches recorded over \(steps) steps, expected \(names.count) a step (\(records.count) block records)")
        }
        func median(_ v: [Double]) -> Double { v.isEmpty ? .nan : v.sorted()[v.count / 2] }
        let K = names.count
        var kernels: [Kernel] = []
        for i in 0..<K {
            var adds: [Double] = [], spans: [Double] = [], leads: [Double] = [], blocks: [Double] = [], longest: [Double] = [], spreads: [Double] = []
            var marks: [[Double]] = [[], []]
            for s in 1..<steps {
                let g = launches[s * K + i], prev = launches[s * K + i - 1]
                adds.append(Double(Int64(bitPattern: g.end &- prev.end)) / 1e3)
                spans.append(Double(g.end - g.start) / 1e3)
                leads.append(Double(Int64(bitPattern: g.start &- prev.end)) / 1e3)
                blocks.append(median(g.durations.map { Double($0) / 1e3 }))
                longest.append(Double(g.durations.max() ?? 0) / 1e3)
                spreads.append(Double(g.lastStart - g.start) / 1e3)
                if let l = g.longest {
                    for (m, at) in [l.marks.0, l.marks.1].enumerated() where at != 0 { marks[m].append(Double(Int64(bitPattern: at &- l.start)) / 1e3) }
                }
            }
            kernels.append(Kernel(family: names[i].family, name: names[i].kernel, blocks: launches[K + i].blocks, adds: median(adds),
                                  span: median(spans), lead: median(leads), blockMedian: median(blocks), blockMax: median(longest),
                                  entrySpread: median(spreads), longestMarks: marks.map { $0.isEmpty ? nil : median($0) }))
        }
        let stepEnds = (1..<steps).map { s in Double(launches[(s + 1) * K - 1].end - launches[s * K - 1].end) / 1e3 }
        self.tokens = tokens
        self.steps = steps - 1
        self.stepMicros = median(stepEnds)
        self.kernels = kernels
    }

    /// Per family, then per kernel name: launches a step and the sum of their adds.
    public func totals(by key: (Kernel) -> String) -> [(key: String, launches: Int, adds: Double)] {
        var order: [String] = [], sums: [String: (Int, Double)] = [:]
        for k in kernels {
            let name = key(k)
            if sums[name] == nil { order.append(name) }
            let s = sums[name] ?? (0, 0)
            sums[name] = (s.0 + 1, s.1 + k.adds)
        }
        return order.map { ($0, sums[$0]!.0, sums[$0]!.1) }.sorted { $0.2 > $1.2 }
    }

    /// The totals by family and by kernel, then every kernel of the step's first `detail`
    /// launches and of its last few.
    public func table(detail: Int = 40) -> String {
        var lines = [String(format: "timeline of the %d-token step (median of %d replayed steps, trace build): %.1f us a step", tokens, steps, stepMicros)]
        for (title, key) in [("family", { (k: Kernel) in k.family }), ("kernel", { (k: Kernel) in k.name })] as [(String, (Kernel) -> String)] {
            lines.append("  by \(title): launches, us added to the step (sum), share")
            for t in totals(by: key) {
                lines.append("    " + t.key.padding(toLength: 28, withPad: " ", startingAt: 0)
                             + String(format: " %4d  %9.1f  %5.1f%%", t.launches, t.adds, 100 * t.adds / stepMicros))
            }
        }
        lines.append("  launch by launch (us): adds = end after the previous kernel's end; span = first entry to last exit; lead = first entry after the previous end; block = median block, longest block; entries = first to last block entering")
        let shown = Array(kernels.indices.prefix(detail)) + Array(kernels.indices.suffix(4).filter { $0 >= detail })
        var last = -1
        for i in shown {
            if i != last + 1 { lines.append("    ...") }
            last = i
            let k = kernels[i]
            lines.append(String(format: "    %3d %@ %@ %5d blocks  adds %7.2f  span %7.2f  lead %7.2f  block %7.2f / %7.2f  entries %7.2f", i,
                                k.family.padding(toLength: 10, withPad: " ", startingAt: 0), k.name.padding(toLength: 24, withPad: " ", startingAt: 0),
                                k.blocks, k.adds, k.span, k.lead, k.blockMedian, k.blockMax, k.entrySpread)
                         + k.longestMarks.enumerated().compactMap { m, at in at.map { String(format: "  mark %d at %.2f", m, $0) } }.joined())
        }
        return lines.joined(separator: "\n")
    }
}
