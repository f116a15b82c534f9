import CKernels
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

// The one graph walk (HNSW's search-layer, RoarGraph's beam search) for HNSW and the retrieval
// graph, for one query or a GQA group's queries walking together, with its pooled scratch.

// MARK: Neighbour lists

/// Where a graph walk reads a node's neighbour list. Generic parameters specialise the walk
/// per layout, so the indirection costs nothing in the hot loop.
protocol NeighbourSource {
    func neighbours(_ node: Int) -> UnsafeMutableBufferPointer<Int32>
    /// Starts fetching `node`'s list into the cache (the walk expands it soon).
    func prefetch(_ node: Int)
}

/// Fixed-stride adjacency: node `i`'s slots start at `base + i * stride`; slot 0 is the count.
/// With `offsets` (a packed graph as stored, or HNSW's upper layers), node `i`'s count and list
/// start at `base + offsets[i]` instead, and `stride` is only how far `prefetch` reads.
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

// MARK: What a walk scores

/// The queries a walk serves, and how the rows it reaches are scored for them.
protocol WalkQueries {
    /// Queries walking together: a GQA group's heads, or 1.
    var count: Int { get }
    /// Scores `n` gathered rows (`rows`, key positions `ids`) for every query into `out`
    /// (`n x count`, row-major), prefetching rows a few ahead.
    func score(_ rows: UnsafePointer<UnsafeRawPointer?>, ids: UnsafePointer<Int32>, count n: Int, keys: VectorView, into out: UnsafeMutablePointer<Float>)
    /// The same for query `h` alone (`n` scores; HNSW's greedy descent, one head at a time).
    func score(head h: Int, _ rows: UnsafePointer<UnsafeRawPointer?>, ids: UnsafePointer<Int32>, count n: Int, keys: VectorView,
               into out: UnsafeMutablePointer<Float>)
}

extension WalkQueries {
    /// One query alone is the group of one.
    @inline(__always)
    func score(head h: Int, _ rows: UnsafePointer<UnsafeRawPointer?>, ids: UnsafePointer<Int32>, count n: Int, keys: VectorView,
               into out: UnsafeMutablePointer<Float>) {
        score(rows, ids: ids, count: n, keys: keys, into: out)
    }

    /// The C kernel for `keys`' dtype over `g` queries: each pair's score is the same bit for bit
    /// whatever `g` (so a group of one walks exactly as a single query), and for f32 equals
    /// `VectorView.score`.
    @inline(__always)
    func scoreRows(_ queries: UnsafePointer<Float>, _ g: Int, _ rows: UnsafePointer<UnsafeRawPointer?>, _ n: Int,
                   _ keys: VectorView, _ out: UnsafeMutablePointer<Float>) {
        switch keys.dtype {
        case .f32: kvr_scores_gathered_f32(queries, g, rows, n, keys.dimension, out)
        case .f16: kvr_scores_gathered_f16(queries, g, rows, n, keys.dimension, out)
        case .bf16: kvr_scores_gathered_bf16(queries, g, rows, n, keys.dimension, out)
        }
    }
}

/// One query, ranking keys by inner product; with `norms` (the keys' squared norms) by L2
/// distance instead, as 2 q·k - |k|² (the retrieval graph's key-to-key search while it links keys).
struct SingleQuery: WalkQueries {
    let query: UnsafePointer<Float>
    var norms: UnsafePointer<Float>? = nil
    @inline(__always) var count: Int { 1 }
    @inline(__always)
    func score(_ rows: UnsafePointer<UnsafeRawPointer?>, ids: UnsafePointer<Int32>, count n: Int, keys: VectorView,
               into out: UnsafeMutablePointer<Float>) {
        scoreRows(query, 1, rows, n, keys, out)
        if let norms { for j in 0..<n { out[j] = 2 * out[j] - norms[Int(ids[j])] } }
    }
}

/// A GQA group's `count` queries (`count x d`, row-major): every row reached is read once and
/// scored for all of them.
struct QueryGroup: WalkQueries {
    let queries: UnsafePointer<Float>
    let count: Int
    @inline(__always)
    func score(_ rows: UnsafePointer<UnsafeRawPointer?>, ids: UnsafePointer<Int32>, count n: Int, keys: VectorView,
               into out: UnsafeMutablePointer<Float>) {
        scoreRows(queries, count, rows, n, keys, out)
    }

