import CLMDB
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

@Suite struct StorageTests {
    @Test(arguments: DType.allCases)
    func roundTripAcrossPartialBlocksAndReopen(dtype: DType) throws {
        let dir = TemporaryDirectory()
        var rng = SeededRandom(seed: 7)
        let d = 24
        let id = HeadID(context: 3, layer: 1, head: 2)
        // Three appends of awkward sizes so partial blocks are completed and extended.
        let sizes = [5, 37, 70]
        let keys = rng.gaussianMatrix(rows: sizes.reduce(0, +), dim: d)
        let values = rng.gaussianMatrix(rows: sizes.reduce(0, +), dim: d)
        do {
            let store = try KVStore(path: dir.path, create: true)
            try store.createHead(id, dimension: d, dtype: dtype, blockSize: 16)
            var start = 0
            for n in sizes {
                let span = (start * d)..<((start + n) * d)
                try keys.withUnsafeBufferPointer { kb in
                    try values.withUnsafeBufferPointer { vb in
                        try store.append(id, keys: UnsafeBufferPointer(rebasing: kb[span]),
                                         values: UnsafeBufferPointer(rebasing: vb[span]), rowsPerTransaction: 9)
                    }
                }
                start += n
            }
            store.close()
        }
        let store = try KVStore(path: dir.path)
        defer { store.close() }
        let info = try store.info(id)
        #expect(info.count == 112 && info.dimension == d && info.dtype == dtype && info.blockSize == 16)
        let back = try store.copyVectors(id, .keys)
        let tolerance: Float = dtype == .f32 ? 0 : (dtype == .f16 ? 2e-3 : 1.6e-2)
        for i in 0..<keys.count {
            #expect(abs(back[i] - keys[i]) <= tolerance * max(1, abs(keys[i])))
        }
        let partial = try store.copyVectors(id, .values, range: 30..<50)
        #expect(partial.count == 20 * d)
        #expect(abs(partial[0] - values[30 * d]) <= tolerance * max(1, abs(values[30 * d])))
        #expect(try store.heads().map(\.id) == [id])
    }

    /// Head records written on the append path (counts spliced into a cached encoding) are the bytes
    /// JSONEncoder writes, for metadata that quotes the count keys themselves, and decode back.
    @Test func headRecordsSplicedAreJSONEncodersBytes() throws {
        let cache = HeadRecordCache()
        var info = HeadInfo(id: HeadID(context: 1, layer: 2, head: 3), dimension: 64, dtype: .f16, blockSize: 256, count: 0,
                            queryCount: 0, metadata: ["count": "0", "note": "\"count\":0, \"queryCount\":0 / é"],
                            codes: CodeFormat(group: 64))
        for (count, queries) in [(0, 0), (1, 0), (9, 10), (65_536, 1), (Int(Int32.max) + 5, 123_456)] {
            info.count = count
            info.queryCount = queries
            let bytes = try cache.encode(info)
            #expect(bytes == (try HeadRecordCache.json(info)))
            let decoded = try bytes.withUnsafeBytes { try KVStore.decodeInfo($0, path: "test") }
            #expect(decoded == info)
            // Read back through a cold cache and the warm one.
            #expect(try bytes.withUnsafeBytes { try HeadRecordCache().decode($0, path: "test") } == info)
            #expect(try bytes.withUnsafeBytes { try cache.decode($0, path: "test") } == info)
        }
        // Another field changed: a new template.
        info.metadata["note"] = "changed"
        info.codes = nil
        #expect(try cache.encode(info) == (try HeadRecordCache.json(info)))
    }

    @Test func mapGrowsFromATinyMap() throws {
        let dir = TemporaryDirectory()
        var options = Environment.Options()
        options.mapSize = 256 * 1024
        options.noSync = true
        let store = try KVStore(path: dir.path, create: true, options: options)
        defer { store.close() }
        let d = 64
        let rows = 20_000  // 5 MB of keys + 5 MB of values, ~40x the initial map
        var rng = SeededRandom(seed: 1)
        let keys = rng.gaussianMatrix(rows: rows, dim: d)
        try store.createHead(HeadID(), dimension: d, dtype: .f32)
        try keys.withUnsafeBufferPointer { kb in
            try store.append(HeadID(), keys: kb, values: kb, rowsPerTransaction: 4096)
        }
        #expect(store.environment.growthCount >= 4)
        #expect(store.environment.mapSize > 10_000_000)
        let back = try store.copyVectors(HeadID(), .keys, range: 19_990..<20_000)
        #expect(back == Array(keys[(19_990 * d)...]))
    }

