import CKernels
import Dispatch
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
    public func merged(with other: PartialAttention) -> PartialAttention { Self.merged([self, other]) }

    /// The partial over the union of many disjoint sets, in one pass (one output written, where
    /// merging them pairwise writes one per pair).
    public static func merged(_ parts: [PartialAttention]) -> PartialAttention {
        merged(count: parts.count) { parts[$0] }
    }

    /// The partial over the union of `count` disjoint sets, the `i`th being `part(i)`: one output
    /// written and each share computed once, without gathering the partials into an array (a
    /// quantized step merges ten partials per query head).
    static func merged(count: Int, _ part: (Int) -> PartialAttention) -> PartialAttention {
        var m = -Float.infinity, live = 0, last = -1
        for i in 0..<count {
            let lse = part(i).lse
            guard lse > -.infinity else { continue }
            m = max(m, lse)
            live += 1
            last = i
        }
        guard live > 1 else { return last >= 0 ? part(last) : count > 0 ? part(0) : .empty(dimension: 0) }
        // Each partial's share exp(lse - m), computed once.
        var shares = [Double](repeating: 0, count: count)
        var total = 0.0
        for i in 0..<count where part(i).lse > -.infinity {
            shares[i] = exp(Double(part(i).lse - m))
            total += shares[i]
        }
        var out = [Float](repeating: 0, count: part(last).output.count)
        out.withUnsafeMutableBufferPointer { o in
            for i in 0..<count where shares[i] > 0 {
                let f = Float(shares[i] / total)
                part(i).output.withUnsafeBufferPointer { x in
                    precondition(x.count == o.count, "partials of different dimensions (\(x.count) and \(o.count)) cannot merge")
                    for j in 0..<o.count { o[j] += f * x[j] }
                }
            }
        }
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

/// Exact attention kernels: a GQA group's positions attended in one pass over their keys (every
/// query head scored per key row read) and one over their values, split across cores and merged
/// by log-sum-exp (flash-decoding's split-K).
package enum AttentionKernel {
    /// Positions a part of a split pass should at least hold: below it starting a part costs more
    /// than it saves.
    static let minimumPartRows = 2048

    /// Exact attention of `g` query heads (`g x d` queries) over `positions` (nil: every position
    /// of `keys`), in up to `parts` parts run in parallel and merged by log-sum-exp.
    package static func attendGroup(queries: UnsafePointer<Float>, g: Int, positions: UnsafeBufferPointer<Int>?,
                                    keys: VectorView, values: VectorView, score: ScoreTransform,
                                    parts requested: Int = 1) -> [PartialAttention] {
        let n = positions?.count ?? keys.count
        let dv = values.dimension
        guard n > 0 else { return Array(repeating: .empty(dimension: dv), count: g) }
        let parts = max(1, min(requested, n / minimumPartRows))
        if parts == 1 {
            return attendPart(queries: queries, g: g, positions: positions, range: 0..<n, keys: keys, values: values, score: score)
        }
        var results = [[PartialAttention]](repeating: [], count: parts)
        results.withUnsafeMutableBufferPointer { out in
            SpinJoin.run(tasks: parts, threads: parts) { p in
                out[p] = attendPart(queries: queries, g: g, positions: positions, range: (n * p / parts)..<(n * (p + 1) / parts),
                                    keys: keys, values: values, score: score)
            }
        }
        return (0..<g).map { h in PartialAttention.merged(results.map { $0[h] }) }
    }

    /// One part: positions `range` of `positions` (or of every position). Rows are handed to the
    /// C kernels in chunks of pointers; the part's scores stay between the two passes.
    static func attendPart(queries: UnsafePointer<Float>, g: Int, positions: UnsafeBufferPointer<Int>?, range: Range<Int>,
                           keys: VectorView, values: VectorView, score: ScoreTransform) -> [PartialAttention] {
        let d = keys.dimension, dv = values.dimension, len = range.count
        let chunk = 256
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: g * len)
        let rows = UnsafeMutablePointer<UnsafeRawPointer?>.allocate(capacity: chunk)
        let sums = UnsafeMutablePointer<Float>.allocate(capacity: g * dv)
        defer { scores.deallocate(); rows.deallocate(); sums.deallocate() }
        sums.initialize(repeating: 0, count: g * dv)
        func fill(_ view: VectorView, _ start: Int, _ count: Int) {
            for j in 0..<count {
                let i = range.lowerBound + start + j
                rows[j] = view.row(positions?[i] ?? i)
            }
        }
        let dtype = Int32(keys.dtype.kernelCode), valueType = Int32(values.dtype.kernelCode)
        for start in stride(from: 0, to: len, by: chunk) {
            let count = min(chunk, len - start)
            fill(keys, start, count)
            kvr_group_scores(queries, g, d, rows, count, dtype, score.scale, scores + start, len)
        }
        var maxima = [Float](repeating: -.infinity, count: g), totals = [Float](repeating: 0, count: g)
        for h in 0..<g {
            let row = scores + h * len
            score.cap(row, count: len)
            let m = kvr_max(row, len)  // vectorised: a scalar Swift loop here was a tenth of exact's time
            maxima[h] = m
            totals[h] = kvr_exp_sub(row, len, m)
        }
        for start in stride(from: 0, to: len, by: chunk) {
            let count = min(chunk, len - start)
            fill(values, start, count)
            kvr_group_accumulate(scores + start, g, len, rows, count, dv, valueType, sums)
        }
        return (0..<g).map { h in
            let inv = 1 / totals[h]
            return PartialAttention(output: (0..<dv).map { sums[h * dv + $0] * inv }, lse: maxima[h] + log(totals[h]))
        }
    }

    /// Attention of one `query` over `positions` (scores through `score`), exactly.
    static func attend(query: UnsafePointer<Float>, positions: [Int], keys: VectorView, values: VectorView,
                       score: ScoreTransform) -> PartialAttention {
        positions.withUnsafeBufferPointer {
            attendGroup(queries: query, g: 1, positions: $0, keys: keys, values: values, score: score)[0]
        }
    }

    /// Exact attention over all positions, given all scaled scores: the scalar reference (double
    /// sums, exp per weight) that the fidelity metrics measure every method, exact included, against.
    static func attendAll(scores: [Float], values: VectorView, scratch: UnsafeMutablePointer<Float>) -> PartialAttention {
        let dv = values.dimension
        guard let m = scores.max() else { return .empty(dimension: dv) }
        var out = [Double](repeating: 0, count: dv)
        var l: Double = 0
        for i in 0..<values.count {
            let w = exp(Double(scores[i] - m))
            l += w
            values.decodeRow(i, into: scratch)
            for c in 0..<dv { out[c] += w * Double(scratch[c]) }
        }
        return PartialAttention(output: out.map { Float($0 / l) }, lse: m + Float(log(l)))
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
}

extension DType {
    /// The C kernels' code for this storage type (KVR_DTYPE_*).
    var kernelCode: Int { self == .f32 ? Int(KVR_DTYPE_F32) : self == .f16 ? Int(KVR_DTYPE_F16) : Int(KVR_DTYPE_BF16) }
}