    @inline(__always)
    func score(head h: Int, _ rows: UnsafePointer<UnsafeRawPointer?>, ids: UnsafePointer<Int32>, count n: Int, keys: VectorView,
               into out: UnsafeMutablePointer<Float>) {
        scoreRows(queries + h * keys.dimension, 1, rows, n, keys, out)
    }
}

// MARK: Beams and results

/// A node and its score as one integer that sorts ascending by score, then by descending id (so
/// the best, ties to the lower id, is the largest). Bit 0 is left free: the walk marks expanded
/// nodes there (it never decides an order, as no two nodes share an id).
enum GraphKey {
    @inline(__always)
    static func make(_ score: Float, _ id: Int32) -> UInt64 {
        let bits = score.bitPattern
        let ordered = bits & 0x8000_0000 != 0 ? ~bits : bits | 0x8000_0000
        return UInt64(ordered) << 32 | UInt64(0x7FFF_FFFF - UInt32(bitPattern: id)) << 1
    }

    @inline(__always)
    static func unpack(_ key: UInt64) -> (score: Float, id: Int32) {
        let ordered = UInt32(truncatingIfNeeded: key >> 32)
        let bits = ordered & 0x8000_0000 != 0 ? ordered & 0x7FFF_FFFF : ~ordered
        return (Float(bitPattern: bits), Int32(bitPattern: 0x7FFF_FFFF - UInt32(truncatingIfNeeded: key >> 1) & 0x7FFF_FFFF))
    }
}

/// One query's beam: the `width` best nodes found, as `GraphKey`s sorted best first, bit 0 set
/// once expanded (as in NSG and DiskANN). It visits the same nodes as HNSW's pair of heaps (a
/// candidate that has left the results can never be expanded there either) with one binary
/// search and a short move per accepted node instead of three heap operations.
struct Beam {
    let keys: UnsafeMutablePointer<UInt64>
    let width: Int
    var size = 0
    /// Every entry before it is expanded.
    var cursor = 0

    init(keys: UnsafeMutablePointer<UInt64>, width: Int) {
        self.keys = keys
        self.width = width
    }

    /// Offers `n` nodes (`ids`, scores at `scores[j * stride]`). Call it on a local copy of the
    /// beam, so its fields stay in registers: most offers are refused by one comparison with the
    /// worst key kept (a full beam never holds a key equal to a new node's).
    @inline(__always)
    mutating func offer(_ scores: UnsafePointer<Float>, stride: Int, ids: UnsafePointer<Int32>, count n: Int) {
        var floor: UInt64 = size < width ? 0 : keys[size &- 1]
        for j in 0..<n {
            let key = GraphKey.make(scores[j &* stride], ids[j])
            guard key >= floor else { continue }
            insert(key)
            floor = size < width ? 0 : keys[size &- 1]
        }
    }

    /// Inserts `key` in order, dropping the worst when full (the caller checked it belongs).
    @inline(__always)
    mutating func insert(_ key: UInt64) {
        // The first position whose key is below `key` (a binary search; written branch-free,
        // a comparison's 0 or 1 scaling the step, it measured slower).
        var lo = 0
        if size > 0 {
            var n = size
            while n > 1 {
                let half = n &>> 1
                lo = keys[lo &+ half] > key ? lo &+ half : lo
                n &-= half
            }
            lo &+= keys[lo] > key ? 1 : 0
        }
        var k = size == width ? size &- 1 : size
        if k &- lo > 16 {
            (keys + lo + 1).update(from: keys + lo, count: k &- lo)
        } else {
            while k > lo { keys[k] = keys[k &- 1]; k &-= 1 }
        }
        keys[lo] = key
        if size < width { size &+= 1 }
        if lo < cursor { cursor = lo }
    }

    /// The best unexpanded node, now marked expanded; nil when every node kept is expanded.
    @inline(__always)
    mutating func expand() -> Int32? {
        guard cursor < size else { return nil }
        let c = GraphKey.unpack(keys[cursor]).id
        keys[cursor] |= 1
        cursor &+= 1
        while cursor < size && keys[cursor] & 1 != 0 { cursor &+= 1 }
        return c
    }

