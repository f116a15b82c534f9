import Foundation
import KVRecall

/// The library's seeded generator with test helpers, so every test's data is reproducible from a seed.
public struct SeededRandom: RandomNumberGenerator {
    private var generator: SeededGenerator
    public init(seed: UInt64) { generator = SeededGenerator(seed: seed) }
    public mutating func next() -> UInt64 { generator.next() }

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
