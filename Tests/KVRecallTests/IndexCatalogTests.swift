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

/// The catalog's one header (kind and version, both checked) and the one section reader, for
/// every stored kind: a damaged section or header is `IndexError.corrupt`, never a crash.
@Suite struct IndexCatalogTests {
    /// Every stored kind built small over the first 1024 keys of the real sample (with its prefill queries).
    static func builtIndexes() throws -> (RetrievalGraphIndexTests.Sample, [(IndexKind, any BuildableIndex)]) {
        let sample = try RetrievalGraphIndexTests.Sample(keyRows: 1024)
        var p = IndexBuildParameters()
        p.M = 8; p.efConstruction = 40; p.tables = 8; p.bits = 6; p.nlist = 16; p.graphDegree = 16
        p.trainingQueries = 256; p.queryNeighbours = 20
        let built = try sample.store.read { s in
            try IndexKind.stored.map { kind in
                (kind, try IndexCatalog.build(kind, keys: try s.vectors(HeadID(), .keys), queries: try s.vectors(HeadID(), .queries),
                                              parameters: p))
            }
        }
        return (sample, built)
    }

    /// Saves `index` and returns its stored sections, header included.
    static func stored(_ index: some BuildableIndex, in store: KVStore) throws -> [String: [UInt8]] {
        try IndexCatalog.save(index, in: store, head: HeadID())
        return try #require(try store.loadIndex(HeadID(), name: index.kind.rawValue)?.arrays)
    }

    @Test(arguments: IndexKind.stored)
    func damagedSectionsAreRefusedForEveryKind(kind: IndexKind) throws {
        let (sample, built) = try Self.builtIndexes()
        let index = try #require(built.first { $0.0 == kind }?.1)
        let good = try Self.stored(index, in: sample.store)
        let type = try #require(kind.type)
        // The stored form loads back to the same sections.
        #expect(try IndexCatalog.load(type, from: good, head: HeadID(), name: kind.rawValue).sections() == index.sections())
        expectCorruptVariantsRefused(good, cuts: [0, 1, 7], trailing: 0) {
            _ = try IndexCatalog.load(type, from: $0, head: HeadID(), name: kind.rawValue)
        }
    }