    /// The node `expand` returns next, if any.
    @inline(__always)
    var upcoming: Int32? { cursor < size ? GraphKey.unpack(keys[cursor]).id : nil }
}

/// The best `keep` of every node offered (a beam narrower than the results wanted): pair keys
/// (`kvr_pair_key`) at or above a threshold, compacted to the best `keep` by quickselect whenever
/// they reach twice that, which raises the threshold (no heap).
struct KeptBest {
    let keys: UnsafeMutablePointer<UInt64>
    let keep: Int
    var count = 0
    var threshold = -Float.infinity

    init(keys: UnsafeMutablePointer<UInt64>, keep: Int) {
        self.keys = keys
        self.keep = keep
    }

    /// Offers `n` nodes (`ids`, scores at `scores[j * stride]`); call it on a local copy.
    @inline(__always)
    mutating func offer(_ scores: UnsafePointer<Float>, stride: Int, ids: UnsafePointer<Int32>, count n: Int) {
        for j in 0..<n {
            let s = scores[j &* stride]
            guard s >= threshold else { continue }
            keys[count] = kvr_pair_key(s, ids[j])
            count &+= 1
            if count == 2 &* keep {
                threshold = kvr_pair_score(kvr_select_u64(keys, count, keep))
                count = keep
            }
        }
    }
}

// MARK: Scratch

typealias VisitStamp = UInt32

/// Per-thread scratch of graph walks, reused across walks (pooled per index: visited stamps for
/// every node are too costly to allocate per query). The walk's growable state lives behind one
/// pointer: a class's stored `var` costs a dynamic exclusivity check per access.
final class GraphScratch {
    struct State {
        /// Visited stamps, one per node, cleared in O(1) by bumping the generation.
        var stamps: UnsafeMutablePointer<VisitStamp>
        var stampCapacity: Int
        var generation: VisitStamp = 0
        /// Beams of the last walk: `heads` of them, `beamWidth` keys each.
        var beams: UnsafeMutablePointer<Beam>
        var beamKeys: UnsafeMutablePointer<UInt64>
        var beamKeyCapacity: Int
        /// With a narrow beam, each head's best `keep` of every node scored (else `keep` is 0).
        var kept: UnsafeMutablePointer<KeptBest>
        var keptKeys: UnsafeMutablePointer<UInt64>
        var keptKeyCapacity: Int
        var headCapacity: Int
        var heads = 0
        var tracking = false
        /// Scores of the gathered rows, `rows x heads`.
        var scores: UnsafeMutablePointer<Float>
        var scoreCapacity: Int
        /// Build: candidates as sortable keys (score, then id).
        var sortKeys: UnsafeMutablePointer<UInt64>
        var sortCapacity: Int
        /// Query-key products computed since the scratch was taken.
        var computations = 0
        /// Routing products that are not keys scanned (HNSW's upper layers).
        var auxiliary = 0
    }

    /// Most neighbours a gathered list holds (HNSW's 2M <= 2048; the retrieval graph's slots < 1536),
    /// and entry points scored per pass.
    static let listCapacity = 4096

    private let state: UnsafeMutablePointer<State>
    let dimension: Int
    /// Unvisited neighbours gathered for scoring, and their rows.
    let pending = UnsafeMutablePointer<Int32>.allocate(capacity: GraphScratch.listCapacity)
    let rows = UnsafeMutablePointer<UnsafeRawPointer?>.allocate(capacity: GraphScratch.listCapacity)
    /// Entry points and their scores handed to a walk (HNSW: the upper layers' result per head).
    let entries = UnsafeMutablePointer<Int32>.allocate(capacity: GraphScratch.listCapacity)
    let entryScores = UnsafeMutablePointer<Float>.allocate(capacity: GraphScratch.listCapacity)
    /// Scores of one list (HNSW's greedy descent).
    let listScores = UnsafeMutablePointer<Float>.allocate(capacity: GraphScratch.listCapacity)
    /// Build: a key decoded as the query, a second row, and the ids the HNSW heuristic kept.
    let query: UnsafeMutablePointer<Float>
    let vector: UnsafeMutablePointer<Float>
    let selected = UnsafeMutablePointer<Int32>.allocate(capacity: GraphScratch.listCapacity)

