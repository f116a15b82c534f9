import CKernels
import Dispatch
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// Where a graph walk reads a node's neighbour list. Generic parameters specialise the walk
/// per layout, so the indirection costs nothing in the hot loop.
protocol NeighbourSource {
    func neighbours(_ node: Int) -> UnsafeMutableBufferPointer<Int32>
    /// Starts fetching `node`'s list into the cache (the walk expands it soon).
    func prefetch(_ node: Int)
}

extension NeighbourSource {
    @inline(__always) func prefetch(_ node: Int) {}
}

/// Fixed-stride adjacency: node `i`'s slots start at `base + i * stride`; slot 0 is the count.
/// With `offsets` (a packed graph, as stored), node `i`'s count and list start at
/// `base + offsets[i]` instead, back to back (read-only).
struct StridedLinks: NeighbourSource {
    let base: UnsafeMutablePointer<Int32>
    let stride: Int
    var offsets: UnsafePointer<Int32>? = nil

    @inline(__always)
    func slot(_ node: Int) -> UnsafeMutablePointer<Int32> {
        if let offsets { return base + Int(offsets[node]) }
        return base + node &* stride
    }

    @inline(__always)
    func neighbours(_ node: Int) -> UnsafeMutableBufferPointer<Int32> {
        let slot = slot(node)
        return UnsafeMutableBufferPointer(start: slot + 1, count: Int(slot[0]))
    }

    @inline(__always)
    func prefetch(_ node: Int) { kvr_prefetch(slot(node), stride &* 4) }
}

/// Marks the neighbours of `node` below `limit` not yet visited in this walk, prefetches the keys
/// of the first `ahead` of them and writes them to `pending` (scored after all are gathered);
/// returns how many.
/// The visited test is branch-free (a stamp is written whether or not it was set; lists hold no
/// duplicates), so its cache misses overlap instead of each costing a mispredicted branch.
@inline(__always)
func gatherUnvisited<Links: NeighbourSource>(_ links: Links, of node: Int32, limit: Int, stamps: UnsafeMutablePointer<UInt32>,
                                             generation: UInt32, keys: VectorView, into pending: UnsafeMutablePointer<Int32>,
                                             prefetching ahead: Int = .max) -> Int {
    var waiting = 0
    for n in links.neighbours(Int(node)) {
        let ni = Int(n)
        guard ni < limit else { continue }
        let fresh = stamps[ni] != generation
        stamps[ni] = generation
        pending[waiting] = n
        waiting &+= fresh ? 1 : 0
    }
    for j in 0..<min(waiting, ahead) { keys.prefetch(row: Int(pending[j])) }
    return waiting
}

