import Foundation
import Testing
@testable import Fulgur

/// Deferred random matrices (RandomModel.buildDeferred): values defined by position, so a
/// slice is the whole matrix at its positions; the distributions of RandomMatrix; a deferred
/// weight survives Plan.shard; the CPU executor runs a deferred model, and split over shards
/// it computes the whole model's function. Kernels/random.cu makes the same bytes on a GPU
/// (fulgur-gpu-check random compares them with these).
@Suite struct DeferredRandomTests {
    static func matrix(_ kind: RandomMatrix.Kind, batches: Int = 1, rows: Int, cols: Int, seed: UInt64 = 9, form: DeferredRandomMatrix.Form = .quantized,
                       batch: Int = 0) -> DeferredRandomMatrix {
        DeferredRandomMatrix(RandomMatrix(kind, seed: seed, batches: batches, rows: rows, cols: cols, std: 1 / Float(cols).squareRoot()), batch: batch, form: form)
    }

    static func rowValues(_ w: LinearWeight) -> [[Float]] {
        (0..<w.outFeatures).map { r in
            var row = [Float](repeating: 0, count: w.inFeatures)
            row.withUnsafeMutableBufferPointer { w.dequantizeRow(r, into: $0.baseAddress!) }
            return row
        }
    }

    /// The generator is splitmix64 at a counter (the published first output of seed 1234567),
    /// so the kernel's copy of it can be checked against any reference.
    @Test func positionalHashIsSplitmix64AtACounter() {
        #expect(RandomFill.positional(1_234_567, 0) == 6_457_827_717_110_365_317)
        #expect(RandomFill.positional(1_234_567, 1) == 3_203_168_211_198_807_973)
        #expect(RandomFill.streamKey(5, 1) != RandomFill.streamKey(5, 2))
    }

    @Test func sameSeedSameBytesOtherSeedOtherBytes() {
        for kind in [RandomMatrix.Kind.fp8, .mxfp4] {
            let a = Self.matrix(kind, rows: 64, cols: 256).hostBytes(), b = Self.matrix(kind, rows: 64, cols: 256).hostBytes()
            let c = Self.matrix(kind, rows: 64, cols: 256, seed: 10).hostBytes()
            let n = Self.matrix(kind, rows: 64, cols: 256).byteCounts.codes
            #expect(memcmp(a.codes.pointer, b.codes.pointer, n) == 0)
            #expect(memcmp(a.codes.pointer, c.codes.pointer, n) != 0)
        }
    }