    init(dimension: Int, capacity: Int) {
        self.dimension = dimension
        let nodes = max(1, capacity)
        let stamps = UnsafeMutablePointer<VisitStamp>.allocate(capacity: nodes)
        stamps.initialize(repeating: 0, count: nodes)
        state = .allocate(capacity: 1)
        state.initialize(to: State(stamps: stamps, stampCapacity: nodes,
                                   beams: .allocate(capacity: 1), beamKeys: .allocate(capacity: 256), beamKeyCapacity: 256,
                                   kept: .allocate(capacity: 1), keptKeys: .allocate(capacity: 256), keptKeyCapacity: 256,
                                   headCapacity: 1, scores: .allocate(capacity: GraphScratch.listCapacity),
                                   scoreCapacity: GraphScratch.listCapacity, sortKeys: .allocate(capacity: 512), sortCapacity: 512))
        query = .allocate(capacity: dimension)
        vector = .allocate(capacity: dimension)
    }

    deinit {
        let s = state.pointee
        s.stamps.deallocate(); s.beams.deallocate(); s.beamKeys.deallocate(); s.kept.deallocate()
        s.keptKeys.deallocate(); s.scores.deallocate(); s.sortKeys.deallocate()
        state.deallocate()
        for p in [pending, entries, selected] as [UnsafeMutablePointer<Int32>] { p.deallocate() }
        rows.deallocate(); entryScores.deallocate(); listScores.deallocate(); query.deallocate(); vector.deallocate()
    }

    /// Query-key products computed since the scratch was taken from its pool.
    var computations: Int {
        get { state.pointee.computations }
        set { state.pointee.computations = newValue }
    }

    /// Routing products since the scratch was taken (HNSW's descent through its upper layers: it
    /// re-scores keys layer 0 may score again, so counted as keys scanned it made small heads
    /// report more than 100% of their keys scanned).
    var auxiliary: Int {
        get { state.pointee.auxiliary }
        set { state.pointee.auxiliary = newValue }
    }

    /// Starts a walk of `heads` queries over nodes `0..<limit`, beams `width` wide, each head also
    /// keeping its best `keep` of every node scored when `keep > width`: grows what must grow,
    /// empties the beams, bumps the visited generation. Returns the walk's pointers.
    @inline(__always)
    func begin(heads g: Int, width: Int, keep: Int, limit: Int) -> (beams: UnsafeMutablePointer<Beam>,
            kept: UnsafeMutablePointer<KeptBest>, tracking: Bool, stamps: UnsafeMutablePointer<VisitStamp>,
            generation: VisitStamp, scores: UnsafeMutablePointer<Float>) {
        let s = state
        if limit > s.pointee.stampCapacity {
            // Geometric growth: a head that gains a key per decode step would otherwise
            // reallocate and clear its visited stamps on every step's walk.
            let capacity = max(limit, s.pointee.stampCapacity + s.pointee.stampCapacity / 2)
            s.pointee.stamps.deallocate()
            s.pointee.stamps = .allocate(capacity: capacity)
            s.pointee.stamps.initialize(repeating: 0, count: capacity)
            s.pointee.stampCapacity = capacity
            s.pointee.generation = 0
        }
        s.pointee.generation &+= 1
        if s.pointee.generation == 0 {
            s.pointee.stamps.update(repeating: 0, count: s.pointee.stampCapacity)
            s.pointee.generation = 1
        }
        if g > s.pointee.headCapacity {
            s.pointee.beams.deallocate(); s.pointee.kept.deallocate()
            s.pointee.beams = .allocate(capacity: g)
            s.pointee.kept = .allocate(capacity: g)
            s.pointee.headCapacity = g
        }
        if g &* width > s.pointee.beamKeyCapacity {
            s.pointee.beamKeys.deallocate()
            s.pointee.beamKeyCapacity = max(g &* width, 2 &* s.pointee.beamKeyCapacity)
            s.pointee.beamKeys = .allocate(capacity: s.pointee.beamKeyCapacity)
        }
        if g &* GraphScratch.listCapacity > s.pointee.scoreCapacity {
            s.pointee.scores.deallocate()
            s.pointee.scoreCapacity = g &* GraphScratch.listCapacity
            s.pointee.scores = .allocate(capacity: s.pointee.scoreCapacity)
        }
        let tracking = keep > width
        if tracking && g &* 2 &* keep > s.pointee.keptKeyCapacity {
            s.pointee.keptKeys.deallocate()
            s.pointee.keptKeyCapacity = max(g &* 2 &* keep, 2 &* s.pointee.keptKeyCapacity)
            s.pointee.keptKeys = .allocate(capacity: s.pointee.keptKeyCapacity)
        }
        let beams = s.pointee.beams, kept = s.pointee.kept
        for h in 0..<g {
            (beams + h).initialize(to: Beam(keys: s.pointee.beamKeys + h &* width, width: width))
            if tracking { (kept + h).initialize(to: KeptBest(keys: s.pointee.keptKeys + h &* 2 &* keep, keep: keep)) }
        }
        s.pointee.heads = g
        s.pointee.tracking = tracking
        return (beams, kept, tracking, s.pointee.stamps, s.pointee.generation, s.pointee.scores)
    }

