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

/// The retrieval graph's shared walk for a GQA group against one walk per query.
@Suite struct GroupSearchTests {
    @Test func aSharedWalkFindsAtLeastWhatSeparateWalksFindAndReadsFewerKeys() throws {
        let data = repositoryDataDirectory() + "/minilm"
        let dir = TemporaryDirectory("kvrecall-group-walk")
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.ingest(keys: try NPY.read(path: data + "/keys.npy"), values: try NPY.read(path: data + "/values.npy"),
                         queries: try NPY.read(path: data + "/prefill_queries.npy"), first: HeadID(), dtype: .f32)
        let queries = try NPY.read(path: data + "/queries.npy").floats()
        let d = 32, g = 4, k = 50
        // A beam wider than k, and one narrower (the best k of every key scored are returned).
        for ef in [64, 16] {
        var p = SearchParameters()
        p.graph.ef = ef
        try store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            let index = try IndexCatalog.build(.retrieval, keys: keys, queries: try s.vectors(HeadID(), .queries),
                                               parameters: IndexBuildParameters()) as! RetrievalGraphIndex
            var separateHits = 0, sharedHits = 0, separateWork = 0, sharedWork = 0
            for group in 0..<16 {
                // Heads of a group: one query and three perturbations of it (heads of a real group overlap).
                var rng = SeededRandom(seed: UInt64(group))
                let base = Array(queries[(group * d)..<((group + 1) * d)])
                var rows = base
                for _ in 1..<g { rows += zip(base, rng.gaussianMatrix(rows: 1, dim: d)).map { $0 + 0.3 * $1 } }
                try rows.withUnsafeBufferPointer { q in
                    let truth = try FlatIndex(keys: keys).search(q, k: k, parameters: p, keys: keys)
                    let separate = try index.search(q, k: k, parameters: p, keys: keys)
                    let shared = try index.searchGroup(q, k: k, parameters: p, keys: keys)
                    #expect(shared.stats.queries == g)
                    for h in 0..<g {
                        let exact = Set(truth.hits(h).map(\.id))
                        separateHits += separate.hits(h).filter { exact.contains($0.id) }.count
                        sharedHits += shared.hits(h).filter { exact.contains($0.id) }.count
                        // Scores are the exact inner products of the ids returned.
                        for hit in shared.hits(h).prefix(3) {
                            #expect(abs(hit.score - keys.score(query: q.baseAddress! + h * d, row: hit.id)) < 1e-4)
                        }
                    }
                    separateWork += separate.stats.distanceComputations
                    sharedWork += shared.stats.distanceComputations
                }
            }
            #expect(sharedHits >= separateHits, "ef \(ef): shared \(sharedHits) vs separate \(separateHits)")
            // Inner products are counted per query, keys read once per group: fewer than g separate walks read.
            #expect(sharedWork / g < separateWork, "shared reads \(sharedWork / g) keys, separate walks \(separateWork)")
        }
        }
    }
}
