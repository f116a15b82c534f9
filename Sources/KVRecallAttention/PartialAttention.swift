import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes

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

/// What a raw inner product q.k becomes before the softmax: scaled, then optionally soft-capped
/// (Gemma 2's cap * tanh(s / cap)). Monotonic, so every index's top-k is unchanged by it.
public struct ScoreTransform: Sendable, Equatable {
    public var scale: Float
    /// nil: no cap.
    public var softCap: Float?

    public init(scale: Float, softCap: Float? = nil) {
        self.scale = scale
        self.softCap = softCap
    }

    /// The transform `parameters` ask for on keys of dimension `d`.
    public init(_ parameters: AttentionParameters, dimension d: Int) {
        self.init(scale: parameters.scale ?? 1 / Float(d).squareRoot(), softCap: parameters.softCap)
    }

    @inline(__always)
    public func callAsFunction(_ raw: Float) -> Float {
        let s = raw * scale
        guard let cap = softCap else { return s }
        return cap * tanhf(s / cap)
    }

    /// Caps `count` already scaled scores in place (nothing without a cap).
    @inline(__always)
    func cap(_ scores: UnsafeMutablePointer<Float>, count: Int) {
        guard let cap = softCap else { return }
        for i in 0..<count { scores[i] = cap * tanhf(scores[i] / cap) }
    }
}

/// Scores and value accumulation for attention over explicit position lists.
package enum AttentionKernel {
    /// Attention of `query` over `positions` (scores through `score`), exactly.
    static func attend(query: UnsafePointer<Float>, positions: [Int], keys: VectorView, values: VectorView,
                       score: ScoreTransform, scratch: UnsafeMutablePointer<Float>) -> PartialAttention {
        let dv = values.dimension
        guard !positions.isEmpty else { return .empty(dimension: dv) }
        var scores = [Float](repeating: 0, count: positions.count)
        var m = -Float.infinity
        for (j, i) in positions.enumerated() {
            let s = score(keys.score(query: query, row: i))
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

    /// Transformed scores of `query` against every key (`keys.count` floats), block by block.
    package static func allScores(query: UnsafePointer<Float>, keys: VectorView, score: ScoreTransform) -> [Float] {
        var scores = [Float](repeating: 0, count: keys.count)
        scores.withUnsafeMutableBufferPointer { s in
            for b in 0..<keys.blockCount {
                keys.scores(query: query, block: b, into: s.baseAddress! + b * keys.blockSize)
            }
            for i in 0..<s.count { s[i] *= score.scale }
            score.cap(s.baseAddress!, count: s.count)
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

extension AttentionKernel {
    /// Exact attention of `g` query heads (`g x d`) over every position, with BLAS: per block of
    /// keys one sgemm for the group's scores, then per block of values one sgemm for the weighted
    /// sum. Reduced-precision blocks are converted once per block. Memory-bandwidth bound.
    /// With `keep`, only positions whose flag is set are attended (the others weigh 0): exact
    /// attention over a large selected set in one dense pass, cheaper than gathering its rows.
    static func attendAllGroup(queries: UnsafePointer<Float>, g: Int, keys: VectorView, values: VectorView,
                               score: ScoreTransform, keep: [Bool]? = nil) -> [PartialAttention] {
        let n = keys.count, d = keys.dimension, dv = values.dimension, bs = keys.blockSize
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: g * n)
        let decoded = UnsafeMutablePointer<Float>.allocate(capacity: bs * max(d, dv))
        let weights = UnsafeMutablePointer<Float>.allocate(capacity: g * bs)
        var out = [Float](repeating: 0, count: g * dv)
        defer { scores.deallocate(); decoded.deallocate(); weights.deallocate() }
        // Scores, block by block: [g, rows] written into the [g, n] matrix at column b * bs.
        let blockScores = UnsafeMutablePointer<Float>.allocate(capacity: g * bs)
        defer { blockScores.deallocate() }
        for b in 0..<keys.blockCount {
            let rows = keys.rowsInBlock(b)
            let k: UnsafePointer<Float>
            if let inPlace = keys.alignedF32Block(b) { k = inPlace } else {
                keys.decodeRows(keys.blocks[b], count: rows, into: decoded)
                k = UnsafePointer(decoded)
            }
            BLAS.scoresNT(m: g, n: rows, k: d, a: queries, b: k, c: blockScores, alpha: score.scale)
            score.cap(blockScores, count: g * rows)
            for h in 0..<g { (scores + h * n + b * bs).update(from: blockScores + h * rows, count: rows) }
        }
        if let keep {
            for h in 0..<g {
                let row = scores + h * n
                for i in 0..<n where !keep[i] { row[i] = -.infinity }
            }
        }
        var maxima = [Float](repeating: -.infinity, count: g)
        var sums = [Double](repeating: 0, count: g)
        for h in 0..<g {
            let row = scores + h * n
            var m = -Float.infinity
            for i in 0..<n { m = max(m, row[i]) }
            maxima[h] = m
        }
        out.withUnsafeMutableBufferPointer { o in
            for b in 0..<values.blockCount {
                let rows = values.rowsInBlock(b)
                for h in 0..<g {
                    let row = scores + h * n + b * bs
                    var s = 0.0
                    for i in 0..<rows {
                        let w = row[i] == -.infinity ? 0 : expf(row[i] - maxima[h])
                        weights[h * rows + i] = w
                        s += Double(w)
                    }
                    sums[h] += s
                }
                let v: UnsafePointer<Float>
                if let inPlace = values.alignedF32Block(b) { v = inPlace } else {
                    values.decodeRows(values.blocks[b], count: rows, into: decoded)
                    v = UnsafePointer(decoded)
                }
                BLAS.gemm(m: g, n: dv, k: rows, a: weights, b: v, c: o.baseAddress!, beta: 1)
            }
        }
        return (0..<g).map { h in
            let inv = Float(1 / sums[h])
            return PartialAttention(output: (0..<dv).map { out[h * dv + $0] * inv }, lse: maxima[h] + Float(log(sums[h])))
        }
    }
}
