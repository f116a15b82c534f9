import CKernels
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// RetrievalAttention's attention-aware graph (RoarGraph-style projection), for decode queries
/// that are out of distribution for the keys.
///
/// Build: the training queries are a sample of prefill queries evenly spread over positions:
/// `maxTrainingQueries` (default 4096) get their exact top-`Nq` keys from Flat's blocked `sgemm`
/// on `threads`; `restrictedTrainingQueries` more (default 45056) get their top-`Nq` among the
/// "hot" keys only, those in some exact list (one `sgemm` over a ~7% slice of the keys: they hold
/// over 99% of any query's top keys), which buys ten times the training queries for the cost of
/// the exact ones. Each query's nearest key is linked to the others that survive the occlusion
/// rule (a candidate is dropped when it is closer to an already-kept neighbour than to the nearest
/// key), the list filled up to `M` nearest first as RoarGraph does, with reverse edges; each key's
/// edges are pruned to `M` the same way. Keys the projection leaves unreachable from the entry
/// points (the keys most often nearest to training queries) get cheap L2 links within groups found
/// by one `sgemm` pass (`linkUnreached`), one edge into each group no entry reaches
/// (`bridgeGroups`) and edges from reached group neighbours (`span`); the few still unreachable
/// are inserted like HNSW nodes — searched with the key as the query and linked to the best found —
/// so the graph is connected. Later keys (decode-time upkeep) are inserted that way too.
/// Search is a beam search from the entry points; the beam (ef) may be narrower than k, the
/// results being the best k of every key scored: with `M` (128) above `Nq` each key links to
/// nearly all keys ranked with it, so a few expanded nodes hold most of a query's top keys and a
/// narrow beam with wide lists scans fewer keys per unit of recall than a wide beam with narrow ones.
public final class RetrievalGraphIndex: BuildableIndex, @unchecked Sendable {
    public static let kind = IndexKind.retrieval
    public static let formatVersion = 3
    public let dimension: Int
    public private(set) var count = 0
    public private(set) var mapSnapshot: MapIdentity?
    /// Degree cap of the query-derived (projection) edges.
    public let M: Int
    /// Extra slots per node for connectivity edges, which never evict projection edges.
    public let connectivitySlots: Int
    /// Key-to-key (L2) nearest neighbours linked per hot key (keys in some training query's top list),
    /// so keys the occlusion rule dropped from a projection stay reachable from their neighbours.
    public let localNeighbours: Int
    /// Exact neighbours taken per training query.
    public let queryNeighbours: Int
    /// Most training queries used.
    public let maxTrainingQueries: Int
    /// Beam width while inserting keys for connectivity.
    public let efConstruction: Int
    public let entryCount: Int
    /// Training queries beyond `maxTrainingQueries` whose top-`Nq` keys are found among the hot
    /// keys only (`restrictedLists`), then projected like the exact ones.
    public let restrictedTrainingQueries: Int
    public var threads: Int
    /// Per node `stride` slots: the count, then projection edges, then connectivity edges.
    let links = Int32Buffer()
    /// Per node, how many of its edges are projection edges (they come first), then local edges.
    private(set) var projectionCount: [Int32] = []
    private(set) var localCount: [Int32] = []
    /// Per node, the next connectivity slot to overwrite when full (round robin).
    private var connectivityCursor: [UInt8] = []
    private(set) var entries: [Int32] = []
    /// Squared norms of the keys `insert` has seen (rows 0..<count), extended as keys arrive.
    private var insertNorms: [Float] = []
    let scratchPool = GraphScratchPool()

    public init(dimension: Int, M: Int = 128, queryNeighbours: Int = 100, maxTrainingQueries: Int = 4096,
                restrictedTrainingQueries: Int = 45056, efConstruction: Int = 64, entryCount: Int = 64,
                connectivitySlots: Int = 2, localNeighbours: Int = 8, threads: Int = 2) throws {
        guard M >= 2, M <= 1024 else { throw IndexError.invalidParameter("M must be in 2...1024 (got \(M))") }
        guard queryNeighbours >= 2 else { throw IndexError.invalidParameter("query neighbours must be at least 2") }
        guard (0...255).contains(connectivitySlots) else { throw IndexError.invalidParameter("connectivity slots must be in 0...255") }
        guard (0...255).contains(localNeighbours) else { throw IndexError.invalidParameter("local neighbours must be in 0...255") }
        guard maxTrainingQueries >= 1, restrictedTrainingQueries >= 0, efConstruction >= 1, entryCount >= 1 else {
            throw IndexError.invalidParameter("training queries, ef-construction and entry count must be positive")
        }
        self.dimension = dimension
        self.M = M
        self.queryNeighbours = queryNeighbours
        self.maxTrainingQueries = maxTrainingQueries
        self.efConstruction = efConstruction
        self.entryCount = entryCount
        self.connectivitySlots = connectivitySlots
        self.localNeighbours = localNeighbours
        self.threads = max(1, threads)
        self.restrictedTrainingQueries = restrictedTrainingQueries
    }

    var stride: Int { M + localNeighbours + connectivitySlots + 1 }
    /// Set while `links` holds the packed graph as stored (`count + 1` offsets of each node's count
    /// slot): a loaded graph searches it in place; the first `add` unpacks it to the fixed stride.
    let packedOffsets = Int32Buffer()
    private(set) var isPacked = false
    var graph: StridedLinks {
        StridedLinks(base: links.pointer, stride: stride, offsets: isPacked ? UnsafePointer(packedOffsets.pointer) : nil)
    }

