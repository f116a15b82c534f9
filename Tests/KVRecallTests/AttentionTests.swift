import CKernels
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

@Suite struct AttentionTests {
    /// The per-head maximum score behind exact attention and the quantized tail passes over a NaN
    /// wherever it sits (first, in the vector body, in the scalar tail), as the Swift loop it replaced
    /// did: a NaN maximum would turn every weight into the same constant.
    @Test func theMaximumScorePassesOverNaN() {
        for n in [1, 7, 8, 16, 17, 40] {
            for at in 0..<n {
                var x = (0..<n).map { Float($0 % 5) - 2 }
                let want = x.enumerated().filter { $0.offset != at }.map(\.element).max() ?? -.infinity
                x[at] = .nan
                #expect(kvr_max(x, n) == want, "n \(n), NaN at \(at)")
            }
        }
    }

    /// Naive softmax attention in double precision over `positions`.
    static func naive(query: [Float], keys: [Float], values: [Float], d: Int, positions: [Int], scale: Double) -> (out: [Double], lse: Double) {
        let scores = positions.map { i in (0..<d).reduce(0.0) { $0 + Double(query[$1]) * Double(keys[i * d + $1]) } * scale }
        let m = scores.max()!
        let w = scores.map { exp($0 - m) }
        let l = w.reduce(0, +)
        var out = [Double](repeating: 0, count: d)
        for (j, i) in positions.enumerated() { for c in 0..<d { out[c] += w[j] * Double(values[i * d + c]) / l } }
        return (out, m + log(l))
    }

    func fixture(n: Int = 600, d: Int = 16) throws -> IndexFixture { try IndexFixture(n: n, d: d, clusters: 12, queryCount: 4) }

    /// Exact attention's two group kernels (the scores of `g` query heads against rows, the weighted
    /// sums of value rows) equal their definition for every stored type, head tiling (4 at a time and
    /// single heads after), dimension (the 8- and 16-wide bodies' scalar tails) and row count (the value
    /// pass's runs and the remainder after the last whole one; none). The rows are gathered through
    /// pointers in shuffled order at unaligned addresses, as a part's positions are, and the score and
    /// weight rows have a stride longer than the part, whose padding stays untouched.
    @Test func theGroupKernelsEqualTheirDefinition() {
        var rng = SeededRandom(seed: 31)
        let shapes = [(1, 8, 1), (4, 256, 100), (6, 40, 17), (3, 24, 16), (4, 16, 15), (5, 256, 33), (4, 72, 64),
                      (4, 20, 9), (2, 12, 5), (8, 48, 35), (4, 16, 0)]
        for (dtype, stored) in [(KVR_DTYPE_F32, TensorDType.f32), (KVR_DTYPE_F16, .f16), (KVR_DTYPE_BF16, .bf16)] {
            for (g, d, n) in shapes {
                // Values exactly representable in every type, so the reference reads what the kernel reads.
                let rows = (0..<n).map { _ in (0..<d).map { _ in Float(Int(rng.next() % 64) - 32) / 16 } }
                let q = (0..<(g * d)).map { _ in Float(rng.gaussian()) }
                let stride = n + 3, pad: Float = -7
                var w = [Float](repeating: 0, count: g * stride)
                for h in 0..<g { for i in 0..<n { w[h * stride + i] = Float(rng.next() % 100) / 100 } }
                let rowBytes = d * stored.byteWidth, offset = 4  // rows 4 bytes past any 32-byte boundary
                var flat = [UInt8](repeating: 0, count: offset + n * rowBytes)
                let order = (0..<n).shuffled(using: &rng)  // row i is stored at slot order[i]
                for i in 0..<n {
                    let encoded = Tensor(name: "row", shape: [1, d], dtype: stored, floats: rows[i]).data
                    flat.replaceSubrange((offset + order[i] * rowBytes)..<(offset + (order[i] + 1) * rowBytes), with: encoded)
                }
                var scores = [Float](repeating: pad, count: g * stride), sums = [Float](repeating: 1, count: g * d)
                flat.withUnsafeBytes { raw in
                    let pointers: [UnsafeRawPointer?] = (0..<n).map { UnsafeRawPointer(raw.baseAddress! + offset + order[$0] * rowBytes) }
                    kvr_group_scores(q, g, d, pointers, n, Int32(dtype), 0.5, &scores, stride)
                    kvr_group_accumulate(w, g, stride, pointers, n, d, Int32(dtype), &sums)
                }
                for h in 0..<g {
                    for i in 0..<n {
                        let want = 0.5 * (0..<d).reduce(0.0) { $0 + Double(q[h * d + $1]) * Double(rows[i][$1]) }
                        #expect(abs(Double(scores[h * stride + i]) - want) < 1e-4 * max(1, abs(want)), "type \(dtype) g \(g) d \(d) n \(n): score")
                    }
                    #expect(scores[(h * stride + n)..<((h + 1) * stride)].allSatisfy { $0 == pad }, "type \(dtype) g \(g) d \(d) n \(n): padding")
                    for c in 0..<d {
                        let want = 1 + (0..<n).reduce(0.0) { $0 + Double(w[h * stride + $1]) * Double(rows[$1][c]) }
                        #expect(abs(Double(sums[h * d + c]) - want) < 1e-4 * max(1, abs(want)), "type \(dtype) g \(g) d \(d) n \(n): sum")
                    }
                }
            }
        }
    }

