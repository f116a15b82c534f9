import Foundation
import Testing
import CKernels
@testable import KVRecall
@testable import KVRecallSupport
@testable import KVRecallKernels
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallSession
import KVRecallTestSupport

@Suite struct HNSWIndexTests {
    func build(_ f: IndexFixture, M: Int = 16, efC: Int = 100, threads: Int = 2, upTo: Int? = nil) throws -> HNSWIndex {
        let index = try HNSWIndex(dimension: f.d, M: M, efConstruction: efC, seed: 9, threads: threads)
        try f.withKeys { try index.add(keys: $0, range: 0..<(upTo ?? f.n), progress: nil) }
        return index
    }

    @Test func recallMeetsFloorAndEfTradesWork() throws {
        let f = try IndexFixture()
        let index = try build(f)
        var low = SearchParameters(); low.graph.ef = 16
        var high = SearchParameters(); high.graph.ef = 128
        let (r16, s16) = try f.recall(of: index, k: 10, parameters: low)
        let (r128, s128) = try f.recall(of: index, k: 10, parameters: high)
        // Documented floor: M=16, efConstruction=100, ef=128 on 4096 x 32 clustered keys.
        #expect(r128 >= 0.95, "recall@10 \(r128)")
        #expect(r128 >= r16)
        #expect(s128.keysScannedFraction > s16.keysScannedFraction)
        #expect(s128.keysScannedFraction < 0.5)
    }

    @Test func sameSeedSameGraphWhateverTheThreadCount() throws {
        let f = try IndexFixture(n: 1500)
        let a = try build(f, threads: 1)
        let b = try build(f, threads: 2)
        #expect(a.sections() == b.sections())
    }

    /// A wide build (candidate lists past the 512-key sort buffer, which then grows) is the same
    /// index whatever the thread count, and finds what a narrower one finds: the growth once freed
    /// the beam under its reader.
    @Test func wideBuildsGrowTheSortBufferSafely() throws {
        let f = try IndexFixture(n: 1200)
        let a = try build(f, efC: 600, threads: 1)
        let b = try build(f, efC: 600, threads: 2)
        #expect(a.sections() == b.sections())
        var p = SearchParameters(); p.graph.ef = 128
        #expect(try f.recall(of: a, k: 10, parameters: p).0 >= 0.95)
    }

    /// The sorted beam (`walkGraph`) expands exactly the nodes HNSW's two heaps do: same
    /// results, same number of scored keys, against a plain two-heap search-layer.
    @Test func beamSearchMatchesTheTwoHeapSearchLayer() throws {
        let f = try IndexFixture(n: 3000)
        let index = try build(f)
        try f.withKeys { keys in
            let scratch = GraphScratch(dimension: f.d, capacity: index.count)
            for q in 0..<f.queries.count / f.d {
                try f.queries.withUnsafeBufferPointer { all in
                    let query = all.baseAddress! + q * f.d
                    let start = Int32(q * 37 % index.count)
                    let startScore = keys.score(query: query, row: Int(start))
                    for ef in [1, 10, 64] {
                        // Reference: candidates max-heap, results min-heap bounded by ef.
                        var visited = Set([start])
                        var candidates = [(startScore, start)], results = [(startScore, start)]
                        var scored = 0
                        while let best = candidates.max(by: { $0.0 < $1.0 }) {
                            candidates.removeAll { $0 == best }
                            let worst = results.min(by: { $0.0 < $1.0 })!.0
                            if results.count >= ef && best.0 < worst { break }
                            for n in index.neighbours(Int(best.1), level: 0) where visited.insert(n).inserted {
                                let s = keys.score(query: query, row: Int(n))
                                scored += 1
                                let bottom = results.min(by: { $0.0 < $1.0 })!.0
                                if results.count < ef || s > bottom {
                                    candidates.append((s, n))
                                    results.append((s, n))
                                    if results.count > ef { results.removeAll { $0.0 == bottom } }
                                }
                            }
                        }
                        scratch.computations = 0
                        [start].withUnsafeBufferPointer { entry in
                            var entryScore = startScore
                            walkGraph(index.layer(0), SingleQuery(query: query), keys: keys, entries: entry,
                                      entryScores: &entryScore, width: ef, limit: index.count, scratch: scratch)
                        }
                        let (beamKeys, size) = scratch.beam()
                        let beam = (0..<size).map { beamKeys[$0] & ~1 }
                        let found = beam.map { GraphKey.unpack($0).id }.sorted()
                        #expect(found == results.map(\.1).sorted(), "query \(q) ef \(ef)")
                        #expect(scratch.computations == scored, "query \(q) ef \(ef)")
                        // The beam is sorted best first.
                        #expect(beam == beam.sorted(by: >))
                    }
                }
            }
        }
    }

