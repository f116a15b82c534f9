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

/// The storage and session contracts of docs/ARCHITECTURE.md ("Contracts").
@Suite struct ContractTests {
    /// Truncation at, inside and before block boundaries leaves exactly the prefix, appends continue it.
    @Test(arguments: [0, 1, 15, 16, 17, 40])
    func truncateKeepsExactlyThePrefix(tokens: Int) throws {
        let dir = TemporaryDirectory()
        var rng = SeededRandom(seed: 11)
        let d = 8, id = HeadID(layer: 0, head: 0)
        let keys = rng.gaussianMatrix(rows: 50, dim: d), values = rng.gaussianMatrix(rows: 50, dim: d)
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.createHead(id, dimension: d, dtype: .f32, blockSize: 16)
        try keys.withUnsafeBufferPointer { kb in try values.withUnsafeBufferPointer { vb in try store.append(id, keys: kb, values: vb) } }
        try store.appendQueries(id, queries: UnsafeBufferPointer(rebasing: keys.withUnsafeBufferPointer { $0 }[0..<(20 * d)]))
        try store.truncate([id], to: tokens, queryTokens: tokens)
        #expect(try store.info(id).count == tokens)
        #expect(try store.info(id).queryCount == min(20, tokens))
        #expect(try store.copyVectors(id, .keys) == Array(keys[0..<(tokens * d)]))
        #expect(try store.copyVectors(id, .values) == Array(values[0..<(tokens * d)]))
        // Appending after a truncation continues the prefix (the partial block is completed).
        try keys.withUnsafeBufferPointer { kb in
            try values.withUnsafeBufferPointer { vb in
                try store.append(id, keys: UnsafeBufferPointer(rebasing: kb[(tokens * d)...]), values: UnsafeBufferPointer(rebasing: vb[(tokens * d)...]))
            }
        }
        #expect(try store.copyVectors(id, .keys) == keys)
    }

    /// A multi-head append is one transaction: a bad head anywhere in the batch leaves every head as it was.
    @Test func multiHeadAppendIsAllOrNothing() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        let a = HeadID(head: 0), b = HeadID(head: 1)
        for id in [a, b] { try store.createHead(id, dimension: 4, dtype: .f16) }
        let good: [Float] = [1, 2, 3, 4], bad: [Float] = [1, .nan, 3, 4]
        try good.withUnsafeBufferPointer { g in
            try bad.withUnsafeBufferPointer { x in
                #expect(throws: StoreError.self) { try store.appendAtomically([.keysAndValues(a, keys: g, values: g), .keysAndValues(b, keys: x, values: g)]) }
                #expect(throws: StoreError.self) { try store.appendAtomically([.keysAndValues(a, keys: g, values: g), .keysAndValues(HeadID(head: 9), keys: g, values: g)]) }
                try store.appendAtomically([.keysAndValues(a, keys: g, values: g), .keysAndValues(b, keys: g, values: g)])
            }
        }
        #expect(try store.info(a).count == 1 && store.info(b).count == 1)
    }

    /// One open environment per store and process; one writer per head (also within a process).
    @Test func aStoreOpensOnceAndAHeadHasOneWriter() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        #expect { try KVStore(path: dir.path) } throws: { ($0 as? StoreError)?.kind == .inUse }
        let lease = try store.lockHeads([HeadID(head: 1), HeadID(head: 2)])
        #expect { try store.lockHeads([HeadID(head: 2)]) } throws: { ($0 as? StoreError)?.kind == .inUse }
        _ = try store.lockHeads([HeadID(head: 3)])  // another head is free
        lease.release()
        _ = try store.lockHeads([HeadID(head: 2)])
        store.close()
        try KVStore(path: dir.path).close()  // closing frees the store for the next open
    }

    func configuration(_ method: AttentionMethod) -> SessionConfiguration {
        SessionConfiguration(layers: 3, kvHeads: 2, queryHeadsPerKV: 2, headDimension: 8, dtype: .f32, method: method,
                             k: 20, sinks: 2, window: 8, ef: 64)
    }

    /// A session whose layers differ (a step cut short) resumes at the shortest layer; a reopen with
    /// another configuration is refused naming the field.
    @Test func resumeCutsBackToTheLastCompleteStep() throws {
        let dir = TemporaryDirectory()
        var rng = SeededRandom(seed: 5)
        let c = configuration(.hnsw)
        do {
            let session = try KVSession(configuration: c, directory: dir.path)
            for layer in 0..<3 {
                let k = rng.gaussianMatrix(rows: 2 * 100, dim: 8)
                try k.withUnsafeBufferPointer { try session.append(layer: layer, keys: $0, values: $0) }
            }
            try session.buildIndexes()
            try session.checkpoint()
            // A step that reached layers 0 and 1 only.
            for layer in 0..<2 {
                let k = rng.gaussianMatrix(rows: 2, dim: 8)
                try k.withUnsafeBufferPointer { try session.append(layer: layer, keys: $0, values: $0) }
            }
            session.close()
        }
        var other = c
        other.k = 21
        #expect { try KVSession(configuration: other, directory: dir.path) } throws: { "\($0)".contains("k 20 (asked 21)") }
        let resumed = try KVSession(resuming: dir.path)
        defer { resumed.close() }
        #expect(resumed.resumeReport == KVSession.ResumeReport(tokens: 100, longest: 101, indexesLoaded: 6, indexesRebuilt: 0, indexesMissing: 0))
        for layer in 0..<3 { for head in 0..<2 { #expect(try resumed.length(layer: layer, head: head) == 100) } }
    }

    /// Prefill queries are training data: truncate keeps them (unless to 0); resume evens them out
    /// across heads (a crash between two layers' calls).
    @Test func prefillQueriesSurviveRollbackAndResumeEvensThemOut() throws {
        let dir = TemporaryDirectory()
        var rng = SeededRandom(seed: 8)
        let c = configuration(.exact)
        func queryCounts(_ s: KVSession) throws -> [Int] {
            try (0..<3).flatMap { l in try (0..<2).map { h in try s.store.info(s.headID(l, h)).queryCount } }
        }
        do {
            let session = try KVSession(configuration: c, directory: dir.path)
            for layer in 0..<3 {
                let k = rng.gaussianMatrix(rows: 2 * 50, dim: 8)
                try k.withUnsafeBufferPointer { try session.append(layer: layer, keys: $0, values: $0) }
                let q = rng.gaussianMatrix(rows: 2 * (layer == 0 ? 130 : 100), dim: 8)  // two per position, and more on layer 0
                try q.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: layer, queries: $0) }
            }
            try session.truncate(to: 40)
            #expect(try queryCounts(session) == [130, 130, 100, 100, 100, 100])
            session.close()
        }
        let resumed = try KVSession(resuming: dir.path)
        #expect(try queryCounts(resumed) == [100, 100, 100, 100, 100, 100])
        try resumed.truncate(to: 0)
        #expect(try queryCounts(resumed) == [0, 0, 0, 0, 0, 0])
        resumed.close()
    }
}
