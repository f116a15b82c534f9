import Foundation
import KVRecall

/// A store holding one head of clustered gaussian keys, for index tests.
public struct IndexFixture {
    public let dir: TemporaryDirectory
    public let store: KVStore
    public let keys: [Float]
    public let queries: [Float]
    public let n: Int
    public let d: Int
    public let id = HeadID()

    /// `n` keys in `clusters` gaussian clusters (so partitions mean something), values equal to keys,
    /// and `queryCount` in-distribution queries drawn like the keys.
    public init(n: Int = 4096, d: Int = 32, clusters: Int = 64, queryCount: Int = 50, dtype: DType = .f32, seed: UInt64 = 3) throws {
        var rng = SeededRandom(seed: seed)
        let centres = rng.gaussianMatrix(rows: clusters, dim: d).map { $0 * 3 }
        func sample(_ count: Int) -> [Float] {
            var out = [Float]()
            out.reserveCapacity(count * d)
            for _ in 0..<count {
                let c = Int.random(in: 0..<clusters, using: &rng)
                for j in 0..<d { out.append(centres[c * d + j] + rng.gaussian()) }
            }
            return out
        }
        keys = sample(n)
        queries = sample(queryCount)
        self.n = n
        self.d = d
        dir = TemporaryDirectory("kvrecall-index")
        store = try KVStore(path: dir.path, create: true)
        try store.createHead(HeadID(), dimension: d, dtype: dtype)
        try keys.withUnsafeBufferPointer { try store.append(HeadID(), keys: $0, values: $0) }
    }

    /// Exact top-k ids per query.
    public func exact(k: Int, queries: [Float]? = nil) throws -> [[Int]] {
        let q = queries ?? self.queries
        return try store.read { s in
            let view = try s.vectors(id, .keys)
            let r = try q.withUnsafeBufferPointer { try FlatIndex(keys: view).search($0, k: k, parameters: SearchParameters(), keys: view) }
            return (0..<r.queryCount).map { i in r.hits(i).map(\.id) }
        }
    }

    /// Mean recall@k of `index` against exact search.
    public func recall(of index: some VectorIndex, k: Int, parameters: SearchParameters, queries: [Float]? = nil) throws -> (recall: Double, stats: SearchStats) {
        let q = queries ?? self.queries
        let truth = try exact(k: k, queries: q)
        let r = try store.read { s in
            let view = try s.vectors(id, .keys)
            return try q.withUnsafeBufferPointer { try index.search($0, k: k, parameters: parameters, keys: view) }
        }
        let total = (0..<r.queryCount).map { KVRecall.recall(retrieved: r.hits($0).map(\.id), exact: truth[$0]) }.reduce(0, +)
        return (total / Double(r.queryCount), r.stats)
    }

    /// Runs `body` with the keys view inside a read transaction.
    public func withKeys<T>(_ body: (VectorView) throws -> T) throws -> T {
        try store.read { s in try body(try s.vectors(id, .keys)) }
    }
}