    /// Unpacks a loaded graph to the fixed stride that `add` writes into.
    private func unpack() {
        guard isPacked else { return }
        let packed = graph
        let strided = Int32Buffer(capacity: count * stride)
        strided.grow(by: count * stride)
        for i in 0..<count {
            let from = packed.slot(i)
            (strided.pointer + i * stride).update(from: from, count: 1 + Int(from[0]))
        }
        links.swapContents(with: strided)  // the packed view goes with `strided`
        isPacked = false
        packedOffsets.adopt(SectionArray())
    }

    /// The projection edges of `node`.
    private func projectionList(_ node: Int) -> [Int32] {
        Array(graph.neighbours(node).prefix(Int(projectionCount[node])))
    }

    /// Replaces the projection edges of `node`, keeping its local and connectivity edges after them.
    private func setProjectionList(_ node: Int, _ list: [Int32]) {
        let slot = links.pointer + node * stride
        let rest = Array(graph.neighbours(node).dropFirst(Int(projectionCount[node])))
        let all = list + rest
        slot[0] = Int32(all.count)
        for (i, n) in all.enumerated() { slot[1 + i] = n }
        projectionCount[node] = Int32(list.count)
    }

    /// Sets the local edges of `node` (before any connectivity edge exists).
    private func setLocalList(_ node: Int, _ list: [Int32]) {
        let slot = links.pointer + node * stride
        let projection = projectionList(node)
        let local = list.filter { !projection.contains($0) && Int($0) != node }.prefix(localNeighbours)
        let all = projection + local
        slot[0] = Int32(all.count)
        for (i, n) in all.enumerated() { slot[1 + i] = n }
        localCount[node] = Int32(local.count)
    }

    /// Adds a connectivity edge `target -> node`; when the slots are full, overwrites the oldest.
    private func addConnectivityEdge(from target: Int, to node: Int32) {
        guard connectivitySlots > 0 else { return }
        let existing = graph.neighbours(target)
        if existing.contains(node) || Int32(target) == node { return }
        let slot = links.pointer + target * stride
        let fixed = Int(projectionCount[target]) + Int(localCount[target])
        let used = Int(slot[0]) - fixed
        if used < connectivitySlots {
            slot[1 + Int(slot[0])] = node
            slot[0] += 1
        } else {
            let cursor = Int(connectivityCursor[target]) % connectivitySlots
            slot[1 + fixed + cursor] = node
            connectivityCursor[target] = UInt8((cursor + 1) % connectivitySlots)
        }
    }

    /// Keeps at most `M` of `candidates` around the key decoded in `scratch.query`: candidates
    /// are taken nearest first (L2), and one is dropped when a kept neighbour is nearer to it than
    /// the base is (the RNG occlusion rule); free places are then filled with the nearest dropped
    /// ones (RoarGraph's fill: on this data it gains more recall than the extra edges cost).
    /// Distances among keys are L2, not inner product: attention keys share a large common
    /// component that would make every key look alike.
    /// `norms` holds every key's squared norm.
    private func prune(_ candidates: [Int32], keys: VectorView, scratch: GraphScratch, norms: UnsafePointer<Float>) -> [Int32] {
        // The fill would keep every candidate: the rule would only reorder them.
        if candidates.count <= M { return candidates }
        let d = dimension
        let base = scratch.query
        var baseNorm: Float = 0
        for j in 0..<d { baseNorm += base[j] * base[j] }
        var byDistance: [(score: Float, id: Int32)] = []
        byDistance.reserveCapacity(candidates.count)
        for c in candidates {
            let dist = baseNorm + norms[Int(c)] - 2 * keys.score(query: base, row: Int(c))
            byDistance.append((-dist, c))  // best first = nearest first
        }
        sortBestFirst(&byDistance)
        var kept: [Int32] = []
        kept.reserveCapacity(M)
        for cand in byDistance where kept.count < M {
            keys.decodeRow(Int(cand.id), into: scratch.vector)
            let toBase = -cand.score
            let norm = norms[Int(cand.id)]
            var occluded = false
            for r in kept where norm + norms[Int(r)] - 2 * keys.score(query: scratch.vector, row: Int(r)) < toBase {
                occluded = true
                break
            }
            if !occluded { kept.append(cand.id) }
        }
        if kept.count < M {
            for cand in byDistance where kept.count < M && !kept.contains(cand.id) { kept.append(cand.id) }
        }
        return kept
    }

    /// Training queries kept by `train` until the first `add` builds the graph from them
    /// (`t x dimension`, row-major).
    private var trainingQueries: [Float] = []
    /// Further training queries whose top keys come from the hot keys only (`restrictedLists`).
    private var restrictedQueries: [Float] = []

    /// True once training queries are kept or the graph is built.
    public var isTrained: Bool { count > 0 || !trainingQueries.isEmpty }

