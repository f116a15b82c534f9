import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallSession
import KVRecallTestSupport

/// Finite values a store's dtype cannot hold (f16: |x| > 65504; bf16: beyond 3.39e38) used to pass
/// the finiteness check, which ran before the conversion, and were stored as Inf: attention then
/// answered NaN with status 0 (issue 23, item 1). Every path now refuses them, naming the file or
/// the call, the row and the value.
@Suite struct StorableRangeTests {
    static let bf16Max = Float(bitPattern: 0x7F7F_0000)

    @Test func largestFiniteOfEachType() {
        #expect(DType.f16.largestFinite == 65504)
        #expect(DType.bf16.largestFinite == Self.bf16Max && Self.bf16Max > 3.389e38)
        #expect(DType.f32.largestFinite == .greatestFiniteMagnitude)
        // What the bound protects against: one step beyond it, the conversion gives Inf.
        #expect(FloatBits.float(fromF16: FloatBits.f16(from: 65504)) == 65504)
        #expect(FloatBits.float(fromF16: FloatBits.f16(from: 70000)).isInfinite)
        #expect(FloatBits.float(fromBF16: FloatBits.bf16(from: 3.4e38)).isInfinite)
    }

    @Test func tensorFindsTheFirstValueBeyondTheTargetType() {
        var floats = [Float](repeating: 1, count: 24)
        floats[3 * 4 + 1] = -7e4
        floats[5 * 4 + 2] = 8e4
        let t = Tensor(name: "k", shape: [6, 4], dtype: .f32, floats: floats)
        let bad = t.firstOutOfRange(for: .f16, rowWidth: 4)
        #expect(bad?.row == 3 && bad?.column == 1 && bad?.value == -7e4)
        #expect(t.firstOutOfRange(for: .bf16, rowWidth: 4) == nil)
        #expect(t.firstOutOfRange(for: .f32, rowWidth: 4) == nil)
        // bf16 input holds values f16 cannot; f16 input fits every type.
        let b = Tensor(name: "k", shape: [6, 4], dtype: .bf16, floats: floats)
        #expect(b.firstOutOfRange(for: .f16, rowWidth: 4)?.row == 3)
        let huge = Tensor(name: "k", shape: [1, 2], dtype: .f32, floats: [1, 3.4e38])
        #expect(huge.firstOutOfRange(for: .bf16, rowWidth: 2)?.column == 1)
        // NaN and Inf are the finiteness check's business, not this one's.
        let inf = Tensor(name: "k", shape: [1, 2], dtype: .f32, floats: [.infinity, .nan])
        #expect(inf.firstOutOfRange(for: .f16, rowWidth: 2) == nil)
    }

