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

@Suite struct CentroidTreeIndexTests {
    static func build(_ f: ClusteredFixture, levels: Int = 2, fineFraction: Double = 0.05, metric: ClusterMetric = .l2,
                      seed: UInt64 = 42, threads: Int = 2, count: Int? = nil) throws -> CentroidTreeIndex {
        let index = try CentroidTreeIndex(dimension: f.d, levels: levels, fineFraction: fineFraction, metric: metric,
                                          iterations: 12, seed: seed, threads: threads)
        try f.read { keys in try index.add(keys: keys, range: 0..<(count ?? keys.count), progress: nil) }
        return index
    }

    static func beam(_ b: Int, threads: Int = 1) -> SearchParameters {
        var p = SearchParameters()
        p.tree.beam = b
        p.threads = threads
        return p
    }

    func threshold(_ f: ClusteredFixture, _ index: CentroidTreeIndex, k: Int, beam: Int? = nil, _ t: Float,
                   queries: [Float]? = nil) throws -> SearchResults {
        try f.read { keys in
            try (queries ?? f.queries).withUnsafeBufferPointer {
                try index.search($0, k: k, beam: beam, threshold: t, keys: keys)
            }
        }
    }

    @Test(arguments: ClusterMetric.allCases)
    func shapeAndRecallAgainstFlat(metric: ClusterMetric) throws {
        let f = try ClusteredFixture()
        let index = try Self.build(f, metric: metric)
        #expect(index.levelCounts == [205, 26])  // 5% of 4096, then 1/8
        #expect(index.clusterSizes(level: 0).reduce(0, +) == f.n)
        #expect(index.clusterSizes(level: 1).reduce(0, +) == f.n)
        let exact = try f.exact(k: 10)
        // Measured: beam 16 recall 0.890 (l2) / 0.915 (ip) scanning 7.0% / 7.8% of keys;
        // beam 32 0.958 / 0.965, 14.6% / 15.6%.
        let narrow = try f.search(index, k: 10, Self.beam(16))
        #expect(meanRecall(narrow, exact) >= 0.85)
        #expect(narrow.stats.keysScannedFraction < 0.1)
        // Top level in full, then at most 16 expanded nodes' children.
        #expect(narrow.stats.auxiliaryComputations >= f.queryCount * 26)
        let wide = try f.search(index, k: 10, Self.beam(32))
        #expect(meanRecall(wide, exact) >= 0.93)
        // A beam as wide as the fine level is exact.
        let all = try f.search(index, k: 10, Self.beam(205))
        #expect(meanRecall(all, exact) == 1 && all.stats.keysScannedFraction == 1)
        for q in 0..<3 {
            let one = Array(f.queries[(q * f.d)..<((q + 1) * f.d)])
            #expect(try f.search(index, k: 10, Self.beam(1000), queries: one).hits(0).map(\.id) == (try f.exactSingle(k: 10, query: q)))
        }
    }

    @Test func beamBoundsTheWork() throws {
        let f = try ClusteredFixture(queryCount: 8)
        let index = try Self.build(f)
        let fine = index.clusterSizes(level: 0)
        let widestFine = fine.max()!
        for b in [1, 4, 12] {
            for q in 0..<8 {
                let one = Array(f.queries[(q * f.d)..<((q + 1) * f.d)])
                let r = try f.search(index, k: 5, Self.beam(b), queries: one)
                #expect(r.stats.distanceComputations <= b * widestFine)
                #expect(r.stats.distanceComputations > 0)
                #expect(r.stats.keysScannedFraction < 1)
            }
        }
    }

