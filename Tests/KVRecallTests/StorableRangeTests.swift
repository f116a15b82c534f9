import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallSession
@testable import KVRecallInterface
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

    /// Storable values whose attention overflows f32 (here a weighted sum of values near 3.4e38) give
    /// an error, never an infinite or NaN output; a score too large for fixed-point display or a
    /// metric that is not finite no longer crashes the tables or the JSON.
    @Test func attentionThatOverflowsIsAnErrorNotNaN() throws {
        let config = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 2, headDimension: 8, dtype: .f32,
                                          method: .exact, k: 10, sinks: 1, window: 2)
        let session = try KVSession(configuration: config, directory: nil)
        defer { session.close() }
        let keys = [Float](repeating: 0, count: 64 * 8), values = [Float](repeating: 3e38, count: 64 * 8)
        try keys.withUnsafeBufferPointer { k in try values.withUnsafeBufferPointer { try session.append(layer: 0, keys: k, values: $0) } }
        let q = [Float](repeating: 1, count: 16)
        #expect { _ = try q.withUnsafeBufferPointer { try session.attend(layer: 0, queries: $0) } } throws: { error in
            "\(error)".contains("attention of layer 0, KV head 0, query head 0 is not finite")
        }
        #expect(fmt(1e20, 3) == "1e+20" && fmt(-2.5e30, 1) == "-2.5e+30" && fmt(12.3456, 2) == "12.35")

        let dir = TemporaryDirectory()
        let (kPath, vPath, qPath) = (dir.path + "/k.npy", dir.path + "/v.npy", dir.path + "/q.npy")
        try NPY.write(Tensor(name: "k", shape: [64, 8], dtype: .f32, floats: keys), to: kPath)
        try NPY.write(Tensor(name: "v", shape: [64, 8], dtype: .f32, floats: values), to: vPath)
        try NPY.write(Tensor(name: "q", shape: [2, 8], dtype: .f32, floats: q), to: qPath)
        #expect(try runCLI(["ingest", "--store", dir.path + "/s", "--keys", kPath, "--values", vPath, "--quiet"]).status == 0)
        let r = try runCLI(["attend", "--store", dir.path + "/s", "--queries", qPath, "--method", "exact", "-k", "10"])
        #expect(r.status != 0 && r.stderr.contains("exact: the attention of query row 0 is not finite"), "\(r.stderr)")
        // Scores beyond f32 (|q|, |k| ~ 1e20): the metrics against a reference that overflows too are
        // null in JSON (the whole output used to be refused), and the REPL shows the scores.
        var rng = SeededRandom(seed: 4)
        var huge = rng.gaussianMatrix(rows: 64, dim: 8)
        for c in 0..<8 { huge[3 * 8 + c] *= 1e20 }
        try NPY.write(Tensor(name: "k", shape: [64, 8], dtype: .f32, floats: huge), to: kPath)
        try NPY.write(Tensor(name: "q", shape: [2, 8], dtype: .f32, floats: rng.gaussianMatrix(rows: 2, dim: 8).map { $0 * 1e20 }), to: qPath)
        #expect(try runCLI(["ingest", "--store", dir.path + "/h", "--keys", kPath, "--values", kPath, "--quiet"]).status == 0)
        let json = try runCLI(["attend", "--store", dir.path + "/h", "--queries", qPath, "--method", "exact", "-k", "10", "--json"])
        if json.status == 0 {
            #expect((try? JSONSerialization.jsonObject(with: Data(json.stdout.utf8))) != nil, "\(json.stdout.prefix(300))")
        } else {
            #expect(json.stderr.contains("is not finite"), "\(json.stderr)")
        }
        let repl = try runCLI(["repl", "--store", dir.path + "/h"], stdin: "query file \(qPath) 0\n")
        #expect(repl.status == 0 && repl.stdout.contains("e+20"), "\(repl.stderr)")
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