/// Beam search over a proximity graph by inner product (HNSW's search-layer, RoarGraph's
/// search): leaves the `ef` best nodes reachable from `entries` in `scratch.results` (and, best
/// first, in `scratch.pool`). With `keep` above `ef` the beam stays `ef` wide but `scratch.results`
/// holds the `keep` best of every node scored (the retrieval graph's narrow beam: its dense lists
/// put most of a query's top keys among the neighbours of a few expanded nodes). Nodes at or
/// above `limit` are skipped (a frozen graph during batched inserts). With `norms` (squared key norms), nodes are ranked by 2 q.k - |k|^2, i.e.
/// by L2 distance to the query (key-to-key neighbourhoods); without, by inner product.
///
/// The beam is one array of the `ef` best nodes found as sort keys, sorted best first, bit 0
/// set once expanded (as in NSG and DiskANN): the next node to expand is the best unexpanded one, and the
/// walk ends when all are expanded. It visits the same nodes as HNSW's pair of heaps (a candidate
/// that has left the results can never be expanded there either) with one binary search and a
/// short move per accepted neighbour instead of three heap operations. Unvisited neighbours are
/// gathered before any of them is scored, their keys prefetched a few rows ahead of the scoring,
/// and the next node's list is prefetched while the current one's are scored.
@inline(__always)
func beamSearch<Links: NeighbourSource>(_ links: Links, query: UnsafePointer<Float>, keys: VectorView,
                                        entries: [(Int32, Float)], ef requested: Int, scratch: SearchScratch, limit: Int,
                                        norms: UnsafePointer<Float>? = nil, fillResults: Bool = true, keep: Int = 0) {
    scratch.visited.reset(capacity: limit)
    // A beam narrower than the results wanted: every node scored competes for the `keep` best.
    let tracking = keep > max(1, requested)
    var kept = scratch.results
    if tracking { kept.removeAll() }
    @inline(__always) func track(_ s: Float, _ n: Int32) {
        if kept.count < keep { kept.push(s, n) } else if s > kept.bottomScore { kept.pop(); kept.push(s, n) }
    }
    let (stamps, generation) = scratch.visited.walk
    let ef = max(1, requested)
    scratch.reservePool(ef)
    let pool = scratch.pool
    var size = 0
    var cursor = 0  // every entry before it is expanded

    /// Inserts `key` if it beats the worst kept (the caller checked), keeping the order.
    @inline(__always) func insert(_ key: UInt64) {
        // The first position whose key is below `key` (branch-free: the outcomes are random).
        var lo = 0
        if size > 0 {
            var n = size
            while n > 1 {
                let half = n &>> 1
                lo = pool[lo &+ half] > key ? lo &+ half : lo
                n &-= half
            }
            lo &+= pool[lo] > key ? 1 : 0
        }
        var k = size == ef ? size &- 1 : size
        if k &- lo > 16 {
            (pool + lo + 1).update(from: pool + lo, count: k &- lo)
        } else {
            while k > lo { pool[k] = pool[k &- 1]; k &-= 1 }
        }
        pool[lo] = key
        if size < ef { size &+= 1 }
        if lo < cursor { cursor = lo }
    }

    for (e, s) in entries where Int(e) < limit && stamps[Int(e)] != generation {
        stamps[Int(e)] = generation
        if tracking { track(s, e) }
        let key = HNSWIndex.sortKey(s, e)
        if size < ef || key > pool[size &- 1] { insert(key) }
    }
    let pending = scratch.pending
    var computed = 0
    // Keys are prefetched 4 rows ahead of scoring, not all at once: a burst of a whole list's
    // rows stalls on the miss queue (at 128K keys 4-5% slower than 4 ahead; 2 and 8 in between).
    let ahead = 4
    while cursor < size {
        let c = HNSWIndex.unpack(pool[cursor]).id
        pool[cursor] |= 1
        cursor &+= 1
        while cursor < size && pool[cursor] & 1 != 0 { cursor &+= 1 }
        // The next best unexpanded node is likely expanded next: fetch its list while scoring.
        if cursor < size { links.prefetch(Int(HNSWIndex.unpack(pool[cursor]).id)) }
        let waiting = gatherUnvisited(links, of: c, limit: limit, stamps: stamps, generation: generation, keys: keys,
                                      into: pending, prefetching: ahead)
        for j in 0..<waiting {
            let n = pending[j]
            if j &+ ahead < waiting { keys.prefetch(row: Int(pending[j &+ ahead])) }
            var sn = keys.score(query: query, row: Int(n))
            if let norms { sn = 2 * sn - norms[Int(n)] }
            if tracking { track(sn, n) }
            let key = HNSWIndex.sortKey(sn, n)
            if size < ef || key > pool[size &- 1] { insert(key) }
        }
        computed += waiting
    }
    scratch.poolCount = size
    scratch.computations += computed
    if tracking { scratch.results = kept; return }
    guard fillResults else { return }
    // Worst first: each push lands at the bottom of the min-heap without a sift.
    var results = scratch.results
    results.removeAll()
    for i in stride(from: size - 1, through: 0, by: -1) {
        let hit = HNSWIndex.unpack(pool[i])
        results.push(hit.score, hit.id)
    }
    scratch.results = results
}

/// Writes the best `k` of `scratch.results` into row `q` of result buffers, best first.
@inline(__always)
func drainResults(_ scratch: SearchScratch, k: Int, row q: Int, ids: UnsafeMutableBufferPointer<Int>,
                  scores: UnsafeMutableBufferPointer<Float>) {
    var results = scratch.results
    while results.count > k { results.pop() }
    var j = results.count - 1
    while !results.isEmpty {
        let hit = results.pop()
        ids[q * k + j] = Int(hit.id)
        scores[q * k + j] = hit.score
        j -= 1
    }
    scratch.results = results
}

