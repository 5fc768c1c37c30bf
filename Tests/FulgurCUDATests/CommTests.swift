import Foundation
import Testing
@testable import FulgurCUDA

/// The host side of the communication layer; the GPU side is checked by `fulgur-gpu-check comm`.
@Suite(.serialized) struct CommTests {
    /// Either libnccl.so.2 loads and reports an NCCL 2 version, or the error lists where it was
    /// looked for and how to point at it.
    @Test func ncclIsFoundOrTheErrorSaysWhereItLooked() {
        do {
            let nccl = try NCCL.describe()
            #expect(nccl.version.hasPrefix("2."))
            #expect(getenv("NCCL_NVLS_ENABLE") != nil)
        } catch let e as NCCLError {
            #expect(e.message.contains("nvidia/nccl/lib/libnccl.so.2"))
            #expect(e.message.contains("FULGUR_NCCL"))
        } catch {
            Issue.record("unexpected error \(error)")
        }
    }

    /// The GPU machines install NCCL as pip's nvidia-nccl wheel; a virtual environment's copy is found.
    @Test func ncclSearchFindsAVirtualEnvironmentsWheel() throws {
        let root = FileManager.default.temporaryDirectory.appendingPathComponent("fulgur-nccl-\(getpid())")
        let lib = root.appendingPathComponent("lib/python3.12/site-packages/nvidia/nccl/lib")
        try FileManager.default.createDirectory(at: lib, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: root) }
        try #require(FileManager.default.createFile(atPath: lib.appendingPathComponent("libnccl.so.2").path, contents: Data()))
        let previous = getenv("VIRTUAL_ENV").map { String(cString: $0) }
        setenv("VIRTUAL_ENV", root.path, 1)
        defer { if let previous { setenv("VIRTUAL_ENV", previous, 1) } else { unsetenv("VIRTUAL_ENV") } }
        let found = NCCLLibrary.candidates().patterns.flatMap(NCCLLibrary.glob)
        #expect(found.first == lib.appendingPathComponent("libnccl.so.2").path)
    }

    /// PeerAllReduce mirrors comm.cu's constants; a grid is the same on every rank, at most
    /// 128 blocks, and one float4 per thread for the decode sizes.
    @Test func peerAllReduceMirrorsTheKernelsLayout() throws {
        let source = try String(contentsOf: URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../Kernels/comm.cu").standardized, encoding: .utf8)
        #expect(source.contains("constexpr int kMaxRanks = \(PeerAllReduce.maxRanks), kMaxBlocks = \(PeerAllReduce.maxBlocks), kThreads = \(PeerAllReduce.threads);"))
        #expect(source.contains("constexpr int kEpoch = 64, kDone = 68, kSlots = \(PeerAllReduce.slotsOffset);"))
        #expect(PeerAllReduce.blocks(count: 4) == 1)
        #expect(PeerAllReduce.blocks(count: 2880) == 2)
        #expect(PeerAllReduce.blocks(count: 65536) == 32)
        #expect(PeerAllReduce.blocks(count: 1 << 20) == PeerAllReduce.maxBlocks)
    }
}
