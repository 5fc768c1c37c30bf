import Foundation

/// Bytes a sliced weight owns (the slice is a copy; the source may be a mapped file).
final class OwnedBytes {
    let pointer: UnsafeMutableRawPointer
    init(_ count: Int) {
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(count, 1), alignment: 64)
        pointer.initializeMemory(as: UInt8.self, repeating: 0, count: max(count, 1))
    }
    deinit { pointer.deallocate() }
}

extension LinearWeight {
    /// The sub-matrix of output features `rows` (in the given order) and input features
    /// `columns`, as a weight of its own (copied). The stored format is kept where the slice
    /// falls on its blocks: MXFP4 when the columns start and end on 32-element blocks; FP8
    /// when every 128-row (or column) tile of the slice comes from one tile of the source, so
    /// one multiplier still serves it; plain types always (GGML blocks when the columns fall on
    /// blocks). Anything else (and the [in, out] layout) becomes f32, which is exact. A deferred
    /// random matrix's slice is deferred too where its rows are evenly spaced and the format
    /// survives (DeferredRandomMatrix.selecting). Tensor parallelism cuts weights this way
    /// (Plan.shard).
    public func selecting(rows: [Int], columns: Range<Int>) throws -> LinearWeight {
        precondition(rows.allSatisfy { (0..<outFeatures).contains($0) } && columns.lowerBound >= 0 && columns.upperBound <= inFeatures,
                     "slice outside \(name) [\(outFeatures), \(inFeatures)]")
        let n = rows.count, k = columns.count, sliceName = "\(name)[\(rows.first ?? 0)..., \(columns.lowerBound)..<\(columns.upperBound)]"
        // A deferred matrix's slice stays deferred (no bytes made) where it can.
        if let slice = deferred?.selecting(rows: rows, columns: columns) {
            return LinearWeight(deferred: slice, name: sliceName)
        }
        if !transposed {
            switch format {
            case .plain(let d):
                let block = d.blockElements
                if columns.lowerBound % block == 0 && k % block == 0 {
                    let start = d.byteCount(elements: columns.lowerBound), rowBytes = d.byteCount(elements: k)
                    let codes = OwnedBytes(n * rowBytes)
                    for (i, r) in rows.enumerated() { codes.pointer.advanced(by: i * rowBytes).copyMemory(from: data + r * storedRowBytes + start, byteCount: rowBytes) }
                    return try LinearWeight(name: sliceName, format: format, rows: n, columns: k, data: codes.pointer, scales: nil, owners: [codes], transposed: false)
                }
            case .mxfp4:
                if columns.lowerBound % 32 == 0 && k % 32 == 0 {
                    let codes = OwnedBytes(n * k / 2), scales = OwnedBytes(n * k / 32), groups = inFeatures / 32
                    for (i, r) in rows.enumerated() {
                        codes.pointer.advanced(by: i * k / 2).copyMemory(from: data + r * storedRowBytes + columns.lowerBound / 2, byteCount: k / 2)
                        scales.pointer.advanced(by: i * k / 32).copyMemory(from: self.scales! + r * groups + columns.lowerBound / 32, byteCount: k / 32)
                    }
                    return try LinearWeight(name: sliceName, format: .mxfp4, rows: n, columns: k, data: codes.pointer, scales: scales.pointer,
                                            owners: [codes, scales], transposed: false)
                }
            case .fp8(let tile):
                // Source tile of each new tile row / column, nil when a new tile would need two.
                func tiles(_ indices: [Int]) -> [Int]? {
                    var map: [Int] = []
                    for (i, s) in indices.enumerated() {
                        if i % tile == 0 { map.append(s / tile) } else if map.last != s / tile { return nil }
                    }
                    return map
                }
                if let rowTiles = tiles(rows), let columnTiles = tiles(Array(columns)) {
                    let codes = OwnedBytes(n * k), sourceTilesPerRow = (inFeatures + tile - 1) / tile
                    for (i, r) in rows.enumerated() { codes.pointer.advanced(by: i * k).copyMemory(from: data + r * inFeatures + columns.lowerBound, byteCount: k) }
                    let scales = OwnedBytes(4 * rowTiles.count * columnTiles.count)
                    let src = self.scales!.assumingMemoryBound(to: Float.self), dst = scales.pointer.assumingMemoryBound(to: Float.self)
                    for (i, rt) in rowTiles.enumerated() {
                        for (j, ct) in columnTiles.enumerated() { dst[i * columnTiles.count + j] = src[rt * sourceTilesPerRow + ct] }
                    }
                    return try LinearWeight(name: sliceName, format: format, rows: n, columns: k, data: codes.pointer, scales: scales.pointer,
                                            owners: [codes, scales], transposed: false)
                }
            }
        }
        // f32, exact: decode each needed stored row.
        let values = OwnedBytes(4 * n * k), out = values.pointer.assumingMemoryBound(to: Float.self)
        if transposed {
            var stored = [Float](repeating: 0, count: outFeatures)
            for (c, i) in columns.enumerated() {
                stored.withUnsafeMutableBufferPointer { dequantizeRow(i, into: $0.baseAddress!) }
                for (o, r) in rows.enumerated() { out[o * k + c] = stored[r] }
            }
        } else {
            var row = [Float](repeating: 0, count: inFeatures)
            for (o, r) in rows.enumerated() {
                row.withUnsafeMutableBufferPointer { dequantizeRow(r, into: $0.baseAddress!) }
                for (c, i) in columns.enumerated() { out[o * k + c] = row[i] }
            }
        }
        return try LinearWeight(name: sliceName, format: .plain(.f32), rows: n, columns: k, data: values.pointer, scales: nil,
                                owners: [values], transposed: false)
    }

    /// Output features `rows` with every input feature.
    public func selecting(rows: [Int]) throws -> LinearWeight { try selecting(rows: rows, columns: 0..<inFeatures) }
    /// Every output feature with input features `columns`.
    public func selecting(columns: Range<Int>) throws -> LinearWeight { try selecting(rows: Array(0..<outFeatures), columns: columns) }
}