    /// Keeps an evenly spaced sample of at most `maxTrainingQueries + restrictedTrainingQueries` of
    /// the head's prefill `queries`, `maxTrainingQueries` of them (evenly spread) for exact top
    /// lists; the first `add` builds the graph from them.
    public func train(keys: VectorView, range: Range<Int>, queries: VectorView?) throws {
        guard count == 0 else { throw IndexError.invalidParameter("the retrieval graph is already built; add keys instead") }
        guard let queries else { throw IndexError.notBuilt("the retrieval index is built from prefill queries; none were given") }
        guard keys.dimension == dimension, queries.dimension == dimension else {
            throw IndexError.dimensionMismatch(expected: dimension, actual: keys.dimension == dimension ? queries.dimension : keys.dimension)
        }
        guard queries.count > 0 else {
            throw IndexError.notBuilt("head \(keys.info.id) has no prefill queries; ingest them with --queries to build a retrieval index")
        }
        let sample = Self.trainingSample(offered: queries.count, budget: maxTrainingQueries + restrictedTrainingQueries)
        var isExact = [Bool](repeating: false, count: sample.count)
        for j in Self.trainingSample(offered: sample.count, budget: maxTrainingQueries) { isExact[j] = true }
        func rows(_ picks: [Int]) -> [Float] {
            var out = [Float](repeating: 0, count: picks.count * dimension)
            out.withUnsafeMutableBufferPointer { buf in
                for (j, i) in picks.enumerated() { queries.decodeRow(i, into: buf.baseAddress! + j * dimension) }
            }
            return out
        }
        trainingQueries = rows(sample.indices.filter { isExact[$0] }.map { sample[$0] })
        restrictedQueries = rows(sample.indices.filter { !isExact[$0] }.map { sample[$0] })
    }

    /// Positions of the training queries taken from `offered` prefill queries: all of them up to
    /// `budget`, else `budget` evenly spread over the positions (the first included).
    static func trainingSample(offered: Int, budget: Int) -> [Int] {
        let t = min(offered, budget)
        return (0..<t).map { $0 * offered / t }
    }

    /// Builds the graph over all keys from the prefill `queries` of the same head (`train` then `add`).
    public func build(keys: VectorView, queries: VectorView, progress: ((Int, Int) -> Void)? = nil) throws {
        try train(keys: keys, range: 0..<keys.count, queries: queries)
        try add(keys: keys, range: 0..<keys.count, progress: progress)
    }

    /// Builds the graph over every key of `mapped` from the training queries.
    private func project(keys mapped: VectorView, progress: ((Int, Int) -> Void)?) throws {
        // The build reads keys at random many times: from a heap copy (huge pages) when large.
        let keys = mapped.count >= 4096 ? mapped.materialized() : mapped
        let n = keys.count
        let nq = min(queryNeighbours, n)
        links.grow(by: n * stride)
        projectionCount = [Int32](repeating: 0, count: n)
        localCount = [Int32](repeating: 0, count: n)
        connectivityCursor = [UInt8](repeating: 0, count: n)
        // 1. Exact top-Nq keys of an evenly spaced sample of training queries (picked by `train`).
        let training = trainingQueries
        trainingQueries = []
        let t = training.count / dimension
        var params = SearchParameters()
        params.threads = threads
        let truth = try training.withUnsafeBufferPointer {
            try FlatIndex(keys: keys).search($0, k: nq, parameters: params, keys: keys)
        }
        // 2. Entry points: the distinct nearest keys of training queries, most often nearest
        // first; they spread over the regions queries go to, so a search starts close.
        var frequency = [Int32](repeating: 0, count: n)
        for q in 0..<t where truth.ids[q * nq] >= 0 { frequency[truth.ids[q * nq]] += 1 }
        let byFrequency = (0..<n).filter { frequency[$0] > 0 }.sorted { (a: Int, b: Int) -> Bool in
            frequency[a] != frequency[b] ? frequency[a] > frequency[b] : a < b
        }
        entries = byFrequency.prefix(min(entryCount, n)).map { Int32($0) }
        // 3. Projection: nearest key of each query linked to the query's other top keys (kept
        // by the occlusion rule), both ways; each key's edges are pruned to `M` once, at the end.
        let norms = squaredNorms(keys)
        insertNorms = norms  // the upkeep's inserts continue from these
        var isHot = [Bool](repeating: false, count: n)
        for id in truth.ids where id >= 0 { isHot[id] = true }
        var lists = (0..<t).map { q in truth.ids[(q * nq)..<((q + 1) * nq)].filter { $0 >= 0 }.map { Int32($0) } }
        if !restrictedQueries.isEmpty {
            let more = restrictedQueries
            restrictedQueries = []
            lists += restrictedLists(more, hot: (0..<n).filter { isHot[$0] }, keys: keys, nq: nq)
        }
        projectLists(lists, keys: keys, norms: norms)
        progress?(t, t + n)
        // 4. Local edges among hot keys: their L2 nearest hot keys, by sgemm.
        try linkLocalNeighbours((0..<n).filter { isHot[$0] }, keys: keys)
        // 5. Connectivity: the keys the entry points cannot reach get links within their L2
        // group (one sgemm pass); the few still unreached are inserted one by one.
        count = n
        linkUnreached(unreachable(n), keys: keys, norms: norms, isHot: isHot)
        // A connectivity edge may overwrite an earlier one when a list is full: re-check, a few rounds.
        var unreached = unreachable(n)
        for _ in 0..<4 where !unreached.isEmpty {
                let pending = unreached
            try insert(pending, keys: keys, limit: n) { done in progress?(t + (n - pending.count) + done, t + n) }
            unreached = unreachable(n)
        }
        progress?(t + n, t + n)
    }

