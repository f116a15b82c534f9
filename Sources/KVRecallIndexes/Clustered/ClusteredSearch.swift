import CKernels
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
    /// The lists to scan for `query`, best first, as pair keys (`kvr_pair_key(score, list)`) in
    /// `order` (room for `max(coarseCount, maxSelected)`); returns how many, and the centroid scores
    /// computed beyond the coarse level. By default `select`, then its lists sorted.
    func selectOrdered(query: UnsafePointer<Float>, coarseScores: UnsafeMutablePointer<Float>,
                       selected: inout TopK<Int32>, into order: UnsafeMutablePointer<UInt64>,
                       scratch: Scratch) -> (count: Int, scored: Int)
    /// True when the selected lists' scores are their centroids' scores q·c (the driver then reuses
    /// them instead of computing them again).
    static var keepsCentroidScores: Bool { get }
}

extension ListQuantizer {
    static var keepsCentroidScores: Bool { false }

    @inline(__always)
    func selectOrdered(query: UnsafePointer<Float>, coarseScores: UnsafeMutablePointer<Float>,
                       selected: inout TopK<Int32>, into order: UnsafeMutablePointer<UInt64>,
                       scratch: Scratch) -> (count: Int, scored: Int) {
        selected.reset()
        let scored = select(query: query, coarseScores: coarseScores, into: &selected, scratch: scratch)
        let n = selected.count
        for j in 0..<n { order[j] = kvr_pair_key(selected.score(at: j), selected.id(at: j)) }
        kvr_sort_u64(order, n)
        return (n, scored)
    }
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
/// selects lists, which are scanned best first, each list's codes (one contiguous run) scored by
/// the C kernels (SQ8: an integer scan against the query quantized to int8, VNNI where the CPU has
/// it) plus the list centroid's score (residual codes). Candidates at or above a threshold are kept
/// as pair keys; whenever they exceed 2 x `rerank` a quickselect keeps the best `rerank` and raises
/// the threshold to the worst of them (no heap: O(1) amortized per candidate). The best `rerank` are
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
    let plan = ChunkPlan(count: m, chunk: qb, threads: threads)
    if plan.workers > 1 { BLAS.setThreads(1) }
    let rerank = max(k, requested > 0 ? requested : defaultRerankFactor * k)
    let longest = max(1, lists.maxListSize), cs = lists.codeSize
    var work = [(scanned: Int, scored: Int)](repeating: (0, 0), count: plan.workers)
    let coarse = quantizer.coarse, keep = quantizer.maxSelected
    results.ids.withUnsafeMutableBufferPointer { outIDs in
        results.scores.withUnsafeMutableBufferPointer { outScores in
            work.withUnsafeMutableBufferPointer { work in
                coarse.withUnsafeBufferPointer { cen in
                    coded.centroids.withUnsafeBufferPointer { fine in
                    lists.offsets.withUnsafeBufferPointer { off in
                        lists.ids.withUnsafeBufferPointer { ids in
                            lists.codes.withUnsafeBufferPointer { codes in
                            plan.run { t, batches in
                                // Sized to the batch: a single query must not pay for a 32-query buffer (an mmap).
                                let scores = UnsafeMutablePointer<Float>.allocate(capacity: min(qb, m) * coarseCount)
                                let prepared = UnsafeMutablePointer<Float>.allocate(capacity: d)
                                let quantized = UnsafeMutablePointer<Int8>.allocate(capacity: d)
                                let listScores = UnsafeMutablePointer<Float>.allocate(capacity: longest)
                                // Candidates: compacted to the best `rerank` whenever they exceed 2 x rerank,
                                // so a list scan always has room for its whole list.
                                let room = 2 * rerank + longest
                                // Candidates and lists as pair keys (`kvr_pair_key`): ascending is best first.
                                let cand = UnsafeMutablePointer<UInt64>.allocate(capacity: room)
                                let order = UnsafeMutablePointer<UInt64>.allocate(capacity: max(coarseCount, keep))
                                let scratch = quantizer.makeScratch()
                                defer {
                                    scores.deallocate(); prepared.deallocate(); quantized.deallocate(); listScores.deallocate()
                                    cand.deallocate(); order.deallocate()
                                    quantizer.release(scratch)
                                }
                                var selected = TopK<Int32>(k: keep)
                                var scanned = 0, scored = 0
                                let integer = codec.kind == .sq8
                                for (_, batch) in batches {
                                    let lo = batch.lowerBound, rows = batch.count
                                    if rows == 1 {
                                        BLAS.gemv(n: coarseCount, k: d, a: cen.baseAddress!, x: queries.baseAddress! + lo * d, y: scores)
                                    } else {
                                        BLAS.scoresNT(m: rows, n: coarseCount, k: d, a: queries.baseAddress! + lo * d,
                                                      b: cen.baseAddress!, c: scores)
                                    }
                                    for r in 0..<rows {
                                        let q = queries.baseAddress! + (lo + r) * d
                                        let (lists, extra) = quantizer.selectOrdered(query: q, coarseScores: scores + r * coarseCount,
                                                                                      selected: &selected, into: order, scratch: scratch)
                                        scored += coarseCount + extra
                                        // Codes of the selected lists, best list first (the candidates' threshold
                                        // rises early), contiguous per list; SQ8 by the integer scan.
                                        let (bias, scale) = integer ? codec.prepareInt8(q, prepared: prepared, into: quantized)
                                                                    : (codec.prepare(q, into: prepared), 1)
                                        var count = 0
                                        var threshold = -Float.infinity
                                        for j in 0..<lists {
                                            let l = Int(kvr_pair_id(order[j]))
                                            let a = off[l], e = off[l + 1]
                                            guard e > a else { continue }
                                            scanned += e - a
                                            let centre = Q.keepsCentroidScores ? kvr_pair_score(order[j])
                                                                                : kvr_dot_f32(q, fine.baseAddress! + l * d, d)
                                            let base = bias + centre
                                            if integer {
                                                count += kvr_scan_u8s8(quantized, codes.baseAddress! + a * cs, ids.baseAddress! + a, e - a, d,
                                                                       base, scale, threshold, cand + count)
                                            } else {
                                                codec.scan(prepared, codes: codes.baseAddress! + a * cs, count: e - a, into: listScores)
                                                for p in 0..<(e - a) {
                                                    let s = base + listScores[p]
                                                    if s >= threshold { cand[count] = kvr_pair_key(s, ids[a + p]); count += 1 }
                                                }
                                            }
                                            // Compacted to the best `rerank`, whose worst score becomes the threshold.
                                            if count > 2 * rerank {
                                                threshold = kvr_pair_score(kvr_select_u64(cand, count, rerank))
                                                count = rerank
                                            }
                                        }
                                        if count > rerank {
                                            _ = kvr_select_u64(cand, count, rerank)
                                            count = rerank
                                        }
                                        // Exact re-rank from the map, prefetching ahead; the k best sorted.
                                        let n = count, ahead = InvertedListsPrefetch.distance
                                        for j in 0..<min(ahead, n) { keys.prefetch(row: Int(kvr_pair_id(cand[j]))) }
                                        for j in 0..<n {
                                            if j + ahead < n { keys.prefetch(row: Int(kvr_pair_id(cand[j + ahead]))) }
                                            let id = kvr_pair_id(cand[j])
                                            cand[j] = kvr_pair_key(keys.score(query: q, row: Int(id)), id)
                                        }
                                        scored += n
                                        let found = min(n, k)
                                        _ = kvr_select_u64(cand, n, k)
                                        kvr_sort_u64(cand, found)
                                        for j in 0..<found {
                                            outIDs[(lo + r) * k + j] = Int(kvr_pair_id(cand[j]))
                                            outScores[(lo + r) * k + j] = kvr_pair_score(cand[j])
                                        }
                                    }
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
