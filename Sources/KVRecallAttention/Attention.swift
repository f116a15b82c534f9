import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes

/// How an index selects positions for the query heads of one GQA group.
public enum GroupSelection: String, CaseIterable, Sendable, Codable {
    /// Every query head searches with its own query (one batched search); each head attends the
    /// union of the heads' top-k (up to g x k positions). Heads of a real group look at different
    /// keys (docs/ARCHITECTURE.md, "GQA selection"), so this is the default.
    case union
    /// The union taken rank by rank across the heads and capped at k positions: the budget of
    /// `summed`, the coverage spread over the heads.
    case unionCapped = "union-capped"
    /// One search with the sum of the group's queries (its score is the sum of the heads' scores).
    case summed
}

/// Knobs of one attention call.
public struct AttentionParameters: Sendable {
    /// Positions retrieved beyond the static part.
    public var k = 100
    /// First positions always attended (attention sinks).
    public var sinks = 4
    /// Last positions always attended (the recent window).
    public var window = 64
    /// Score scale; nil means 1/sqrt(d).
    public var scale: Float? = nil
    /// Logit soft-cap: scaled scores s become cap * tanh(s / cap) (Gemma 2); nil for none.
    public var softCap: Float? = nil
    /// Cores one head's exact passes are split over (positions in parts merged by log-sum-exp);
    /// a session gives each of its KV heads its share of the session's threads.
    public var threads = 1
    /// Passed to the selecting index.
    public var search = SearchParameters()
    /// Estimation zone and adaptive budget (the `estimate` method).
    public var estimation = EstimationParameters()
    /// Candidates and tail of the `quantized` method.
    public var quantized = QuantizedParameters()
    /// How a GQA group's heads share the selection.
    public var groupSelection = GroupSelection.union
    public init() {}

    /// The parameters with these knobs set, every other at its default; a nil search knob is left
    /// to the index's calibration.
    public init(k: Int, sinks: Int, window: Int, ef: Int? = nil, nprobe: Int? = nil, beam: Int? = nil) {
        self.k = k
        self.sinks = sinks
        self.window = window
        search.graph.efSetting = ef
        search.ivf.nprobeSetting = nprobe
        search.tree.beamSetting = beam
    }

    /// Checks every knob (shared by the CLI, the REPL and the session).
    public func validate() throws {
        guard k >= 1 else { throw IndexError.invalidParameter("k must be at least 1 (got \(k))") }
        guard threads >= 1 else { throw IndexError.invalidParameter("threads must be at least 1 (got \(threads))") }
        guard sinks >= 0, window >= 0 else {
            throw IndexError.invalidParameter("sinks and window must be non-negative (got \(sinks), \(window))")
        }
        if let scale { guard scale.isFinite, scale > 0 else { throw IndexError.invalidParameter("scale must be positive (got \(scale))") } }
        if let softCap { guard softCap.isFinite, softCap > 0 else { throw IndexError.invalidParameter("soft-cap must be positive (got \(softCap))") } }
        try search.validate()
        try estimation.validate()
        try quantized.validate()
    }
}

/// The result of attention for one GQA group (the query heads sharing one KV head).
public struct AttentionResult: Sendable {
    /// One output and log-sum-exp per query head.
    public var heads: [PartialAttention]
    /// Positions the method chose outside the static part, best first.
    public var retrieved: [Int]
    /// Every attended position, ascending (static part and retrieved).
    public var attended: [Int]
    /// What the selection touched.
    public var stats: SearchStats
    /// Clusters whose contribution was estimated rather than attended (estimation zone).
    public var estimatedClusters = 0
    /// Members of the estimated clusters (shared with the cluster summary, not copied); static
    /// positions among them were attended exactly instead.
    public var estimated: [[Int32]] = []
}

public enum Attention {
    /// The positions of `a` and `b` (disjoint, each below `n`) in increasing order: a bit per
    /// position, read out in order (a decode step's few hundred attended rows, without a sort).
    static func sortedPositions(_ a: [Int], _ b: [Int], below n: Int) -> [Int] {
        var bits = [UInt64](repeating: 0, count: (n + 63) / 64)
        for i in a { bits[i >> 6] |= 1 << UInt64(i & 63) }
        for i in b { bits[i >> 6] |= 1 << UInt64(i & 63) }
        return setBits(bits)
    }

    /// The indices of the set bits of `bits` (bit `i & 63` of word `i >> 6`), ascending.
    static func setBits(_ bits: [UInt64]) -> [Int] {
        var out: [Int] = []
        for (w, word) in bits.enumerated() where word != 0 {
            var rest = word
            while rest != 0 {
                out.append(w << 6 | rest.trailingZeroBitCount)
                rest &= rest - 1
            }
        }
        return out
    }

    /// The static part of a context of `n` positions: sinks then window, ascending, no duplicates.
    public static func staticPositions(count n: Int, sinks: Int, window: Int) -> [Int] {
        let head = 0..<min(max(0, sinks), n)
        let tail = max(head.upperBound, n - max(0, window))..<n
        return Array(head) + Array(tail)
    }