    @Test func exactEqualsNaiveSoftmax() throws {
        let f = try fixture()
        try f.store.read { s in
            let keys = try s.vectors(f.id, .keys), values = try s.vectors(f.id, .values)
            let q = Array(f.queries.prefix(2 * f.d))
            let r = try q.withUnsafeBufferPointer { try Attention.attend(queries: $0, selector: nil, keys: keys, values: values, parameters: AttentionParameters()) }
            #expect(r.heads.count == 2 && r.attended.count == f.n)
            for h in 0..<2 {
                let ref = Self.naive(query: Array(q[(h * f.d)..<((h + 1) * f.d)]), keys: f.keys, values: f.keys, d: f.d,
                                     positions: Array(0..<f.n), scale: 1 / Double(f.d).squareRoot())
                #expect(abs(Double(r.heads[h].lse) - ref.lse) < 1e-3)
                for c in 0..<f.d { #expect(abs(Double(r.heads[h].output[c]) - ref.out[c]) < 1e-4 * max(1, abs(ref.out[c]))) }
            }
        }
    }

    @Test func logSumExpMergeOfAnySplitEqualsTheUnion() throws {
        let f = try fixture()
        var rng = SeededRandom(seed: 4)
        try f.store.read { s in
            let keys = try s.vectors(f.id, .keys), values = try s.vectors(f.id, .values)
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: f.d)
            defer { scratch.deallocate() }
            let q = Array(f.queries.prefix(f.d))
            for trial in 0..<5 {
                let union = Array(Set((0..<200).map { _ in Int.random(in: 0..<f.n, using: &rng) })).sorted()
                let cut = trial == 0 ? 0 : Int.random(in: 1..<union.count, using: &rng)
                let (a, b) = (Array(union[..<cut]), Array(union[cut...]))
                let whole = q.withUnsafeBufferPointer { AttentionKernel.attend(query: $0.baseAddress!, positions: union, keys: keys, values: values, score: ScoreTransform(scale: 0.25)) }
                let pa = q.withUnsafeBufferPointer { AttentionKernel.attend(query: $0.baseAddress!, positions: a, keys: keys, values: values, score: ScoreTransform(scale: 0.25)) }
                let pb = q.withUnsafeBufferPointer { AttentionKernel.attend(query: $0.baseAddress!, positions: b, keys: keys, values: values, score: ScoreTransform(scale: 0.25)) }
                let merged = pa.merged(with: pb)
                #expect(abs(merged.lse - whole.lse) < 1e-4)
                #expect(relativeError(merged.output, whole.output) < 1e-5)
            }
        }
    }

    /// Every selector, built over the fixture's keys.
    func selectors(_ f: IndexFixture) throws -> [(String, any VectorIndex)] {
        try f.store.read { s in
            let keys = try s.vectors(f.id, .keys)
            var out: [(String, any VectorIndex)] = [("hip", HiPSelector(keys: keys))]
            var p = IndexBuildParameters()
            p.M = 8; p.efConstruction = 40; p.tables = 16; p.bits = 6; p.nlist = 16
            for kind in IndexKind.stored where kind != .retrieval {
                out.append((kind.rawValue, try IndexCatalog.build(kind, keys: keys, parameters: p)))
            }
            return out
        }
    }

