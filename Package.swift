// swift-tools-version:6.0
import PackageDescription

// AVX2, FMA and F16C (every x86-64 server since 2013) for the CPU executor's kernels.
#if arch(x86_64)
let cpuFlags: [SwiftSetting] = [.unsafeFlags(["-target-cpu", "haswell"])]
#else
let cpuFlags: [SwiftSetting] = []
#endif

let package = Package(
    name: "Fulgur",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "Fulgur", targets: ["Fulgur"]),
        .executable(name: "fulgur", targets: ["fulgur"]),
        .executable(name: "fulgur-gpu-check", targets: ["fulgur-gpu-check"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        .target(
            name: "Fulgur",
            swiftSettings: cpuFlags
        ),
        .executableTarget(
            name: "fulgur",
            dependencies: ["Fulgur", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        // The CUDA executor: the driver is opened at run time, so this builds without CUDA.
        .target(
            name: "FulgurCUDA",
            dependencies: ["Fulgur"]
        ),
        .executableTarget(
            name: "fulgur-gpu-check",
            dependencies: ["Fulgur", "FulgurCUDA"]
        ),
        .testTarget(
            name: "FulgurCUDATests",
            dependencies: ["FulgurCUDA"]
        ),
        .testTarget(
            name: "FulgurTests",
            dependencies: ["Fulgur"],
            resources: [.copy("Fixtures")]
        ),
    ],
    swiftLanguageModes: [.v5]
)