    /// The orphan repair gives a node without an incoming layer-0 edge one from a neighbour (or a
    /// neighbour's neighbour) whose list holds fewer than M edges, never from a long list such as
    /// a hub's: a hub filled with repair edges made every walk through it score 2M keys.
    @Test func orphansAreRepairedFromShortListsNotHubs() throws {
        let f = try IndexFixture(n: 12)
        let index = try build(f, M: 4, efC: 20)
        let hub = Int(index.entryPoint)
        let others = (0..<12).filter { $0 != hub }
        func set(_ node: Int, _ list: [Int]) {
            let slot = index.layer(0).slot(node)
            slot[0] = Int32(list.count)
            for (i, n) in list.enumerated() { slot[1 + i] = Int32(n) }
        }
        // The hub lists six nodes (room for eight, but more than M); they and five orphans list the hub.
        let listed = Array(others.prefix(6)), orphans = Array(others.dropFirst(6))
        set(hub, listed)
        for n in others { set(n, [hub]) }
        index.repairOrphans()
        #expect(index.neighbours(hub, level: 0).map(Int.init) == listed, "the hub's list is left as it was")
        var incoming = [Int](repeating: 0, count: 12)
        for n in 0..<12 { for m in index.neighbours(n, level: 0) { incoming[Int(m)] += 1 } }
        for o in orphans { #expect(incoming[o] == 1, "orphan \(o) is linked once") }
        for n in listed {
            let list = index.neighbours(n, level: 0).map(Int.init)
            #expect(list.count <= index.M && list[0] == hub, "node \(n) took repair edges up to M: \(list)")
        }
    }

    @Test func persistenceRoundTripGivesIdenticalResults() throws {
        let f = try IndexFixture(n: 2000)
        let index = try build(f)
        try IndexCatalog.save(index, in: f.store, head: f.id)
        let loaded = try IndexCatalog.load(HNSWIndex.self, from: try f.store.loadIndex(f.id, name: "hnsw"), head: f.id, name: "hnsw")
        var p = SearchParameters(); p.graph.ef = 40
        try f.withKeys { keys in
            try f.queries.withUnsafeBufferPointer { q in
                let a = try index.search(q, k: 10, parameters: p, keys: keys)
                let b = try loaded.search(q, k: 10, parameters: p, keys: keys)
                #expect(a.ids == b.ids && a.scores == b.scores)
                #expect(a.stats == b.stats)
            }
        }
    }

    @Test func incrementalAddFindsTheNewKeys() throws {
        let f = try IndexFixture(n: 2000)
        let index = try build(f, upTo: 1500)
        #expect(index.count == 1500)
        // Keys 1500..<2000 are not indexed yet: a query equal to key 1700 cannot find it.
        let probe = Array(f.keys[(1700 * f.d)..<(1701 * f.d)])
        var p = SearchParameters(); p.graph.ef = 64
        let before = try f.withKeys { keys in try probe.withUnsafeBufferPointer { try index.search($0, k: 5, parameters: p, keys: keys) } }
        #expect(!before.ids.contains(1700))
        try f.withKeys { try index.add(keys: $0, range: 1500..<2000, progress: nil) }
        #expect(index.count == 2000)
        let (r, _) = try f.recall(of: index, k: 10, parameters: p)
        #expect(r >= 0.9)
        let exact = try f.exact(k: 5, queries: probe)[0]
        let after = try f.withKeys { keys in try probe.withUnsafeBufferPointer { try index.search($0, k: 5, parameters: p, keys: keys) } }
        #expect(after.ids.contains(exact[0]))
    }

    @Test func badParametersAndCorruptSectionsAreErrors() throws {
        #expect(throws: IndexError.invalidParameter("M must be at least 2 (got 1)")) { try HNSWIndex(dimension: 8, M: 1) }
        let f = try IndexFixture(n: 300)
        let index = try build(f, M: 4, efC: 20)
        try f.withKeys { keys in
            let q = [Float](repeating: 1, count: f.d)
            #expect(throws: IndexError.self) { try q.withUnsafeBufferPointer { try index.search($0, k: 301, parameters: SearchParameters(), keys: keys) } }
            var zero = SearchParameters(); zero.graph.ef = 0
            #expect(throws: IndexError.invalidParameter("ef must be at least 1")) {
                try q.withUnsafeBufferPointer { try index.search($0, k: 1, parameters: zero, keys: keys) }
            }
            #expect(throws: IndexError.invalidParameter("HNSW adds keys in order: expected a range starting at 300 within 300 keys, got 0..<10")) {
                try index.add(keys: keys, range: 0..<10, progress: nil)
            }
        }
        var sections = index.sections()
        sections["graph"]!.removeLast(7)
        #expect(throws: IndexError.self) { try HNSWIndex(sections: sections) }
        var bad = index.sections()
        // Point a layer-0 link at a node that does not exist.
        var graph = ByteReader(bad["graph"]!, context: "t")
        var links = try graph.readAlignedArray(Int32.self).array
        links[1] = 1_000_000
        var w = ByteWriter()
        w.write(alignedArray: links)
        bad["graph"] = w.bytes + Array(bad["graph"]!.dropFirst(w.bytes.count))
        #expect(throws: IndexError.self) { try HNSWIndex(sections: bad) }
        #expect(throws: IndexError.notBuilt("no 'hnsw' index for head 0/0/0; build it first with `kvrecall build --index hnsw`")) {
            try IndexCatalog.load(HNSWIndex.self, from: nil as IndexSections?, head: HeadID(), name: "hnsw")
        }
    }
}