    @Test func withKEqualToNEveryMethodEqualsExact() throws {
        let f = try fixture(n: 300)
        var p = AttentionParameters()
        p.k = f.n
        p.search.graph.ef = f.n
        p.search.ivf.nprobe = 16
        p.search.tree.beam = 1000
        p.search.lsh.minCollisions = 1
        p.search.landmark.blocks = 1000
        try f.store.read { s in
            let keys = try s.vectors(f.id, .keys), values = try s.vectors(f.id, .values)
            let q = Array(f.queries.prefix(2 * f.d))
            let exact = try q.withUnsafeBufferPointer { try Attention.attend(queries: $0, selector: nil, keys: keys, values: values, parameters: p) }
            for (name, selector) in try selectors(f) {
                let r = try q.withUnsafeBufferPointer { try Attention.attend(queries: $0, selector: selector, keys: keys, values: values, parameters: p) }
                if name == "lsh" { continue }  // LSH only returns keys sharing a bucket with the query
                #expect(r.attended == Array(0..<f.n), "\(name) attended \(r.attended.count)")
                for h in 0..<2 {
                    #expect(relativeError(r.heads[h].output, exact.heads[h].output) < 1e-5, "\(name)")
                    #expect(abs(r.heads[h].lse - exact.heads[h].lse) < 1e-4, "\(name)")
                }
            }
        }
    }

    @Test func staticPartIsSinksAndWindowWithoutDuplicates() {
        #expect(Attention.staticPositions(count: 10, sinks: 4, window: 3) == [0, 1, 2, 3, 7, 8, 9])
        #expect(Attention.staticPositions(count: 5, sinks: 4, window: 3) == [0, 1, 2, 3, 4])
        #expect(Attention.staticPositions(count: 3, sinks: 0, window: 0) == [])
    }
}

/// Every method on the real MiniLM sample (a diffuse head), against floors set a little below
/// what was measured (release and debug give the same numbers: everything is deterministic).
@Suite struct AttentionFidelityFloors {
    @Test func everyMethodMeetsItsFloorsOnTheRealSample() throws {
        let data = repositoryDataDirectory() + "/minilm"
        let dir = TemporaryDirectory("kvrecall-floors")
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.ingest(keys: try NPY.read(path: data + "/keys.npy"), values: try NPY.read(path: data + "/values.npy"),
                         queries: try NPY.read(path: data + "/prefill_queries.npy"), first: HeadID(), dtype: .f32)
        for kind in [IndexKind.hnsw, .ivf, .lsh, .tree, .retrieval, .landmark] {
            let index = try store.read { s in
                try IndexCatalog.build(kind, keys: try s.vectors(HeadID(), .keys), queries: try s.vectors(HeadID(), .queries),
                                       parameters: IndexBuildParameters())
            }
            try IndexCatalog.save(index, in: store, head: HeadID())
        }
        // auto measures its candidates on the head's last prefill queries (no codes here: no quantized).
        let plan = try store.read { s in
            try HeadPlanner.plan(keys: try s.vectors(HeadID(), .keys), values: try s.vectors(HeadID(), .values),
                                 queries: try s.vectors(HeadID(), .queries), group: 1, calibration: CalibrationParameters(),
                                 attention: AttentionParameters(), policy: PolicyParameters(), build: IndexBuildParameters()).plan
        }
        #expect(plan.candidates.contains { $0.policy == .exact } && !plan.candidates.contains { $0.policy == .quantized })
        try plan.save(in: store, head: HeadID())
        let queries = Array(try NPY.read(path: data + "/queries.npy").floats().prefix(64 * 32))
        var p = AttentionParameters()
        p.k = 100
        p.search.graph.ef = 128
        p.search.ivf.nprobe = 8
        // (min recall@100, max output error). Measured on these 64 queries: exact 1.0/0; retrieval
        // 0.978/0.716; hip 0.398/0.628; landmark 0.441/0.628; hnsw 0.961/0.715; ivf 0.438/0.915;
        // lsh 0.661/0.723; tree 0.559/0.860; estimate 0.555/0.115 (oracle top-100 error 0.715).
        let floors: [AttentionMethod: (Double, Double)] = [
            .exact: (1.0, 1e-5), .retrieval: (0.95, 0.74), .hip: (0.35, 0.66), .landmark: (0.40, 0.66),
            .hnsw: (0.93, 0.74), .ivf: (0.40, 0.95), .lsh: (0.60, 0.75), .tree: (0.50, 0.89), .estimate: (0.50, 0.15),
            .auto: (0.50, 0.15),
        ]
        var oracleError = 0.0
        var measured: [AttentionMethod: (Double, Double)] = [:]
        try store.read { snapshot in
            for method in AttentionMethod.allCases where method != .quantized {  // (no codes in this store)
                let prepared = try method.prepare(snapshot: snapshot, head: HeadID())
                var recall = 0.0, error = 0.0
                try queries.withUnsafeBufferPointer { qb in
                    for q in 0..<64 {
                        let one = UnsafeBufferPointer(rebasing: qb[(q * 32)..<((q + 1) * 32)])
                        let r = try prepared.attend(one, parameters: p)
                        let f = Attention.fidelity(of: r, queries: one, keys: prepared.keys, values: prepared.values, parameters: p)
                        recall += f.recall / 64
                        error += f.outputError / 64
                        if method == .exact { oracleError += f.oracleError / 64 }
                    }
                }
                measured[method] = (recall, error)
            }
        }
        for (method, (minRecall, maxError)) in floors {
            let (recall, error) = measured[method]!
            #expect(recall >= minRecall, "\(method) recall@100 \(recall)")
            #expect(error <= maxError, "\(method) output error \(error)")
        }
        // The estimation zone at least halves the oracle top-100's error on this diffuse head.
        #expect(measured[.estimate]!.1 < oracleError / 2, "estimate \(measured[.estimate]!.1) vs oracle \(oracleError)")
    }

