// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "Fulgur",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "Fulgur", targets: ["Fulgur"]),
        .executable(name: "fulgur", targets: ["fulgur"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
    ],
    targets: [
        .target(
            name: "Fulgur",
            swiftSettings: [.unsafeFlags(["-Ounchecked"], .when(configuration: .release))]
        ),
        .executableTarget(
            name: "fulgur",
            dependencies: ["Fulgur", .product(name: "ArgumentParser", package: "swift-argument-parser")]
        ),
        .testTarget(
            name: "FulgurTests",
            dependencies: ["Fulgur"],
            resources: [.copy("Fixtures")]
        ),
    ],
    swiftLanguageModes: [.v5]
)