@Suite struct HNSWBuildKernelTests {
    @Test func candidateKeysSortByScoreThenLowerID() {
        var rng = SeededGenerator(seed: 12)
        for n in [0, 1, 2, 23, 24, 25, 200, 513] {
            var keys = (0..<n).map { _ in rng.next() }
            if n > 10 { for i in 0..<5 { keys[i] = keys[n - 1 - i] } }  // duplicates
            let expected = keys.sorted()
            keys.withUnsafeMutableBufferPointer { kvr_sort_u64($0.baseAddress, n) }
            #expect(keys == expected)
        }
        // Keys order candidates by score (negative, zero, positive), ties to the lower id, and unpack.
        // Listed worst first.
        let candidates: [(Float, Int32)] = [(-3, 4), (-0.5, 1), (0, 9), (0, 2), (1e-3, 0), (2.5, 7), (2.5, 3), (100, Int32.max)]
        for (a, b) in zip(candidates, candidates.dropFirst()) {
            let ka = GraphKey.make(a.0, a.1), kb = GraphKey.make(b.0, b.1)
            #expect(ka < kb, "\(a) should rank below \(b)")
        }
        for c in candidates {
            let u = GraphKey.unpack(GraphKey.make(c.0, c.1))
            #expect(u.score == c.0 && u.id == c.1)
            // Bit 0 (the beam search's expanded mark) changes neither the unpacked pair nor the order.
            let marked = GraphKey.unpack(GraphKey.make(c.0, c.1) | 1)
            #expect(marked.score == c.0 && marked.id == c.1)
        }
        for (a, b) in zip(candidates, candidates.dropFirst()) {
            #expect(GraphKey.make(a.0, a.1) | 1 < GraphKey.make(b.0, b.1))
        }
    }
}
