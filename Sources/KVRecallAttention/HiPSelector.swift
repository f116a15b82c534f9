import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
/// HiP attention's training-free hierarchical pruning, as a search: split the keys into 2k
/// chunks, score one representative (the middle key) of each, keep the k best chunks, halve
/// them, and repeat until the chunks are single keys — about log2(N / k) rounds of 2k scores,
/// O(k log N) per query, and no index to build.
public struct HiPSelector: VectorIndex {
    public let kind = IndexKind.hip
    public let dimension: Int
    public let count: Int

    public init(keys: VectorView) {
        dimension = keys.dimension
        count = keys.count
    }

    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        let m = try validateSearch(queries, k: k, dimension: dimension, keys: keys)
        var results = SearchResults(k: k, queryCount: m)
        results.stats.keyCount = keys.count
        var computations = 0
        // A key is scored once per query: a kept single key, or a halved chunk whose middle is the
        // old one's, keeps its score (scoring them again every round made HiP report more than
        // 100% of the keys scanned on small heads, and cost as much).
        var scored: [Int: Float] = [:]
        for q in 0..<m {
            let query = queries.baseAddress! + q * dimension
            let n = keys.count
            scored.removeAll(keepingCapacity: true)
            // Chunks as [lo, hi) ranges, initially 2k (or n) equal ones.
            let initial = min(2 * k, n)
            var chunks: [(lo: Int, hi: Int)] = (0..<initial).map { (n * $0 / initial, n * ($0 + 1) / initial) }
            var top = TopK<Int>(k: k)
            while true {
                top.reset()
                for (c, chunk) in chunks.enumerated() {
                    let representative = (chunk.lo + chunk.hi - 1) / 2
                    let score: Float
                    if let known = scored[representative] {
                        score = known
                    } else {
                        score = keys.score(query: query, row: representative)
                        scored[representative] = score
                    }
                    top.push(score, c)
                }
                let kept = top.sorted().map { chunks[$0.id] }
                if kept.allSatisfy({ $0.hi - $0.lo == 1 }) {
                    for (j, hit) in top.sorted().enumerated() {
                        results.ids[q * k + j] = chunks[hit.id].lo
                        results.scores[q * k + j] = hit.score
                    }
                    break
                }
                // Halve every kept chunk (single keys stay as they are).
                chunks = []
                for chunk in kept.sorted(by: { $0.lo < $1.lo }) {
                    if chunk.hi - chunk.lo == 1 {
                        chunks.append(chunk)
                    } else {
                        let mid = (chunk.lo + chunk.hi) / 2
                        chunks.append((chunk.lo, mid))
                        chunks.append((mid, chunk.hi))
                    }
                }
            }
            computations += scored.count
        }
        results.stats.distanceComputations = computations
        return results
    }
}
