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

@Suite struct LSHIndexTests {
    func build(_ f: IndexFixture, tables: Int = 40, bits: Int = 8, upTo: Int? = nil) throws -> LSHIndex {
        let index = try LSHIndex(dimension: f.d, tables: tables, bits: bits, seed: 5)
        try f.withKeys { try index.add(keys: $0, range: 0..<(upTo ?? f.n), progress: nil) }
        return index
    }

    @Test func recallMeetsFloorAndCollisionsTradeWork() throws {
        let f = try IndexFixture()
        let index = try build(f)
        var p2 = SearchParameters(); p2.lsh.minCollisions = 2
        var p8 = SearchParameters(); p8.lsh.minCollisions = 8
        let (r2, s2) = try f.recall(of: index, k: 10, parameters: p2)
        let (r8, s8) = try f.recall(of: index, k: 10, parameters: p8)
        // Documented floor: 40 tables x 8 bits, at least 2 collisions, 4096 x 32 clustered keys.
        #expect(r2 >= 0.9, "recall@10 \(r2)")
        #expect(r2 >= r8)
        #expect(s8.keysScannedFraction < s2.keysScannedFraction)
        #expect(s2.keysScannedFraction < 0.9)
    }

    /// Calibration walks min-collisions down from 8 (rising recall) and stops at the first value
    /// reaching the target; a head whose calibration found none is attended with an exact-scan
    /// selection (recall 1), unless the caller set min-collisions.
    @Test func calibrationPicksCollisionsAndAHeadNoValueServesIsScanned() throws {
        let f = try IndexFixture()
        let index = try build(f, tables: 40, bits: 8)
        let calibration = try f.withKeys { keys in
            var parameters = CalibrationParameters()
            parameters.k = 10
            return try f.queries.withUnsafeBufferPointer { try Calibrator.calibrate(index, keys: keys, queries: $0, parameters: parameters) }
        }
        let c = try #require(calibration)
        #expect(c.knob == .minCollisions && c.reached && c.recall >= 0.95 && c.value >= 1 && c.value < 8, "\(c.summary)")
        var strict = SearchParameters(); strict.lsh.minCollisions = 8
        let (atEight, _) = try f.recall(of: index, k: 100, parameters: strict)
        var failed = c
        failed.knob = .minCollisions; failed.value = 8; failed.recall = atEight; failed.reached = false
        try f.store.read { s in
            let keys = try s.vectors(f.id, .keys), values = try s.vectors(f.id, .values)
            let query = UnsafeBufferPointer(rebasing: f.queries.withUnsafeBufferPointer { $0 }[0..<f.d])
            var p = AttentionParameters(k: 100, sinks: 0, window: 0)
            p.search.lsh.minCollisions = 8
            func recall(_ calibration: SearchCalibration, parameters: AttentionParameters) throws -> Double {
                let prepared = try PreparedMethod(.lsh, index: index, calibration: calibration, keys: keys, values: values)
                let r = try prepared.attend(query, keys: keys, values: values, parameters: parameters)
                return Attention.fidelity(of: r, queries: query, keys: keys, values: values, parameters: parameters).recall
            }
            // The caller's own min-collisions wins over the calibration: the index answers.
            #expect(try recall(failed, parameters: p) < 1, "min-collisions 8 finds fewer than the exact top-100")
            // Left to the calibration, a head it could not serve is scanned.
            p.search.lsh.minCollisionsSetting = nil
            #expect(try recall(failed, parameters: p) == 1)
        }
    }

    @Test func oneTableOneCollisionScoresExactlyTheQueryBucket() throws {
        let f = try IndexFixture(n: 500)
        let index = try build(f, tables: 1, bits: 3)
        var p = SearchParameters(); p.lsh.minCollisions = 1
        let (_, stats) = try f.recall(of: index, k: 1, parameters: p, queries: Array(f.queries.prefix(f.d)))
        let sizes = zip(index.bucketOffsets[0], index.bucketOffsets[0].dropFirst()).map { Int($1 - $0) }
        #expect(sizes.contains(stats.distanceComputations))
        #expect(sizes.reduce(0, +) == 500)
    }

    @Test func persistenceRoundTripAndDeterminism() throws {
        let f = try IndexFixture(n: 1500)
        let index = try build(f)
        #expect(try build(f).sections() == index.sections())
        try IndexCatalog.save(index, in: f.store, head: f.id)
        let loaded = try IndexCatalog.load(LSHIndex.self, from: try f.store.loadIndex(f.id, name: "lsh"), head: f.id, name: "lsh")
        try f.withKeys { keys in
            try f.queries.withUnsafeBufferPointer { q in
                let a = try index.search(q, k: 10, parameters: SearchParameters(), keys: keys)
                let b = try loaded.search(q, k: 10, parameters: SearchParameters(), keys: keys)
                #expect(a.ids == b.ids && a.stats == b.stats)
            }
        }
    }