    @Test func headerKindAndVersionAreBothChecked() throws {
        let (sample, built) = try Self.builtIndexes()
        let index: any BuildableIndex = built.first { $0.0 == .hnsw }!.1
        let hnsw = try Self.stored(index, in: sample.store)
        // An HNSW index read as IVF: the header names another kind.
        expectRefusedAsCorrupt(hnsw, "hnsw read as ivf") { _ = try IndexCatalog.load(IVFIndex.self, from: $0, head: HeadID(), name: "ivf") }
        // A newer version of the right kind.
        var newer = hnsw
        var header = ByteWriter()
        header.write(UInt32(HNSWIndex.formatVersion + 1))
        header.write(array: Array("hnsw".utf8))
        newer["header"] = header.bytes
        #expect(throws: IndexError.unsupportedVersion(found: HNSWIndex.formatVersion + 1, supported: HNSWIndex.formatVersion)) {
            try IndexCatalog.load(HNSWIndex.self, from: newer, head: HeadID(), name: "hnsw")
        }
    }

    @Test func hnswEntryPointMustBeOnTheTopLayer() throws {
        let (_, built) = try Self.builtIndexes()
        let good = built.first { $0.0 == .hnsw }!.1.sections()
        // Rewrite the meta with maxLevel one above the entry point's level.
        var meta = ByteReader(good["meta"]!, context: "t")
        var v = try (0..<6).map { _ in try meta.read(Int64.self) }
        let rest = Array(good["meta"]![meta.offset...])
        v[5] += 1
        var w = ByteWriter()
        for x in v { w.write(x) }
        var bad = good
        bad["meta"] = w.bytes + rest
        expectRefusedAsCorrupt(bad, "max level above the entry point") { _ = try HNSWIndex(sections: $0) }
    }

    @Test func trainThenAddEqualsAddAlone() throws {
        // `add` on an untrained index trains on its range first: the same index either way.
        let sample = try RetrievalGraphIndexTests.Sample(keyRows: 1024)
        var p = IndexBuildParameters()
        p.nlist = 16; p.tables = 8; p.bits = 6
        try sample.store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            for kind in [IndexKind.ivf, .tree, .lsh] {
                let a = try IndexCatalog.make(kind, dimension: 32, count: keys.count, parameters: p)
                try a.train(keys: keys, range: 0..<keys.count, queries: nil)
                try a.add(keys: keys, range: 0..<keys.count, progress: nil)
                let b = try IndexCatalog.make(kind, dimension: 32, count: keys.count, parameters: p)
                try b.add(keys: keys, range: 0..<keys.count, progress: nil)
                #expect(a.sections() == b.sections(), "\(kind)")
                #expect(a.isTrained && b.isTrained)
            }
        }
    }

    /// Whether the per-key arrays of `index` are views, and of what: nil when any is owned, else
    /// true when every one is a view of the store's map (no owner), false when of an owned copy.
    static func viewsMap(_ index: any BuildableIndex) -> Bool? {
        func owners(_ arrays: [SectionArray<Int32>]) -> [AnyObject?]? {
            let views = arrays.map(\.view)
            return views.contains { $0 == nil } ? nil : views.map { $0!.owner }
        }
        var found: [AnyObject?]?
        switch index {
        case let h as HNSWIndex:
            found = h.links0.isView && h.upperOffset.isView
                ? owners([h.levels]).map { $0 + [h.upperOffset.viewOwner, h.links0.viewOwner] } : nil
        case let g as RetrievalGraphIndex: found = g.links.isView ? [g.links.viewOwner] : nil
        case let i as IVFIndex: found = i.lists.codes.view != nil ? owners([i.lists.ids]) : nil
        case let t as CentroidTreeIndex: found = t.lists.codes.view != nil ? owners([t.lists.ids]) : nil
        case let l as LSHIndex: found = owners(l.bucketIDs)
        case let m as LandmarkIndex: found = m.sums.view != nil && m.mins.view != nil ? [m.maxs.view?.owner] : nil
        default: return nil
        }
        return found.map { $0.allSatisfy { $0 == nil } }
    }

    /// Issue 11, part 4: an index loaded in a snapshot keeps its per-key arrays as views of the
    /// map (no copy), searches as the built one does, and copies them before it grows; with
    /// `copy` it owns its bytes and outlives the snapshot.
    @Test(arguments: IndexKind.stored)
    func loadedIndexesAreViewsOfTheMapUntilTheyGrow(kind: IndexKind) throws {
        let sample = try RetrievalGraphIndexTests.Sample(keyRows: 1024)
        var p = IndexBuildParameters()
        p.M = 8; p.efConstruction = 40; p.tables = 8; p.bits = 6; p.nlist = 16; p.graphDegree = 16
        p.trainingQueries = 256; p.queryNeighbours = 20; p.threads = 1
        let queries = Array(sample.decode.prefix(8 * sample.d))
        var search = SearchParameters()
        search.graph.ef = 64
        try sample.store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            let built = try IndexCatalog.make(kind, dimension: sample.d, count: keys.count, parameters: p)
            try built.train(keys: keys, range: 0..<768, queries: try s.vectors(HeadID(), .queries))
            try built.add(keys: keys, range: 0..<768, progress: nil)
            try IndexCatalog.save(built, in: sample.store, head: HeadID())
        }
        let copied = try sample.store.read { s -> any BuildableIndex in
            let keys = try s.vectors(HeadID(), .keys)
            let view = try IndexCatalog.load(kind, snapshot: s, head: HeadID())
            #expect(Self.viewsMap(view) == true, "\(kind): loaded arrays are views of the map")
            let reference = try IndexCatalog.make(kind, dimension: sample.d, count: keys.count, parameters: p)
            try reference.train(keys: keys, range: 0..<768, queries: try s.vectors(HeadID(), .queries))
            try reference.add(keys: keys, range: 0..<768, progress: nil)
            #expect(view.sections() == reference.sections())
            try queries.withUnsafeBufferPointer { q in
                let a = try view.search(q, k: 10, parameters: search, keys: keys)
                let b = try reference.search(q, k: 10, parameters: search, keys: keys)
                #expect(a.ids == b.ids, "\(kind)")
            }
            // Growing copies the views first: the same index as growing the built one.
            try view.add(keys: keys, range: 768..<1024, progress: nil)
            try reference.add(keys: keys, range: 768..<1024, progress: nil)
            #expect(Self.viewsMap(view) == nil, "\(kind): grown arrays are owned")
            #expect(view.sections() == reference.sections(), "\(kind)")
            let copy = try IndexCatalog.load(kind, snapshot: s, head: HeadID(), copy: true)
            #expect(Self.viewsMap(copy) == false, "\(kind): a copy's arrays view its own bytes")
            return copy
        }
        // The copy is valid after its snapshot ended, across a write that reuses pages.
        try IndexCatalog.save(copied, in: sample.store, head: HeadID(), name: "again")
        try sample.store.read { s in
            let again = try IndexCatalog.load(kind.type!, from: try s.index(HeadID(), name: "again"), head: HeadID(), name: "again")
            #expect(again.sections() == copied.sections())
        }
    }

    /// A view index is valid in any snapshot of its identity, and refuses, with an error naming
    /// `copy: true`, the keys of a snapshot taken after a commit (instead of reading reused pages).
    @Test func aViewIndexIsBoundToItsSnapshotIdentity() throws {
        let sample = try RetrievalGraphIndexTests.Sample(keyRows: 1024)
        var p = IndexBuildParameters()
        p.M = 8; p.efConstruction = 40
        try sample.store.read { s in
            try IndexCatalog.save(try IndexCatalog.build(.hnsw, keys: try s.vectors(HeadID(), .keys), parameters: p),
                                  in: sample.store, head: HeadID())
        }
        let query = Array(sample.decode.prefix(sample.d))
        let view = try sample.store.read { s in try IndexCatalog.load(.hnsw, snapshot: s, head: HeadID()) }
        #expect(view.mapSnapshot != nil)
        // A later snapshot of the same commit: the pages are still the index's.
        let first = try sample.store.read { s in
            try query.withUnsafeBufferPointer { try view.search($0, k: 5, parameters: SearchParameters(), keys: try s.vectors(HeadID(), .keys)).ids }
        }
        #expect(first.count == 5)
        try sample.store.saveIndex(HeadID(), name: "other", sections: ["a": [1]])
        try sample.store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            let refused: (any Error) -> Bool = { "\($0)".contains("copy: true") }
            #expect(performing: { try query.withUnsafeBufferPointer { try view.search($0, k: 5, parameters: SearchParameters(), keys: keys) } },
                    throws: refused)
            #expect(performing: { try view.add(keys: keys, range: view.count..<keys.count, progress: nil) }, throws: refused)
            // A heap copy of the keys may outlive any snapshot: refused too.
            let view2 = try IndexCatalog.load(.hnsw, snapshot: s, head: HeadID())
            #expect(performing: {
                try query.withUnsafeBufferPointer { try view2.search($0, k: 5, parameters: SearchParameters(), keys: keys.materialized()) }
            }, throws: refused)
            let copy = try IndexCatalog.load(.hnsw, snapshot: s, head: HeadID(), copy: true)
            #expect(copy.mapSnapshot == nil)
            #expect(try query.withUnsafeBufferPointer { try copy.search($0, k: 5, parameters: SearchParameters(), keys: keys).ids } == first)
        }
    }

    /// Counts a damaged section could use to make `add` write past a node's slots or a search read
    /// past a list are refused as corrupt (found by review): the graph's per-node edge counts above
    /// their parts of the slot or overflowing Int32, an HNSW upper-layer list longer than M.
    @Test func damagedEdgeCountsAreRefusedNotTrusted() throws {
        let (sample, built) = try Self.builtIndexes()
        let graph = try #require(built.first { $0.0 == .retrieval }?.1 as? RetrievalGraphIndex)
        let good = graph.sections()
        // The stored graph: entry points, each node's count slot offset, the packed lists (count, then
        // ids, node after node), then the per-node projected and local counts and cursors.
        func rewrite(_ edit: (inout [[Int32]], inout [Int32], inout [Int32]) -> Void, offsets tamper: ((inout [Int32]) -> Void)? = nil) throws -> [String: [UInt8]] {
            var r = ByteReader(good["graph"]!, context: "t")
            let entries = try r.readArray(Int32.self)
            let offsets = try r.readAlignedArray(Int32.self).array, packed = try r.readAlignedArray(Int32.self).array
            var lists = (0..<graph.count).map { i in Array(packed[(Int(offsets[i]) + 1)..<Int(offsets[i + 1])]) }
            var projection = try r.readArray(Int32.self), local = try r.readArray(Int32.self)
            let cursors = try r.readArray(UInt8.self)
            edit(&lists, &projection, &local)
            var newOffsets: [Int32] = [], newPacked: [Int32] = []
            for list in lists { newOffsets.append(Int32(newPacked.count)); newPacked += [Int32(list.count)] + list }
            newOffsets.append(Int32(newPacked.count))
            tamper?(&newOffsets)
            var w = ByteWriter()
            w.write(array: entries); w.write(alignedArray: newOffsets); w.write(alignedArray: newPacked)
            w.write(array: projection); w.write(array: local); w.write(array: cursors)
            var sections = good
            sections["graph"] = w.bytes
            return sections
        }
        #expect(throws: Never.self) { _ = try RetrievalGraphIndex(sections: try rewrite { _, _, _ in }) }
        let full = graph.M + graph.localNeighbours + graph.connectivitySlots
        // Node 0 full of valid edges, all of them counted as projected: more than M.
        expectRefusedAsCorrupt(try rewrite { lists, projection, local in
            lists[0] = (1...full).map(Int32.init)
            projection[0] = Int32(full); local[0] = 0
        }, "projected edges above M") { _ = try RetrievalGraphIndex(sections: $0) }
        expectRefusedAsCorrupt(try rewrite { _, projection, local in projection[0] = .max; local[0] = 1 },
                               "counts overflowing Int32") { _ = try RetrievalGraphIndex(sections: $0) }
        // Offsets that do not chain each list to the next, or point past the lists.
        expectRefusedAsCorrupt(try rewrite({ _, _, _ in }, offsets: { $0[1] += 1 }), "offsets out of step") {
            _ = try RetrievalGraphIndex(sections: $0)
        }
        expectRefusedAsCorrupt(try rewrite({ _, _, _ in }, offsets: { $0[1] = .max }), "an offset past the lists") {
            _ = try RetrievalGraphIndex(sections: $0)
        }

        let hnsw = try #require(built.first { $0.0 == .hnsw }?.1 as? HNSWIndex)
        let node = try #require((0..<hnsw.count).first { hnsw.levels[$0] > 0 })
        var sections = hnsw.sections()
        var r = ByteReader(sections["graph"]!, context: "t")
        let links0 = try r.readAlignedArray(Int32.self).array, levels = try r.readAlignedArray(Int32.self).array
        let offsets = try r.readAlignedArray(Int32.self).array
        var upper = try r.readAlignedArray(Int32.self).array
        upper[Int(offsets[node])] = 1000
        var w = ByteWriter()
        w.write(alignedArray: links0); w.write(alignedArray: levels); w.write(alignedArray: offsets); w.write(alignedArray: upper)
        sections["graph"] = w.bytes
        expectRefusedAsCorrupt(sections, "an upper-layer list longer than M") { _ = try HNSWIndex(sections: $0) }

        // An index over more keys than the head holds is refused by every kind's search.
        let query = Array(sample.decode.prefix(sample.d))
        try sample.store.read { s in
            let fewer = try s.vectors(HeadID(), .keys).limited(to: 100)
            for (kind, index) in built {
                #expect(throws: IndexError.self, "\(kind)") {
                    try query.withUnsafeBufferPointer { try index.search($0, k: 5, parameters: SearchParameters(), keys: fewer) }
                }
            }
        }
    }

    /// Each kind's descriptor is the catalog's one source: it makes an index of its own type and
    /// kind, and a kind with a knob has an ascending ladder ending inside what the index can use.
    @Test(arguments: IndexCatalog.descriptors)
    func everyDescriptorMakesItsOwnKind(descriptor: IndexDescriptor) throws {
        let f = try IndexFixture(n: 1024, d: 16, queryCount: 8)
        try f.store.read { snapshot in
            let keys = try snapshot.vectors(f.id, .keys)
            let index = try IndexCatalog.build(descriptor.kind, keys: keys, queries: keys, parameters: IndexBuildParameters())
            #expect(type(of: index) == descriptor.type)
            #expect(index.kind == descriptor.kind && descriptor.kind.descriptor?.kind == descriptor.kind)
            #expect(SearchKnob(kind: descriptor.kind) == descriptor.knob)
            let ladder = descriptor.ladder(index, 10)
            if descriptor.knob == nil {
                #expect(ladder.isEmpty)
            } else {
                // In order of rising recall: wider beams and more probes, fewer required collisions.
                let rising = descriptor.knob == .minCollisions ? ladder.sorted(by: >) : ladder.sorted()
                #expect(!ladder.isEmpty && ladder == rising && Set(ladder).count == ladder.count)
            }
            #expect(!descriptor.describe(SearchParameters()).isEmpty)
        }
        #expect(IndexKind.stored == IndexCatalog.descriptors.map(\.kind))
        #expect(IndexKind.flat.descriptor == nil && IndexKind.hip.descriptor == nil)
    }
}
