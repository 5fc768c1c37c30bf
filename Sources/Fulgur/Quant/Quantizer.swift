import Foundation

/// Turns a BF16/F16/F32 Hugging Face checkpoint into Fulgur's serving format: expert weights
/// in MXFP4, the other linear layers in FP8 E4M3 with 128x128 block scales, everything else
/// (embeddings, LM head, norms, router, biases, sinks) as in the source.
///
/// Output layout, by source tensor:
/// - `...experts.{e}.{gate,up,down}_proj.weight` [out, in]: MiMo FP4 release layout, the
///   tensor itself as U8 codes [out, in/2] (even element in the low nibble) and
///   `...{proj}.weight_scale` U8 E8M0 scales [out, in/32].
/// - stacked `...experts.gate_up_proj` / `down_proj` [E, out, in] (transformers 5 fused
///   experts): the same encoding per expert, still stacked: U8 [E, out, in/2] under the same
///   name plus `<name>_scale` U8 [E, out, in/32].
/// - gpt-oss's `...experts.gate_up_proj` / `down_proj`, stored [E, in, out]: the published
///   gpt-oss layout, transposed to [out, in]: `<name>_blocks` U8 [E, out, in/32, 16] and
///   `<name>_scales` U8 [E, out, in/32].
/// - any other 2-D `*_proj.weight`: F8_E4M3 [out, in] plus `<module>.weight_scale_inv` F32
///   [ceil(out/128), ceil(in/128)], a multiplier.
///
/// The scales are U8 because that is how the MiMo FP4 release stores them (its tensors are
/// BF16, F32, F8_E4M3 and U8 only). `config.json` gains the release's `quantization_config`.
///
/// Tensors are converted one at a time (experts one expert at a time), so memory stays near
/// the largest tensor in f32, not the model.
public struct Quantizer {
    public enum Kind: String, Sendable, CaseIterable {
        case mxfp4, fp8, kept
    }

    enum Layout {
        case copy
        case fp8(rows: Int, columns: Int)
        /// `experts` matrices, each stored [rows, columns] or, when `transposed`, [columns, rows].
        case mxfp4(experts: Int, rows: Int, columns: Int, transposed: Bool)
    }

    struct Step {
        let tensor: TensorView
        let kind: Kind
        let layout: Layout
        let outputs: [SafetensorsWriter.Entry]
    }

    public let source: String
    let config: JSONObject
    let steps: [Step]
    /// Linear modules that would have been quantized but stay in the source precision (`--keep`).
    public let ignoredLayers: [String]
    // Keeps the mapped shards alive while `steps` points into them.
    let checkpoint: SafetensorsCheckpoint

    /// Plans the conversion of the checkpoint directory `source`. `keep` are regular
    /// expressions; a tensor whose name contains a match stays in the source precision.
    public init(source: String, keep: [String] = []) throws {
        let keepRegexes = try keep.map { pattern -> Regex<AnyRegexOutput> in
            do {
                return try Regex(pattern)
            } catch {
                throw FulgurError(.usage, "--keep '\(pattern)' is not a valid regular expression (\(error))")
            }
        }
        let configPath = source + "/config.json"
        guard let bytes = FileManager.default.contents(atPath: configPath) else {
            throw FulgurError(.io, "\(configPath): cannot read; quantize needs a Hugging Face checkpoint directory with config.json")
        }
        guard case .object(let config) = try JSONValue(parsing: bytes) else {
            throw FulgurError.format(configPath, "expected a JSON object")
        }
        if config["quantization_config"] != nil {
            throw FulgurError(.unsupported, "\(configPath): the checkpoint is already quantized ('quantization_config' is set); quantize needs a BF16, F16 or F32 source")
        }
        let architecture = config["architectures"]?.array?.first?.string
        let gptOss = architecture == "GptOssForCausalLM" || config["model_type"]?.string == "gpt_oss"
        let checkpoint = try SafetensorsCheckpoint(directory: source)

        var steps: [Step] = [], ignored: [String] = []
        for name in checkpoint.tensorNames {
            let t = try checkpoint.tensor(name)
            if [.fp8e4m3, .e8m0, .u8, .i8].contains(t.dtype)
                || ["_blocks", "_scales", "weight_scale", "weight_scale_inv"].contains(where: { name.hasSuffix($0) }) {
                throw FulgurError(.unsupported, "\(source): tensor '\(name)' (\(t.dtype)) is already quantized; quantize needs a BF16, F16 or F32 source")
            }
            var step = try Self.plan(t, gptOss: gptOss)
            if step.kind != .kept, keepRegexes.contains(where: { name.contains($0) }) {
                ignored.append(name.hasSuffix(".weight") ? String(name.dropLast(7)) : name)
                step = Step(tensor: t, kind: .kept, layout: .copy, outputs: [.init(name: name, dtype: t.dtype, shape: t.shape)])
            }
            steps.append(step)
        }
        self.source = source
        self.config = config
        self.steps = steps
        self.ignoredLayers = ignored
        self.checkpoint = checkpoint
    }