    /// Rows evenly spaced (Plan.shard's head ranges, gpt-oss's interleaved gate/up pairs) and
    /// columns on blocks: the slice stays deferred and holds the whole matrix's values there,
    /// in every form; for a batch (expert) of a stacked tensor too.
    @Test(arguments: [(RandomMatrix.Kind.fp8, DeferredRandomMatrix.Form.quantized), (.mxfp4, .quantized), (.fp8, .bf16), (.mxfp4, .bf16)])
    func aSliceIsTheWholeMatrixAtItsPositions(_ kind: RandomMatrix.Kind, _ form: DeferredRandomMatrix.Form) throws {
        let whole = Self.matrix(kind, batches: 3, rows: 384, cols: 320, form: form, batch: 2)
        let w = LinearWeight(deferred: whole, name: "w")
        let all = Self.rowValues(w)
        // Rows 128..<256 then every other row of those, columns from 128 (on FP8 tiles and MXFP4 blocks).
        let first = try w.selecting(rows: Array(128..<256), columns: 128..<320)
        let second = try first.selecting(rows: Array(stride(from: 0, to: 128, by: 2)), columns: 0..<128)
        for (slice, rows, columns) in [(first, Array(128..<256), 128..<320), (second, Array(stride(from: 128, to: 256, by: 2)), 128..<256)] {
            #expect(slice.deferred != nil && slice.format == w.format, "\(slice.name) stays deferred")
            let values = Self.rowValues(slice)
            for (i, r) in rows.enumerated() { #expect(values[i] == Array(all[r][columns]), "row \(r)") }
        }
        // The bytes too, not only the values: the codes of the slice are the whole's codes there.
        let codes = w.storage.codes, sliceCodes = first.storage.codes
        let unit = kind == .fp8 ? 1 : 2, rowBytes = (form == .bf16 ? 2 * 320 : 320 / unit), sliceRowBytes = (form == .bf16 ? 2 * 192 : 192 / unit)
        let offset = form == .bf16 ? 2 * 128 : 128 / unit
        for i in 0..<128 {
            #expect(memcmp(sliceCodes.baseAddress! + i * sliceRowBytes, codes.baseAddress! + (128 + i) * rowBytes + offset, sliceRowBytes) == 0)
        }
    }

    /// Where the format would not survive, the slice is made in memory as f32 (exact), as for
    /// stored weights: FP8 rows across a 128-row tile boundary, MXFP4 columns off a block.
    @Test func slicesThatBreakTheFormatBecomeExactF32() throws {
        for (kind, rows, columns) in [(RandomMatrix.Kind.fp8, Array(96..<192), 0..<256), (.mxfp4, Array(0..<8), 16..<80)] {
            let w = LinearWeight(deferred: Self.matrix(kind, rows: 256, cols: 256), name: "w")
            let slice = try w.selecting(rows: rows, columns: columns)
            #expect(slice.deferred == nil && slice.format == .plain(.f32))
            let all = Self.rowValues(w), values = Self.rowValues(slice)
            for (i, r) in rows.enumerated() { #expect(values[i] == Array(all[r][columns])) }
        }
    }

    /// The BF16 form holds exactly what the codes and scales decode to.
    @Test(arguments: [RandomMatrix.Kind.fp8, .mxfp4])
    func bf16FormIsTheDequantizedCodes(_ kind: RandomMatrix.Kind) {
        let q = LinearWeight(deferred: Self.matrix(kind, rows: 200, cols: 192), name: "q")
        let b = LinearWeight(deferred: Self.matrix(kind, rows: 200, cols: 192, form: .bf16), name: "b")
        #expect(b.format == .plain(.bf16))
        #expect(Self.rowValues(q) == Self.rowValues(b))
    }

    /// No NaN anywhere: the code tables hold no NaN code, E8M0 scales stay within the exponent
    /// and its jitter, FP8 tile multipliers are finite powers of two.
    @Test func noNaNCodesOrScales() {
        #expect(!RandomFill.e4m3Codes.contains { $0 & 0x7F == 0x7F })
        #expect(DeferredRandomMatrix.deviceTables.count == 2 * 65536 + 4 * (256 + 16))
        let mx = Self.matrix(.mxfp4, rows: 256, cols: 1024), fp8 = Self.matrix(.fp8, rows: 300, cols: 1000)
        let mxBytes = mx.hostBytes(), fp8Bytes = fp8.hostBytes()
        let scales = mxBytes.scales!.pointer.assumingMemoryBound(to: UInt8.self)
        let blocks = (0..<(256 * 1024 / 32)).map { Int(scales[$0]) - 127 }
        #expect(Set(blocks) == [mx.exponent - 1, mx.exponent, mx.exponent + 1])
        let tiles = fp8Bytes.scales!.pointer.assumingMemoryBound(to: Float.self)
        for i in 0..<(fp8.tileRows * fp8.tileColumns) {
            #expect(tiles[i].isFinite && tiles[i].significand == 1 && abs(Int(tiles[i].exponent) - fp8.exponent) <= 1)
        }
        let values = Self.rowValues(LinearWeight(deferred: fp8, name: "w")).joined()
        #expect(values.allSatisfy { $0.isFinite })
    }

    /// Same distributions as RandomMatrix (the host model's): codes drawn from the same table
    /// (decoded, the same root mean square, mean and share of zeros), scales 2^(exponent +
    /// jitter) with jitter -1, 0, +1 a quarter, a half and a quarter of the time. (Whole values
    /// are not compared sample to sample: a few dozen FP8 tile scales move a matrix's RMS by
    /// several percent.)
    @Test(arguments: [RandomMatrix.Kind.fp8, .mxfp4])
    func distributionsMatchRandomMatrix(_ kind: RandomMatrix.Kind) {
        let rows = 512, cols = 2048, std = 1 / Float(cols).squareRoot()
        let host = RandomMatrix(kind, seed: 3, rows: rows, cols: cols, std: std)
        let m = DeferredRandomMatrix(host, form: .quantized)
        var hostCodes = [UInt8](repeating: 0, count: rows * host.codeRowBytes), codes = hostCodes
        hostCodes.withUnsafeMutableBufferPointer { c in
            for chunk in 0..<host.chunks { host.codes(chunk: chunk, into: c.baseAddress! + host.rowRange(chunk).lowerBound * host.codeRowBytes) }
        }
        codes.withUnsafeMutableBufferPointer { m.codes(into: $0.baseAddress!) }
        func decoded(_ bytes: [UInt8]) -> [Float] {
            kind == .fp8 ? bytes.map { E4M3.decode($0) } : bytes.flatMap { [E2M1.decode($0 & 0xF), E2M1.decode($0 >> 4)] }
        }
        func stats(_ v: [Float]) -> (mean: Double, rms: Double, zeros: Double) {
            let n = Double(v.count)
            return (v.reduce(0.0) { $0 + Double($1) } / n, (v.reduce(0.0) { $0 + Double($1 * $1) } / n).squareRoot(),
                    Double(v.filter { $0 == 0 }.count) / n)
        }
        let a = stats(decoded(hostCodes)), b = stats(decoded(codes))
        let tableRMS = Double(kind == .fp8 ? RandomFill.e4m3RMS : RandomFill.e2m1RMS)
        #expect(abs(b.mean) < 0.01 * b.rms, "mean \(b.mean), rms \(b.rms)")
        #expect(abs(b.rms / a.rms - 1) < 0.01 && abs(b.rms / tableRMS - 1) < 0.01, "code rms: deferred \(b.rms), RandomMatrix \(a.rms), table \(tableRMS)")
        #expect(abs(b.zeros - a.zeros) < 0.005, "share of zero codes: deferred \(b.zeros), RandomMatrix \(a.zeros)")
        // Scale exponents: 16384 FP8 tiles of a [16384, 16384] matrix, 32768 MXFP4 blocks.
        var exponents: [Int]
        if kind == .fp8 {
            let big = DeferredRandomMatrix(RandomMatrix(.fp8, seed: 3, rows: 16384, cols: 16384, std: std), form: .quantized)
            var tiles = [Float](repeating: 0, count: big.tileRows * big.tileColumns)
            tiles.withUnsafeMutableBufferPointer { big.tileScales(into: $0.baseAddress!) }
            exponents = tiles.map { Int($0.exponent) - big.exponent }
        } else {
            var scales = [UInt8](repeating: 0, count: rows * cols / 32)
            scales.withUnsafeMutableBufferPointer { m.blockScales(into: $0.baseAddress!) }
            exponents = scales.map { Int($0) - 127 - m.exponent }
        }
        let n = Double(exponents.count)
        for (j, share) in [(-1, 0.25), (0, 0.5), (1, 0.25)] {
            let got = Double(exponents.filter { $0 == j }.count) / n
            #expect(abs(got - share) < 0.02, "jitter \(j): \(got) of the scales")
        }
        #expect(m.exponent == host.exponent)
    }

    // MARK: Models

    static let tiny = ["tiny-gpt-oss", "tiny-qwen3-moe", "tiny-mimo-v2-flash"]

    static func linearWeights(_ plan: Plan) -> [LinearWeight] {
        plan.ops.flatMap { op -> [LinearWeight] in
            switch op {
            case .linear(_, _, let w, _): return [w]
            case .fusedQKV(let chunks, _, _, _): return chunks
            case .moe(_, _, let m): return [m.router] + m.experts.flatMap { e in [e.gateUp, e.gate, e.up, e.down].compactMap { $0 } }
            default: return []
            }
        } + [plan.lmHead]
    }

    /// Only the small tensors are in memory; every matrix RandomModel makes is deferred, in the
    /// format and shape the host model has.
    @Test(arguments: tiny)
    func deferredModelHasTheHostModelsWeightsShapesAndFormats(_ preset: String) throws {
        let random = try RandomModel(preset: preset, seed: 1)
        let deferred = try random.buildDeferred(), host = try random.build()
        let a = Self.linearWeights(deferred.plan), b = Self.linearWeights(host.plan)
        #expect(a.count == b.count)
        for (x, y) in zip(a, b) {
            #expect(x.outFeatures == y.outFeatures && x.inFeatures == y.inFeatures && x.format == y.format, "\(x.name) vs \(y.name)")
            let small = x.name.contains("router") || x.name.contains("mlp.gate.weight") || x.name == deferred.spec.names.lmHead
            #expect((x.deferred == nil) == small, "\(x.name): deferred only for the matrices")
        }
        let inMemory = deferred.tensors.tensorNames.reduce(0) { $0 + (deferred.tensors.tensorIfPresent($1)?.byteCount ?? 0) }
        #expect(inMemory == (try random.byteCount(deferringMatrices: true)))
        #expect(inMemory < (try random.byteCount(deferringMatrices: false)))
    }

    /// The CPU executor runs a deferred model (making each matrix when it first reads it):
    /// finite logits of a sensible spread, another function than the host model of the same seed.
    @Test(arguments: tiny)
    func cpuExecutorRunsATinyDeferredModel(_ preset: String) throws {
        let random = try RandomModel(preset: preset, seed: 1)
        let model = try random.buildDeferred()
        let tokens = RandomModelTests.prompt(model.spec.vocabSize, count: 12)
        let logits = try RandomModelTests.logits(model, tokens), vocab = model.spec.vocabSize
        #expect(logits.allSatisfy { $0.isFinite })
        for t in 0..<tokens.count {
            let row = logits[(t * vocab)..<((t + 1) * vocab)]
            let mean = row.reduce(0, +) / Float(vocab)
            let std = (row.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Float(vocab)).squareRoot()
            #expect(std > 0.3 && std < 10, "position \(t): logit std \(std)")
        }
        #expect(RandomModelTests.relativeError(logits, try RandomModelTests.logits(random.build(), tokens)) > 0.1)
        // Deterministic: built again, the same logits.
        #expect(try RandomModelTests.logits(random.buildDeferred(), tokens) == logits)
    }

    /// Split over 2 shards (and 4 where the heads allow) the deferred model computes the
    /// whole one's function: its slices are the whole matrices' values. Plan.shard keeps the
    /// experts deferred: gate/up rows always (gpt-oss's interleaved pairs are contiguous rows),
    /// down's columns where they fall on MXFP4 blocks (not tiny-gpt-oss's 96 / 2).
    @Test(arguments: [("tiny-mimo-v2-flash", 2), ("tiny-qwen3-moe", 2), ("tiny-gpt-oss", 2), ("tiny-qwen3-moe", 4)])
    func shardsOfADeferredModelAddUpToTheWholeModel(_ preset: String, _ count: Int) throws {
        let model = try RandomModel(preset: preset, seed: 4).buildDeferred()
        let prompt = RandomModelTests.prompt(model.spec.vocabSize, count: 12)
        let whole = try CPUExecutor(plan: model.plan, maxStepTokens: 8).forward(prompt, logits: .all)
        let split = try CPUTensorParallel(plan: model.plan, count: count, maxStepTokens: 8).forward(prompt, logits: .all)
        #expect(RandomModelTests.relativeError(split, whole) <= 1e-5)
        for rank in 0..<count {
            let shard = try model.plan.shard(rank: rank, of: count)
            for case .moe(_, _, let m) in shard.ops {
                let blocks = m.spec.intermediate % 32 == 0
                for e in m.experts {
                    for w in [e.gateUp, e.gate, e.up].compactMap({ $0 }) { #expect(w.deferred != nil, "\(w.name)") }
                    #expect((e.down.deferred != nil) == blocks, "\(e.down.name)")
                }
            }
        }
    }

    /// At MiMo-V2-Flash's real shapes every split Plan.shard makes over 2 GPUs keeps the
    /// matrices deferred (no bytes on the host): q/k/v/o head ranges, the dense MLP, experts.
    @Test func mimoV2FlashShardsStayDeferredOverTwoGPUs() throws {
        let seed = RandomFill.seed(0, "w")
        func w(_ kind: RandomMatrix.Kind, _ rows: Int, _ cols: Int) -> LinearWeight {
            LinearWeight(deferred: DeferredRandomMatrix(RandomMatrix(kind, seed: seed, rows: rows, cols: cols, std: 0.01), form: .quantized), name: "w")
        }
        for rank in 0..<2 {
            let h = 4096, q = 64 * 192, kFull = 4 * 192, kSWA = 8 * 192, v = 8 * 128, dense = 16384, expert = 2048
            let cuts: [LinearWeight] = [
                try w(.fp8, q, h).selecting(rows: Array((rank * q / 2)..<((rank + 1) * q / 2))),
                try w(.fp8, kFull, h).selecting(rows: Array((rank * kFull / 2)..<((rank + 1) * kFull / 2))),
                try w(.fp8, kSWA, h).selecting(rows: Array((rank * kSWA / 2)..<((rank + 1) * kSWA / 2))),
                try w(.fp8, v, h).selecting(rows: Array((rank * v / 2)..<((rank + 1) * v / 2))),
                try w(.fp8, h, 64 * 128).selecting(columns: (rank * 32 * 128)..<((rank + 1) * 32 * 128)),
                try w(.fp8, dense, h).selecting(rows: Array((rank * dense / 2)..<((rank + 1) * dense / 2))),
                try w(.fp8, h, dense).selecting(columns: (rank * dense / 2)..<((rank + 1) * dense / 2)),
                try w(.mxfp4, expert, h).selecting(rows: Array((rank * expert / 2)..<((rank + 1) * expert / 2))),
                try w(.mxfp4, h, expert).selecting(columns: (rank * expert / 2)..<((rank + 1) * expert / 2)),
            ]
            for c in cuts { #expect(c.deferred != nil, "\(c.name)") }
        }
    }
}
