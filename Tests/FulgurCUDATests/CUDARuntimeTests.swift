import Foundation
import Testing
@testable import FulgurCUDA

@Suite struct CUDARuntimeTests {
    /// Machines without a GPU (CI, development machines) get one clear error, not a crash.
    @Test func openingADeviceWithoutADriverFailsWithAClearError() throws {
        guard dlopen("libcuda.so.1", RTLD_NOW) == nil else { return }  // a GPU machine: nothing to check
        do {
            _ = try CUDADevice()
            Issue.record("opened a CUDA device without libcuda.so.1")
        } catch let e as CUDAError {
            #expect(e.code == nil)
            #expect(e.message.contains("libcuda.so.1"))
            #expect(e.message.contains("CPU executor"))
        }
    }

    /// The hash the runtime expects must be the hash of Kernels/ as checked in; otherwise
    /// scripts/build-kernels was not run after a kernel changed.
    @Test func kernelSourceHashMatchesTheKernelsFolder() throws {
        let kernels = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../Kernels").standardized
        let names = try FileManager.default.contentsOfDirectory(atPath: kernels.path)
            .filter { $0.hasSuffix(".cu") || $0.hasSuffix(".cuh") }.sorted()
        #expect(!names.isEmpty)
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for name in names {
            let bytes = Array(name.utf8) + [0] + [UInt8](try Data(contentsOf: kernels.appendingPathComponent(name))) + [0]
            for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        }
        #expect(h == kernelSourceHash, "Kernels/ hashes to \(String(h, radix: 16)); run scripts/build-kernels to update KernelSourceHash.swift")
    }

    @Test func poolRoundsSizesSoNearSizesShareAFreeList() {
        #expect(DevicePool.capacity(for: 1) == 512)
        #expect(DevicePool.capacity(for: 513) == 1024)
        #expect(DevicePool.capacity(for: 2 << 20) == 2 << 20)
        #expect(DevicePool.capacity(for: (2 << 20) + 1) == 4 << 20)
    }

    /// Plain products whose grid is resident at once prefetch their weights before the wait; the
    /// LM heads (many waves of blocks), where it measured slower, do not (CUDALinear.plainEarly).
    @Test(.enabled(if: ProcessInfo.processInfo.environment["FULGUR_PLAIN_EARLY"] == nil))
    func onlyFewRowPlainProductsPrefetchEarlyByDefault() {
        #expect(CUDALinear.plainEarly(rows: 960))          // the default model's q/k/v
        #expect(CUDALinear.plainEarly(rows: 3072))         // its gate and up
        #expect(!CUDALinear.plainEarly(rows: 49152))       // its LM head
        #expect(!CUDALinear.plainEarly(rows: 201088))      // gpt-oss-20b's
        #expect(CUDALinear.plainEarly(rows: CUDALinear.plainFewRows - 1) && !CUDALinear.plainEarly(rows: CUDALinear.plainFewRows))
    }

    /// Plain products of few rows split each row's sum over a block's warps from 2 tokens on,
    /// one row a block; 1-token products and large ones (LM heads) keep their layouts
    /// (CUDALinear.plainSplit).
    @Test(.enabled(if: ProcessInfo.processInfo.environment["FULGUR_PLAIN_SPLIT"] == nil))
    func fewRowPlainProductsSplitRowsFromTwoTokensByDefault() {
        for bin in [2, 4, 8, 16] {
            #expect(CUDALinear.plainSplit(rows: 576, bin: bin))     // the default model's o_proj
            #expect(CUDALinear.plan(.f32, tokens: bin, rows: 576).rowsPerBlock == 1)
            #expect(!CUDALinear.plainSplit(rows: 49152, bin: bin))  // its LM head
            #expect(CUDALinear.plan(.bf16, tokens: bin, rows: 201088).rowsPerBlock == 4 * min(bin, 4))
        }
        #expect(!CUDALinear.plainSplit(rows: 576, bin: 1))
        #expect(CUDALinear.plan(.f32, tokens: 1, rows: 576).rowsPerBlock == 4)
        #expect(CUDALinear.plan(.f32, tokens: 3, rows: 3072).rowsPerBlock == 1)  // 3 tokens: bin 4
    }
}
