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

/// The one graph walk (`walkGraph`) as HNSW and the retrieval graph use it: a GQA group's shared
/// walk against one walk per query, a group of one against a single query, the retrieval graph's
/// narrow beam against a plain reference walk, HNSW's ef raised to k.
@Suite struct GroupSearchTests {
    /// The real MiniLM sample in a store, with its decode queries.
    struct Sample {
        let dir = TemporaryDirectory("kvrecall-group-walk")
        let store: KVStore
        let queries: [Float]
        let d = 32

        init() throws {
            let data = repositoryDataDirectory() + "/minilm"
            store = try KVStore(path: dir.path, create: true)
            try store.ingest(keys: try NPY.read(path: data + "/keys.npy"), values: try NPY.read(path: data + "/values.npy"),
                             queries: try NPY.read(path: data + "/prefill_queries.npy"), first: HeadID(), dtype: .f32)
            queries = try NPY.read(path: data + "/queries.npy").floats()
        }

        func build(_ kind: IndexKind) throws -> any BuildableIndex {
            try store.read { s in
                try IndexCatalog.build(kind, keys: try s.vectors(HeadID(), .keys), queries: try s.vectors(HeadID(), .queries),
                                       parameters: IndexBuildParameters())
            }
        }

        /// Query `i` and `g - 1` perturbations of it (heads of a real group overlap).
        func group(_ i: Int, g: Int) -> [Float] {
            var rng = SeededRandom(seed: UInt64(i))
            let base = Array(queries[(i * d)..<((i + 1) * d)])
            var rows = base
            for _ in 1..<max(1, g) { rows += zip(base, rng.gaussianMatrix(rows: 1, dim: d)).map { $0 + 0.3 * $1 } }
            return rows
        }
    }

    static func searchGroup(_ index: any BuildableIndex, _ q: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                            keys: VectorView) throws -> SearchResults {
        try index.searchGroup(q, k: k, parameters: parameters, keys: keys)
    }

    @Test(arguments: [IndexKind.retrieval, .hnsw])
    func aSharedWalkFindsAtLeastWhatSeparateWalksFindAndReadsFewerKeys(kind: IndexKind) throws {
        let sample = try Sample()
        let index = try sample.build(kind)
        let d = sample.d, g = 4, k = 50
        // A beam wider than k, and one narrower (the retrieval graph returns the best k of every
        // key scored; HNSW raises it to k).
        for ef in [64, 16] {
            var p = SearchParameters()
            p.graph.ef = ef
            try sample.store.read { s in
                let keys = try s.vectors(HeadID(), .keys)
                var separateHits = 0, sharedHits = 0, separateWork = 0, sharedWork = 0
                for group in 0..<16 {
                    try sample.group(group, g: g).withUnsafeBufferPointer { q in
                        let truth = try FlatIndex(keys: keys).search(q, k: k, parameters: p, keys: keys)
                        let separate = try index.search(q, k: k, parameters: p, keys: keys)
                        let shared = try Self.searchGroup(index, q, k: k, parameters: p, keys: keys)
                        #expect(shared.stats.queries == g)
                        for h in 0..<g {
                            let exact = Set(truth.hits(h).map(\.id))
                            separateHits += separate.hits(h).filter { exact.contains($0.id) }.count
                            sharedHits += shared.hits(h).filter { exact.contains($0.id) }.count
                            // Scores are the exact inner products of the ids returned, best first.
                            let hits = shared.hits(h)
                            #expect(hits.count == k && zip(hits, hits.dropFirst()).allSatisfy { $0.score >= $1.score })
                            for hit in hits.prefix(3) {
                                #expect(abs(hit.score - keys.score(query: q.baseAddress! + h * d, row: hit.id)) < 1e-4)
                            }
                        }
                        separateWork += separate.stats.distanceComputations
                        sharedWork += shared.stats.distanceComputations
                    }
                }
                #expect(sharedHits >= separateHits, "\(kind) ef \(ef): shared \(sharedHits) vs separate \(separateHits)")
                // Inner products are counted per query, keys read once per group: fewer than g separate walks read.
                #expect(sharedWork / g < separateWork, "\(kind): shared reads \(sharedWork / g) keys, separate walks \(separateWork)")
            }
        }
    }