/// Runs `search` for every query of a batch, spread over `threads`, each thread with its own
/// pooled scratch; the walk leaves its hits in `scratch.results`, which are drained into the
/// batch's results. Shared by the graph indexes' `search`.
func searchGraphBatch(_ queries: UnsafeBufferPointer<Float>, dimension: Int, k: Int, threads requested: Int,
                      keyCount: Int, pool: ScratchPool,
                      _ search: (UnsafePointer<Float>, SearchScratch) -> Void) -> SearchResults {
    let m = queries.count / dimension
    var results = SearchResults(k: k, queryCount: m)
    results.stats.keyCount = keyCount
    let threads = max(1, min(requested, m))
    let scratches = (0..<threads).map { _ in pool.take(dimension: dimension, capacity: keyCount) }
    defer { scratches.forEach(pool.give) }
    let chunk = (m + threads - 1) / threads
    results.ids.withUnsafeMutableBufferPointer { ids in
        results.scores.withUnsafeMutableBufferPointer { scores in
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                let scratch = scratches[t]
                for q in (t * chunk)..<min(m, (t + 1) * chunk) {
                    search(queries.baseAddress! + q * dimension, scratch)
                    drainResults(scratch, k: k, row: q, ids: ids, scores: scores)
                }
            }
        }
    }
    results.stats.distanceComputations = scratches.reduce(0) { $0 + $1.computations }
    results.stats.auxiliaryComputations = scratches.reduce(0) { $0 + $1.auxiliary }
    return results
}

/// Beam search of a GQA group's `g` queries (`queries`, `g x d`) sharing one walk: every node
/// any query's beam reaches is read once and scored for all `g` queries, and enters each
/// query's beam on its own score. Each query expands its own best candidates (round robin) and
/// stops when its beam can no longer improve, so it sees at least the nodes its own walk would,
/// while a key shared by several heads' neighbourhoods is fetched once. Leaves each query's
/// `ef` best in `scratches[h].results` — with `keep` above `ef`, the `keep` best of every node
/// scored, the beam still `ef` wide (as `beamSearch`); `scratches[0].visited` is the shared visited set.
func groupBeamSearch<Links: NeighbourSource>(_ links: Links, queries: UnsafePointer<Float>, g: Int, keys: VectorView,
                                             entries: [Int32], ef: Int, keep: Int = 0, scratches: [SearchScratch], limit: Int) {
    let d = keys.dimension
    let shared = scratches[0]
    shared.visited.reset(capacity: limit)
    let (stamps, generation) = shared.visited.walk
    var candidates = scratches.map(\.candidates)
    var results = scratches.map(\.results)
    for h in 0..<g {
        candidates[h].removeAll()
        results[h].removeAll()
    }
    let tracking = keep > ef
    var kept = tracking ? (0..<g).map { _ in MinScoreHeap(capacity: keep) } : []
    var computed = 0
    // One read of a key row for the whole group: decoded once, then g inner products.
    let row = shared.vector
    let scores = UnsafeMutablePointer<Float>.allocate(capacity: g)
    defer { scores.deallocate() }
    @inline(__always) func offer(_ n: Int32) {
        if keys.dtype == .f32 {
            kvr_scores_f32(keys.row(Int(n)).assumingMemoryBound(to: Float.self), queries, g, d, scores)
        } else {
            keys.decodeRow(Int(n), into: row)
            kvr_scores_f32(row, queries, g, d, scores)
        }
        for h in 0..<g {
            let s = scores[h]
            if tracking {
                if kept[h].count < keep { kept[h].push(s, n) } else if s > kept[h].bottomScore { kept[h].pop(); kept[h].push(s, n) }
            }
            if results[h].count < ef || s > results[h].bottomScore {
                candidates[h].push(s, n)
                results[h].push(s, n)
                if results[h].count > ef { results[h].pop() }
            }
        }
    }
    for e in entries where Int(e) < limit && stamps[Int(e)] != generation {
        stamps[Int(e)] = generation
        offer(e)
        computed += g
    }
    let pending = shared.pending
    var active = [Bool](repeating: true, count: g)
    var remaining = g
    while remaining > 0 {
        for h in 0..<g where active[h] {
            guard !candidates[h].isEmpty else { active[h] = false; remaining -= 1; continue }
            let (s, c) = candidates[h].pop()
            if results[h].count >= ef && s < results[h].bottomScore {
                active[h] = false
                remaining -= 1
                continue
            }
            let waiting = gatherUnvisited(links, of: c, limit: limit, stamps: stamps, generation: generation, keys: keys, into: pending)
            for j in 0..<waiting { offer(pending[j]) }
            computed += waiting * g
        }
    }
    for h in 0..<g {
        scratches[h].candidates = candidates[h]
        if tracking {
            results[h].deallocate()  // the scratch owns the kept heap's buffers from now on
            scratches[h].results = kept[h]
        } else {
            scratches[h].results = results[h]
        }
    }
    shared.computations += computed
}