    /// Top-`nq` keys, best first, of each of `queries` (row-major) among the `hot` keys only (one
    /// `sgemm` per block of queries on `threads`): the keys some exact training query ranks in its
    /// top list hold nearly all of any query's top keys, at a fraction of a full scan's cost.
    func restrictedLists(_ queries: [Float], hot: [Int], keys: VectorView, nq: Int) -> [[Int32]] {
        let d = dimension, m = queries.count / d, h = hot.count
        guard m > 0, h > 1 else { return [] }
        let take = min(nq, h)
        var matrix = [Float](repeating: 0, count: h * d)
        matrix.withUnsafeMutableBufferPointer { mb in
            for (j, i) in hot.enumerated() { keys.decodeRow(i, into: mb.baseAddress! + j * d) }
        }
        let rowsPerBlock = 128
        var lists = [[Int32]](repeating: [], count: m)
        BLAS.setThreads(1)
        lists.withUnsafeMutableBufferPointer { out in
            matrix.withUnsafeBufferPointer { mb in
                queries.withUnsafeBufferPointer { qb in
                    ChunkPlan(count: m, chunk: rowsPerBlock, threads: threads).run(scratch: rowsPerBlock * h) { _, blocks, scores in
                        var top = TopK<Int32>(k: take)
                        for (_, block) in blocks {
                            let lo = block.lowerBound
                            BLAS.scoresNT(m: block.count, n: h, k: d, a: qb.baseAddress! + lo * d, b: mb.baseAddress!, c: scores)
                            for r in 0..<block.count {
                                top.reset()
                                top.push(scores: scores + r * h, count: h)
                                out[lo + r] = top.sorted().map { Int32(hot[Int($0.id)]) }
                            }
                        }
                    }
                }
            }
        }
        return lists
    }

    /// Projects training queries' top lists (`lists`, best first): each list's nearest key is
    /// linked to the others the occlusion rule keeps, both ways. Lists are pruned in parallel;
    /// edges gather per key (compacted by the rule when they pass `4 M`), and each key's edges are
    /// pruned to `M` at the end, in parallel; the graph has no other edge yet.
    private func projectLists(_ lists: [[Int32]], keys: VectorView, norms: [Float]) {
        let n = keys.count, d = dimension, m = lists.count
        let plan = ChunkPlan(count: m, chunk: 1, threads: threads), workers = plan.workers
        let pool = (0..<workers).map { _ in scratchPool.take(dimension: d, capacity: n) }
        defer { pool.forEach(scratchPool.give) }
        var kept = [[Int32]](repeating: [], count: m)
        norms.withUnsafeBufferPointer { nb in
            kept.withUnsafeMutableBufferPointer { out in
                plan.run { w, owned in
                    for (q, _) in owned {
                        if let nearest = lists[q].first {
                            keys.decodeRow(Int(nearest), into: pool[w].query)
                            out[q] = self.prune(Array(lists[q].dropFirst()), keys: keys, scratch: pool[w], norms: nb.baseAddress!)
                        }
                    }
                }
            }
            // Edges gather per key, each worker for its own keys (key mod workers), in list order:
            // the same lists whatever the thread count.
            var pending = [[Int32]](repeating: [], count: n)
            let slack = 4 * M
            pending.withUnsafeMutableBufferPointer { pb in
                plan.run { w, _ in
                    func append(_ node: Int, _ ids: some Sequence<Int32>) {
                        pb[node].append(contentsOf: ids)
                        guard pb[node].count > slack else { return }
                        keys.decodeRow(node, into: pool[w].query)
                        pb[node] = self.prune(Self.unique(pb[node]), keys: keys, scratch: pool[w], norms: nb.baseAddress!)
                    }
                    for (list, edges) in zip(lists, kept) {
                        guard let nearest = list.first else { continue }
                        if Int(nearest) % workers == w { append(Int(nearest), edges) }
                        for c in edges where Int(c) % workers == w { append(Int(c), CollectionOfOne(nearest)) }
                    }
                }
            }
            let base = links.pointer, stride = self.stride
            projectionCount.withUnsafeMutableBufferPointer { counts in
                pending.withUnsafeBufferPointer { pb in
                    ChunkPlan(count: n, chunk: 1, threads: workers).run { w, nodes in
                        for (node, _) in nodes {
                            var list = Self.unique(pb[node])
                            if list.count > self.M {
                                keys.decodeRow(node, into: pool[w].query)
                                list = self.prune(list, keys: keys, scratch: pool[w], norms: nb.baseAddress!)
                            }
                            let slot = base + node * stride
                            slot[0] = Int32(list.count)
                            for (i, x) in list.enumerated() { slot[1 + i] = x }
                            counts[node] = Int32(list.count)
                        }
                    }
                }
            }
        }
    }

    /// `ids` without repeats, first occurrences kept in order.
    static func unique(_ ids: [Int32]) -> [Int32] {
        var seen = Set<Int32>(minimumCapacity: ids.count)
        return ids.filter { seen.insert($0).inserted }
    }

    /// Keys of `0..<n` no entry point reaches.
    func unreachable(_ n: Int) -> [Int] {
        let reached = reachedFlags(n)
        return (0..<n).filter { !reached[$0] }
    }

    /// Per key of `0..<n`, whether an entry point reaches it.
    func reachedFlags(_ n: Int) -> [Bool] {
        var reached = [Bool](repeating: false, count: n)
        var stack = entries.map(Int.init)
        for e in stack { reached[e] = true }
        while let node = stack.popLast() {
            for nb in graph.neighbours(node) where !reached[Int(nb)] {
                reached[Int(nb)] = true
                stack.append(Int(nb))
            }
        }
        return reached
    }

    /// Squared norm of every key from `start` on (of keys `start..<keys.count`).
    private func squaredNorms(_ keys: VectorView, from start: Int = 0) -> [Float] {
        let n = keys.count, d = dimension, chunk = 4096
        var norms = [Float](repeating: 0, count: max(0, n - start))
        let rows = UnsafeMutablePointer<Float>.allocate(capacity: chunk * d)
        defer { rows.deallocate() }
        var i = start
        while i < n {
            let m = decodeRun(keys, from: i, upTo: min(n, i + chunk), into: rows)
            for r in 0..<m { norms[i - start + r] = kvr_dot_f32(rows + r * d, rows + r * d, d) }
            i += m
        }
        return norms
    }

