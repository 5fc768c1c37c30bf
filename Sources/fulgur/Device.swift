import ArgumentParser
import Fulgur
import FulgurCUDA

/// Where a model runs. `auto` takes the GPU when there is one and the kernels for it, and
/// says why when it falls back to the CPU on a machine that has a GPU.
enum DeviceChoice: String, ExpressibleByArgument, CaseIterable {
    case auto, cpu, cuda

    /// The executor factory for Engine (nil: the CPU executor).
    func executorFactory(log: @escaping (String) -> Void) -> ((Plan, Int) throws -> any Executor)? {
        switch self {
        case .cpu:
            return nil
        case .cuda:
            return { plan, context in try Self.cuda(plan, context, log: log) }
        case .auto:
            return { plan, context in
                let device: CUDADevice
                do {
                    device = try CUDADevice()
                } catch {
                    return CPUExecutor(plan: plan, maxPositions: context)  // no GPU or driver: the CPU, silently
                }
                do {
                    return try Self.cuda(plan, context, device: device, log: log)
                } catch {
                    log("note: \(device.name) found but not used (\(error)); running on the CPU. --device cuda makes this an error.")
                    return CPUExecutor(plan: plan, maxPositions: context)
                }
            }
        }
    }

    static func cuda(_ plan: Plan, _ context: Int, device: CUDADevice? = nil, log: (String) -> Void) throws -> CUDAExecutor {
        let device = try device ?? CUDADevice()
        let module = try KernelModule(device: device)
        let executor = try CUDAExecutor(plan: plan, device: device, module: module, maxPositions: context)
        log("Running on \(device.name) (CUDA executor)")
        return executor
    }
}
