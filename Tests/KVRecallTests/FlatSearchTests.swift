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

@Suite struct FlatSearchTests {
    /// Ingests random vectors in `dtype` and returns the store with the stored (rounded) keys.
    static func makeStore(_ dir: TemporaryDirectory, n: Int, d: Int, dtype: DType, seed: UInt64) throws -> (KVStore, [Float]) {
        var rng = SeededRandom(seed: seed)
        let keys = rng.gaussianMatrix(rows: n, dim: d)
        let store = try KVStore(path: dir.path, create: true)
        try store.createHead(HeadID(), dimension: d, dtype: dtype, blockSize: 64)
        try keys.withUnsafeBufferPointer { try store.append(HeadID(), keys: $0, values: $0) }
        return (store, try store.copyVectors(HeadID(), .keys))
    }

    @Test(arguments: DType.allCases, [1, 3, 9])
    func matchesNaiveReference(dtype: DType, queryCount: Int) throws {
        let dir = TemporaryDirectory()
        let (n, d, k) = (1000, 40, 17)
        let (store, stored) = try Self.makeStore(dir, n: n, d: d, dtype: dtype, seed: 11)
        defer { store.close() }
        var rng = SeededRandom(seed: 99)
        let queries = rng.gaussianMatrix(rows: queryCount, dim: d)
        let results = try store.read { snapshot in
            let keys = try snapshot.vectors(HeadID(), .keys)
            return try queries.withUnsafeBufferPointer {
                try FlatIndex(keys: keys).search($0, k: k, parameters: SearchParameters(), keys: keys)
            }
        }
        #expect(results.stats.keysScannedFraction == 1)
        for q in 0..<queryCount {
            let expected = naiveTopK(keys: stored, dim: d, query: queries[(q * d)..<((q + 1) * d)], k: k)
            let got = results.hits(q)
            #expect(got.map(\.id) == expected.map(\.id))
            for (g, e) in zip(got, expected) { #expect(abs(g.score - e.score) <= 1e-3 * max(1, abs(e.score))) }
            #expect(zip(got, got.dropFirst()).allSatisfy { $0.score >= $1.score })
        }
    }

    @Test func tiesGoToTheLowerID() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        // Every key is identical, so every score ties: the answer must be ids 0..<k in order.
        let keys = [Float](repeating: 0.25, count: 300 * 8)
        try store.createHead(HeadID(), dimension: 8, dtype: .f32, blockSize: 32)
        try keys.withUnsafeBufferPointer { try store.append(HeadID(), keys: $0, values: $0) }
        for m in [1, 5] {
            let q = [Float](repeating: 1, count: 8 * m)
            let r = try store.read { s in
                let view = try s.vectors(HeadID(), .keys)
                return try q.withUnsafeBufferPointer { try FlatIndex(keys: view).search($0, k: 10, parameters: SearchParameters(), keys: view) }
            }
            for qi in 0..<m { #expect(r.hits(qi).map(\.id) == Array(0..<10)) }
        }
    }

    @Test func threadedBatchEqualsSingleThreaded() throws {
        let dir = TemporaryDirectory()
        let (store, _) = try Self.makeStore(dir, n: 700, d: 32, dtype: .f16, seed: 5)
        defer { store.close() }
        var rng = SeededRandom(seed: 6)
        let queries = rng.gaussianMatrix(rows: 13, dim: 32)
        var two = SearchParameters()
        two.threads = 2
        let (a, b) = try store.read { s in
            let view = try s.vectors(HeadID(), .keys)
            let index = FlatIndex(keys: view)
            return try queries.withUnsafeBufferPointer {
                (try index.search($0, k: 5, parameters: SearchParameters(), keys: view),
                 try index.search($0, k: 5, parameters: two, keys: view))
            }
        }
        #expect(a.ids == b.ids)
    }

    @Test func rejectsBadArguments() throws {
        let dir = TemporaryDirectory()
        let (store, _) = try Self.makeStore(dir, n: 50, d: 8, dtype: .f32, seed: 1)
        defer { store.close() }
        try store.read { s in
            let view = try s.vectors(HeadID(), .keys)
            let index = FlatIndex(keys: view)
            let q = [Float](repeating: 1, count: 8)
            #expect(throws: IndexError.invalidParameter("k = 51 exceeds the 50 keys of head 0/0/0")) {
                try q.withUnsafeBufferPointer { try index.search($0, k: 51, parameters: SearchParameters(), keys: view) }
            }
            let bad = [Float](repeating: 1, count: 7)
            #expect(throws: IndexError.self) {
                try bad.withUnsafeBufferPointer { try index.search($0, k: 1, parameters: SearchParameters(), keys: view) }
            }
        }
    }

    @Test func reducedPrecisionConversionsAreExactOnRepresentableValues() {
        let values: [Float] = [0, 1, -2.5, 65504, 0.000061035156, 5.9604645e-8, .infinity, -.infinity]
        var half = [UInt16](repeating: 0, count: values.count)
        var back = [Float](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { encode($0, dtype: .f16, into: &half) }
        half.withUnsafeBufferPointer { h in back.withUnsafeMutableBufferPointer { kvrDecodeF16(h, $0) } }
        #expect(back == values)
        // Rounding: 1 + 2^-11 is halfway between two halves and rounds to even (1.0).
        var h1: UInt16 = 0
        [Float(1 + 1.0 / 2048)].withUnsafeBufferPointer { encode($0, dtype: .f16, into: &h1) }
        #expect(h1 == 0x3C00)
        var b: UInt16 = 0
        [Float(-2.5)].withUnsafeBufferPointer { encode($0, dtype: .bf16, into: &b) }
        #expect(b == 0xC020)
    }
}

import CKernels
func kvrDecodeF16(_ h: UnsafeBufferPointer<UInt16>, _ out: UnsafeMutableBufferPointer<Float>) {
    kvr_f16_to_f32(h.baseAddress!, out.baseAddress!, h.count)
}