    /// Keys per group at most in `linkUnreached` (its Gram matrix: 16 MB).
    static let groupLimit = 2048

    /// Links `cold` keys (out of every training query's reach, mostly) cheaply: all keys are
    /// grouped by their L2-nearest of about sqrt(n) evenly spaced anchor keys (one `sgemm` pass),
    /// groups are cut in position order to at most `groupLimit` keys, and within a group each
    /// cold key gets its `localNeighbours` L2-nearest members as edges (one `sgemm` per group),
    /// the same number of reverse edges from the cold keys that chose it (in its empty projection
    /// slots: keys in no training query's list have none), and a connectivity edge from its
    /// nearest member. Groups run on `threads`; edges are written after, in key order, so the
    /// graph does not depend on the thread count.
    private func linkUnreached(_ cold: [Int], keys: VectorView, norms: [Float], isHot: [Bool]) {
        let n = keys.count, d = dimension, L = localNeighbours
        guard !cold.isEmpty, L > 0, n > 1 else { return }
        let anchors = max(1, min(n, Int(Double(n).squareRoot().rounded())))
        var anchorRows = [Float](repeating: 0, count: anchors * d)
        var anchorNorms = [Float](repeating: 0, count: anchors)
        for a in 0..<anchors {
            let i = a * n / anchors
            anchorRows.withUnsafeMutableBufferPointer { keys.decodeRow(i, into: $0.baseAddress! + a * d) }
            anchorNorms[a] = norms[i]
        }
        // Nearest anchor of every key: argmax 2 x·a - |a|² by sgemm, in chunks over threads.
        var group = [Int32](repeating: 0, count: n)
        let chunk = 2048
        BLAS.setThreads(1)
        group.withUnsafeMutableBufferPointer { out in
            anchorRows.withUnsafeBufferPointer { ar in
                anchorNorms.withUnsafeBufferPointer { an in
                    ChunkPlan(count: n, chunk: chunk, threads: threads).run(scratch: chunk * (d + anchors)) { _, chunks, buffer in
                        let rows = buffer, scores = buffer + chunk * d
                        for (_, part) in chunks {
                            let lo = part.lowerBound, m = decodeRun(keys, from: lo, upTo: part.upperBound, into: rows)
                            for r in 0..<m { (scores + r * anchors).update(from: an.baseAddress!, count: anchors) }
                            BLAS.scoresNT(m: m, n: anchors, k: d, a: rows, b: ar.baseAddress!, c: scores, alpha: -2, beta: 1)
                            for r in 0..<m { out[lo + r] = Int32(KMeans.argMin(scores + r * anchors, count: anchors).0) }
                        }
                    }
                }
            }
        }
        // Groups in position order, cut to at most `groupLimit` keys.
        var members = [[Int32]](repeating: [], count: anchors)
        for i in 0..<n { members[Int(group[i])].append(Int32(i)) }
        var isCold = [Bool](repeating: false, count: n)
        for c in cold { isCold[c] = true }
        var pieces: [ArraySlice<Int32>] = []
        for m in members where m.count > 1 {
            var lo = 0
            while lo < m.count {
                let hi = min(m.count, lo + Self.groupLimit)
                if m[lo..<hi].contains(where: { isCold[Int($0)] }) { pieces.append(m[lo..<hi]) }
                lo = hi
            }
        }
        // Per cold key: its L nearest members (nearest first).
        var plans = [[Int32]](repeating: [], count: n)
        let limit = Self.groupLimit
        plans.withUnsafeMutableBufferPointer { out in
            norms.withUnsafeBufferPointer { nb in
                isCold.withUnsafeBufferPointer { coldFlags in
                    ChunkPlan(count: pieces.count, chunk: 1, threads: threads).run(scratch: limit * (2 * d + limit)) { _, owned, buffer in
                        let rows = buffer, coldRows = buffer + limit * d, scores = buffer + 2 * limit * d
                        var top = TopK<Int32>(k: L + 1)
                        for (p, _) in owned {
                            let piece = Array(pieces[p]), s = piece.count
                            var coldIndex: [Int] = []
                            for (j, id) in piece.enumerated() {
                                keys.decodeRow(Int(id), into: rows + j * d)
                                if coldFlags[Int(id)] {
                                    (coldRows + coldIndex.count * d).update(from: rows + j * d, count: d)
                                    coldIndex.append(j)
                                }
                            }
                            let c = coldIndex.count
                            BLAS.scoresNT(m: c, n: s, k: d, a: coldRows, b: rows, c: scores)
                            for (r, j) in coldIndex.enumerated() {
                                top.reset()
                                let row = scores + r * s
                                for x in 0..<s where x != j {
                                    let v = 2 * row[x] - nb[Int(piece[x])]  // -|a - b|² + |a|²
                                    if v >= top.threshold { top.push(v, piece[x]) }
                                }
                                out[Int(piece[j])] = top.sorted().prefix(L).map(\.id)
                            }
                        }
                    }
                }
            }
        }
        // Reverse edges among keys without projection edges, at most L each.
        var reverse = [[Int32]](repeating: [], count: n)
        for i in cold where !isHot[i] {
            for j in plans[i] where !isHot[Int(j)] && isCold[Int(j)] && reverse[Int(j)].count < min(L, M) && !plans[Int(j)].contains(Int32(i)) {
                reverse[Int(j)].append(Int32(i))
            }
        }
        for i in cold where !plans[i].isEmpty {
            if isHot[i] {
                setLocalList(i, plans[i])  // keeps its projection edges
            } else {
                let slot = links.pointer + i * stride
                let all = reverse[i] + plans[i]
                slot[0] = Int32(all.count)
                for (x, id) in all.enumerated() { slot[1 + x] = id }
                projectionCount[i] = Int32(reverse[i].count)
                localCount[i] = Int32(plans[i].count)
            }
        }
        for i in cold { if let nearest = plans[i].first { addConnectivityEdge(from: Int(nearest), to: Int32(i)) } }
        bridgeGroups(members, anchorRows: anchorRows, anchorNorms: anchorNorms, keys: keys, norms: norms)
        span(cold, plans: plans, isHot: isHot)
    }