    /// Keys added a few at a time (decode-time upkeep) wait in a tail matched code by code: the
    /// same candidates as once merged into the tables, and a saved index holds them.
    @Test func keysInTheTailAreFoundAsInTheTables() throws {
        let f = try IndexFixture(n: 1500)
        let index = try build(f, upTo: 1024)
        try f.withKeys { keys in for i in 1024..<1084 { try index.add(keys: keys, range: i..<(i + 1), progress: nil) } }
        #expect(index.count == 1084 && index.merged == 1024 && index.tailCodes.count == 60 * index.tables, "60 < 64: all in the tail")
        let probes = Array(f.keys[(1030 * f.d)..<(1080 * f.d)]) + Array(f.queries.prefix(10 * f.d))
        var p = SearchParameters(); p.lsh.minCollisions = 2
        func answers() throws -> [[Int]] {
            let r = try f.withKeys { keys in try probes.withUnsafeBufferPointer { try index.search($0, k: 20, parameters: p, keys: keys.limited(to: 1084)) } }
            return (0..<r.queryCount).map { r.hits($0).map(\.id).sorted() }
        }
        let fromTail = try answers()
        #expect(fromTail.prefix(50).enumerated().allSatisfy { $0.element.contains(1030 + $0.offset) }, "each tail key finds itself")
        try IndexCatalog.save(index, in: f.store, head: f.id)  // its sections merge the tail
        #expect(index.merged == 1084 && index.tailCodes.isEmpty && index.bucketIDs.allSatisfy { $0.count == 1084 })
        #expect(try answers() == fromTail)
        let restored = try IndexCatalog.load(LSHIndex.self, from: try f.store.loadIndex(f.id, name: "lsh"), head: f.id, name: "lsh")
        #expect(restored.count == 1084 && restored.merged == 1084)
        // The tail merges once it holds 1/16 of the tables' keys (1084 / 16: 67), a few tables per
        // add (40 tables over 35 adds: 2 each); mid-merge a search finds what merged tables find.
        try f.withKeys { keys in for i in 1084..<1152 { try index.add(keys: keys, range: i..<(i + 1), progress: nil) } }
        #expect(index.count == 1152 && index.merged == 1084 && index.mergingUpTo == 1151 && index.mergedTables == 4)
        #expect(index.bucketIDs[3].count == 1151 && index.bucketIDs[4].count == 1084)
        let probes2 = Array(f.keys[(1090 * f.d)..<(1152 * f.d)]) + Array(f.queries.prefix(20 * f.d))
        func answers2(_ index: LSHIndex) throws -> [[Int]] {
            let r = try f.withKeys { keys in try probes2.withUnsafeBufferPointer { try index.search($0, k: 20, parameters: p, keys: keys.limited(to: 1152)) } }
            return (0..<r.queryCount).map { r.hits($0).map(\.id).sorted() }
        }
        let midMerge = try answers2(index)
        #expect(midMerge.prefix(62).enumerated().allSatisfy { $0.element.contains(1090 + $0.offset) }, "each new key finds itself")
        let twin = try build(f, upTo: 1024)  // the same keys in one add: merged at once
        try f.withKeys { try twin.add(keys: $0, range: 1024..<1152, progress: nil) }
        #expect(twin.merged == 1152 && !twin.isMerging)
        #expect(try answers2(twin) == midMerge, "tables, tail and a merge in progress answer alike")
        try f.withKeys { keys in for i in 1152..<1200 { try index.add(keys: keys, range: i..<(i + 1), progress: nil) } }
        #expect(index.merged == 1151 && !index.isMerging && index.tailCodes.count == 49 * index.tables, "the merge completed within 35 adds")
        // A large add (a build's, a refresh's catch-up) merges everything at once.
        try f.withKeys { try index.add(keys: $0, range: 1200..<1264, progress: nil) }
        #expect(index.merged == 1264 && !index.isMerging && index.tailCodes.isEmpty && index.bucketIDs.allSatisfy { $0.count == 1264 })
    }

    @Test func incrementalAddEqualsOneShotBuild() throws {
        let f = try IndexFixture(n: 1200)
        let whole = try build(f)
        let parts = try build(f, upTo: 700)
        try f.withKeys { try parts.add(keys: $0, range: 700..<1200, progress: nil) }
        // Same mean (taken from the first add) differs, so compare search quality, and the new keys' presence.
        #expect(parts.count == 1200)
        #expect(parts.bucketIDs.allSatisfy { $0.count == 1200 })
        let probe = Array(f.keys[(1100 * f.d)..<(1101 * f.d)])
        var p = SearchParameters(); p.lsh.minCollisions = 1
        let r = try f.withKeys { keys in try probe.withUnsafeBufferPointer { try parts.search($0, k: 3, parameters: p, keys: keys) } }
        #expect(r.ids.contains(try f.exact(k: 1, queries: probe)[0][0]))
        _ = whole
    }

    @Test func badParametersAndCorruptSections() throws {
        #expect(throws: IndexError.invalidParameter("bits must be in 1...16 (got 17)")) { try LSHIndex(dimension: 8, bits: 17) }
        #expect(throws: IndexError.invalidParameter("tables must be in 1...1024 (got 0)")) { try LSHIndex(dimension: 8, tables: 0) }
        let f = try IndexFixture(n: 300)
        let index = try build(f, tables: 4, bits: 4)
        var p = SearchParameters(); p.lsh.minCollisions = 5
        try f.withKeys { keys in
            #expect(throws: IndexError.invalidParameter("min-collisions 5 must be in 1...4 (the table count)")) {
                try f.queries.withUnsafeBufferPointer { try index.search($0, k: 1, parameters: p, keys: keys) }
            }
        }
        var s = index.sections()
        s["buckets"]![20] ^= 0x7F
        #expect(throws: IndexError.self) { try LSHIndex(sections: s) }
    }
}
