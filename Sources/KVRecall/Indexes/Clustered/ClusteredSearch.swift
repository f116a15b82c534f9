import Dispatch

/// The part of a clustered index that picks lists for a query (faiss's coarse quantizer): flat
/// centroids for IVF, a descent through the levels for the centroid tree.
protocol ListQuantizer {
    /// Per-worker scratch reused across queries.
    associatedtype Scratch
    /// Vectors scored against every query by one `sgemm` per batch, `coarseCount x dimension`
    /// (IVF: every centroid; tree: its top level).
    var coarse: [Float] { get }
    var coarseCount: Int { get }
    /// Most lists `select` keeps.
    var maxSelected: Int { get }
    func makeScratch() -> Scratch
    func release(_ scratch: Scratch)
    /// Fills `selected` with the lists to scan for `query` (`coarseScores` are its scores against
    /// `coarse`, which may be overwritten); returns the centroid scores computed beyond the coarse level.
    func select(query: UnsafePointer<Float>, coarseScores: UnsafeMutablePointer<Float>,
                into selected: inout TopK<Int32>, scratch: Scratch) -> Int
}

/// Queries scored against the coarse level by one `sgemm`; fixed, so results do not depend on threads.
let clusteredQueryBatch = 32

/// One batched search over inverted lists (faiss's `IndexIVF::search`): queries go in fixed
/// batches of `clusteredQueryBatch`, batches are spread over `threads`; per batch one `sgemm`
/// scores the coarse level, per query the quantizer selects lists and their keys are scored
/// exactly from the map (`InvertedLists.scan`). Statistics: keys scored, and coarse plus deeper
/// centroid scores as auxiliary work.
func searchInvertedLists<Q: ListQuantizer>(_ queries: UnsafeBufferPointer<Float>, queryCount m: Int, k: Int, dimension d: Int,
                                           threads: Int, quantizer: Q, lists: InvertedLists, keys: VectorView) -> SearchResults {
    var results = SearchResults(k: k, queryCount: m)
    results.stats.keyCount = lists.keyCount
    guard m > 0 else { return results }
    let qb = clusteredQueryBatch, coarseCount = quantizer.coarseCount
    let batches = (m + qb - 1) / qb
    let workers = max(1, min(threads, batches))
    if workers > 1 { BLAS.setThreads(1) }
    var work = [(scanned: Int, scored: Int)](repeating: (0, 0), count: workers)
    let coarse = quantizer.coarse, keep = quantizer.maxSelected
    results.ids.withUnsafeMutableBufferPointer { outIDs in
        results.scores.withUnsafeMutableBufferPointer { outScores in
            work.withUnsafeMutableBufferPointer { work in
                coarse.withUnsafeBufferPointer { cen in
                    lists.offsets.withUnsafeBufferPointer { off in
                        lists.ids.withUnsafeBufferPointer { ids in
                            DispatchQueue.concurrentPerform(iterations: workers) { t in
                                let scores = UnsafeMutablePointer<Float>.allocate(capacity: qb * coarseCount)
                                let scratch = quantizer.makeScratch()
                                defer { scores.deallocate(); quantizer.release(scratch) }
                                var selected = TopK<Int32>(k: keep)
                                var best = TopK<Int32>(k: k)
                                var scanned = 0, scored = 0
                                var b = t
                                while b < batches {
                                    let lo = b * qb, rows = min(qb, m - lo)
                                    BLAS.scoresNT(m: rows, n: coarseCount, k: d, a: queries.baseAddress! + lo * d,
                                                  b: cen.baseAddress!, c: scores)
                                    for r in 0..<rows {
                                        let q = queries.baseAddress! + (lo + r) * d
                                        selected.reset()
                                        scored += coarseCount + quantizer.select(query: q, coarseScores: scores + r * coarseCount,
                                                                                 into: &selected, scratch: scratch)
                                        best.reset()
                                        scanned += InvertedLists.scan(query: q, lists: selected, offsets: off, ids: ids,
                                                                      keys: keys, into: &best)
                                        best.drain(ids: outIDs.baseAddress! + (lo + r) * k,
                                                   scores: outScores.baseAddress! + (lo + r) * k)
                                    }
                                    b += workers
                                }
                                work[t] = (scanned, scored)
                            }
                        }
                    }
                }
            }
        }
    }
    results.stats.distanceComputations = work.reduce(0) { $0 + $1.scanned }
    results.stats.auxiliaryComputations = work.reduce(0) { $0 + $1.scored }
    return results
}