    @Test func fullMapWithGrowthDisabledIsAClearError() throws {
        let dir = TemporaryDirectory()
        var options = Environment.Options()
        options.mapSize = 256 * 1024
        options.growth = false
        let store = try KVStore(path: dir.path, create: true, options: options)
        defer { store.close() }
        let data = [Float](repeating: 1, count: 100_000 * 4)
        try store.createHead(HeadID(), dimension: 4, dtype: .f32)
        #expect {
            try data.withUnsafeBufferPointer { try store.append(HeadID(), keys: $0, values: $0) }
        } throws: { error in
            (error as? StoreError)?.kind == .mapFull && (error as? StoreError)?.code == MDB_MAP_FULL
        }
        // Nothing half-written: the head is still readable and consistent.
        let info = try store.info(HeadID())
        #expect(try store.copyVectors(HeadID(), .keys).count == info.count * 4)
    }

    @Test func readersSeeOnlyCommittedStatesWhileAWriterAppends() throws {
        let dir = TemporaryDirectory()
        var options = Environment.Options()
        options.mapSize = 1 << 20  // small, so the writer also grows the map under the readers
        options.noSync = true
        let store = try KVStore(path: dir.path, create: true, options: options)
        defer { store.close() }
        let d = 16
        let id = HeadID()
        try store.createHead(id, dimension: d, dtype: .f32, blockSize: 32)
        // Row i holds the value i in every key component and -i in every value component,
        // so a reader can check any snapshot for agreement between counts and contents.
        let batch = 50
        let batches = 120
        let stop = ManagedAtomicFlag()
        let failures = LockedCounter()
        let checks = LockedCounter()
        let readers = (0..<3).map { r in
            Thread {
                var rng = SeededRandom(seed: UInt64(r))
                while !stop.isSet {
                    do {
                        try store.read { snapshot in
                            let info = try snapshot.info(id)
                            let keys = try snapshot.vectors(id, .keys)
                            let values = try snapshot.vectors(id, .values)
                            guard keys.count == info.count, values.count == info.count, info.count % batch == 0 else {
                                failures.add(); return
                            }
                            if info.count == 0 { return }
                            let q = [Float](repeating: 1, count: d)
                            let top = try q.withUnsafeBufferPointer {
                                try FlatIndex(keys: keys).search($0, k: 1, parameters: SearchParameters(), keys: keys)
                            }
                            if top.ids[0] != info.count - 1 { failures.add() }
                            let i = Int.random(in: 0..<info.count, using: &rng)
                            var row = [Float](repeating: 0, count: d)
                            values.decodeRow(i, into: &row)
                            if row != [Float](repeating: -Float(i), count: d) { failures.add() }
                            checks.add()
                        }
                    } catch { failures.add() }
                }
            }
        }
        readers.forEach { $0.start() }
        for b in 0..<batches {
            var k = [Float](), v = [Float]()
            for i in (b * batch)..<((b + 1) * batch) {
                k += [Float](repeating: Float(i), count: d)
                v += [Float](repeating: -Float(i), count: d)
            }
            try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try store.append(id, keys: kb, values: vb) } }
        }
        stop.set()
        while readers.contains(where: { !$0.isFinished }) { usleep(1000) }
        #expect(failures.value == 0)
        #expect(checks.value > 10)
        #expect(try store.info(id).count == batch * batches)
    }

    @Test func refusesDirectoriesThatAreNotStores() throws {
        let empty = TemporaryDirectory()
        #expect { try KVStore(path: empty.path) } throws: { ($0 as? StoreError)?.kind == .notAStore }
        #expect { try KVStore(path: empty.path + "/missing") } throws: { ($0 as? StoreError)?.kind == .notAStore }

        // A foreign LMDB environment: valid LMDB, but none of the store's databases.
        let foreign = TemporaryDirectory()
        let env = try Environment(path: foreign.path)
        try env.write { txn in
            let dbi = try env.database("something-else", txn: txn.txn, create: true)
            try txn.put(dbi, Array("k".utf8), Array("v".utf8))
        }
        env.close()
        #expect { try KVStore(path: foreign.path) } throws: { error in
            let e = error as? StoreError
            return e?.kind == .notAStore && e?.description.contains(foreign.path) == true
        }

        // A file that is not LMDB at all.
        let garbage = TemporaryDirectory()
        try Data(repeating: 0x5A, count: 16384).write(to: URL(fileURLWithPath: garbage.path + "/data.mdb"))
        #expect { try KVStore(path: garbage.path) } throws: { ($0 as? StoreError)?.kind == .notAStore }
    }

    @Test func refusesAFutureFormatVersion() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        try store.environment.write { txn in try txn.put(store.metaDB, Array("version".utf8), [0, 0, 0, 99]) }
        store.close()
        #expect { try KVStore(path: dir.path) } throws: { error in
            let e = error as? StoreError
            return e?.kind == .unsupportedVersion && e?.message.contains("99") == true
        }
    }

    @Test func rejectsNonFiniteAndMismatchedShapes() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        let id = HeadID(layer: 1)
        try store.createHead(id, dimension: 4, dtype: .f16)
        var keys = [Float](repeating: 0.5, count: 12)
        keys[9] = .nan
        #expect { try keys.withUnsafeBufferPointer { try store.append(id, keys: $0, values: $0) } } throws: { error in
            let e = error as? StoreError
            return e?.kind == .nonFinite && e?.message.contains("row 2") == true
        }
        let six = [Float](repeating: 0, count: 6)
        #expect { try six.withUnsafeBufferPointer { try store.append(id, keys: $0, values: $0) } } throws: {
            ($0 as? StoreError)?.kind == .shapeMismatch
        }
        #expect { try store.createHead(id, dimension: 8, dtype: .f16) } throws: { ($0 as? StoreError)?.kind == .shapeMismatch }
        #expect { try store.info(HeadID(layer: 9)) } throws: { ($0 as? StoreError)?.kind == .headNotFound }
        #expect(try store.info(id).count == 0)
    }

    @Test func indexSectionsRoundTripAndDrop() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.createHead(HeadID(), dimension: 2, dtype: .f32)
        let big = (0..<(KVStore.legacySectionChunkBytes + 1000)).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        try store.saveIndex(HeadID(), name: "hnsw", sections: ["graph": big, "meta": [1, 2, 3]])
        let back = try store.loadIndex(HeadID(), name: "hnsw")
        #expect(back?["graph"]?.array == big)
        #expect(back?["meta"]?.array == [1, 2, 3])
        // Inside a snapshot a section is a view of the map: one value, in overflow pages whose data
        // is 16-byte aligned, so its aligned arrays are read without a copy.
        try store.read { s in
            let graph = try #require(try s.index(HeadID(), name: "hnsw")?["graph"])
            #expect(graph.owner == nil && Int(bitPattern: graph.bytes.baseAddress) % 16 == 0)
            #expect(graph.bytes.elementsEqual(big))
            let copied = try #require(try s.index(HeadID(), name: "hnsw", copy: true)?["graph"])
            #expect(copied.owner != nil && copied.bytes.baseAddress != graph.bytes.baseAddress)
        }
        // A store written before sections were single values split them in chunks: still read.
        try store.environment.write { txn in
            for (chunk, part) in [Array(big[..<1000]), Array(big[1000...])].enumerated() {
                try txn.put(store.indexesDB, StoreKey.indexChunk(HeadID(), "hnsw", section: "graph", chunk: UInt32(chunk)), part)
            }
        }
        #expect(try store.loadIndex(HeadID(), name: "hnsw")?["graph"]?.array == big)
        #expect(try store.indexNames()[HeadID()] == ["hnsw"])
        #expect(try store.dropIndex(HeadID(), name: "hnsw"))
        #expect(try store.loadIndex(HeadID(), name: "hnsw") == nil)
    }
}

/// A flag set once and read from other threads.
final class ManagedAtomicFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var flag = false
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return flag }
    func set() { lock.lock(); flag = true; lock.unlock() }
}

final class LockedCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var count = 0
    var value: Int { lock.lock(); defer { lock.unlock() }; return count }
    func add() { lock.lock(); count += 1; lock.unlock() }
}