    /// A group of one query walks exactly as the query alone: the same ids, scores and work, for
    /// beams wider and narrower than k, on f32 and f16 keys (the gathered kernels score a pair the
    /// same bit for bit whatever the group size).
    @Test(arguments: [IndexKind.retrieval, .hnsw], [DType.f32, .f16])
    func aGroupOfOneWalksExactlyAsASingleQuery(kind: IndexKind, dtype: DType) throws {
        let f = try IndexFixture(n: 3000, queryCount: 20, dtype: dtype)
        // The retrieval graph learns from queries: the fixture's keys stand in for prefill queries.
        if kind == .retrieval {
            try f.keys.withUnsafeBufferPointer { try f.store.appendQueries(f.id, queries: UnsafeBufferPointer(rebasing: $0[0..<(1000 * f.d)])) }
        }
        let index = try f.store.read { s in
            try IndexCatalog.build(kind, keys: try s.vectors(f.id, .keys), queries: try s.vectors(f.id, .queries),
                                   parameters: IndexBuildParameters())
        }
        try f.withKeys { keys in
            for ef in [4, 20, 64] {
                var p = SearchParameters()
                p.graph.ef = ef
                for i in 0..<(f.queries.count / f.d) {
                    try Array(f.queries[(i * f.d)..<((i + 1) * f.d)]).withUnsafeBufferPointer { q in
                        let single = try index.search(q, k: 20, parameters: p, keys: keys)
                        let group = try Self.searchGroup(index, q, k: 20, parameters: p, keys: keys)
                        #expect(single.ids == group.ids && single.scores == group.scores, "\(kind) \(dtype) ef \(ef) query \(i)")
                        #expect(single.stats == group.stats, "\(kind) \(dtype) ef \(ef) query \(i)")
                    }
                }
            }
        }
    }

    /// A retrieval-graph beam narrower than k returns the best k of every key the walk scored,
    /// against a plain walk: a max-heap of candidates, a beam of the ef best, every scored key kept.
    @Test func aNarrowBeamKeepsTheBestKOfEveryKeyScored() throws {
        let sample = try Sample()
        let index = try #require(try sample.build(.retrieval) as? RetrievalGraphIndex)
        let d = sample.d, k = 50
        try sample.store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            for ef in [1, 8, 30] {
                var p = SearchParameters()
                p.graph.ef = ef
                for i in 0..<20 {
                    try Array(sample.queries[(i * d)..<((i + 1) * d)]).withUnsafeBufferPointer { q in
                        // Reference: ties to the lower id, as the walk's keys order them.
                        func better(_ a: (Float, Int32), _ b: (Float, Int32)) -> Bool { a.0 != b.0 ? a.0 > b.0 : a.1 < b.1 }
                        var visited = Set<Int32>(), scored: [(Float, Int32)] = [], candidates: [(Float, Int32)] = []
                        var beam: [(Float, Int32)] = []
                        func visit(_ n: Int32) {
                            guard visited.insert(n).inserted else { return }
                            let hit = (keys.score(query: q.baseAddress!, row: Int(n)), n)
                            scored.append(hit)
                            if beam.count < ef || better(hit, beam.last!) {
                                beam.append(hit)
                                beam.sort(by: better)
                                if beam.count > ef { beam.removeLast() }
                                candidates.append(hit)
                            }
                        }
                        for e in index.entries { visit(e) }
                        while let best = candidates.min(by: { better($0, $1) }) {
                            candidates.removeAll { $0.1 == best.1 }
                            if beam.count >= ef && better(beam.last!, best) { break }
                            for n in index.graph.neighbours(Int(best.1)) { visit(n) }
                        }
                        let expected = scored.sorted(by: better).prefix(k)
                        let found = try index.search(q, k: k, parameters: p, keys: keys)
                        #expect(found.hits(0).map(\.id) == expected.map { Int($0.1) }, "ef \(ef) query \(i)")
                        #expect(found.hits(0).map(\.score) == expected.map(\.0), "ef \(ef) query \(i)")
                        #expect(found.stats.distanceComputations == scored.count, "ef \(ef) query \(i)")
                    }
                }
            }
        }
    }

    /// HNSW raises a beam narrower than k to k: ef 1 or 3 searches exactly as ef = k.
    @Test func hnswRaisesEfToK() throws {
        let f = try IndexFixture(n: 2000)
        let index = try HNSWIndex(dimension: f.d, M: 8, efConstruction: 60, seed: 4)
        try f.withKeys { try index.add(keys: $0, range: 0..<f.n, progress: nil) }
        try f.withKeys { keys in
            try f.queries.withUnsafeBufferPointer { q in
                var atK = SearchParameters(); atK.graph.ef = 10
                let reference = try index.search(q, k: 10, parameters: atK, keys: keys)
                for ef in [1, 3, 9] {
                    var p = SearchParameters(); p.graph.ef = ef
                    let r = try index.search(q, k: 10, parameters: p, keys: keys)
                    #expect(r.ids == reference.ids && r.scores == reference.scores && r.stats == reference.stats, "ef \(ef)")
                    #expect(r.hits(0).count == 10)
                }
            }
        }
    }
}