    /// Links keys of `cold` that entry points still do not reach from the first reached key of
    /// their plan (nearest first) with a free connectivity slot, keys in no training query's top
    /// list first (a search rarely expands them, so the edge costs decode searches little);
    /// a newly reached key passes reach on along its own edges. A few sweeps.
    private func span(_ cold: [Int], plans: [[Int32]], isHot: [Bool]) {
        let n = count
        var reached = reachedFlags(n)
        func free(_ j: Int) -> Bool {
            Int(links.pointer[j * stride]) - Int(projectionCount[j]) - Int(localCount[j]) < connectivitySlots
        }
        func spread(_ start: Int) {
            reached[start] = true
            var stack = [start]
            while let node = stack.popLast() {
                for nb in graph.neighbours(node) where !reached[Int(nb)] {
                    reached[Int(nb)] = true
                    stack.append(Int(nb))
                }
            }
        }
        for _ in 0..<3 {
            var linked = 0
            for i in cold where !reached[i] {
                let plan = plans[i]
                guard let source = plan.first(where: { reached[Int($0)] && !isHot[Int($0)] && free(Int($0)) })
                        ?? plan.first(where: { reached[Int($0)] && free(Int($0)) }) else { continue }
                addConnectivityEdge(from: Int(source), to: Int32(i))
                spread(i)
                linked += 1
            }
            if linked == 0 { break }
        }
    }

    /// Gives each group of `members` (keys by nearest anchor) that no entry point reaches one
    /// edge in: a connectivity edge to its anchor key from the reached key nearest to it in the
    /// nearest group (by anchor) that entry points do reach, preferring keys with a free slot.
    private func bridgeGroups(_ members: [[Int32]], anchorRows: [Float], anchorNorms: [Float], keys: VectorView, norms: [Float]) {
        let n = keys.count, d = dimension, anchors = members.count
        let reached = reachedFlags(n)
        let reaches = members.map { $0.contains { reached[Int($0)] } }
        let row = UnsafeMutablePointer<Float>.allocate(capacity: d)
        defer { row.deallocate() }
        anchorRows.withUnsafeBufferPointer { ar in
            for g in 0..<anchors where !reaches[g] && !members[g].isEmpty {
                let anchorKey = Int32(g * n / anchors)
                let target = members[g].contains(anchorKey) ? anchorKey : members[g][0]
                keys.decodeRow(Int(target), into: row)
                var best = -1, bestDistance = Float.infinity
                for h in 0..<anchors where reaches[h] {
                    let distance = anchorNorms[h] - 2 * kvr_dot_f32(row, ar.baseAddress! + h * d, d)
                    if distance < bestDistance { bestDistance = distance; best = h }
                }
                guard best >= 0 else { return }
                var source = -1, sourceDistance = Float.infinity, sourceFree = false
                for m in members[best] where reached[Int(m)] {
                    let used = Int(links.pointer[Int(m) * stride]) - Int(projectionCount[Int(m)]) - Int(localCount[Int(m)])
                    let free = used < connectivitySlots
                    let distance = norms[Int(m)] - 2 * keys.score(query: row, row: Int(m))
                    if (free && !sourceFree) || (free == sourceFree && distance < sourceDistance) {
                        source = Int(m); sourceDistance = distance; sourceFree = free
                    }
                }
                if source >= 0 { addConnectivityEdge(from: source, to: target) }
            }
        }
    }

    /// Links each of `hot` to its `localNeighbours` nearest (L2) keys among `hot`.
    private func linkLocalNeighbours(_ hot: [Int], keys: VectorView) throws {
        let h = hot.count
        guard localNeighbours > 0, h > 1 else { return }
        let d = dimension
        var matrix = [Float](repeating: 0, count: h * d)
        var norms = [Float](repeating: 0, count: h)
        matrix.withUnsafeMutableBufferPointer { m in
            for (j, i) in hot.enumerated() {
                keys.decodeRow(i, into: m.baseAddress! + j * d)
                var s: Float = 0
                for c in 0..<d { s += m[j * d + c] * m[j * d + c] }
                norms[j] = s
            }
        }
        let rowsPerBlock = 256
        var lists = [[Int32]](repeating: [], count: h)
        lists.withUnsafeMutableBufferPointer { out in
            matrix.withUnsafeBufferPointer { m in
                ChunkPlan(count: h, chunk: rowsPerBlock, threads: threads).run(scratch: rowsPerBlock * h) { _, blocks, scores in
                    for (_, block) in blocks {
                        let lo = block.lowerBound
                        BLAS.scoresNT(m: block.count, n: h, k: d, a: m.baseAddress! + lo * d, b: m.baseAddress!, c: scores)
                        for r in 0..<block.count {
                            var top = TopK<Int>(k: min(localNeighbours + 1, h))
                            let row = scores + r * h
                            for j in 0..<h { top.push(2 * row[j] - norms[j], j) }  // -|x - y|^2 + |x|^2
                            out[lo + r] = top.sorted().filter { $0.id != lo + r }.prefix(localNeighbours).map { Int32(hot[$0.id]) }
                        }
                    }
                }
            }
        }
        for (j, i) in hot.enumerated() { setLocalList(i, lists[j]) }
    }

