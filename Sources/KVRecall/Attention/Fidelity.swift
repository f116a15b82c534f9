import Foundation

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

extension Attention {
    /// Fidelity of `result` for `queries` (`g x d`) against exact attention over every position.
    public static func fidelity(of result: AttentionResult, queries: UnsafeBufferPointer<Float>, keys: VectorView,
                                values: VectorView, parameters: AttentionParameters) -> FidelityMetrics {
        let d = keys.dimension
        let g = queries.count / d
        let n = keys.count
        let k = min(parameters.k, n)
        let scale = parameters.scale ?? 1 / Float(d).squareRoot()
        let scratch = UnsafeMutablePointer<Float>.allocate(capacity: max(values.dimension, d))
        defer { scratch.deallocate() }
        let fixed = staticPositions(count: n, sinks: parameters.sinks, window: parameters.window)
        let attended = Set(result.attended)
        var sums = (recall: 0.0, mass: 0.0, error: 0.0, oracleMass: 0.0, oracleError: 0.0)
        for h in 0..<g {
            let query = queries.baseAddress! + h * d
            let scores = AttentionKernel.allScores(query: query, keys: keys, scale: scale)
            let exact = AttentionKernel.attendAll(scores: scores, values: values, scratch: scratch)
            var top = TopK<Int>(k: k)
            top.push(scores: scores, count: n, firstID: 0)
            let topIDs = top.sorted().map(\.id)
            sums.recall += Double(topIDs.filter { attended.contains($0) }.count) / Double(k)
            var mass = 0.0
            for i in result.attended { mass += exp(Double(scores[i] - exact.lse)) }
            // Estimated clusters contribute (approximately) the mass of their members.
            let fixedSet = Set(fixed)
            for cluster in result.estimated {
                for id in cluster where !fixedSet.contains(Int(id)) { mass += exp(Double(scores[Int(id)] - exact.lse)) }
            }
            sums.mass += min(1, mass)
            sums.error += relativeError(result.heads[h].output, exact.output)
            let oracleSet = Array(Set(topIDs).union(fixed)).sorted()
            var oracleMass = 0.0
            for i in oracleSet { oracleMass += exp(Double(scores[i] - exact.lse)) }
            sums.oracleMass += oracleMass
            let oracle = AttentionKernel.attend(query: query, positions: oracleSet, keys: keys, values: values,
                                                scale: scale, scratch: scratch)
            sums.oracleError += relativeError(oracle.output, exact.output)
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
func logSumExp(_ values: [Float]) -> Float {
    guard let m = values.max(), m > -.infinity else { return -.infinity }
    var s = 0.0
    for v in values { s += exp(Double(v - m)) }
    return m + Float(log(s))
}