    /// Attention of each query head (`g x d` queries) over the static part only: the sinks and
    /// the window (StreamingLLM; `auto`'s streaming heads). Exact when they cover every position.
    public static func attendStatic(queries: UnsafeBufferPointer<Float>, keys: VectorView, values: VectorView,
                                    parameters: AttentionParameters) throws -> AttentionResult {
        let d = keys.dimension
        guard queries.count % d == 0, queries.count > 0 else { throw IndexError.dimensionMismatch(expected: d, actual: queries.count) }
        guard values.count == keys.count else { throw IndexError.corrupt("head has \(keys.count) keys but \(values.count) values") }
        guard keys.count > 0 else { throw IndexError.invalidParameter("head \(keys.info.id) is empty") }
        let g = queries.count / d
        let score = ScoreTransform(parameters, dimension: d)
        let fixed = staticPositions(count: keys.count, sinks: parameters.sinks, window: parameters.window)
        let heads = fixed.withUnsafeBufferPointer {
            AttentionKernel.attendGroup(queries: queries.baseAddress!, g: g, positions: $0, keys: keys, values: values, score: score)
        }
        return AttentionResult(heads: heads, retrieved: [], attended: fixed,
                               stats: SearchStats(queries: g, keyCount: keys.count))
    }

    /// Attention for the query heads `queries` (`g x d`, row-major) of one KV head.
    ///
    /// With `selector == nil` every position is attended (exact attention). Otherwise the
    /// selector picks positions outside the static part for the group as
    /// `parameters.groupSelection` says (by default the union of every head's own top-k, found by
    /// one batched search), and each head attends exactly to the static part plus those positions.
    public static func attend(queries: UnsafeBufferPointer<Float>, selector: (any VectorIndex)?, keys: VectorView,
                              values: VectorView, parameters: AttentionParameters) throws -> AttentionResult {
        let d = keys.dimension
        guard queries.count % d == 0, queries.count > 0 else {
            throw IndexError.dimensionMismatch(expected: d, actual: queries.count)
        }
        guard values.count == keys.count else {
            throw IndexError.corrupt("head has \(keys.count) keys but \(values.count) values")
        }
        guard keys.count > 0 else { throw IndexError.invalidParameter("head \(keys.info.id) is empty") }
        guard parameters.k >= 1, parameters.sinks >= 0, parameters.window >= 0 else {
            throw IndexError.invalidParameter("k must be positive and sinks, window non-negative")
        }
        let g = queries.count / d
        let n = keys.count
        let score = ScoreTransform(parameters, dimension: d)

        guard let selector else {
            let heads = AttentionKernel.attendGroup(queries: queries.baseAddress!, g: g, positions: nil, keys: keys, values: values,
                                                    score: score, parts: parameters.threads)
            return AttentionResult(heads: heads, retrieved: [], attended: Array(0..<n),
                                   stats: SearchStats(distanceComputations: n * g, queries: g, keyCount: n))
        }

        let fixed = staticPositions(count: n, sinks: parameters.sinks, window: parameters.window)
        let isStatic = Set(fixed)
        let want = min(n, parameters.k + fixed.count)
        var retrieved: [Int] = []
        var stats = SearchStats()
        if fixed.count < n {
            if parameters.groupSelection == .summed || g == 1 {
                var summed = [Float](repeating: 0, count: d)
                for h in 0..<g { for j in 0..<d { summed[j] += queries[h * d + j] } }
                let found = try summed.withUnsafeBufferPointer {
                    try selector.search($0, k: want, parameters: parameters.search, keys: keys)
                }
                stats = found.stats
                retrieved = Array(found.hits(0).map(\.id).filter { !isStatic.contains($0) }.prefix(parameters.k))
            } else {
                // One shared walk for the group where the index has one, else a batch of searches.
                let found = try selector.searchGroup(queries, k: want, parameters: parameters.search, keys: keys)
                stats = found.stats
                let perHead = (0..<g).map { found.hits($0).map(\.id).filter { !isStatic.contains($0) }.prefix(parameters.k) }
                let cap = parameters.groupSelection == .unionCapped ? parameters.k : g * parameters.k
                var seen = Set<Int>()
                // Rank by rank across the heads, so a cap keeps every head's best positions.
                var rank = 0
                while retrieved.count < cap && perHead.contains(where: { rank < $0.count }) {
                    for h in 0..<g where rank < perHead[h].count && retrieved.count < cap {
                        let id = perHead[h][perHead[h].startIndex + rank]
                        if seen.insert(id).inserted { retrieved.append(id) }
                    }
                    rank += 1
                }
            }
        }
        let attended = sortedPositions(fixed, retrieved, below: n)
        // One pass over the attended rows scores every head of the group (each row read once).
        let heads = attended.withUnsafeBufferPointer {
            AttentionKernel.attendGroup(queries: queries.baseAddress!, g: g, positions: $0, keys: keys, values: values,
                                        score: score, parts: parameters.threads)
        }
        return AttentionResult(heads: heads, retrieved: retrieved, attended: attended, stats: stats)
    }
}