    /// Head `h`'s beam of the last walk: its keys (best first, bit 0 the expanded mark) and size.
    func beam(_ h: Int = 0) -> (keys: UnsafeMutablePointer<UInt64>, count: Int) {
        let b = state.pointee.beams[h]
        return (b.keys, b.size)
    }

    /// Head `h`'s hits of the last walk, best first: the best `k` of every node it scored. Writes
    /// at most `k` ids and scores; returns how many.
    @inline(__always)
    func hits(_ h: Int, k: Int, ids: UnsafeMutablePointer<Int>, scores: UnsafeMutablePointer<Float>) -> Int {
        let s = state
        if s.pointee.tracking {
            let kept = s.pointee.kept[h]
            let n = min(kept.count, k)
            _ = kvr_select_u64(kept.keys, kept.count, n)
            kvr_sort_u64(kept.keys, n)
            for j in 0..<n {
                ids[j] = Int(kvr_pair_id(kept.keys[j]))
                scores[j] = kvr_pair_score(kept.keys[j])
            }
            return n
        }
        let beam = s.pointee.beams[h]
        let n = min(beam.size, k)
        for j in 0..<n {
            let hit = GraphKey.unpack(beam.keys[j])
            ids[j] = Int(hit.id)
            scores[j] = hit.score
        }
        return n
    }

    /// The sort buffer, grown to hold `n` keys (the HNSW build's candidate lists).
    @inline(__always)
    func sortBuffer(_ n: Int) -> UnsafeMutablePointer<UInt64> {
        let s = state
        if n > s.pointee.sortCapacity {
            s.pointee.sortKeys.deallocate()
            s.pointee.sortCapacity = max(n, 2 &* s.pointee.sortCapacity)
            s.pointee.sortKeys = .allocate(capacity: s.pointee.sortCapacity)
        }
        return s.pointee.sortKeys
    }

    /// The sort buffer as last grown.
    var sortKeys: UnsafeMutablePointer<UInt64> { state.pointee.sortKeys }
}

/// A lock-protected stack of scratch objects, so concurrent searches each get their own and
/// repeated searches reuse them. The stack lives behind a pointer (no exclusivity checks).
final class GraphScratchPool: @unchecked Sendable {
    private let lock = NSLock()
    private let free = UnsafeMutablePointer<[GraphScratch]>.allocate(capacity: 1)

    init() { free.initialize(to: []) }

    deinit {
        free.deinitialize(count: 1)
        free.deallocate()
    }

    func take(dimension: Int, capacity: Int) -> GraphScratch {
        lock.lock()
        let s = free.pointee.popLast()
        lock.unlock()
        let scratch = s ?? GraphScratch(dimension: dimension, capacity: capacity)
        scratch.computations = 0
        scratch.auxiliary = 0
        return scratch
    }

    func give(_ scratch: GraphScratch) {
        lock.lock()
        free.pointee.append(scratch)
        lock.unlock()
    }

    /// Runs `body` with a scratch taken from the pool, then gives it back.
    @inline(__always)
    func with<T>(dimension: Int, capacity: Int, _ body: (GraphScratch) throws -> T) rethrows -> T {
        let scratch = take(dimension: dimension, capacity: capacity)
        defer { give(scratch) }
        return try body(scratch)
    }
}

// MARK: The walk

