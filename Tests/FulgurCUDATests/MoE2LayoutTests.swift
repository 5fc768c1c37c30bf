import Foundation
import Testing
@testable import FulgurCUDA

/// moe2_experts' data path on the CPU, with no GPU: weights repacked by CUDAMoE.tiled, decoded
/// as e2m1_pairs does, x staged as moe2::stage does (scaled f16 hi + lo in the permuted order),
/// multiplied by an emulation of mma.sync m16n8k16 built from the PTX fragment layout (not from
/// the kernel's reading of it), scaled and read out as the epilogues do. The product must
/// match the plain dot product: a wrong lane, word, nibble or column order fails it.
@Suite struct MoE2LayoutTests {
    /// Kernels/moe.cu moe2::e2m1_pairs, bit for bit.
    static func pairs(_ w: UInt32) -> [UInt32] {
        [w & 0x8E00_8E00, (w << 3) & 0x8E00_8E00, ((w << 6) & 0x0E00_0E00) | ((w << 2) & 0x8000_8000),
         ((w << 9) & 0x0E00_0E00) | ((w << 1) & 0x8000_8000)]
    }

    /// moe2::scale_byte<B>.
    static func scale(_ w: UInt32, byte b: Int) -> Float {
        let shift = 23 - 8 * b
        let bits = (shift >= 0 ? w << UInt32(shift) : w >> UInt32(-shift)) & 0x7F80_0000
        return Float(bitPattern: max(bits, 0x0040_0000))
    }

    static func halves(_ v: UInt32) -> (Double, Double) {
        (Double(Float16(bitPattern: UInt16(v & 0xFFFF))), Double(Float16(bitPattern: UInt16(v >> 16))))
    }

    static func f16x2(_ lo: Float, _ hi: Float) -> UInt32 {
        UInt32(Float16(lo).bitPattern) | UInt32(Float16(hi).bitPattern) << 16
    }

    /// D = A B + C for mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, from the PTX ISA's
    /// fragment layout: lane = 4 * groupID + threadID_in_group; A regs {a0,a1}..{a6,a7} hold
    /// (row g, cols 2t, 2t+1), (row g+8, same), (row g, cols 2t+8, 2t+9), (row g+8, same); B regs
    /// hold (rows 2t, 2t+1, col g) and (rows 2t+8, 2t+9, col g); C/D hold (row g, cols 2t, 2t+1)
    /// then (row g+8, same).
    static func mma(_ a: [[UInt32]], _ b: [[UInt32]], _ c: [[Float]]) -> [[Float]] {
        var A = [[Double]](repeating: [Double](repeating: 0, count: 16), count: 16)
        var B = [[Double]](repeating: [Double](repeating: 0, count: 8), count: 16)
        for lane in 0..<32 {
            let g = lane >> 2, t = lane & 3
            for (reg, (row, col)) in [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].enumerated() {
                (A[row][col], A[row][col + 1]) = halves(a[lane][reg])
            }
            for (reg, k) in [2 * t, 2 * t + 8].enumerated() {
                (B[k][g], B[k + 1][g]) = halves(b[lane][reg])
            }
        }
        var d = c
        for lane in 0..<32 {
            let g = lane >> 2, t = lane & 3
            for (i, (row, col)) in [(g, 2 * t), (g, 2 * t + 1), (g + 8, 2 * t), (g + 8, 2 * t + 1)].enumerated() {
                var s = Double(c[lane][i])
                for k in 0..<16 { s += A[row][k] * B[k][col] }
                d[lane][i] = Float(s)
            }
        }
        return d
    }

    static let e2m1: [Double] = [0, 0.5, 1, 1.5, 2, 3, 4, 6]

