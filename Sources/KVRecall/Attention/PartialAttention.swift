import Foundation

/// Attention of one query over some set of positions: the normalised output and its
/// log-sum-exp. Two partials over disjoint sets merge exactly into the partial over their union
/// (the flash-decoding merge), which is how the static part, the retrieved part and an estimated
/// part are combined.
public struct PartialAttention: Equatable, Sendable {
    /// Output vector (value dimension).
    public var output: [Float]
    /// log sum_i exp(score_i) over the set; -inf for an empty set.
    public var lse: Float

    public init(output: [Float], lse: Float) {
        self.output = output
        self.lse = lse
    }

    public static func empty(dimension: Int) -> PartialAttention {
        PartialAttention(output: [Float](repeating: 0, count: dimension), lse: -.infinity)
    }

    /// The partial over the union of two disjoint sets.
    public func merged(with other: PartialAttention) -> PartialAttention {
        if other.lse == -.infinity { return self }
        if lse == -.infinity { return other }
        let m = max(lse, other.lse)
        let a = exp(Double(lse - m)), b = exp(Double(other.lse - m))
        let total = a + b
        let wa = Float(a / total), wb = Float(b / total)
        var out = output
        for j in out.indices { out[j] = wa * output[j] + wb * other.output[j] }
        return PartialAttention(output: out, lse: m + Float(log(total)))
    }
}

/// Scores and value accumulation for attention over explicit position lists.
enum AttentionKernel {
    /// Attention of `query` over `positions` (scores scaled by `scale`), exactly.
    static func attend(query: UnsafePointer<Float>, positions: [Int], keys: VectorView, values: VectorView,
                       scale: Float, scratch: UnsafeMutablePointer<Float>) -> PartialAttention {
        let dv = values.dimension
        guard !positions.isEmpty else { return .empty(dimension: dv) }
        var scores = [Float](repeating: 0, count: positions.count)
        var m = -Float.infinity
        for (j, i) in positions.enumerated() {
            let s = keys.score(query: query, row: i) * scale
            scores[j] = s
            m = max(m, s)
        }
        var out = [Float](repeating: 0, count: dv)
        var l: Double = 0
        out.withUnsafeMutableBufferPointer { o in
            for (j, i) in positions.enumerated() {
                let w = Float(exp(Double(scores[j] - m)))
                l += Double(w)
                values.decodeRow(i, into: scratch)
                for c in 0..<dv { o[c] += w * scratch[c] }
            }
            let inv = Float(1 / l)
            for c in 0..<dv { o[c] *= inv }
        }
        return PartialAttention(output: out, lse: m + Float(log(l)))
    }

    /// Scaled scores of `query` against every key (`keys.count` floats), block by block.
    static func allScores(query: UnsafePointer<Float>, keys: VectorView, scale: Float) -> [Float] {
        var scores = [Float](repeating: 0, count: keys.count)
        scores.withUnsafeMutableBufferPointer { s in
            for b in 0..<keys.blockCount {
                keys.scores(query: query, block: b, into: s.baseAddress! + b * keys.blockSize)
            }
            for i in 0..<s.count { s[i] *= scale }
        }
        return scores
    }

    /// Exact attention over all positions, given all scaled scores.
    static func attendAll(scores: [Float], values: VectorView, scratch: UnsafeMutablePointer<Float>) -> PartialAttention {
        let dv = values.dimension
        guard let m = scores.max() else { return .empty(dimension: dv) }
        var out = [Float](repeating: 0, count: dv)
        var l: Double = 0
        out.withUnsafeMutableBufferPointer { o in
            for b in 0..<values.blockCount {
                let rows = values.rowsInBlock(b)
                let base = b * values.blockSize
                for r in 0..<rows {
                    let w = Float(exp(Double(scores[base + r] - m)))
                    l += Double(w)
                    values.decodeRow(base + r, into: scratch)
                    for c in 0..<dv { o[c] += w * scratch[c] }
                }
            }
            let inv = Float(1 / l)
            for c in 0..<dv { o[c] *= inv }
        }
        return PartialAttention(output: out, lse: m + Float(log(l)))
    }
}
