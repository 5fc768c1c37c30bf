import Foundation
import Testing
@testable import Fulgur

/// The narrow-float codecs and block quantizers against ml_dtypes, bit for bit, through the
/// fixtures of recipes/fixtures/make_codec_fixtures.py.
@Suite struct CodecTests {
    enum Format: String, CaseIterable, CustomTestStringConvertible {
        case e2m1, e8m0, e4m3, bf16

        var codeCount: Int { self == .e2m1 ? 16 : self == .bf16 ? 65536 : 256 }

        func decode(_ code: Int) -> Float {
            switch self {
            case .e2m1: E2M1.decode(UInt8(code))
            case .e8m0: E8M0.decode(UInt8(code))
            case .e4m3: E4M3.decode(UInt8(code))
            case .bf16: bf16ToFloat(UInt16(code))
            }
        }

        func encode(_ x: Float) -> Int {
            switch self {
            case .e2m1: Int(E2M1.encode(x))
            case .e8m0: Int(E8M0.encode(x))
            case .e4m3: Int(E4M3.encode(x))
            case .bf16: Int(floatToBF16(x))
            }
        }

        var testDescription: String { rawValue }
    }

    /// A fixture array; fixtures are little-endian, as are the machines Fulgur runs on.
    static func load<T>(_ name: String, as: T.Type) throws -> [T] {
        let data = try Data(contentsOf: URL(fileURLWithPath: Fixtures.path("codecs/" + name)))
        return [T](unsafeUninitializedCapacity: data.count / MemoryLayout<T>.stride) { buffer, count in
            count = data.copyBytes(to: buffer) / MemoryLayout<T>.stride
        }
    }

    static func sameFloat(_ a: Float, _ b: Float) -> Bool {
        a.bitPattern == b.bitPattern || (a.isNaN && b.isNaN)
    }

    static func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }

    @Test(arguments: [Format.e2m1, .e8m0, .e4m3])
    func decodeMatchesMLDtypesForEveryCode(_ format: Format) throws {
        let want = try Self.load("decode_\(format).bin", as: UInt32.self)
        #expect(want.count == format.codeCount)
        for (code, bits) in want.enumerated() {
            let got = format.decode(code)
            #expect(Self.sameFloat(got, Float(bitPattern: bits)), "\(format) code \(code): \(got), ml_dtypes \(Float(bitPattern: bits))")
        }
    }

    @Test(arguments: Format.allCases)
    func encodeMatchesMLDtypes(_ format: Format) throws {
        let inputs = try Self.load("encode_inputs.bin", as: UInt32.self)
        let want: [Int] = format == .bf16
            ? try Self.load("encode_bf16.bin", as: UInt16.self).map(Int.init)
            : try Self.load("encode_\(format).bin", as: UInt8.self).map(Int.init)
        try #require(inputs.count >= 100_000 && want.count == inputs.count)
        var mismatches: [String] = []
        var count = 0
        for (bits, code) in zip(inputs, want) {
            let got = format.encode(Float(bitPattern: bits))
            if got != code {
                count += 1
                if mismatches.count < 10 { mismatches.append("\(Self.hex(bits)) (\(Float(bitPattern: bits))): \(Self.hex(got)), ml_dtypes \(Self.hex(code))") }
            }
        }
        #expect(count == 0, "\(format): \(count) of \(inputs.count) inputs encode differently, e.g. \(mismatches.joined(separator: "; "))")
    }

    @Test(arguments: Format.allCases)
    func everyValueEncodesToItsOwnCode(_ format: Format) {
        for code in 0..<format.codeCount where !format.decode(code).isNaN {
            #expect(format.encode(format.decode(code)) == code, "\(format) code \(code)")
        }
    }

    @Test func dequantizeFP8AndE8M0RowsDecodeEveryCode() throws {
        let codes = (0...255).map(UInt8.init)
        for (dtype, table) in [(DType.fp8e4m3, "decode_e4m3.bin"), (.e8m0, "decode_e8m0.bin")] {
            let want = try Self.load(table, as: UInt32.self)
            var got = [Float](repeating: 0, count: 256)
            codes.withUnsafeBytes { Dequant.row(dtype, $0.baseAddress!, 256, &got) }
            for code in 0..<256 {
                #expect(Self.sameFloat(got[code], Float(bitPattern: want[code])), "\(dtype) code \(code)")
            }
        }
    }

    @Test func mxfp4QuantizerMatchesReference() throws {
        let x = try Self.load("mxfp4_input.bin", as: Float.self)
        let want = try Self.load("mxfp4_blocks.bin", as: UInt8.self)
        let columns = 256, rows = x.count / columns
        var got = [UInt8](repeating: 0xAA, count: want.count)
        got.withUnsafeMutableBytes { out in
            for r in 0..<rows {
                x.withUnsafeBufferPointer { Quantize.mxfp4Row($0.baseAddress! + r * columns, columns, into: out.baseAddress! + r * DType.mxfp4.byteCount(elements: columns)) }
            }
        }
        for b in 0..<(want.count / 17) where got[17 * b..<17 * b + 17] != want[17 * b..<17 * b + 17] {
            Issue.record("block \(b): \(got[17 * b..<17 * b + 17].map(Self.hex)), reference \(want[17 * b..<17 * b + 17].map(Self.hex))")
        }
    }

    @Test func mxfp4RowsDequantizeLikeMLDtypes() throws {
        let blocks = try Self.load("mxfp4_blocks.bin", as: UInt8.self)
        let want = try Self.load("mxfp4_dequant.bin", as: UInt32.self)
        var got = [Float](repeating: 0, count: want.count)
        blocks.withUnsafeBytes { Dequant.row(.mxfp4, $0.baseAddress!, want.count, &got) }
        for i in want.indices where !Self.sameFloat(got[i], Float(bitPattern: want[i])) {
            Issue.record("element \(i): \(got[i]), ml_dtypes \(Float(bitPattern: want[i]))")
        }
    }

    @Test func fp8BlockQuantizerMatchesReference() throws {
        let x = try Self.load("fp8_input.bin", as: Float.self)
        let wantCodes = try Self.load("fp8_codes.bin", as: UInt8.self)
        let wantScales = try Self.load("fp8_scales.bin", as: Float.self)
        let rows = 300, columns = 260
        try #require(x.count == rows * columns && wantScales.count == 9)
        var codes = [UInt8](repeating: 0xAA, count: x.count)
        var scales = [Float](repeating: -1, count: 9)
        Quantize.fp8Blocks(x, rows: rows, columns: columns, codes: &codes, scales: &scales)
        #expect(scales.map(\.bitPattern) == wantScales.map(\.bitPattern))
        let differing = codes.indices.filter { codes[$0] != wantCodes[$0] }
        #expect(differing.count == 0, "\(differing.count) codes differ, first at \(differing.first.map { "row \($0 / columns), column \($0 % columns)" } ?? "")")
    }
}
