import Foundation

/// A failed CUDA driver call, or no usable driver: says which operation failed and the
/// driver's name for the error (CUDA_ERROR_OUT_OF_MEMORY, ...), so a user can act on it.
public struct CUDAError: Error, CustomStringConvertible, Equatable {
    public let operation: String
    /// The driver's CUresult, or nil when the driver itself could not be used.
    public let code: Int32?
    public let message: String

    public var description: String { message }

    static func noDriver(_ why: String) -> CUDAError {
        CUDAError(operation: "open the CUDA driver", code: nil,
                  message: "CUDA is not available: \(why). The CUDA executor needs an NVIDIA GPU with its driver (libcuda.so.1); use the CPU executor on this machine.")
    }
}

typealias CUresult = Int32
typealias CUdeviceptr = UInt64

/// The CUDA driver API, opened at run time with dlopen so that Fulgur builds and tests on
/// machines without CUDA. Only the entry points Fulgur uses are resolved; names carry the
/// versioned suffixes that cuda.h maps them to (cuMemAlloc -> cuMemAlloc_v2, ...).
final class Driver: @unchecked Sendable {
    let cuInit: @convention(c) (UInt32) -> CUresult
    let cuGetErrorName: @convention(c) (CUresult, UnsafeMutablePointer<UnsafePointer<CChar>?>) -> CUresult
    let cuDeviceGetCount: @convention(c) (UnsafeMutablePointer<Int32>) -> CUresult
    let cuDeviceGet: @convention(c) (UnsafeMutablePointer<Int32>, Int32) -> CUresult
    let cuDeviceGetName: @convention(c) (UnsafeMutablePointer<CChar>, Int32, Int32) -> CUresult
    let cuDeviceGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> CUresult
    let cuDeviceTotalMem: @convention(c) (UnsafeMutablePointer<Int>, Int32) -> CUresult
    let cuDevicePrimaryCtxRetain: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, Int32) -> CUresult
    let cuCtxSetCurrent: @convention(c) (OpaquePointer?) -> CUresult
    let cuCtxSynchronize: @convention(c) () -> CUresult
    let cuMemAlloc: @convention(c) (UnsafeMutablePointer<CUdeviceptr>, Int) -> CUresult
    let cuMemFree: @convention(c) (CUdeviceptr) -> CUresult
    let cuMemcpyHtoD: @convention(c) (CUdeviceptr, UnsafeRawPointer, Int) -> CUresult
    let cuMemcpyDtoH: @convention(c) (UnsafeMutableRawPointer, CUdeviceptr, Int) -> CUresult
    let cuMemcpyHtoDAsync: @convention(c) (CUdeviceptr, UnsafeRawPointer, Int, OpaquePointer?) -> CUresult
    let cuMemcpyDtoHAsync: @convention(c) (UnsafeMutableRawPointer, CUdeviceptr, Int, OpaquePointer?) -> CUresult
    let cuMemcpyDtoDAsync: @convention(c) (CUdeviceptr, CUdeviceptr, Int, OpaquePointer?) -> CUresult
    let cuMemsetD8Async: @convention(c) (CUdeviceptr, UInt8, Int, OpaquePointer?) -> CUresult
    let cuModuleLoadData: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UnsafeRawPointer) -> CUresult
    let cuModuleGetFunction: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UnsafePointer<CChar>) -> CUresult
    let cuLaunchKernelEx: @convention(c) (UnsafeRawPointer, OpaquePointer?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?,
                                          UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> CUresult
    let cuFuncSetAttribute: @convention(c) (OpaquePointer?, Int32, Int32) -> CUresult
    let cuFuncGetAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, OpaquePointer?) -> CUresult
    let cuOccupancyMaxActiveBlocksPerMultiprocessor: @convention(c) (UnsafeMutablePointer<Int32>, OpaquePointer?, Int32, Int) -> CUresult
    let cuModuleGetGlobal: @convention(c) (UnsafeMutablePointer<CUdeviceptr>, UnsafeMutablePointer<Int>, OpaquePointer?, UnsafePointer<CChar>) -> CUresult
    let cuLaunchKernel: @convention(c) (OpaquePointer?, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, UInt32, OpaquePointer?,
                                        UnsafeMutablePointer<UnsafeMutableRawPointer?>?, UnsafeMutablePointer<UnsafeMutableRawPointer?>?) -> CUresult
    let cuStreamCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> CUresult
    let cuStreamSynchronize: @convention(c) (OpaquePointer?) -> CUresult
    let cuStreamDestroy: @convention(c) (OpaquePointer?) -> CUresult
    let cuStreamWaitEvent: @convention(c) (OpaquePointer?, OpaquePointer?, UInt32) -> CUresult
    let cuEventCreate: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, UInt32) -> CUresult
    let cuEventRecord: @convention(c) (OpaquePointer?, OpaquePointer?) -> CUresult
    let cuEventSynchronize: @convention(c) (OpaquePointer?) -> CUresult
    let cuEventElapsedTime: @convention(c) (UnsafeMutablePointer<Float>, OpaquePointer?, OpaquePointer?) -> CUresult
    let cuEventDestroy: @convention(c) (OpaquePointer?) -> CUresult
    let cuStreamBeginCapture: @convention(c) (OpaquePointer?, Int32) -> CUresult
    let cuStreamEndCapture: @convention(c) (OpaquePointer?, UnsafeMutablePointer<OpaquePointer?>) -> CUresult
    let cuGraphInstantiateWithFlags: @convention(c) (UnsafeMutablePointer<OpaquePointer?>, OpaquePointer?, UInt64) -> CUresult
    let cuGraphLaunch: @convention(c) (OpaquePointer?, OpaquePointer?) -> CUresult
    let cuGraphExecDestroy: @convention(c) (OpaquePointer?) -> CUresult
    let cuGraphDestroy: @convention(c) (OpaquePointer?) -> CUresult
    let cuDeviceCanAccessPeer: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32) -> CUresult
    let cuDeviceGetP2PAttribute: @convention(c) (UnsafeMutablePointer<Int32>, Int32, Int32, Int32) -> CUresult
    let cuCtxEnablePeerAccess: @convention(c) (OpaquePointer?, UInt32) -> CUresult

    /// The process's driver, opened and initialized once; the failure is kept and rethrown.
    static let shared: Result<Driver, CUDAError> = Result { try Driver(library: "libcuda.so.1") }
        .mapError { $0 as! CUDAError }

    static func get() throws -> Driver { try shared.get() }

    private init(library: String) throws {
        guard let handle = dlopen(library, RTLD_NOW | RTLD_LOCAL) else {
            let why = dlerror().map { String(cString: $0) } ?? "unknown dlopen error"
            throw CUDAError.noDriver("could not load \(library) (\(why))")
        }
        func symbol<F>(_ name: String) throws -> F {
            guard let p = dlsym(handle, name) else {
                throw CUDAError.noDriver("\(library) has no \(name); the driver is older than CUDA 12")
            }
            return unsafeBitCast(p, to: F.self)
        }
        cuInit = try symbol("cuInit")
        cuGetErrorName = try symbol("cuGetErrorName")
        cuDeviceGetCount = try symbol("cuDeviceGetCount")
        cuDeviceGet = try symbol("cuDeviceGet")
        cuDeviceGetName = try symbol("cuDeviceGetName")
        cuDeviceGetAttribute = try symbol("cuDeviceGetAttribute")
        cuDeviceTotalMem = try symbol("cuDeviceTotalMem_v2")
        cuDevicePrimaryCtxRetain = try symbol("cuDevicePrimaryCtxRetain")
        cuCtxSetCurrent = try symbol("cuCtxSetCurrent")
        cuCtxSynchronize = try symbol("cuCtxSynchronize")
        cuMemAlloc = try symbol("cuMemAlloc_v2")
        cuMemFree = try symbol("cuMemFree_v2")
        cuMemcpyHtoD = try symbol("cuMemcpyHtoD_v2")
        cuMemcpyDtoH = try symbol("cuMemcpyDtoH_v2")
        cuMemcpyHtoDAsync = try symbol("cuMemcpyHtoDAsync_v2")
        cuMemcpyDtoHAsync = try symbol("cuMemcpyDtoHAsync_v2")
        cuMemcpyDtoDAsync = try symbol("cuMemcpyDtoDAsync_v2")
        cuMemsetD8Async = try symbol("cuMemsetD8Async")
        cuModuleLoadData = try symbol("cuModuleLoadData")
        cuModuleGetFunction = try symbol("cuModuleGetFunction")
        cuModuleGetGlobal = try symbol("cuModuleGetGlobal_v2")
        cuFuncSetAttribute = try symbol("cuFuncSetAttribute")
        cuFuncGetAttribute = try symbol("cuFuncGetAttribute")
        cuOccupancyMaxActiveBlocksPerMultiprocessor = try symbol("cuOccupancyMaxActiveBlocksPerMultiprocessor")
        cuLaunchKernelEx = try symbol("cuLaunchKernelEx")
        cuLaunchKernel = try symbol("cuLaunchKernel")
        cuStreamCreate = try symbol("cuStreamCreate")
        cuStreamSynchronize = try symbol("cuStreamSynchronize")
        cuStreamDestroy = try symbol("cuStreamDestroy_v2")
        cuStreamWaitEvent = try symbol("cuStreamWaitEvent")
        cuEventCreate = try symbol("cuEventCreate")
        cuEventRecord = try symbol("cuEventRecord")
        cuEventSynchronize = try symbol("cuEventSynchronize")
        cuEventElapsedTime = try symbol("cuEventElapsedTime_v2")
        cuEventDestroy = try symbol("cuEventDestroy_v2")
        cuStreamBeginCapture = try symbol("cuStreamBeginCapture_v2")
        cuStreamEndCapture = try symbol("cuStreamEndCapture")
        cuGraphInstantiateWithFlags = try symbol("cuGraphInstantiateWithFlags")
        cuGraphLaunch = try symbol("cuGraphLaunch")
        cuGraphExecDestroy = try symbol("cuGraphExecDestroy")
        cuGraphDestroy = try symbol("cuGraphDestroy")
        cuDeviceCanAccessPeer = try symbol("cuDeviceCanAccessPeer")
        cuDeviceGetP2PAttribute = try symbol("cuDeviceGetP2PAttribute")
        cuCtxEnablePeerAccess = try symbol("cuCtxEnablePeerAccess")
        try check(cuInit(0), "cuInit")
    }

    /// Throws unless `result` is CUDA_SUCCESS, naming the operation and the error.
    func check(_ result: CUresult, _ operation: @autoclosure () -> String) throws {
        guard result != 0 else { return }
        var name: UnsafePointer<CChar>?
        let errorName = cuGetErrorName(result, &name) == 0 ? name.map { String(cString: $0) } : nil
        let op = operation()
        throw CUDAError(operation: op, code: result,
                        message: "CUDA error in \(op): \(errorName ?? "unknown CUresult") (\(result))")
    }
}
