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
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
    ],
    targets: [
        .target(
            name: "Fulgur",
            swiftSettings: cpuFlags
        ),
        // The OpenAI-compatible HTTP API over an Engine.
        .target(
            name: "FulgurServer",
            dependencies: [
                "Fulgur",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        .executableTarget(
            name: "fulgur",
            dependencies: ["Fulgur", "FulgurCUDA", "FulgurServer", .product(name: "ArgumentParser", package: "swift-argument-parser")]
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
            name: "FulgurServerTests",
            dependencies: [
                "FulgurServer",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "FulgurTests",
            dependencies: ["Fulgur"],
            resources: [.copy("Fixtures")]
        ),
    ],
    swiftLanguageModes: [.v5]
)