/// Beam search over a proximity graph for `queries` (one query, or a GQA group's heads walking
/// together): HNSW's search-layer, RoarGraph's search.
///
/// Each head keeps its own beam, `width` wide (at least 1). Every node any head reaches is read
/// once, scored for all heads (one kernel call per gathered list) and offered to every head's
/// beam on its own score; one visited set serves the group. Heads expand in turn, each its best
/// unexpanded node (round robin), until no head has one: a head sees at least the nodes its own
/// walk would, while a key shared by several heads' neighbourhoods is read once. With one query
/// this is the plain sorted-beam search.
///
/// With `keep` above `width` the beam stays `width` wide but each head also keeps the best `keep`
/// of every node scored (the retrieval graph's narrow beam: its dense lists put most of a query's
/// top keys among the neighbours of a few expanded nodes); else the hits are the beam's best.
/// Either way `scratch.hits` returns the best k of every node the walk scored.
///
/// Entry points are scored here, counted as computations (unless `entryScores` gives them:
/// `entries.count x heads`, row-major). Nodes at or above `limit` are skipped (a frozen graph
/// during batched inserts). Unvisited neighbours are gathered before any of them is scored, their
/// rows scored by one C call that prefetches them a few rows ahead, and the next node's list is
/// prefetched while the current one's rows are scored.
@inline(__always)
func walkGraph<Links: NeighbourSource, Queries: WalkQueries>(
    _ links: Links, _ queries: Queries, keys: VectorView, entries: UnsafeBufferPointer<Int32>,
    entryScores: UnsafePointer<Float>? = nil, width requested: Int, keep: Int = 0, limit: Int,
    scratch: GraphScratch
) {
    let g = queries.count
    let width = max(1, requested)
    let (beams, kept, tracking, stamps, generation, scores) = scratch.begin(heads: g, width: width, keep: keep, limit: limit)
    let pending = scratch.pending, rows = scratch.rows
    var computed = 0

    /// Offers the `n` pending nodes, scored in `scores` (`n x g`), to every head.
    @inline(__always) func offer(_ n: Int, _ scores: UnsafePointer<Float>) {
        for h in 0..<g {
            if tracking {
                var best = kept[h]
                best.offer(scores + h, stride: g, ids: pending, count: n)
                kept[h] = best
            }
            var beam = beams[h]
            beam.offer(scores + h, stride: g, ids: pending, count: n)
            beams[h] = beam
        }
    }

    // Entry points, in passes of at most a list's capacity.
    var e = 0
    while e < entries.count {
        var waiting = 0
        while e < entries.count && waiting < GraphScratch.listCapacity {
            let node = entries[e]
            if Int(node) < limit && stamps[Int(node)] != generation {
                stamps[Int(node)] = generation
                if let entryScores {
                    pending[0] = node
                    offer(1, entryScores + e &* g)
                } else {
                    pending[waiting] = node
                    rows[waiting] = keys.row(Int(node))
                    waiting &+= 1
                }
            }
            e &+= 1
        }
        if waiting > 0 {
            for j in 0..<waiting { rows[j] = keys.row(Int(pending[j])) }
            queries.score(rows, ids: pending, count: waiting, keys: keys, into: scores)
            offer(waiting, scores)
            computed &+= waiting &* g
        }
    }

    var h = 0
    var idle = 0
    while idle < g {
        guard let c = beams[h].expand() else {
            idle &+= 1
            h = h &+ 1 == g ? 0 : h &+ 1
            continue
        }
        idle = 0
        // The node expanded next (the next head's best unexpanded): fetch its list while scoring.
        let next = h &+ 1 == g ? 0 : h &+ 1
        if let upcoming = beams[next].upcoming { links.prefetch(Int(upcoming)) }
        // Unvisited neighbours below `limit`, with their rows. The visited test is branch-free (a
        // stamp is written whether or not it was set; lists hold no duplicates; a visited node's
        // entry is overwritten by the next), so its cache misses overlap instead of each costing
        // a mispredicted branch.
        var waiting = 0
        for n in links.neighbours(Int(c)) {
            let ni = Int(n)
            guard ni < limit else { continue }
            let fresh = stamps[ni] != generation
            stamps[ni] = generation
            pending[waiting] = n
            rows[waiting] = keys.row(ni)
            waiting &+= fresh ? 1 : 0
        }
        if waiting > 0 {
            queries.score(rows, ids: pending, count: waiting, keys: keys, into: scores)
            offer(waiting, scores)
            computed &+= waiting &* g
        }
        h = next
    }
    scratch.computations &+= computed
}

