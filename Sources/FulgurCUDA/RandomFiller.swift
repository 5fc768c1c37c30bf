import Foundation
import Fulgur

/// Makes deferred random matrices (DeferredRandomMatrix, RandomModel.buildDeferred) in device
/// memory with the kernels of Kernels/random.cu, in the layouts the products read: CUDALinear's
/// row-major codes and scales or BF16 values, CUDAMoE's tiled steps. The bytes equal what
/// DeferredRandomMatrix makes on the CPU (fulgur-gpu-check random compares them). One per
/// KernelModule (`KernelModule.randomFiller()`): RandomFill's tables uploaded once (130 KB)
/// and a stream of its own; fills are asynchronous until `finish()`.
///
/// The launches are planned by pure functions (`launches`, `tiledLaunch`), so what the kernels
/// are asked to do can be read without a GPU.
final class RandomFiller: @unchecked Sendable {
    /// One kernel launch: its entry, how many elements (threads' work items) it covers, and
    /// its arguments, the tables' address among them.
    struct Launch {
        let kernel: String
        let elements: Int
        let arguments: [KernelModule.Argument]
    }
    static let kernelNames = ["random_codes", "random_block_scales", "random_tile_scales", "random_bf16", "random_moe_tiled"]

    let module: KernelModule
    let tables: DeviceBuffer
    let stream: CUDAStream
    let functions: [String: KernelModule.Function]

    init(module: KernelModule) throws {
        self.module = module
        tables = try DeferredRandomMatrix.deviceTables.withUnsafeBytes { try module.device.upload($0) }
        stream = try module.device.makeStream()
        functions = try Dictionary(uniqueKeysWithValues: Self.kernelNames.map { ($0, try module.function($0)) })
    }

    /// Waits until every fill enqueued so far is in device memory.
    func finish() throws { try stream.synchronize() }

    func run(_ launches: [Launch]) throws {
        for l in launches where l.elements > 0 {
            let blocks = min((l.elements + 255) / 256, 16 * module.device.multiprocessors)
            try module.launch(functions[l.kernel]!, grid: (blocks, 1, 1), block: (256, 1, 1), stream: stream, l.arguments)
        }
    }

    /// `m` as a LinearWeight stores it: codes at `codes`, scales at `scales`, or BF16 values at `codes`.
    func fill(_ m: DeferredRandomMatrix, codes: UInt64, scales: UInt64?) throws {
        try run(Self.launches(m, codes: codes, scales: scales, tables: tables.address))
    }

    /// See `tiledLaunch`.
    func fillTiled(_ m: DeferredRandomMatrix, firstRow: Int, rowStep: Int, at address: UInt64, tiles: Int, tileRows: Range<Int>) throws {
        try run([Self.tiledLaunch(m, firstRow: firstRow, rowStep: rowStep, at: address, tiles: tiles, tileRows: tileRows, tables: tables.address)])
    }

    // MARK: Plans

    /// The kernels index with 32-bit ints and build scales from exponent bits.
    static func check(_ m: DeferredRandomMatrix) throws {
        guard m.rows * m.columns < Int(Int32.max), m.wholeRow(max(m.rows - 1, 0)) < Int(Int32.max), (-120...120).contains(m.exponent) else {
            throw FulgurError(.unsupported, "\(m): too large for one fill launch (2^31 elements) or a scale exponent outside -120...120")
        }
    }

    private static func int(_ v: Int) -> KernelModule.Argument { .int32(Int32(v)) }
    private static func u64(_ v: Int) -> KernelModule.Argument { .uint64(UInt64(v)) }

    /// The launches that write `m` as a LinearWeight stores it (`storage`): codes at `codes`
    /// and scales at `scales` (MXFP4 E8M0 `[rows, columns/32]`, FP8 f32 `[tileRows,
    /// tileColumns]`), or its BF16 values at `codes`.
    static func launches(_ m: DeferredRandomMatrix, codes address: UInt64, scales: UInt64?, tables: UInt64) throws -> [Launch] {
        try check(m)
        let rowBase = m.batch * m.wholeRows, fp8 = m.kind == .fp8
        switch m.form {
        case .bf16:
            return [Launch(kernel: "random_bf16", elements: m.rows * m.columns, arguments: [
                .pointer(address), .pointer(tables), int(fp8 ? 0 : 1), .uint64(m.codeKey), .uint64(fp8 ? m.tileKey : m.blockKey),
                u64(rowBase), u64(m.batch * m.wholeTileRows), u64(m.wholeColumns), int(m.rowStart), int(m.rowStride), int(m.rows),
                int(m.columnStart), int(m.columns), int(m.exponent)])]
        case .quantized:
            guard let scales else { throw FulgurError(.unsupported, "\(m): quantized, but no room for its scales") }
            let rowBytes = fp8 ? m.columns : m.columns / 2
            let codes = Launch(kernel: "random_codes", elements: m.rows * rowBytes, arguments: [
                .pointer(address), .pointer(tables), int(fp8 ? 0 : 1), .uint64(m.codeKey), u64(rowBase), u64(m.wholeRowBytes),
                int(m.rowStart), int(m.rowStride), int(m.rows), int(fp8 ? m.columnStart : m.columnStart / 2), int(rowBytes)])
            if fp8 {
                return [codes, Launch(kernel: "random_tile_scales", elements: m.tileRows * m.tileColumns, arguments: [
                    .pointer(scales), .uint64(m.tileKey), u64(m.batch * m.wholeTileRows), u64(m.wholeTileColumns), int(m.rowStart),
                    int(m.rowStride), int(m.tileRows), int(m.columnStart), int(m.tileColumns), int(m.exponent)])]
            }
            return [codes, Launch(kernel: "random_block_scales", elements: m.rows * m.columns / 32, arguments: [
                .pointer(scales), .uint64(m.blockKey), u64(rowBase), u64(m.wholeBlocks), int(m.rowStart), int(m.rowStride),
                int(m.rows), int(m.columnStart / 32), int(m.columns / 32), int(m.exponent)])]
        }
    }

    /// The launch that writes tile rows `tileRows` of `tiles` tiles of one expert's matrix in
    /// CUDAMoE's tiled layout at `address` (the expert's first tile), from the MXFP4 matrix
    /// `m`: tile t's row tileRows.lowerBound + i is part row j = tileRows.count * t + i, which
    /// is row `firstRow + rowStep * j` of `m` (gate and up halves of a fused weight,
    /// interleaved or not).
    static func tiledLaunch(_ m: DeferredRandomMatrix, firstRow: Int, rowStep: Int, at address: UInt64, tiles: Int, tileRows: Range<Int>,
                            tables: UInt64) throws -> Launch {
        guard m.kind == .mxfp4, m.form == .quantized, m.columnStart % 32 == 0, m.columns % 32 == 0 else {
            throw FulgurError(.unsupported, "\(m): the tiled MoE layout takes MXFP4 codes on whole 32-element blocks")
        }
        try check(m)
        let steps = (m.columns / 32 + 1) / 2
        return Launch(kernel: "random_moe_tiled", elements: tiles * steps * tileRows.count * 8, arguments: [
            .pointer(address), .pointer(tables), .uint64(m.codeKey), .uint64(m.blockKey), u64(m.batch * m.wholeRows),
            u64(m.wholeColumns), int(m.wholeRow(firstRow)), int(m.rowStride * rowStep), int(tiles), int(m.columns), int(m.columnStart),
            int(tileRows.lowerBound), int(tileRows.count), int(m.exponent)])
    }
}