    @Test func storeRefusesOnEveryAppendPath() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        let f16 = HeadID(layer: 1), bf16 = HeadID(layer: 2), f32 = HeadID(layer: 3)
        try store.createHead(f16, dimension: 4, dtype: .f16)
        try store.createHead(bf16, dimension: 4, dtype: .bf16)
        try store.createHead(f32, dimension: 4, dtype: .f32)
        var rows = [Float](repeating: 0.5, count: 12)
        rows[2 * 4 + 3] = 70000
        func refused(_ error: Error, row: Int, column: Int, value: String) -> Bool {
            guard let e = error as? StoreError, e.kind == .outOfRange else { return false }
            return e.message.contains("row \(row), column \(column)") && e.message.contains(value) && e.message.contains("f16")
                && e.head == f16
        }
        let good = [Float](repeating: 0.5, count: 12)
        for allowNonFinite in [false, true] {  // --allow-non-finite lets NaN/Inf through, never an overflow
            #expect { try rows.withUnsafeBufferPointer { try store.append(f16, keys: $0, values: $0, allowNonFinite: allowNonFinite) } }
                throws: { refused($0, row: 2, column: 3, value: "70000") }
            #expect { try good.withUnsafeBufferPointer { g in try rows.withUnsafeBufferPointer { try store.append(f16, keys: g, values: $0, allowNonFinite: allowNonFinite) } } }
                throws: { refused($0, row: 2, column: 3, value: "70000") && ($0 as? StoreError)?.message.hasPrefix("values") == true }
            #expect { try rows.withUnsafeBufferPointer { try store.appendQueries(f16, queries: $0, allowNonFinite: allowNonFinite) } }
                throws: { refused($0, row: 2, column: 3, value: "70000") }
            #expect { try rows.withUnsafeBufferPointer { try store.appendAtomically([.keysAndValues(f16, keys: $0, values: $0)], allowNonFinite: allowNonFinite) } }
                throws: { refused($0, row: 2, column: 3, value: "70000") }
        }
        #expect(try store.info(f16).count == 0 && store.info(f16).queryCount == 0, "nothing was written")
        // The largest f16 is stored as is; bf16 and f32 hold 70000.
        var edge = good
        edge[0] = 65504
        edge[1] = -65504
        try edge.withUnsafeBufferPointer { try store.append(f16, keys: $0, values: $0) }
        try rows.withUnsafeBufferPointer { try store.append(bf16, keys: $0, values: $0) }
        try rows.withUnsafeBufferPointer { try store.append(f32, keys: $0, values: $0) }
        #expect(try store.copyVectors(f16, .keys).prefix(2) == [65504, -65504])
        #expect(try store.copyVectors(bf16, .keys).allSatisfy { $0.isFinite })
        // bf16's own bound; f32 holds everything finite.
        let beyondBF16: [Float] = [1, 1, 1, 3.4e38]
        #expect { try beyondBF16.withUnsafeBufferPointer { try store.append(bf16, keys: $0, values: $0) } }
            throws: { ($0 as? StoreError)?.kind == .outOfRange && "\($0)".contains("bf16") }
        try beyondBF16.withUnsafeBufferPointer { try store.append(f32, keys: $0, values: $0) }
    }

    @Test func sessionRefusesAndNeverAnswersNaN() throws {
        let (d, heads, tokens) = (8, 2, 6)
        for dtype in [DType.f16, .bf16] {
            let config = SessionConfiguration(layers: 2, kvHeads: heads, queryHeadsPerKV: 2, headDimension: d,
                                              dtype: dtype, method: .exact, k: 10, sinks: 1, window: 2)
            let session = try KVSession(configuration: config, directory: nil)
            defer { session.close() }
            var rng = SeededRandom(seed: 3)
            let keys = rng.gaussianMatrix(rows: heads * tokens, dim: d), values = rng.gaussianMatrix(rows: heads * tokens, dim: d)
            try keys.withUnsafeBufferPointer { k in try values.withUnsafeBufferPointer { try session.append(layer: 1, keys: k, values: $0) } }
            var bad = keys
            let big: Float = dtype == .f16 ? 70000 : 3.4e38
            bad[(1 * tokens + 4) * d + 5] = big  // KV head 1, token 4, column 5
            for (k, v) in [(bad, values), (keys, bad)] {
                #expect { try k.withUnsafeBufferPointer { k in try v.withUnsafeBufferPointer { try session.append(layer: 1, keys: k, values: $0) } } }
                    throws: { error in
                        guard case .invalidArgument(let m)? = error as? SessionError else { return false }
                        return m.contains("layer 1") && m.contains("KV head 1, token 4, column 5") && m.contains("\(big)")
                            && m.contains("\(dtype)'s range")
                    }
            }
            #expect { try bad.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: 1, queries: $0) } }
                throws: { "\($0)".contains("KV head 1, token 4, column 5") }
            #expect(try session.length(layer: 1) == tokens, "nothing was appended")
            let q = rng.gaussianMatrix(rows: heads * 2, dim: d)
            let out = try q.withUnsafeBufferPointer { try session.attend(layer: 1, queries: $0) }
            #expect(out.allSatisfy { $0.isFinite })
        }
    }

    @Test func ingestRefusesNamingTheFileRowColumnAndValue() throws {
        let dir = TemporaryDirectory()
        var rng = SeededRandom(seed: 9)
        var keys = rng.gaussianMatrix(rows: 64, dim: 8)
        keys[3 * 8 + 5] = 70000
        let kPath = dir.path + "/big_keys.npy", vPath = dir.path + "/v.npy", qPath = dir.path + "/q.npy"
        try NPY.write(Tensor(name: "k", shape: [64, 8], dtype: .f32, floats: keys), to: kPath)
        try NPY.write(Tensor(name: "v", shape: [64, 8], dtype: .f32, floats: rng.gaussianMatrix(rows: 64, dim: 8)), to: vPath)
        try NPY.write(Tensor(name: "q", shape: [4, 8], dtype: .f32, floats: rng.gaussianMatrix(rows: 4, dim: 8)), to: qPath)
        for extra in [[String](), ["--allow-non-finite"]] {
            let r = try runCLI(["ingest", "--store", dir.path + "/s", "--keys", kPath, "--values", vPath, "--dtype", "f16", "--quiet"] + extra)
            #expect(r.status != 0)
            #expect(r.stderr.contains("big_keys.npy") && r.stderr.contains("row 3, column 5") && r.stderr.contains("70000")
                    && r.stderr.contains("f16's range (|x| <= 65504)"), "\(r.stderr)")
        }
        // Stored as f32 (the file's type) the same data is fine, and exact attention is finite.
        let ok = try runCLI(["ingest", "--store", dir.path + "/s", "--keys", kPath, "--values", vPath, "--quiet"])
        #expect(ok.status == 0, "\(ok.stderr)")
        let attend = try runCLI(["attend", "--store", dir.path + "/s", "--queries", qPath, "--method", "exact", "-k", "10", "--json"])
        #expect(attend.status == 0 && !attend.stdout.lowercased().contains("nan") && !attend.stdout.contains("null"), "\(attend.stdout)")
    }
}
