import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallSupport
@testable import KVRecallKernels
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallSession
import KVRecallTestSupport

/// The one attention dispatcher (`PreparedMethod`): the session runs every method through it,
/// `estimate` included, and the REPL's cache reuses prepared methods only while the store is unchanged.
@Suite struct DispatchTests {
    static let d = 16, heads = 2, group = 2

    func session(_ method: AttentionMethod, beam: Int = 8, k: Int = 50) throws -> (KVSession, [Float]) {
        var rng = SeededRandom(seed: 5)
        var c = SessionConfiguration(layers: 1, kvHeads: Self.heads, queryHeadsPerKV: Self.group, headDimension: Self.d,
                                     dtype: .f32, method: method, k: k, sinks: 4, window: 16, nprobe: 4, beam: beam)
        c.upkeepBatch = 8
        let s = try KVSession(configuration: c, directory: nil)
        let (k, v) = (rng.gaussianMatrix(rows: Self.heads * 600, dim: Self.d), rng.gaussianMatrix(rows: Self.heads * 600, dim: Self.d))
        try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try s.append(layer: 0, keys: kb, values: vb) } }
        try s.buildIndexes()
        // Keys appended after the build: some indexed by upkeep, the rest attended like the window.
        let (k1, v1) = (rng.gaussianMatrix(rows: Self.heads * 13, dim: Self.d), rng.gaussianMatrix(rows: Self.heads * 13, dim: Self.d))
        try k1.withUnsafeBufferPointer { kb in try v1.withUnsafeBufferPointer { vb in try s.append(layer: 0, keys: kb, values: vb) } }
        return (s, rng.gaussianMatrix(rows: Self.group, dim: Self.d))
    }

    @Test func sessionEstimateRunsTheEstimationZone() throws {
        let (estimate, q) = try session(.estimate)
        let (ivf, _) = try session(.ivf)
        defer { estimate.close(); ivf.close() }
        let e = try q.withUnsafeBufferPointer { try estimate.attendDetailed(layer: 0, head: 1, queries: $0) }
        let i = try q.withUnsafeBufferPointer { try ivf.attendDetailed(layer: 0, head: 1, queries: $0) }
        #expect(e.estimatedClusters > 0)
        #expect(i.estimatedClusters == 0)
        // Keys not yet indexed are attended exactly (they are in the attended set, not estimated).
        let n = try estimate.length(layer: 0)
        let indexed = try estimate.indexedCount(layer: 0, head: 1)
        #expect(indexed < n && Set(e.attended).isSuperset(of: indexed..<n))
        #expect(!e.estimated.joined().contains { Int($0) >= indexed })
    }

    @Test func sessionTreeBeamIsReachable() throws {
        // k below PreparedMethod.exactSelectionFraction of the 600 keys, so the tree does the selecting.
        let (narrow, q) = try session(.tree, beam: 1, k: 20)
        let (wide, _) = try session(.tree, beam: 64, k: 20)
        defer { narrow.close(); wide.close() }
        #expect(narrow.parameters.search.tree.beam == 1 && wide.parameters.search.tree.beam == 64)
        let a = try q.withUnsafeBufferPointer { try narrow.attendDetailed(layer: 0, head: 0, queries: $0) }
        let b = try q.withUnsafeBufferPointer { try wide.attendDetailed(layer: 0, head: 0, queries: $0) }
        #expect(a.stats.distanceComputations < b.stats.distanceComputations)
        // From 5% of the keys on, an exact scan selects instead (every key scored once per query head).
        let (large, _) = try session(.tree, beam: 1, k: 50)
        defer { large.close() }
        let c = try q.withUnsafeBufferPointer { try large.attendDetailed(layer: 0, head: 0, queries: $0) }
        #expect(c.stats.distanceComputations == Self.group * (try large.length(layer: 0)))
    }

    @Test func olderCheckpointConfigurationsDecodeWithDefaults() throws {
        let old = #"{"layers":1,"kvHeads":2,"queryHeadsPerKV":2,"headDimension":16,"dtype":"f32","method":"lsh","k":50,"sinks":4,"window":16,"ef":64,"nprobe":4,"upkeepBatch":8,"context":0}"#
        let c = try JSONDecoder().decode(SessionConfiguration.self, from: Data(old.utf8))
        #expect(c.beam == nil && c.targetRecall == 0.95 && c.minCollisions == nil && !c.landmarkBound && c.method == .lsh)
        let back = try JSONDecoder().decode(SessionConfiguration.self, from: try JSONEncoder().encode(c))
        #expect(back == c)
    }

    @Test func cacheReusesPreparedMethodsUntilTheStoreChanges() throws {
        let (s, _) = try session(.hnsw)
        defer { s.close() }
        try s.checkpoint()
        let id = HeadID(layer: 0, head: 0)
        let cache = PreparedMethodCache()
        let first = try s.store.read { try cache.prepare(.hnsw, snapshot: $0, head: id).method }
        let again = try s.store.read { try cache.prepare(.hnsw, snapshot: $0, head: id).method }
        #expect(first === again)
        var rng = SeededRandom(seed: 9)
        let k = rng.gaussianMatrix(rows: Self.heads, dim: Self.d)
        try k.withUnsafeBufferPointer { try s.append(layer: 0, keys: $0, values: $0) }
        let after = try s.store.read { try cache.prepare(.hnsw, snapshot: $0, head: id).method }
        #expect(after !== first)
    }
}