    /// At a budget where the other index methods select by a scan, the estimation zone's retrieval
    /// zone is each query head's exact top-k positions, taken out of their clusters: at k = n it is
    /// exact attention, and below it every head's exact top-k is attended, each position once.
    @Test func estimationWithAnExactZoneAttendsEachHeadsTopKAndCountsEveryPositionOnce() throws {
        let f = try IndexFixture(n: 2000, d: 16, clusters: 32, queryCount: 4)
        try f.store.read { s in
            let keys = try s.vectors(f.id, .keys), values = try s.vectors(f.id, .values)
            let ivf = try IndexCatalog.build(.ivf, keys: keys, queries: nil, parameters: IndexBuildParameters()) as! IVFIndex
            let summary = try ClusterSummary(ivf: ivf, keys: keys, values: values)
            try f.queries.withUnsafeBufferPointer { q in
                var p = AttentionParameters(k: 2000, sinks: 4, window: 16)
                let whole = try Attention.attendEstimated(queries: q, summary: summary, keys: keys, values: values, parameters: p, exactZone: true)
                let exact = try Attention.attend(queries: q, selector: nil, keys: keys, values: values, parameters: p)
                #expect(whole.estimatedClusters == 0)
                for (a, b) in zip(whole.heads, exact.heads) {
                    #expect(zip(a.output, b.output).allSatisfy { abs($0 - $1) < 1e-4 } && abs(a.lse - b.lse) < 1e-3)
                }
                p.k = 50
                let part = try Attention.attendEstimated(queries: q, summary: summary, keys: keys, values: values, parameters: p, exactZone: true)
                let attended = Set(part.attended)
                for h in 0..<4 {
                    let one = UnsafeBufferPointer(rebasing: q[(h * 16)..<((h + 1) * 16)])
                    let top = try FlatIndex(keys: keys).search(one, k: 70, parameters: SearchParameters(), keys: keys).hits(0).map(\.id)
                    let outside = top.filter { $0 >= 4 && $0 < 2000 - 16 }.prefix(50)
                    #expect(outside.allSatisfy(attended.contains), "head \(h)'s exact top-50 is attended")
                }
                let estimatedMembers = part.estimated.flatMap { $0 }.map(Int.init)
                #expect(Set(estimatedMembers).isDisjoint(with: attended) && part.attended.count + estimatedMembers.count == 2000,
                        "every position once: attended \(part.attended.count), estimated \(estimatedMembers.count)")
            }
        }
    }
}