    static func plan(_ t: TensorView, gptOss: Bool) throws -> Step {
        let name = t.name, s = t.shape
        func kept() -> Step { Step(tensor: t, kind: .kept, layout: .copy, outputs: [.init(name: name, dtype: t.dtype, shape: s)]) }
        func mxfp4(experts: Int, rows: Int, columns: Int, transposed: Bool, _ outputs: [SafetensorsWriter.Entry]) throws -> Step {
            guard columns % 32 == 0 else {
                throw FulgurError(.shape, "tensor '\(name)' \(s): MXFP4 needs an input dimension that is a multiple of 32, got \(columns); keep it in high precision with --keep")
            }
            return Step(tensor: t, kind: .mxfp4, layout: .mxfp4(experts: experts, rows: rows, columns: columns, transposed: transposed),
                        outputs: outputs)
        }
        let perExpert = name.contains(".experts.") && ["gate_proj.weight", "up_proj.weight", "down_proj.weight"].contains { name.hasSuffix("." + $0) }
        let stacked = name.hasSuffix(".experts.gate_up_proj") || name.hasSuffix(".experts.down_proj")
        let quantized = (perExpert && s.count == 2) || (stacked && s.count == 3) || (name.hasSuffix("_proj.weight") && s.count == 2)
        if quantized && ![.f32, .f16, .bf16].contains(t.dtype) {
            throw FulgurError(.unsupported, "tensor '\(name)' is \(t.dtype); quantize reads F32, F16 and BF16 weights")
        }
        switch (s.count, perExpert, stacked) {
        case (2, true, _):
            let module = String(name.dropLast(7))
            return try mxfp4(experts: 1, rows: s[0], columns: s[1], transposed: false, [
                .init(name: name, dtype: .u8, shape: [s[0], s[1] / 2]),
                .init(name: module + ".weight_scale", dtype: .u8, shape: [s[0], s[1] / 32])])
        case (3, _, true) where gptOss:
            let (e, inF, out) = (s[0], s[1], s[2])
            return try mxfp4(experts: e, rows: out, columns: inF, transposed: true, [
                .init(name: name + "_blocks", dtype: .u8, shape: [e, out, inF / 32, 16]),
                .init(name: name + "_scales", dtype: .u8, shape: [e, out, inF / 32])])
        case (3, _, true):
            return try mxfp4(experts: s[0], rows: s[1], columns: s[2], transposed: false, [
                .init(name: name, dtype: .u8, shape: [s[0], s[1], s[2] / 2]),
                .init(name: name + "_scale", dtype: .u8, shape: [s[0], s[1], s[2] / 32])])
        case (2, _, _) where name.hasSuffix("_proj.weight"):
            let module = String(name.dropLast(7))
            return Step(tensor: t, kind: .fp8, layout: .fp8(rows: s[0], columns: s[1]), outputs: [
                .init(name: name, dtype: .fp8e4m3, shape: s),
                .init(name: module + ".weight_scale_inv", dtype: .f32, shape: [(s[0] + 127) / 128, (s[1] + 127) / 128])])
        default:
            return kept()
        }
    }

    /// The output tensors, in file order.
    public var outputs: [SafetensorsWriter.Entry] { steps.flatMap(\.outputs) }

    /// `quantization_config` in the schema of the MiMo FP4 release.
    public var quantizationConfig: JSONValue {
        ["quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128],
         "store_dtype": "mxfp4", "mxfp4_block_size": 32, "ignored_layers": .array(ignoredLayers.map { .string($0) })]
    }

    /// Writes the quantized checkpoint into `destination` (created; it must not already hold
    /// a checkpoint) and returns each tensor's quantization error. `progress` gets (tensors
    /// done, total).
    public func write(to destination: String, shardBytes: Int = 5_000_000_000,
                      progress: ((Int, Int) -> Void)? = nil) throws -> [QuantizationReport.TensorError] {
        let fm = FileManager.default
        let src = URL(fileURLWithPath: source).standardizedFileURL.path, dst = URL(fileURLWithPath: destination).standardizedFileURL.path
        guard src != dst else { throw FulgurError(.usage, "\(destination): the destination must differ from the source") }
        if let existing = try? fm.contentsOfDirectory(atPath: destination),
           existing.contains(where: { $0 == "config.json" || $0.hasSuffix(".safetensors") || $0.hasSuffix(".safetensors.index.json") }) {
            throw FulgurError(.io, "\(destination): already holds a checkpoint; remove it or choose another destination")
        }
        do {
            try fm.createDirectory(atPath: destination, withIntermediateDirectories: true)
        } catch {
            throw FulgurError(.io, "\(destination): cannot create directory (\(error.localizedDescription))")
        }

        let writer = try SafetensorsWriter(directory: destination, entries: outputs, shardBytes: shardBytes)
        var errors: [QuantizationReport.TensorError] = []
        for (i, step) in steps.enumerated() {
            let error = try convert(step, into: writer)
            errors.append(.init(name: step.tensor.name, kind: step.kind, elements: step.tensor.elementCount,
                                sourceBytes: step.tensor.byteCount, storedBytes: step.outputs.reduce(0) { $0 + $1.byteCount },
                                relativeError: error))
            progress?(i + 1, steps.count)
        }
        try writer.finish()

        var config = self.config
        config["quantization_config"] = quantizationConfig
        let configPath = destination + "/config.json"
        guard fm.createFile(atPath: configPath, contents: Data((JSONValue.object(config).serialized(indent: "  ") + "\n").utf8)) else {
            throw FulgurError(.io, "\(configPath): cannot write")
        }
        // Tokenizer, generation config, chat template: everything but the weights and config.
        for file in try fm.contentsOfDirectory(atPath: source).sorted() {
            var isDir: ObjCBool = false
            let path = source + "/" + file
            guard fm.fileExists(atPath: path, isDirectory: &isDir), !isDir.boolValue, file != "config.json",
                  !file.hasSuffix(".safetensors"), file != "model.safetensors.index.json" else { continue }
            do {
                try fm.copyItem(atPath: path, toPath: destination + "/" + file)
            } catch {
                throw FulgurError(.io, "\(path): cannot copy to \(destination) (\(error.localizedDescription))")
            }
        }
        return errors
    }

