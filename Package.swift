// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "KVRecall",
    products: [
        .library(name: "KVRecall", targets: ["KVRecall"]),
        .executable(name: "kvrecall", targets: ["KVRecallCLI"]),
        // The C ABI (include/kvrecall.h) as a shared library: libKVRecallC.so.
        .library(name: "KVRecallC", type: .dynamic, targets: ["KVRecallC"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // liblmdb, found through pkg-config (Debian: liblmdb-dev).
        .systemLibrary(
            name: "CLMDB",
            pkgConfig: "lmdb",
            providers: [.apt(["liblmdb-dev"])]
        ),
        // OpenBLAS's CBLAS interface (Debian: libopenblas-dev).
        .systemLibrary(
            name: "CBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev"])]
        ),
        // libedit through pkg-config (Debian: libedit-dev): line editing, history and completion
        // for `kvrecall repl`, through its readline-compatible API.
        .systemLibrary(
            name: "CEditLine",
            pkgConfig: "libedit",
            providers: [.apt(["libedit-dev"])]
        ),
        // The REPL's key reader and signal handling over libedit (its state defined once, in C).
        .target(name: "CLineReader", dependencies: ["CEditLine"]),
        // Vectorised f16/bf16 kernels with a runtime CPU check and a portable fallback.
        .target(name: "CKernels"),
        // The engine, one target per layer; a layer imports only the layers below it.
        .target(name: "KVRecallSupport"),
        .target(name: "KVRecallKernels", dependencies: ["KVRecallSupport", "CBLAS", "CKernels"]),
        .target(name: "KVRecallFormats"),
        .target(name: "KVRecallStorage", dependencies: ["KVRecallSupport", "KVRecallKernels", "KVRecallFormats", "CLMDB", "CKernels"]),
        .target(name: "KVRecallIndexes", dependencies: ["KVRecallSupport", "KVRecallKernels", "KVRecallFormats", "KVRecallStorage",
                                                        "CBLAS", "CKernels"]),
        .target(name: "KVRecallAttention", dependencies: ["KVRecallSupport", "KVRecallKernels", "KVRecallFormats", "KVRecallStorage",
                                                          "KVRecallIndexes", "CBLAS", "CKernels"]),
        // Profiles a head, chooses its policy and budget, builds and calibrates its index, stores the plan.
        .target(name: "KVRecallPlanning", dependencies: ["KVRecallSupport", "KVRecallKernels", "KVRecallFormats", "KVRecallStorage",
                                                         "KVRecallIndexes", "KVRecallAttention"]),
        .target(name: "KVRecallSession", dependencies: ["KVRecallSupport", "KVRecallKernels", "KVRecallFormats", "KVRecallStorage",
                                                        "KVRecallIndexes", "KVRecallAttention", "KVRecallPlanning"]),
        // `import KVRecall`: every layer's public API (what the C ABI and the decoder build on).
        .target(
            name: "KVRecall",
            dependencies: ["KVRecallSupport", "KVRecallKernels", "KVRecallFormats", "KVRecallStorage", "KVRecallIndexes",
                           "KVRecallAttention", "KVRecallPlanning", "KVRecallSession"]
        ),
        // Presentation: text tables, terminal styles and the REPL's interpreter (the CLI's, not the C ABI's).
        .target(name: "KVRecallInterface", dependencies: ["KVRecall"]),
        // The C header (include/kvrecall.h) and its C-only part, so Swift sees the ABI's types.
        .target(name: "KVRecallABI", path: "include", publicHeadersPath: "."),
        .target(name: "KVRecallC", dependencies: ["KVRecall", "KVRecallABI", "CKernels"]),
        // A real decoder above the engine: GGUF reader, tokenizer, Gemma 3 forward pass whose global
        // layers attend through a KVSession. The engine never imports it.
        // The decoder's own C kernel: matrix-vector products read from Q8_0 blocks.
        .target(name: "CDecoderKernels"),
        .target(
            name: "KVRecallDecoder",
            dependencies: ["KVRecall", "CBLAS", "CKernels", "CDecoderKernels"]
        ),
        .executableTarget(
            name: "KVRecallCLI",
            dependencies: [
                "KVRecall",
                "KVRecallInterface",
                "KVRecallDecoder",
                "CKernels",
                "CEditLine",
                "CLineReader",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .target(
            name: "KVRecallTestSupport",
            dependencies: ["KVRecall"],
            path: "Tests/KVRecallTestSupport"
        ),
        .testTarget(
            name: "KVRecallTests",
            dependencies: ["KVRecall", "KVRecallInterface", "KVRecallTestSupport", "KVRecallCLI"]
        ),
        .testTarget(
            name: "KVRecallDecoderTests",
            dependencies: ["KVRecallDecoder", "KVRecall", "KVRecallTestSupport", "KVRecallCLI"]
        ),
    ],
    swiftLanguageModes: [.v5]
)
