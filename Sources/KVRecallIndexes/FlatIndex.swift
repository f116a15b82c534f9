import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// Exact search: every key is scored. The ground truth for every recall figure.
///
/// One query scans block by block with the C kernels (f32, or f16/bf16 converted in registers);
/// a batch goes through `sgemm` per block (reduced-precision blocks converted once per block),
/// so each block is read from memory once for the whole batch.
public struct FlatIndex: VectorIndex {
    public let kind = IndexKind.flat
    public let dimension: Int
    public let count: Int

    public init(dimension: Int, count: Int) {
        self.dimension = dimension
        self.count = count
    }

    public init(keys: VectorView) { self.init(dimension: keys.dimension, count: keys.count) }

    /// Below this many queries a batch is scanned one query at a time.
    static let gemmBatchThreshold = 4

    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        let m = try validateSearch(queries, k: k, dimension: dimension, keys: keys)
        var results = SearchResults(k: k, queryCount: m)
        results.stats.keyCount = keys.count
        results.stats.distanceComputations = m * keys.count
        guard m > 0 else { return results }
        let d = dimension
        let outIDs = UnsafeMutableBufferPointer<Int>.allocate(capacity: m * k)
        let outScores = UnsafeMutableBufferPointer<Float>.allocate(capacity: m * k)
        defer { outIDs.deallocate(); outScores.deallocate() }
        ChunkPlan.contiguous(count: m, threads: parameters.threads).run { _, chunks in
            for (_, range) in chunks {
                let lo = range.lowerBound
                let part = UnsafeBufferPointer(rebasing: queries[(lo * d)..<(range.upperBound * d)])
                let tops = FlatIndex.scan(part, k: k, keys: keys)
                for (j, top) in tops.enumerated() {
                    for (r, hit) in top.sorted().enumerated() {
                        outIDs[(lo + j) * k + r] = hit.id
                        outScores[(lo + j) * k + r] = hit.score
                    }
                }
            }
        }
        results.ids = Array(outIDs)
        results.scores = Array(outScores)
        return results
    }

    /// Exact top-k of each query over all keys.
    static func scan(_ queries: UnsafeBufferPointer<Float>, k: Int, keys: VectorView) -> [TopK<Int>] {
        let d = keys.dimension
        let m = queries.count / d
        var tops = [TopK<Int>](repeating: TopK<Int>(k: k), count: m)
        let bs = keys.blockSize
        if m < gemmBatchThreshold {
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: bs)
            defer { scratch.deallocate() }
            for q in 0..<m {
                let query = queries.baseAddress! + q * d
                for b in 0..<keys.blockCount {
                    keys.scores(query: query, block: b, into: scratch)
                    tops[q].push(scores: scratch, count: keys.rowsInBlock(b), firstID: b * bs)
                }
            }
            return tops
        }
        let decoded = UnsafeMutablePointer<Float>.allocate(capacity: bs * d)
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: bs * m)
        defer { decoded.deallocate(); scores.deallocate() }
        for b in 0..<keys.blockCount {
            let n = keys.rowsInBlock(b)
            let rows: UnsafePointer<Float>
            if let inPlace = keys.alignedF32Block(b) {
                rows = inPlace
            } else {
                keys.decodeRows(keys.blocks[b], count: n, into: decoded)
                rows = UnsafePointer(decoded)
            }
            BLAS.scoresNT(m: m, n: n, k: d, a: queries.baseAddress!, b: rows, c: scores)
            for q in 0..<m {
                tops[q].push(scores: scores + q * n, count: n, firstID: b * bs)
            }
        }
        return tops
    }
}