    /// Appends the step's outputs to `writer`; returns ||W - deq(Q(W))|| / ||W|| (0 for kept).
    func convert(_ step: Step, into writer: SafetensorsWriter) throws -> Double {
        let t = step.tensor
        switch step.layout {
        case .copy:
            try writer.append(UnsafeRawBufferPointer(start: t.data, count: t.byteCount))
            return 0
        case .fp8(let rows, let columns):
            let w = t.floats()
            var codes = [UInt8](repeating: 0, count: rows * columns)
            var scales = [Float](repeating: 0, count: ((rows + 127) / 128) * ((columns + 127) / 128))
            w.withUnsafeBufferPointer { Quantize.fp8Blocks($0.baseAddress!, rows: rows, columns: columns,
                                                             codes: &codes, scales: &scales) }
            var error = ErrorSum()
            let tileColumns = (columns + 127) / 128
            for r in 0..<rows {
                for c in 0..<columns {
                    error.add(w[r * columns + c], E4M3.decode(codes[r * columns + c]) * scales[(r / 128) * tileColumns + c / 128])
                }
            }
            try writer.append(codes)
            try writer.append(scales)
            return error.relative
        case .mxfp4(let experts, let rows, let columns, let transposed):
            let perExpert = rows * columns, groups = columns / 32
            var scales = [UInt8](repeating: 0, count: experts * rows * groups)
            var w = [Float](repeating: 0, count: perExpert)
            var codes = [UInt8](repeating: 0, count: perExpert / 2)
            var rowErrors = [ErrorSum](repeating: ErrorSum(), count: rows)
            var total = ErrorSum()
            let elementBytes = t.dtype.byteCount(elements: 1)
            for e in 0..<experts {
                let base = t.data + e * perExpert * elementBytes
                w.withUnsafeMutableBufferPointer { wb in
                    if transposed {
                        // Stored [in, out]: read a stored row (one input) and scatter it into column i.
                        var row = [Float](repeating: 0, count: rows)
                        for i in 0..<columns {
                            Dequant.row(t.dtype, base + i * rows * elementBytes, rows, &row)
                            for o in 0..<rows { wb[o * columns + i] = row[o] }
                        }
                    } else {
                        Dequant.row(t.dtype, base, perExpert, wb.baseAddress!)
                    }
                }
                w.withUnsafeBufferPointer { wb in
                    codes.withUnsafeMutableBufferPointer { cb in
                        scales.withUnsafeMutableBufferPointer { sb in
                            rowErrors.withUnsafeMutableBufferPointer { eb in
                                let (wp, cp, sp, ep) = (wb.baseAddress!, cb.baseAddress!, sb.baseAddress! + e * rows * groups, eb.baseAddress!)
                                Parallel.chunks(rows, work: perExpert * 8) { range in
                                    for r in range {
                                        let x = wp + r * columns, q = cp + r * columns / 2, s = sp + r * groups
                                        Quantize.mxfp4Split(x, columns, codes: q, scales: s)
                                        var error = ErrorSum()
                                        for j in 0..<columns {
                                            let code = j % 2 == 0 ? q[j / 2] & 0xF : q[j / 2] >> 4
                                            error.add(x[j], E2M1.decode(code) * E8M0.decode(s[j / 32]))
                                        }
                                        ep[r] = error
                                    }
                                }
                            }
                        }
                    }
                }
                for r in 0..<rows { total.merge(rowErrors[r]) }
                try writer.append(codes)
            }
            try writer.append(scales)
            return total.relative
        }
    }
}

/// Sums of squares for ||w - q|| / ||w||, in Double so that billions of terms stay exact enough.
struct ErrorSum {
    var error: Double = 0
    var norm: Double = 0

    @inline(__always) mutating func add(_ w: Float, _ q: Float) {
        let d = Double(w) - Double(q)
        error += d * d
        norm += Double(w) * Double(w)
    }

    mutating func merge(_ other: ErrorSum) {
        error += other.error
        norm += other.norm
    }

    var relative: Double { norm > 0 ? (error / norm).squareRoot() : (error > 0 ? .infinity : 0) }
}
