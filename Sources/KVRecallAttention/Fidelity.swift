import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes

/// How close an attention result is to exact attention (DESIGN.md section 6), averaged over the
/// query heads of the group.
public struct FidelityMetrics: Sendable {
    /// |attended ∩ exact top-k| / k.
    public var recall: Double
    /// Exact softmax mass of the attended set, plus that of the members of estimated clusters.
    public var attentionMass: Double
    /// ||o - o_exact|| / ||o_exact||.
    public var outputError: Double
    /// Mass that exact top-k plus the static part would hold (the oracle's attended set).
    public var oracleMass: Double
    /// Output error of the oracle: exact top-k plus the static part, attended exactly.
    public var oracleError: Double
}

/// Exact attention for one query group, computed once and shared by the fidelity of every
/// method run on that group (`--method all`, `compare`): per query head its scores, its exact
/// output and log-sum-exp, exact top-k, and the oracle's mass and error.
public struct ExactReference {
    struct Head {
        let scores: [Float]
        let exact: PartialAttention
        let topIDs: [Int]
        let oracleMass: Double
        let oracleError: Double
    }

    let heads: [Head]
    let k: Int
    let fixed: [Int]

    /// The reference for `queries` (`g x d`) over every position of `keys` / `values`, with
    /// `parameters`' k, sinks, window and scale.
    public init(queries: UnsafeBufferPointer<Float>, keys: VectorView, values: VectorView, parameters: AttentionParameters) {
        let d = keys.dimension
        let g = queries.count / d
        let n = keys.count
        let k = min(parameters.k, n)
        let score = ScoreTransform(parameters, dimension: d)
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: max(values.dimension, d))
        defer { scratch.deallocate() }
        let fixed = Attention.staticPositions(count: n, sinks: parameters.sinks, window: parameters.window)
        heads = (0..<g).map { h in
            let query = queries.baseAddress! + h * d
            let scores = AttentionKernel.allScores(query: query, keys: keys, score: score)
            let exact = AttentionKernel.attendAll(scores: scores, values: values, scratch: scratch)
            var top = TopK<Int>(k: k)
            top.push(scores: scores, count: n, firstID: 0)
            let topIDs = top.sorted().map(\.id)
            let oracleSet = Array(Set(topIDs).union(fixed)).sorted()
            var oracleMass = 0.0
            for i in oracleSet { oracleMass += exp(Double(scores[i] - exact.lse)) }
            let oracle = AttentionKernel.attend(query: query, positions: oracleSet, keys: keys, values: values,
                                                score: score)
            return Head(scores: scores, exact: exact, topIDs: topIDs, oracleMass: oracleMass,
                        oracleError: relativeError(oracle.output, exact.output))
        }
        self.k = k
        self.fixed = fixed
    }
}

extension Attention {
    /// Fidelity of `result` for `queries` (`g x d`) against exact attention over every position.
    public static func fidelity(of result: AttentionResult, queries: UnsafeBufferPointer<Float>, keys: VectorView,
                                values: VectorView, parameters: AttentionParameters) -> FidelityMetrics {
        fidelity(of: result, reference: ExactReference(queries: queries, keys: keys, values: values, parameters: parameters))
    }

    /// Fidelity of `result` against a reference computed for the same queries and parameters.
    public static func fidelity(of result: AttentionResult, reference: ExactReference) -> FidelityMetrics {
        let g = reference.heads.count
        let attended = Set(result.attended)
        let fixedSet = Set(reference.fixed)
        var sums = (recall: 0.0, mass: 0.0, error: 0.0, oracleMass: 0.0, oracleError: 0.0)
        for (h, head) in reference.heads.enumerated() {
            sums.recall += Double(head.topIDs.filter { attended.contains($0) }.count) / Double(reference.k)
            var mass = 0.0
            for i in result.attended { mass += exp(Double(head.scores[i] - head.exact.lse)) }
            // Estimated clusters contribute (approximately) the mass of their members.
            for cluster in result.estimated {
                for id in cluster where !fixedSet.contains(Int(id)) { mass += exp(Double(head.scores[Int(id)] - head.exact.lse)) }
            }
            sums.mass += min(1, mass)
            sums.error += relativeError(result.heads[h].output, head.exact.output)
            sums.oracleMass += head.oracleMass
            sums.oracleError += head.oracleError
        }
        let gd = Double(max(1, g))
        return FidelityMetrics(recall: sums.recall / gd, attentionMass: sums.mass / gd, outputError: sums.error / gd,
                               oracleMass: sums.oracleMass / gd, oracleError: sums.oracleError / gd)
    }
}

/// ||a - b|| / ||b|| (0 when both are zero).
public func relativeError(_ a: [Float], _ b: [Float]) -> Double {
    var num = 0.0, den = 0.0
    for (x, y) in zip(a, b) {
        num += Double(x - y) * Double(x - y)
        den += Double(y) * Double(y)
    }
    return den == 0 ? (num == 0 ? 0 : .infinity) : (num / den).squareRoot()
}

/// log sum exp of `values` (-inf for none).
package func logSumExp(_ values: [Float]) -> Float {
    guard let m = values.max(), m > -.infinity else { return -.infinity }
    var s = 0.0
    for v in values { s += exp(Double(v - m)) }
    return m + Float(log(s))
}