    @Test func thresholdDescent() throws {
        let f = try ClusteredFixture()
        let index = try Self.build(f)
        let exact = try f.exact(k: 10)
        // Threshold 0 keeps every non-empty node: exact.
        let zero = try threshold(f, index, k: 10, 0)
        #expect(meanRecall(zero, exact) == 1 && zero.stats.keysScannedFraction == 1)
        // Measured: threshold 0.01 recall 0.902 scanning 6.6% of keys; 0.001 0.994, 36%.
        let tight = try threshold(f, index, k: 10, 0.01)
        #expect(meanRecall(tight, exact) >= 0.85)
        #expect(tight.stats.keysScannedFraction < 0.1)
        let loose = try threshold(f, index, k: 10, 0.001)
        #expect(meanRecall(loose, exact) >= 0.97)
        #expect(tight.stats.keysScannedFraction < loose.stats.keysScannedFraction)
        // Threshold 1 keeps only the best node per level; a beam cap bounds a loose threshold.
        let one = try threshold(f, index, k: 10, 1)
        #expect(one.stats.distanceComputations <= f.queryCount * index.clusterSizes(level: 0).max()!)
        let capped = try threshold(f, index, k: 10, beam: 2, 0)
        #expect(capped.stats.distanceComputations <= f.queryCount * 2 * index.clusterSizes(level: 0).max()!)
        try f.read { keys in
            f.queries.withUnsafeBufferPointer { q in
                #expect(throws: IndexError.invalidParameter("threshold must be in [0, 1] (got 1.5)")) {
                    try index.search(q, k: 10, threshold: 1.5, keys: keys)
                }
                #expect(throws: IndexError.invalidParameter("beam must be at least 1 (got 0)")) {
                    try index.search(q, k: 10, beam: 0, threshold: 0.1, keys: keys)
                }
                #expect(throws: IndexError.invalidParameter("scale must be positive (got -1.0)")) {
                    try index.search(q, k: 10, threshold: 0.1, scale: -1, keys: keys)
                }
            }
        }
    }

    @Test func threeLevelsAndThreads() throws {
        let f = try ClusteredFixture(queryCount: 40)
        let index = try Self.build(f, levels: 3)
        #expect(index.levelCounts == [205, 26, 4])
        #expect(index.clusterSizes(level: 2).reduce(0, +) == f.n)
        let exact = try f.exact(k: 10)
        #expect(meanRecall(try f.search(index, k: 10, Self.beam(205)), exact) == 1)
        let b = try f.search(index, k: 10, Self.beam(16))
        #expect(meanRecall(b, exact) >= 0.85)
        let threaded = try f.search(index, k: 10, Self.beam(16, threads: 3))
        #expect(threaded.ids == b.ids && threaded.stats == b.stats)
    }

    @Test func persistenceRoundTrips() throws {
        let f = try ClusteredFixture(n: 2048, queryCount: 16)
        let index = try Self.build(f, levels: 3)
        let sections = index.sections()
        #expect(try Self.build(f, levels: 3, threads: 1).sections() == sections)
        #expect(try Self.build(f, levels: 3, seed: 7).sections() != sections)
        let restored = try CentroidTreeIndex(sections: sections)
        #expect(restored.sections() == sections && restored.levelCounts == index.levelCounts)
        let a = try f.search(index, k: 10, Self.beam(6))
        #expect(try f.search(restored, k: 10, Self.beam(6)).ids == a.ids)
        try IndexCatalog.save(index, in: f.store, head: HeadID())
        let loaded = try IndexCatalog.load(CentroidTreeIndex.self, from: try f.store.loadIndex(HeadID(), name: "tree"),
                                           head: HeadID(), name: "tree")
        let b = try f.search(loaded, k: 10, Self.beam(6))
        #expect(b.ids == a.ids && b.scores == a.scores)
        #expect(try threshold(f, loaded, k: 10, 0.02).ids == (try threshold(f, index, k: 10, 0.02)).ids)
        let empty = try CentroidTreeIndex(dimension: 8, levels: 4)
        let back = try CentroidTreeIndex(sections: empty.sections())
        #expect(back.count == 0 && back.levels == 4 && !back.isTrained)
    }

    @Test func incrementalAddFindsNewKeys() throws {
        let f = try ClusteredFixture(n: 3000, queryCount: 2)
        let index = try Self.build(f)
        let shape = index.levelCounts
        let q = Array(f.queries[0..<f.d])
        let norm = q.reduce(0) { $0 + $1 * $1 }.squareRoot()
        let far = (0..<12).flatMap { j in q.map { $0 / norm * Float(60 + j) } }
        try f.append(far)
        try f.read { keys in try index.add(keys: keys, range: 3000..<3012, progress: nil) }
        #expect(index.count == 3012 && index.levelCounts == shape)
        #expect(index.clusterSizes(level: 1).reduce(0, +) == 3012)
        let r = try f.search(index, k: 12, Self.beam(8), queries: q)
        #expect(r.hits(0).map(\.id) == Array((3000..<3012).reversed()))
        let t = try threshold(f, index, k: 12, 0.05, queries: q)
        #expect(t.hits(0).map(\.id) == Array((3000..<3012).reversed()))
        #expect(Set(index.lists.ids.map(Int.init)) == Set(0..<3012))
    }

    @Test func rejectsBadParameters() throws {
        let f = try ClusteredFixture(n: 400, queryCount: 2)
        let index = try Self.build(f)
        #expect(throws: IndexError.invalidParameter("beam must be at least 1 (got 0)")) { try f.search(index, k: 5, Self.beam(0)) }
        #expect(throws: IndexError.invalidParameter("k = 401 exceeds the 400 keys of head 0/0/0")) { try f.search(index, k: 401) }
        #expect(throws: IndexError.dimensionMismatch(expected: 32, actual: 33)) {
            try f.search(index, k: 5, queries: [Float](repeating: 1, count: 33))
        }
        #expect(throws: IndexError.invalidParameter("levels must be in 2...32 (got 1)")) { try CentroidTreeIndex(dimension: 4, levels: 1) }
        #expect(throws: IndexError.invalidParameter("fine fraction must be in (0, 1] (got 0.0)")) {
            try CentroidTreeIndex(dimension: 4, fineFraction: 0)
        }
        #expect(throws: IndexError.invalidParameter("fine fraction must be in (0, 1] (got 1.5)")) {
            try CentroidTreeIndex(dimension: 4, fineFraction: 1.5)
        }
        let narrow = try CentroidTreeIndex(dimension: 16)
        #expect(throws: IndexError.dimensionMismatch(expected: 16, actual: 32)) {
            try f.read { keys in try narrow.add(keys: keys, range: 0..<400, progress: nil) }
        }
        #expect(throws: IndexError.notBuilt("the centroid tree is empty; add keys first")) {
            try f.search(try CentroidTreeIndex(dimension: 32), k: 5)
        }
        // fineFraction 1: one key per fine cluster at most, still a valid tree.
        let full = try Self.build(f, fineFraction: 1)
        #expect(full.levelCounts == [400, 50])
        #expect(meanRecall(try f.search(full, k: 5, Self.beam(400)), try f.exact(k: 5)) == 1)
    }

    @Test func corruptSectionsThrow() throws {
        let f = try ClusteredFixture(n: 500, queryCount: 1)
        let good = try Self.build(f, levels: 3).sections()
        expectCorruptVariantsRefused(good, cuts: [0, 1, 9], trailing: 1) { _ = try CentroidTreeIndex(sections: $0) }
        func expectCorrupt(_ sections: [String: [UInt8]], _ label: String) {
            expectRefusedAsCorrupt(sections, label) { _ = try CentroidTreeIndex(sections: $0) }
        }
        // Child offsets that do not cover the level below.
        var tree = ByteReader(good["tree"]!, context: "test")
        var offsets = [try tree.readArray(Int64.self), try tree.readArray(Int64.self)]
        let kind = try tree.read(UInt8.self)
        let vmin = try tree.readFloatArray(), vdiff = try tree.readFloatArray()
        let listOffsets = try tree.readArray(Int64.self)
        let ids = try tree.readAlignedArray(Int32.self).array
        let codes = try tree.readAlignedArray(UInt8.self).array
        func treeSection(_ o: [[Int64]], _ lo: [Int64], _ i: [Int32], codes c: [UInt8]? = nil) -> [String: [UInt8]] {
            var w = ByteWriter()
            for a in o { w.write(array: a) }
            w.write(kind)
            w.write(array: vmin)
            w.write(array: vdiff)
            w.write(array: lo)
            w.write(alignedArray: i)
            w.write(alignedArray: c ?? codes)
            var s = good
            s["tree"] = w.bytes
            return s
        }
        #expect(throws: Never.self) { _ = try CentroidTreeIndex(sections: treeSection(offsets, listOffsets, ids)) }
        offsets[1][offsets[1].count - 1] += 1
        expectCorrupt(treeSection(offsets, listOffsets, ids), "child offsets past the level")
        offsets[1][offsets[1].count - 1] -= 1
        offsets[0][1] = -5
        expectCorrupt(treeSection(offsets, listOffsets, ids), "negative child offset")
        offsets[0][1] = 0
        var badIDs = ids
        badIDs[0] = -1
        expectCorrupt(treeSection(offsets, listOffsets, badIDs), "negative key id")
        expectCorrupt(treeSection(offsets, listOffsets, ids, codes: codes + [0]), "codes too long")
        var rng = SeededRandom(seed: 2)
        for _ in 0..<60 {
            let name = good.keys.sorted()[Int(rng.next() % 3)]
            var t = good
            let at = Int(rng.next() % UInt64(good[name]!.count))
            t[name]![at] ^= UInt8(1 << (rng.next() % 8))
            if let index = try? CentroidTreeIndex(sections: t), index.dimension == f.d, index.count <= f.n {
                _ = try f.search(index, k: 5, Self.beam(1000))
            }
        }
    }
}
