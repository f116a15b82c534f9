import CKernels
import Dispatch
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

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

/// What the driver scans: the lists with their codes, how the codes decode, and the centroid
/// each list's residuals are taken from (`lists.count x dimension`, centred like the keys).
struct CodedLists {
    let lists: InvertedLists
    let codec: ListCodec
    let centroids: [Float]
}

/// Candidates re-ranked exactly per query when `requested` is 0: `defaultRerankFactor x k`.
let defaultRerankFactor = 2

/// One batched search over inverted lists (faiss's `IndexIVF::search` over SQ codes plus
/// `IndexRefine`): queries go in fixed batches of `clusteredQueryBatch`, batches are spread
/// over `threads`; per batch one `sgemm` scores the coarse level, per query the quantizer
/// selects lists, each selected list's codes (one contiguous run) are scored by the C kernels,
/// plus the list centroid's score (residual codes), and the best `rerank` candidates are
/// re-ranked exactly from the store's map (prefetched a few rows ahead). Returned scores are
/// exact inner products. Statistics: codes scanned as keys scanned (faiss's count); coarse and
/// deeper centroid scores plus the re-ranked keys as auxiliary work.
func searchInvertedLists<Q: ListQuantizer>(_ queries: UnsafeBufferPointer<Float>, queryCount m: Int, k: Int, dimension d: Int,
                                           threads: Int, quantizer: Q, coded: CodedLists, rerank requested: Int,
                                           keys: VectorView) -> SearchResults {
    var results = SearchResults(k: k, queryCount: m)
    let lists = coded.lists, codec = coded.codec
    results.stats.keyCount = lists.keyCount
    guard m > 0 else { return results }
    let qb = clusteredQueryBatch, coarseCount = quantizer.coarseCount
    let batches = (m + qb - 1) / qb
    let workers = max(1, min(threads, batches))
    if workers > 1 { BLAS.setThreads(1) }
    let rerank = max(k, requested > 0 ? requested : defaultRerankFactor * k)
    let longest = max(1, lists.maxListSize), cs = lists.codeSize
    var work = [(scanned: Int, scored: Int)](repeating: (0, 0), count: workers)
    let coarse = quantizer.coarse, keep = quantizer.maxSelected
    results.ids.withUnsafeMutableBufferPointer { outIDs in
        results.scores.withUnsafeMutableBufferPointer { outScores in
            work.withUnsafeMutableBufferPointer { work in
                coarse.withUnsafeBufferPointer { cen in
                    coded.centroids.withUnsafeBufferPointer { fine in
                    lists.offsets.withUnsafeBufferPointer { off in
                        lists.ids.withUnsafeBufferPointer { ids in
                            lists.codes.withUnsafeBufferPointer { codes in
                            DispatchQueue.concurrentPerform(iterations: workers) { t in
                                // Sized to the batch: a single query must not pay for a 32-query buffer (an mmap).
                                let scores = UnsafeMutablePointer<Float>.allocate(capacity: min(qb, m) * coarseCount)
                                let prepared = UnsafeMutablePointer<Float>.allocate(capacity: d)
                                let listScores = UnsafeMutablePointer<Float>.allocate(capacity: longest)
                                let scratch = quantizer.makeScratch()
                                defer {
                                    scores.deallocate(); prepared.deallocate(); listScores.deallocate()
                                    quantizer.release(scratch)
                                }
                                var selected = TopK<Int32>(k: keep)
                                var candidates = TopK<Int32>(k: rerank)
                                var best = TopK<Int32>(k: k)
                                var scanned = 0, scored = 0
                                var b = t
                                while b < batches {
                                    let lo = b * qb, rows = min(qb, m - lo)
                                    if rows == 1 {
                                        BLAS.gemv(n: coarseCount, k: d, a: cen.baseAddress!, x: queries.baseAddress! + lo * d, y: scores)
                                    } else {
                                        BLAS.scoresNT(m: rows, n: coarseCount, k: d, a: queries.baseAddress! + lo * d,
                                                      b: cen.baseAddress!, c: scores)
                                    }
                                    for r in 0..<rows {
                                        let q = queries.baseAddress! + (lo + r) * d
                                        selected.reset()
                                        scored += coarseCount + quantizer.select(query: q, coarseScores: scores + r * coarseCount,
                                                                                 into: &selected, scratch: scratch)
                                        // Codes of the selected lists, contiguous per list.
                                        let bias = codec.prepare(q, into: prepared)
                                        candidates.reset()
                                        for j in 0..<selected.count {
                                            let l = Int(selected.id(at: j))
                                            let a = off[l], e = off[l + 1]
                                            guard e > a else { continue }
                                            scanned += e - a
                                            let base = bias + kvr_dot_f32(q, fine.baseAddress! + l * d, d)
                                            codec.scan(prepared, codes: codes.baseAddress! + a * cs, count: e - a, into: listScores)
                                            for p in 0..<(e - a) {
                                                let s = base + listScores[p]
                                                if s >= candidates.threshold { candidates.push(s, ids[a + p]) }
                                            }
                                        }
                                        // Exact re-rank from the map, prefetching ahead.
                                        best.reset()
                                        let n = candidates.count, ahead = InvertedListsPrefetch.distance
                                        for j in 0..<min(ahead, n) { keys.prefetch(row: Int(candidates.id(at: j))) }
                                        for j in 0..<n {
                                            if j + ahead < n { keys.prefetch(row: Int(candidates.id(at: j + ahead))) }
                                            let id = candidates.id(at: j)
                                            let s = keys.score(query: q, row: Int(id))
                                            if s >= best.threshold { best.push(s, id) }
                                        }
                                        scored += n
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
        }
    }
    results.stats.distanceComputations = work.reduce(0) { $0 + $1.scanned }
    results.stats.auxiliaryComputations = work.reduce(0) { $0 + $1.scored }
    return results
}

/// Rows prefetched ahead of the one being re-ranked.
enum InvertedListsPrefetch {
    static let distance = 8
}
