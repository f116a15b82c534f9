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

/// The session's adaptive budget: an index method's k raised per head, at build, for heads whose
/// query heads spread their attention (DESIGN "Adaptive budget").
@Suite struct AdaptiveBudgetTests {
    static let d = 32, n = 4096, group = 2

    /// A diffuse head: unit keys and soft queries, so the exact top-100 holds a small part of each
    /// query head's mass. Prefill queries for every position and query head.
    static func diffuseHead() -> (keys: [Float], values: [Float], prefill: [Float], decode: [Float]) {
        var rng = SeededRandom(seed: 41)
        func gaussian(_ count: Int, _ sigma: Float) -> [Float] {
            (0..<count).map { _ in
                let u = Float.random(in: Float.ulpOfOne..<1, using: &rng), v = Float.random(in: 0..<1, using: &rng)
                return sigma * (-2 * log(u)).squareRoot() * cos(2 * .pi * v)
            }
        }
        return (gaussian(n * d, 1), gaussian(n * d, 1), gaussian(n * group * d, 0.6), gaussian(8 * group * d, 0.6))
    }

    static func session(_ budgetMass: Double?, directory: String) throws -> KVSession {
        let h = diffuseHead()
        let configuration = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: group, headDimension: d, dtype: .f32,
                                                 method: .retrieval, budgetMass: budgetMass)
        let session = try KVSession(configuration: configuration, directory: directory)
        try h.keys.withUnsafeBufferPointer { k in
            try h.values.withUnsafeBufferPointer { v in try session.append(layer: 0, keys: k, values: v) }
        }
        try h.prefill.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: 0, queries: $0) }
        try session.buildIndexes()
        return session
    }

    /// Mean output error of the session's 8 decode groups against exact attention, and the most
    /// positions one group attended.
    static func measure(_ session: KVSession) throws -> (error: Double, attended: Int) {
        let h = diffuseHead()
        var error = 0.0, attended = 0
        try session.store.read { snapshot in
            let keys = try snapshot.vectors(HeadID(), .keys), values = try snapshot.vectors(HeadID(), .values)
            for q in 0..<8 {
                let one = Array(h.decode[(q * group * d)..<((q + 1) * group * d)])
                let result = try one.withUnsafeBufferPointer { try session.attendDetailed(layer: 0, head: 0, queries: $0) }
                let fidelity = one.withUnsafeBufferPointer {
                    Attention.fidelity(of: result, queries: $0, keys: keys, values: values, parameters: session.parameters)
                }
                error += fidelity.outputError / 8
                attended = max(attended, result.attended.count)
            }
        }
        return (error, attended)
    }

    @Test func aDiffuseHeadGetsAHigherKThatLowersItsErrorAndKeepsItOnResume() throws {
        let fixedDir = TemporaryDirectory("kvrecall-budget-fixed"), budgetDir = TemporaryDirectory("kvrecall-budget")
        let fixed = try Self.session(nil, directory: fixedDir.path)
        defer { fixed.close() }
        #expect(try fixed.plan(layer: 0, head: 0) == nil)
        let fixedRun = try Self.measure(fixed)
        #expect(fixedRun.attended <= Self.group * 100 + 4 + 64)

        var budgetRun: (error: Double, attended: Int)
        let raised: Int
        do {
            let session = try Self.session(0.9, directory: budgetDir.path)
            let plan = try #require(try session.plan(layer: 0, head: 0))
            raised = try #require(plan.k, "\(plan.summary)")
            // 200, 400...: at most 10% of the 4096 keys.
            #expect(raised > 100 && raised <= 410, "\(plan.summary)")
            #expect(plan.reason.contains("adaptive budget"))
            #expect(session.report()[0].hasPrefix("layer 0 head 0: retrieval (adaptive budget"))
            budgetRun = try Self.measure(session)
            #expect(budgetRun.attended > fixedRun.attended)
            #expect(budgetRun.error < fixedRun.error, "budget \(budgetRun.error) vs fixed k \(fixedRun.error)")
            try session.checkpoint()
            session.close()
        }
        let resumed = try KVSession(resuming: budgetDir.path)
        defer { resumed.close() }
        #expect(try resumed.plan(layer: 0, head: 0)?.k == raised)
        #expect(try Self.measure(resumed).attended == budgetRun.attended)
    }

    /// The group kernel (every head scored per row read, positions split in parts merged by
    /// log-sum-exp) equals a double-precision softmax per head, for every dtype, a soft-cap, odd
    /// dimensions (scalar tails) and a selected subset of positions.
    @Test(arguments: [(DType.f16, 24, 3, 1), (.f32, 37, 5, 3), (.bf16, 64, 4, 2), (.f16, 256, 4, 4)])
    func theSplitGroupKernelEqualsASoftmaxPerHead(dtype: DType, d: Int, g: Int, parts: Int) throws {
        var rng = SeededRandom(seed: 7)
        let n = 9000
        let dir = TemporaryDirectory("kvrecall-group-kernel")
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        let keys = rng.gaussianMatrix(rows: n, dim: d), values = rng.gaussianMatrix(rows: n, dim: d)
        try store.ingest(keys: Tensor(name: "k", shape: [n, d], dtype: .f32, floats: keys),
                         values: Tensor(name: "v", shape: [n, d], dtype: .f32, floats: values),
                         queries: nil, first: HeadID(), dtype: dtype)
        let queries = rng.gaussianMatrix(rows: g, dim: d)
        var p = AttentionParameters()
        p.softCap = 5
        let score = ScoreTransform(p, dimension: d)
        try store.read { s in
            let kv = try s.vectors(HeadID(), .keys), vv = try s.vectors(HeadID(), .values)
            for subset in [nil, (0..<n).filter { $0 % 3 == 0 || $0 < 4 }] {
                let positions = subset ?? Array(0..<n)
                let got = queries.withUnsafeBufferPointer { q in
                    subset.map { list in
                        list.withUnsafeBufferPointer {
                            AttentionKernel.attendGroup(queries: q.baseAddress!, g: g, positions: $0, keys: kv, values: vv,
                                                        score: score, parts: parts)
                        }
                    } ?? AttentionKernel.attendGroup(queries: q.baseAddress!, g: g, positions: nil, keys: kv, values: vv,
                                                     score: score, parts: parts)
                }
                var row = [Float](repeating: 0, count: d)
                for h in 0..<g {
                    let scores = positions.map { i -> Double in
                        kv.decodeRow(i, into: &row)
                        var dot = 0.0
                        for j in 0..<d { dot += Double(queries[h * d + j]) * Double(row[j]) }
                        return Double(score(Float(dot)))
                    }
                    let m = scores.max()!
                    let weights = scores.map { exp($0 - m) }
                    let total = weights.reduce(0, +)
                    var out = [Double](repeating: 0, count: d)
                    for (w, i) in zip(weights, positions) {
                        vv.decodeRow(i, into: &row)
                        for j in 0..<d { out[j] += w * Double(row[j]) / total }
                    }
                    #expect(abs(Double(got[h].lse) - (m + log(total))) < 1e-3)
                    #expect(relativeError(got[h].output, out.map { Float($0) }) < 1e-4)
                }
            }
        }
    }

    @Test func theBudgetMassIsValidated() throws {
        for bad in [0.0, -0.5, 1.5, .nan] {
            let c = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: 8, budgetMass: bad)
            #expect(throws: SessionError.self) { try c.validate() }
        }
        // A configuration saved before the knob existed keeps k fixed (auto kept its 0.9).
        let json = #"{"layers":1,"kvHeads":1,"queryHeadsPerKV":1,"headDimension":8,"dtype":"f16","method":"retrieval","k":100,"sinks":4,"window":64,"upkeepBatch":64,"context":0}"#
        #expect(try JSONDecoder().decode(SessionConfiguration.self, from: Data(json.utf8)).budgetMass == nil)
        let autoJSON = json.replacingOccurrences(of: "\"retrieval\"", with: "\"auto\"")
        #expect(try JSONDecoder().decode(SessionConfiguration.self, from: Data(autoJSON.utf8)).budgetMass == 0.9)
    }
}
