import Foundation
import KVRecall

/// SplitMix64: a small deterministic generator, so every test's data is reproducible from a seed.
public struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A standard normal sample (Box–Muller).
    public mutating func gaussian() -> Float {
        let u1 = max(Double.leastNonzeroMagnitude, Double.random(in: 0..<1, using: &self))
        let u2 = Double.random(in: 0..<1, using: &self)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * .pi * u2))
    }

    /// `rows x dim` standard normal floats, row-major.
    public mutating func gaussianMatrix(rows: Int, dim: Int) -> [Float] {
        (0..<(rows * dim)).map { _ in gaussian() }
    }
}

/// A fresh temporary directory, removed by `cleanup()`.
public final class TemporaryDirectory {
    public let path: String
    public init(_ label: String = "kvrecall-test") {
        path = NSTemporaryDirectory() + "\(label)-\(UUID().uuidString)"
        try? FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    }
    public func cleanup() { try? FileManager.default.removeItem(atPath: path) }
    deinit { cleanup() }
}

/// Exact top-k by a plain double-precision loop: the naive reference the fast paths are checked against.
public func naiveTopK(keys: [Float], dim: Int, query: ArraySlice<Float>, k: Int) -> [(id: Int, score: Float)] {
    let n = keys.count / dim
    let q = Array(query)
    var scored: [(id: Int, score: Float)] = []
    for i in 0..<n {
        var s: Double = 0
        for j in 0..<dim { s += Double(keys[i * dim + j]) * Double(q[j]) }
        scored.append((i, Float(s)))
    }
    scored.sort { $0.score != $1.score ? $0.score > $1.score : $0.id < $1.id }
    return Array(scored.prefix(k))
}

/// Path of the repository's `Data/` folder, found from this source file.
public func repositoryDataDirectory() -> String {
    let here = URL(fileURLWithPath: #filePath)
    return here.deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Data").path
}