    /// Links `nodes` into the graph, in batches searched in parallel against the graph as it
    /// stood at the batch start (deterministic whatever the thread count), then linked in order.
    private func insert(_ nodes: [Int], keys: VectorView, limit: Int, progress: ((Int) -> Void)?) throws {
        let pool = (0..<threads).map { _ in scratchPool.take(dimension: dimension, capacity: limit) }
        defer { pool.forEach(scratchPool.give) }
        // Squared norms, so key-to-key search ranks by L2 distance; kept between upkeep calls (keys
        // are append-only), so a step that inserts one key computes one norm, not the head's.
        if insertNorms.count > limit { insertNorms.removeLast(insertNorms.count - limit) }
        insertNorms += squaredNorms(keys.limited(to: limit), from: insertNorms.count)
        let norms = insertNorms
        var next = 0
        while next < nodes.count {
            let batch = min(64, nodes.count - next)
            var plans = [[Int32]](repeating: [], count: batch)
            norms.withUnsafeBufferPointer { normsBuffer in
            let normsPointer = normsBuffer.baseAddress!
            plans.withUnsafeMutableBufferPointer { out in
                ChunkPlan.contiguous(count: batch, threads: threads).run { th, chunks in
                    let scratch = pool[th]
                    for (_, range) in chunks { for j in range {
                        let node = nodes[next + j]
                        keys.decodeRow(node, into: scratch.query)
                        entries.withUnsafeBufferPointer { entries in
                            walkGraph(graph, SingleQuery(query: scratch.query, norms: normsPointer), keys: keys, entries: entries,
                                      width: efConstruction, limit: limit, scratch: scratch)
                        }
                        let (beam, size) = scratch.beam()
                        let found = (0..<size).map { GraphKey.unpack(beam[$0]).id }.filter { Int($0) != node }
                        out[j] = self.prune(found, keys: keys, scratch: scratch, norms: normsPointer)
                    } }
                }
            }
            }
            for (j, plan) in plans.enumerated() {
                let node = nodes[next + j]
                setProjectionList(node, Array(plan.prefix(M)))
                for c in plan { addConnectivityEdge(from: Int(c), to: Int32(node)) }
            }
            next += batch
            progress?(next)
        }
    }

    /// Adds keys `range` (decode-time upkeep): each is searched for and linked.
    public func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)? = nil) throws {
        try checkAdd(keys: keys, range: range, name: "the retrieval graph")
        guard isTrained else {
            throw IndexError.notBuilt("the retrieval graph must first be built from prefill queries")
        }
        if count == 0 {
            guard !range.isEmpty else { return }
            try project(keys: keys.limited(to: range.upperBound), progress: progress)
            return
        }
        unpack()
        links.grow(by: range.count * stride)
        projectionCount += [Int32](repeating: 0, count: range.count)
        localCount += [Int32](repeating: 0, count: range.count)
        connectivityCursor += [UInt8](repeating: 0, count: range.count)
        let newCount = range.upperBound
        try insert(Array(range), keys: keys, limit: newCount) { done in progress?(done, range.count) }
        count = newCount
    }

    public func reserveCapacity(keys: Int) {
        guard count > 0, keys > count else { return }
        unpack()
        links.reserveAndTouch(keys * stride)
        projectionCount.reserveCapacity(keys)
        localCount.reserveCapacity(keys)
        connectivityCursor.reserveCapacity(keys)
        insertNorms.reserveCapacity(keys)
    }

    /// Top-`k` of each query by a beam walk from the entry points; the beam (ef) may be narrower
    /// than k, the results being the best k of every key scored.
    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        try searchGraph(queries, k: k, parameters: parameters, keys: keys)
    }

    // MARK: Persistence

    public func sections() -> [String: [UInt8]] {
        var meta = ByteWriter()
        for v in [dimension, count, M, queryNeighbours, maxTrainingQueries, efConstruction, entryCount, connectivitySlots,
                  localNeighbours] {
            meta.write(Int64(v))
        }
        // Packed: each node's count and list back to back (most nodes fill a fraction of their
        // slots), with the offset of each node's count slot.
        var offsets: [Int32] = [], packed: [Int32] = []
        if isPacked {
            offsets = Array(UnsafeBufferPointer(start: packedOffsets.pointer, count: packedOffsets.count))
            packed = Array(links.elements)
        } else {
            offsets.reserveCapacity(count + 1)
            let strided = graph
            for i in 0..<count {
                offsets.append(Int32(packed.count))
                let slot = strided.slot(i)
                packed.append(contentsOf: UnsafeBufferPointer(start: slot, count: 1 + Int(slot[0])))
            }
            offsets.append(Int32(packed.count))
        }
        var graph = ByteWriter()
        graph.write(array: entries)
        graph.write(alignedArray: offsets)
        graph.write(alignedArray: packed)
        graph.write(array: projectionCount)
        graph.write(array: localCount)
        graph.write(array: connectivityCursor)
        return ["meta": meta.bytes, "graph": graph.bytes]
    }

    public convenience init(sections: IndexSections) throws {
        let v = try readSection(sections, "meta", of: .retrieval) { meta in try (0..<9).map { _ in Int(try meta.read(Int64.self)) } }
        guard (1...65536).contains(v[0]), (0...Int(Int32.max)).contains(v[1]), (2...1024).contains(v[2]),
              (2...1_000_000).contains(v[3]), (1...Int(Int32.max)).contains(v[4]), (1...1_000_000).contains(v[5]),
              (1...1_000_000).contains(v[6]), (0...255).contains(v[7]), (0...255).contains(v[8]) else {
            throw IndexError.corrupt("retrieval meta out of range")
        }
        try self.init(dimension: v[0], M: v[2], queryNeighbours: v[3], maxTrainingQueries: v[4], efConstruction: v[5],
                      entryCount: v[6], connectivitySlots: v[7], localNeighbours: v[8])
        let (entries, offsets, packed, projection, local, cursors) = try readSection(sections, "graph", of: .retrieval) { reader in
            (try reader.readArray(Int32.self), try reader.readAlignedArray(Int32.self), try reader.readAlignedArray(Int32.self),
             try reader.readArray(Int32.self), try reader.readArray(Int32.self), try reader.readArray(UInt8.self))
        }
        let count = v[1]
        guard offsets.count == count + 1, projection.count == count, local.count == count, cursors.count == count,
              !entries.isEmpty || count == 0, entries.allSatisfy({ $0 >= 0 && Int($0) < count }) else {
            throw IndexError.corrupt("retrieval graph sizes disagree with its node count \(count)")
        }
        try offsets.withUnsafeBufferPointer { offsets in
            try packed.withUnsafeBufferPointer { packed in
                guard offsets[0] == 0, Int(offsets[count]) == packed.count else {
                    throw IndexError.corrupt("retrieval graph offsets do not cover its \(packed.count) link slots")
                }
                for i in 0..<count {
                    let at = Int(offsets[i]), n = at < packed.count ? Int(packed[at]) : -1
                    // Each list follows its count and ends where the next node's begins; projected and
                    // local edges within their parts of the slot (so an unpacked graph's `add` never
                    // writes past a node's slots); sums in Int, so damaged counts cannot overflow.
                    guard (0...(M + localNeighbours + connectivitySlots)).contains(n), at + 1 + n <= packed.count,
                          Int(offsets[i + 1]) == at + 1 + n,
                          (0...M).contains(Int(projection[i])), (0...localNeighbours).contains(Int(local[i])),
                          Int(projection[i]) + Int(local[i]) <= n,
                          packed[(at + 1)..<(at + 1 + n)].allSatisfy({ $0 >= 0 && Int($0) < count }) else {
                        throw IndexError.corrupt("retrieval graph node \(i) has an invalid link list")
                    }
                }
            }
        }
        // The packed links and their offsets stay views of the section (searched in place); the
        // per-key counters are copied.
        if count > 0 {
            links.adopt(packed)
            packedOffsets.adopt(offsets)
            isPacked = true
        }
        projectionCount = projection
        localCount = local
        connectivityCursor = cursors
        self.entries = entries
        self.count = count
        mapSnapshot = sections.mapSnapshot
    }
}