// MARK: Searching a graph index

/// A graph index the walk serves (HNSW, the retrieval graph): it supplies the walk of one query
/// or group (HNSW first descends its upper layers); searching a batch and a group is shared here.
protocol GraphWalkIndex: BuildableIndex {
    /// How errors name the index ("the HNSW index").
    static var indexName: String { get }
    var scratchPool: GraphScratchPool { get }
    /// The beam width a search for `k` results with `ef` walks (HNSW raises ef to k; the
    /// retrieval graph keeps a beam narrower than k and returns the best k of every key scored).
    func beamWidth(k: Int, ef: Int) -> Int
    /// Walks the graph for `queries` (validated by the caller), leaving each head's hits in `scratch`.
    func walk<Queries: WalkQueries>(_ queries: Queries, width: Int, keep: Int, keys: VectorView, scratch: GraphScratch)
}

extension GraphWalkIndex {
    /// Top-`k` of each query of a batch, one walk per query, queries spread over
    /// `parameters.threads`, each thread with its own pooled scratch.
    func searchGraph(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                     keys: VectorView) throws -> SearchResults {
        let m = try checkSearch(queries, k: k, keys: keys, name: Self.indexName)
        try parameters.graph.validate()
        let width = beamWidth(k: k, ef: parameters.graph.ef), d = dimension
        var results = SearchResults(k: k, queryCount: m)
        results.stats.keyCount = count
        let plan = ChunkPlan.contiguous(count: m, threads: parameters.threads)
        let computed = UnsafeMutablePointer<Int>.allocate(capacity: 2 * plan.workers)
        defer { computed.deallocate() }
        computed.initialize(repeating: 0, count: 2 * plan.workers)
        results.ids.withUnsafeMutableBufferPointer { ids in
            results.scores.withUnsafeMutableBufferPointer { scores in
                plan.run { worker, chunks in
                    scratchPool.with(dimension: d, capacity: count) { scratch in
                        for (_, range) in chunks {
                            for q in range {
                                walk(SingleQuery(query: queries.baseAddress! + q * d), width: width, keep: k, keys: keys,
                                     scratch: scratch)
                                _ = scratch.hits(0, k: k, ids: ids.baseAddress! + q * k, scores: scores.baseAddress! + q * k)
                            }
                        }
                        computed[worker] = scratch.computations
                        computed[plan.workers + worker] = scratch.auxiliary
                    }
                }
            }
        }
        results.stats.distanceComputations = UnsafeBufferPointer(start: computed, count: plan.workers).reduce(0, +)
        results.stats.auxiliaryComputations = UnsafeBufferPointer(start: computed + plan.workers, count: plan.workers).reduce(0, +)
        return results
    }

    /// Top-`k` for each query of a GQA group (`g x dimension`) by one shared walk: each key
    /// reached is read once for the whole group (see `walkGraph`). Same results layout as `search`.
    func searchGraphGroup(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                          keys: VectorView) throws -> SearchResults {
        let g = try checkSearch(queries, k: k, keys: keys, name: Self.indexName)
        try parameters.graph.validate()
        var results = SearchResults(k: k, queryCount: g)
        results.stats.keyCount = count
        guard g > 0 else { return results }
        let width = beamWidth(k: k, ef: parameters.graph.ef)
        (results.stats.distanceComputations, results.stats.auxiliaryComputations) = scratchPool.with(dimension: dimension, capacity: count) { scratch in
            walk(QueryGroup(queries: queries.baseAddress!, count: g), width: width, keep: k, keys: keys, scratch: scratch)
            results.ids.withUnsafeMutableBufferPointer { ids in
                results.scores.withUnsafeMutableBufferPointer { scores in
                    for h in 0..<g { _ = scratch.hits(h, k: k, ids: ids.baseAddress! + h * k, scores: scores.baseAddress! + h * k) }
                }
            }
            return (scratch.computations, scratch.auxiliary)
        }
        return results
    }
}