    @Test(arguments: [(32, 96), (16, 256)])
    func repackedTilesTimesStagedTokensGiveTheProduct(rows: Int, columns: Int) throws {
        var rng = SystemRandomNumberGenerator()
        let blocks = columns / 32, steps = (blocks + 1) / 2
        let codes = (0..<(rows * columns / 2)).map { _ in UInt8.random(in: 0...255, using: &rng) }
        var scales = (0..<(rows * blocks)).map { _ in UInt8.random(in: 118...130, using: &rng) }
        scales[1] = 0  // 2^-127
        // Three tokens of very different sizes (per-token scaling); the fourth column is unused.
        let n = 3, magnitude: [Float] = [1, 3000, 1e-3]
        let x = (0..<n).map { j in (0..<columns).map { _ in Float.random(in: -1...1, using: &rng) * magnitude[j] } }

        let packed = codes.withUnsafeBytes { c in
            scales.withUnsafeBytes { s in
                CUDAMoE.tiled(experts: 1, tiles: rows / 16, columns: columns) { _, tile, r in
                    (c.baseAddress! + (16 * tile + r) * columns / 2, s.baseAddress! + (16 * tile + r) * blocks)
                }
            }
        }
        #expect(packed.count == rows / 16 * steps * 544)

        // moe2::stage: per token, per 32-column block, 64 bytes of hi then 64 of lo, chunk t
        // holding columns 8t + (0, 4, 1, 5, 2, 6, 3, 7); columns past the row are zero.
        var exps = [Int](), staged = [[UInt32]]()  // staged[token]: words, 32 per block
        for j in 0..<n {
            let peak = x[j].map { abs($0) }.max()!
            let e = min(max(Int(peak.bitPattern >> 23), 15), 255)
            exps.append(e)
            let sc = Float(bitPattern: UInt32(268 - e) << 23)
            var words = [UInt32](repeating: 0, count: steps * 2 * 32)
            for c in 0..<(steps * 8) {
                let q = (0..<8).map { 8 * c + $0 < columns ? x[j][8 * c + $0] * sc : 0 }
                for e in 0..<4 {
                    let hi = Self.f16x2(q[e], q[e + 4])
                    let (h0, h1) = Self.halves(hi)
                    let lo = Self.f16x2(q[e] - Float(h0), q[e + 4] - Float(h1))
                    words[(c >> 2) * 32 + (c & 3) * 4 + e] = hi
                    words[(c >> 2) * 32 + 16 + (c & 3) * 4 + e] = lo
                }
            }
            staged.append(words)
        }
        let garbage = [UInt32](repeating: 0x7E00_7E00, count: steps * 2 * 32)  // f16 NaN: a column no token owns

        func word(_ at: Int) -> UInt32 { packed.withUnsafeBytes { $0.load(fromByteOffset: at, as: UInt32.self) } }
        for tile in 0..<(rows / 16) {
            var acc = [[Float]](repeating: [0, 0, 0, 0], count: 32)
            for s in 0..<steps {
                let step = (tile * steps + s) * 544
                for h in 0..<2 {
                    var a0 = [[UInt32]](), a1 = [[UInt32]](), b0 = [[UInt32]](), b1 = [[UInt32]](), sg = [Float](), sg8 = [Float]()
                    for lane in 0..<32 {
                        let g = lane >> 2, t = lane & 3
                        let hg = Self.pairs(word(step + 16 * lane + 8 * h)), hg8 = Self.pairs(word(step + 16 * lane + 8 * h + 4))
                        a0.append([hg[0], hg8[0], hg[1], hg8[1]])
                        a1.append([hg[2], hg8[2], hg[3], hg8[3]])
                        let sw = word(step + 512 + 4 * g)
                        sg.append(Self.scale(sw, byte: 2 * h))
                        sg8.append(Self.scale(sw, byte: 2 * h + 1))
                        let j = g >> 1, src = j < n ? staged[j] : garbage
                        let at = (2 * s + h) * 32 + (g & 1) * 16 + t * 4
                        b0.append([src[at], src[at + 1]])
                        b1.append([src[at + 2], src[at + 3]])
                    }
                    let d = Self.mma(a1, b1, Self.mma(a0, b0, [[Float]](repeating: [0, 0, 0, 0], count: 32)))
                    for lane in 0..<32 {
                        acc[lane][0] += d[lane][0] * sg[lane]
                        acc[lane][1] += d[lane][1] * sg[lane]
                        acc[lane][2] += d[lane][2] * sg8[lane]
                        acc[lane][3] += d[lane][3] * sg8[lane]
                    }
                }
            }
            // The epilogues: lane (g, t) holds token t's hi and lo sums of rows g and g + 8.
            for lane in 0..<32 {
                let g = lane >> 2, t = lane & 3
                guard t < n else { continue }
                let unscale = Float(bitPattern: UInt32(exps[t]) << 23)
                for (row, got) in [(16 * tile + g, (acc[lane][0] + acc[lane][1]) * unscale), (16 * tile + g + 8, (acc[lane][2] + acc[lane][3]) * unscale)] {
                    var want = 0.0, size = 0.0
                    for c in 0..<columns {
                        let code = Int(codes[row * columns / 2 + c / 2] >> (4 * UInt8(c % 2))) & 0xF
                        let e = scales[row * blocks + c / 32]
                        let w = (code & 8 != 0 ? -1 : 1) * Self.e2m1[code & 7] * (e == 0 ? 0x1p-127 : pow(2, Double(Int(e) - 127)))
                        want += w * Double(x[t][c])
                        size += abs(w * Double(x[t][c]))
                    }
                    #expect(abs(Double(got) - want) <= 1e-6 * size, "tile \(tile) row \(row) token \(t): \(got), want \(want)")
                }
            }
        }
    }

    /// placed() moves each bit once: the table and the function agree, and distinct words stay distinct.
    @Test func placedIsABitPermutation() {
        var seen = Set<UInt32>()
        for b in 0..<32 { seen.insert(CUDAMoE.placed(1 << UInt32(b))) }
        #expect(seen.count == 32 && seen.allSatisfy { $0.nonzeroBitCount == 1 })
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<1000 {
            let w = UInt32.random(in: 0...UInt32.max, using: &rng)
            let t = CUDAMoE.placedTable
            let viaTable = t[Int(w & 0xFF)] | t[256 + Int((w >> 8) & 0xFF)] | t[512 + Int((w >> 16) & 0xFF)] | t[768 + Int(w >> 24)]
            #expect(viaTable == CUDAMoE.placed(w))
        }
    }

    /// moe6_route's grid covers every expert at the fatbin's experts per block (narrow up to
    /// H = 4096, wide above; one a block under 128 experts), and only the blocks it needs.
    @Test func routerGridCoversEveryExpertOnce() {
        for (experts, hidden, perBlock, blocks) in [(256, 4096, (2, 1), 128), (32, 2880, (2, 1), 32), (128, 2048, (2, 1), 64),
                                                    (257, 4096, (2, 1), 129), (384, 7168, (2, 1), 384), (384, 7168, (4, 2), 192),
                                                    (6, 64, (2, 1), 6), (256, 4096, (1, 1), 256)] {
            #expect(CUDAMoE.route6Blocks(experts: experts, hidden: hidden, perBlock: perBlock) == blocks)
        }
    }
}