extension RetrievalGraphIndex: GraphWalkIndex {
    /// Top-`k` for each query of a GQA group (`g x dimension`) by one shared walk of the graph:
    /// each reached key is read once for the whole group. An ef below `k` narrows each query's
    /// beam as in `search`.
    public func searchGroup(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                            keys: VectorView) throws -> SearchResults {
        try searchGraphGroup(queries, k: k, parameters: parameters, keys: keys)
    }

    static let indexName = "the retrieval graph"

    /// The beam is ef wide; below k it is narrower than the results, which keep the best k scored.
    func beamWidth(k: Int, ef: Int) -> Int { ef }

    /// One walk from the entry points (each scored for every query).
    func walk<Queries: WalkQueries>(_ queries: Queries, width: Int, keep: Int, keys: VectorView, scratch: GraphScratch) {
        let graph = self.graph
        entries.withUnsafeBufferPointer { entries in
            walkGraph(graph, queries, keys: keys, entries: entries, width: width, keep: keep, limit: count, scratch: scratch)
        }
    }
}

/// Decodes row `i` of `keys` into `buffer` and returns it (for a norm: the row scored against itself).
@inline(__always)
func rowAsFloats(_ keys: VectorView, _ i: Int, _ buffer: UnsafeMutablePointer<Float>) -> UnsafeMutablePointer<Float> {
    keys.decodeRow(i, into: buffer)
    return buffer
}

/// Sorts short candidate lists best first (score descending, ties to the lower id). Insertion
/// sort: the lists here hold a few dozen to a few hundred entries and are mostly ordered already.
@inline(__always)
func sortBestFirst(_ list: inout [(score: Float, id: Int32)]) {
    list.withUnsafeMutableBufferPointer { a in
        guard a.count > 1 else { return }
        for i in 1..<a.count {
            let x = a[i]
            var j = i - 1
            while j >= 0 && (a[j].score < x.score || (a[j].score == x.score && a[j].id > x.id)) {
                a[j + 1] = a[j]
                j -= 1
            }
            a[j + 1] = x
        }
    }
}

extension RetrievalGraphIndex {
    /// The retrieval graph's entry in the catalog: trained on prefill queries, searched with a beam
    /// that may be narrower than k.
    public static let descriptor = IndexDescriptor(
        kind: .retrieval, type: RetrievalGraphIndex.self, knob: .ef,
        make: { d, _, p in
            try RetrievalGraphIndex(dimension: d, M: p.graphDegree, queryNeighbours: p.queryNeighbours,
                                    maxTrainingQueries: p.trainingQueries, efConstruction: min(p.efConstruction, 64),
                                    connectivitySlots: p.connectivitySlots, localNeighbours: p.localNeighbours, threads: p.threads)
        },
        ladder: { index, k in Calibrator.efLadder(index: index, k: k, narrowerThanK: true) },
        describe: { "ef \($0.graph.ef)" })
}
