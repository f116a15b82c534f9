import CKernels
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// Hierarchical Navigable Small World graph (Malkov & Yashunin) for inner-product search.
///
/// Layout as in hnswlib: layer-0 links in one flat buffer of `count x (maxM0 + 1)` Int32 slots
/// (slot 0 holds the neighbour count), upper-layer links in a second flat buffer addressed by a
/// per-node offset. Vectors are not copied: they are read from the store's memory map.
///
/// Build: nodes are inserted in batches. Within a batch the candidate searches run in parallel
/// against the graph as it stood at the batch start (plus the batch's earlier nodes, scored
/// directly), then the links are made in node order. The result depends only on the keys,
/// the parameters and the seed — not on the thread count or timing.
public final class HNSWIndex: BuildableIndex, @unchecked Sendable {
    public static let kind = IndexKind.hnsw
    public static let formatVersion = 2
    public let dimension: Int
    public private(set) var count = 0
    public private(set) var mapSnapshot: MapIdentity?
    public let M: Int
    public let maxM0: Int
    public let efConstruction: Int
    public let seed: UInt64
    public var threads: Int
    let levelMultiplier: Double

    /// Layer-0 links: `count x (maxM0 + 1)` slots, slot 0 the neighbour count.
    let links0 = Int32Buffer()
    private(set) var levels: SectionArray<Int32> = []
    /// Per node, the offset of its upper-layer slots in `upperLinks`, or -1.
    let upperOffset = Int32Buffer()
    let upperLinks = Int32Buffer()
    private(set) var entryPoint: Int32 = -1
    private(set) var maxLevel = -1
    private var rng: SeededGenerator
    /// Nodes linked since the last orphan repair (a decode-time add of one key does not pay a
    /// whole-graph repair; see `add`).
    private var linkedSinceRepair = 0
    /// Scratch reused across searches (visited stamps for every node are too costly to allocate per query).
    let scratchPool = GraphScratchPool()

    public init(dimension: Int, M: Int = 16, efConstruction: Int = 200, seed: UInt64 = 42, threads: Int = 2) throws {
        guard M >= 2 else { throw IndexError.invalidParameter("M must be at least 2 (got \(M))") }
        guard M <= 1024 else { throw IndexError.invalidParameter("M must be at most 1024 (got \(M))") }
        guard efConstruction >= 1 else { throw IndexError.invalidParameter("ef-construction must be at least 1") }
        self.dimension = dimension
        self.M = M
        self.maxM0 = 2 * M
        self.efConstruction = max(efConstruction, M)
        self.seed = seed
        self.threads = max(1, threads)
        levelMultiplier = 1 / log(Double(M))
        rng = SeededGenerator(seed: seed)
    }

    var stride0: Int { maxM0 + 1 }
    var strideUpper: Int { M + 1 }

    // MARK: Link access

    /// Layer `level`'s lists: layer 0 at a fixed stride, upper layers by each node's offset.
    @inline(__always)
    func layer(_ level: Int) -> StridedLinks {
        level == 0 ? StridedLinks(base: links0.pointer, stride: stride0)
                   : StridedLinks(base: upperLinks.pointer + (level - 1) * strideUpper, stride: strideUpper,
                                  offsets: UnsafePointer(upperOffset.pointer))
    }

    /// The neighbour list of `node` at `level`, pointing into the link buffer (valid until the next growth).
    @inline(__always)
    func neighbours(_ node: Int, level: Int) -> UnsafeMutableBufferPointer<Int32> { layer(level).neighbours(node) }

    private func setNeighbours(_ node: Int, level: Int, _ list: [Int32]) {
        let slot = layer(level).slot(node)
        slot[0] = Int32(list.count)
        for (i, n) in list.enumerated() { slot[1 + i] = n }
    }

    // MARK: Search primitives

    /// Greedy walk of head `h` of `queries` at one upper layer, from `start` (scored `startScore`):
    /// moves to the best neighbour until none improves; each list is scored by one gathered call.
    @inline(__always)
    func greedy<Queries: WalkQueries>(_ queries: Queries, head h: Int, keys: VectorView, from start: Int32,
                                      score startScore: Float, level: Int, scratch: GraphScratch,
                                      computations: inout Int) -> (Int32, Float) {
        let links = layer(level), rows = scratch.rows, scores = scratch.listScores
        var current = start
        var best = startScore
        var changed = true
        while changed {
            changed = false
            let list = links.neighbours(Int(current))
            guard let ids = list.baseAddress, list.count > 0 else { break }
            for j in 0..<list.count { rows[j] = keys.row(Int(ids[j])) }
            queries.score(head: h, rows, ids: ids, count: list.count, keys: keys, into: scores)
            computations += list.count
            for j in 0..<list.count where scores[j] > best {
                best = scores[j]
                current = ids[j]
                changed = true
            }
        }
        return (current, best)
    }

    /// Descends the upper layers from the entry point for each head of `queries` (greedy), down to
    /// `level` + 1; leaves the distinct nodes reached in `scratch.entries` and, for one head, its
    /// score in `scratch.entryScores`; returns how many.
    @inline(__always)
    func descend<Queries: WalkQueries>(_ queries: Queries, keys: VectorView, to level: Int, scratch: GraphScratch) -> Int {
        let g = queries.count, entries = scratch.entries
        var found = 0, computations = 0
        for h in 0..<g {
            var ep = entryPoint
            scratch.rows[0] = keys.row(Int(ep))
            queries.score(head: h, scratch.rows, ids: &ep, count: 1, keys: keys, into: scratch.listScores)
            var epScore = scratch.listScores[0]
            scratch.computations += 1  // the entry point is a key scanned; the descent is routing
            for l in stride(from: maxLevel, to: level, by: -1) {
                (ep, epScore) = greedy(queries, head: h, keys: keys, from: ep, score: epScore, level: l, scratch: scratch,
                                       computations: &computations)
            }
            if !UnsafeBufferPointer(start: entries, count: found).contains(ep) {
                entries[found] = ep
                scratch.entryScores[found] = epScore
                found += 1
            }
        }
        scratch.auxiliary += computations
        return found
    }

    /// A candidate as one sortable integer (see `GraphKey`).
    @inline(__always)
    static func sortKey(_ score: Float, _ id: Int32) -> UInt64 { GraphKey.make(score, id) }

    @inline(__always)
    static func unpack(_ key: UInt64) -> (score: Float, id: Int32) { GraphKey.unpack(key) }

    /// hnswlib's neighbour-selection heuristic: take candidates best first, keep one only if it is
    /// closer to the base than to every neighbour kept so far (for inner product: base.e > e.r).
    /// The `count` candidates are `sortKey`s in `scratch.sortKeys`; they are sorted once, in C
    /// (a heap drained one pop at a time cost ~10% of a one-thread build, Swift's stable sort ~8%
    /// with its merge buffer: the heuristic usually examines every candidate). The kept ids go to
    /// `scratch.selected`, best first; returns how many.
    @inline(__always)
    func selectSorted(count: Int, sorted: Bool = false, keys: VectorView, max m: Int, scratch: GraphScratch) -> Int {
        let buffer = scratch.sortKeys
        if !sorted { kvr_sort_u64(buffer, count) }
        let kept = scratch.selected
        var n = 0
        var computations = 0
        let direct = keys.dtype == .f32  // f32 rows are scored in place, not copied first
        var i = count - 1
        while i >= 0 && n < m {
            let cand = HNSWIndex.unpack(buffer[i])
            i -= 1
            if count <= m { kept[n] = cand.id; n += 1; continue }
            let vector: UnsafePointer<Float>
            if direct {
                vector = keys.row(Int(cand.id)).assumingMemoryBound(to: Float.self)
            } else {
                keys.decodeRow(Int(cand.id), into: scratch.vector)
                vector = UnsafePointer(scratch.vector)
            }
            var good = true
            for j in 0..<n {
                let s = keys.score(query: vector, row: Int(kept[j]))
                computations += 1
                if s > cand.score { good = false; break }
            }
            if good { kept[n] = cand.id; n += 1 }
        }
        scratch.computations += computations
        return n
    }

    // MARK: Build

    public func add(keys mapped: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)? = nil) throws {
        try checkAdd(keys: mapped, range: range, name: "HNSW")
        // Large adds read a heap copy (huge pages); small incremental ones read the map.
        let keys = range.count >= 4096 ? mapped.limited(to: range.upperBound).materialized() : mapped
        let newCount = range.upperBound
        // Links loaded as views of the store are copied before the first write.
        links0.makeOwned()
        upperLinks.makeOwned()
        upperOffset.makeOwned()
        // Reserve link storage and draw levels (in node order, from the seeded generator).
        links0.grow(by: (newCount - count) * stride0)
        for _ in range {
            let u = max(Double(rng.next() >> 11) / Double(1 << 53), 1e-300)
            let level = Int(-log(u) * levelMultiplier)
            levels.append(Int32(level))
            if level > 0 {
                upperOffset.append(Int32(upperLinks.count))
                upperLinks.grow(by: level * strideUpper)
            } else {
                upperOffset.append(-1)
            }
        }
        let pool = (0..<threads).map { _ in scratchPool.take(dimension: dimension, capacity: newCount) }
        defer { pool.forEach(scratchPool.give) }
        var next = range.lowerBound
        if count == 0 && next < newCount {
            // The first node is the graph.
            entryPoint = Int32(next)
            maxLevel = Int(levels[next])
            next += 1
            count = next
        }
        while next < newCount {
            // Small batches while the graph is small, so early nodes see each other.
            let batch = min(newCount - next, max(1, min(64, count / 8)))
            let batchRange = next..<(next + batch)
            var plans = [[[Int32]]](repeating: [], count: batch)
            let frozenCount = count
            plans.withUnsafeMutableBufferPointer { out in
                ChunkPlan.contiguous(count: batch, threads: threads).run { t, chunks in
                    for (_, range) in chunks {
                        for j in range {
                            out[j] = self.plan(node: batchRange.lowerBound + j, keys: keys, frozenCount: frozenCount,
                                               batchStart: batchRange.lowerBound, scratch: pool[t])
                        }
                    }
                }
            }
            for (j, plan) in plans.enumerated() {
                link(node: batchRange.lowerBound + j, plan: plan, keys: keys, scratch: pool[0])
            }
            next += batch
            count = next
            progress?(count - range.lowerBound, range.count)
        }
        // The repair walks the whole graph: after a build at once, during decode-time upkeep
        // (a key or a few per step) once the nodes linked since the last reach 1/16 of the graph
        // (at least 64), so its cost per key stays constant and few steps pay it.
        linkedSinceRepair += range.count
        if range.lowerBound == 0 || linkedSinceRepair >= max(64, count / 16) {
            repairOrphans()
            linkedSinceRepair = 0
        }
    }

    public func reserveCapacity(keys: Int) {
        guard count > 0, keys > count else { return }
        links0.reserveAndTouch(keys * stride0)
        upperOffset.reserveAndTouch(keys)
        // Upper layers hold about 1/(M-1) of the nodes: reserve in proportion to what they hold now.
        upperLinks.reserveAndTouch(upperLinks.count + (upperLinks.count * (keys - count)) / count + 64 * strideUpper)
    }

    /// Gives layer-0 nodes without an incoming edge one, so they stay reachable: the heuristic
    /// pruning can drop a node from every list that held it (hnswlib leaves such nodes
    /// unreachable). The edge is appended to the list of a neighbour, or of a neighbour's
    /// neighbour, that holds fewer than M edges; no existing edge is ever replaced, so navigation
    /// is untouched. Lists the heuristic left long (hubs: on keys sharing a large offset most
    /// nodes keep one edge, to a hub) stop taking repair edges at M: filled up to 2M they made
    /// every walk through them score 2M keys (synthetic 128K head, held-out keys: 0.29% -> 0.21%
    /// of keys scanned at ef 10, 2.3% -> 1.5% at ef 128, recall@10 within 0.004). A cap of M/2
    /// scanned fewer still but lost decode-query recall: out-of-distribution walks stay among the
    /// hubs and reach orphans through their repair edges.
    func repairOrphans() {
        let cap = M
        var indegree = [Int32](repeating: 0, count: count)
        for i in 0..<count { for n in neighbours(i, level: 0) { indegree[Int(n)] += 1 } }
        for orphan in 0..<count where indegree[orphan] == 0 && Int32(orphan) != entryPoint {
            let first = Array(neighbours(orphan, level: 0))
            var candidates = first
            for n in first { candidates += neighbours(Int(n), level: 0) }
            for n in candidates where Int(n) != orphan && neighbours(Int(n), level: 0).count < cap {
                var list = Array(neighbours(Int(n), level: 0))
                list.append(Int32(orphan))
                setNeighbours(Int(n), level: 0, list)
                indegree[orphan] = 1
                break
            }
        }
    }

    /// Chooses the neighbours of `node` on each of its layers, reading only the frozen graph.
    private func plan(node: Int, keys: VectorView, frozenCount: Int, batchStart: Int, scratch: GraphScratch) -> [[Int32]] {
        let q = scratch.query
        keys.decodeRow(node, into: q)
        let query = SingleQuery(query: q)
        let nodeLevel = Int(levels[node])
        var entries = descend(query, keys: keys, to: nodeLevel, scratch: scratch)
        var result = [[Int32]](repeating: [], count: nodeLevel + 1)
        for level in stride(from: min(nodeLevel, maxLevel), through: 0, by: -1) {
            walkGraph(layer(level), query, keys: keys, entries: UnsafeBufferPointer(start: scratch.entries, count: entries),
                      entryScores: scratch.entryScores, width: efConstruction, limit: frozenCount, scratch: scratch)
            // The candidates, ascending: the walk's beam (sorted, best first) merged with the
            // earlier nodes of this batch that reach this layer (scored directly, sorted here).
            let (beam, found) = scratch.beam()
            var extras = 0
            for other in batchStart..<node where Int(levels[other]) >= level { extras += 1 }
            let filled = found + extras
            let buffer = scratch.sortBuffer(filled)
            var e = found
            for other in batchStart..<node where Int(levels[other]) >= level {
                buffer[e] = HNSWIndex.sortKey(keys.score(query: q, row: other), Int32(other))
                e += 1
            }
            kvr_sort_u64(buffer + found, extras)
            // In place from the front: the write position never passes the next unread extra.
            var i = found - 1, j = found, out = 0
            while i >= 0 && j < filled {
                if beam[i] < buffer[j] { buffer[out] = beam[i]; i -= 1 } else { buffer[out] = buffer[j]; j += 1 }
                out += 1
            }
            while i >= 0 { buffer[out] = beam[i]; i -= 1; out += 1 }
            guard filled > 0 else { entries = 0; continue }
            let kept = selectSorted(count: filled, sorted: true, keys: keys, max: M, scratch: scratch)
            let top = HNSWIndex.unpack(buffer[filled - 1])  // sorted: the best is last
            (scratch.entries[0], scratch.entryScores[0], entries) = (top.id, top.score, 1)
            result[level] = Array(UnsafeBufferPointer(start: scratch.selected, count: kept))
        }
        return result
    }

    /// Links `node` to its planned neighbours and adds the reverse edges, pruning full lists.
    private func link(node: Int, plan: [[Int32]], keys: VectorView, scratch: GraphScratch) {
        let nodeLevel = Int(levels[node])
        for level in 0..<plan.count where level <= nodeLevel {
            let chosen = plan[level]
            setNeighbours(node, level: level, chosen)
            let cap = level == 0 ? maxM0 : M
            for n in chosen {
                let ni = Int(n)
                let slot = layer(level).slot(ni)
                let listCount = Int(slot[0])
                var present = false
                for j in 0..<listCount where slot[1 + j] == Int32(node) { present = true; break }
                if present { continue }
                if listCount < cap {
                    slot[1 + listCount] = Int32(node)
                    slot[0] = Int32(listCount + 1)
                    continue
                }
                // Full: the heuristic over the list plus the new node, from ni's point of view.
                let base: UnsafePointer<Float>
                if keys.dtype == .f32 {
                    base = keys.row(ni).assumingMemoryBound(to: Float.self)
                } else {
                    keys.decodeRow(ni, into: scratch.query)
                    base = UnsafePointer(scratch.query)
                }
                let buffer = scratch.sortBuffer(listCount + 1)
                for j in 0..<listCount {
                    buffer[j] = HNSWIndex.sortKey(keys.score(query: base, row: Int(slot[1 + j])), slot[1 + j])
                }
                buffer[listCount] = HNSWIndex.sortKey(keys.score(query: base, row: node), Int32(node))
                let kept = selectSorted(count: listCount + 1, keys: keys, max: cap, scratch: scratch)
                slot[0] = Int32(kept)
                (slot + 1).update(from: scratch.selected, count: kept)
            }
        }
        if nodeLevel > maxLevel {
            maxLevel = nodeLevel
            entryPoint = Int32(node)
        }
    }

    // MARK: Search

    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        try searchGraph(queries, k: k, parameters: parameters, keys: keys)
    }

    /// HNSW learns nothing before adding.
    public var isTrained: Bool { true }
    public func train(keys: VectorView, range: Range<Int>, queries: VectorView? = nil) throws {}

    // MARK: Persistence

    public func sections() -> [String: [UInt8]] {
        var meta = ByteWriter()
        for v in [dimension, count, M, maxM0, efConstruction, maxLevel] { meta.write(Int64(v)) }
        meta.write(entryPoint)
        meta.write(seed)
        meta.write(rng.state)
        var graph = ByteWriter()
        graph.write(alignedArray: links0.elements)
        graph.write(alignedArray: levels)
        graph.write(alignedArray: upperOffset.elements)
        graph.write(alignedArray: upperLinks.elements)
        return ["meta": meta.bytes, "graph": graph.bytes]
    }

    public convenience init(sections: IndexSections) throws {
        let (v, entry, seed, state) = try readSection(sections, "meta", of: .hnsw) { meta in
            (try (0..<6).map { _ in Int(try meta.read(Int64.self)) }, try meta.read(Int32.self),
             try meta.read(UInt64.self), try meta.read(UInt64.self))
        }
        let (dimension, count, M, maxM0, efC, maxLevel) = (v[0], v[1], v[2], v[3], v[4], v[5])
        guard (1...65536).contains(dimension), (0...Int(Int32.max)).contains(count), (2...1024).contains(M), maxM0 == 2 * M,
              efC >= 1, (count == 0) == (maxLevel == -1), (-1...64).contains(maxLevel) else {
            throw IndexError.corrupt("HNSW meta out of range")
        }
        try self.init(dimension: dimension, M: M, efConstruction: efC, seed: seed)
        let (links, levels, upperOffset, upper) = try readSection(sections, "graph", of: .hnsw) { graph in
            (try graph.readAlignedArray(Int32.self), try graph.readAlignedArray(Int32.self),
             try graph.readAlignedArray(Int32.self), try graph.readAlignedArray(Int32.self))
        }
        self.levels = levels
        guard links.count == count * stride0 else { throw IndexError.corrupt("HNSW layer-0 links have \(links.count) slots, expected \(count * stride0)") }
        try links.withUnsafeBufferPointer { links in
            for i in 0..<count {
                let base = i * stride0
                guard links[base] >= 0, Int(links[base]) <= maxM0,
                      links[(base + 1)..<(base + 1 + Int(links[base]))].allSatisfy({ $0 >= 0 && Int($0) < count }) else {
                    throw IndexError.corrupt("HNSW node \(i) has an invalid layer-0 link list")
                }
            }
        }
        links0.adopt(links)
        upperLinks.adopt(upper)
        self.upperOffset.adopt(upperOffset)
        guard levels.count == count, upperOffset.count == count,
              count == 0 || (entry >= 0 && Int(entry) < count) else {
            throw IndexError.corrupt("HNSW graph sizes disagree with its node count \(count)")
        }
        // The entry point is a node of the top layer, and no node is above it.
        guard count == 0 || (Int(levels[Int(entry)]) == maxLevel && levels.allSatisfy { $0 >= 0 && Int($0) <= maxLevel }) else {
            throw IndexError.corrupt("HNSW entry point \(entry) is not on the top layer \(maxLevel)")
        }
        // Every link must name a node and every list fit its slot, so a damaged section cannot send
        // a search out of bounds.
        try upper.withUnsafeBufferPointer { upper in
            for i in 0..<count where levels[i] > 0 {
                let start = Int(upperOffset[i]), end = start + Int(levels[i]) * strideUpper
                guard start >= 0, end <= upper.count else { throw IndexError.corrupt("HNSW node \(i) upper links out of range") }
                for level in 0..<Int(levels[i]) {
                    let slot = start + level * strideUpper
                    guard (0...M).contains(Int(upper[slot])),
                          upper[(slot + 1)..<(slot + 1 + Int(upper[slot]))].allSatisfy({ $0 >= 0 && Int($0) < count }) else {
                        throw IndexError.corrupt("HNSW node \(i) has an invalid link list on layer \(level + 1)")
                    }
                }
            }
        }
        self.count = count
        self.entryPoint = entry
        self.maxLevel = maxLevel
        rng.state = state
        mapSnapshot = sections.mapSnapshot
    }
}

extension HNSWIndex: GraphWalkIndex {
    /// Top-`k` for each query of a GQA group (`g x dimension`): each head descends the upper
    /// layers on its own, then the group walks layer 0 once from the nodes they reached.
    public func searchGroup(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                            keys: VectorView) throws -> SearchResults {
        try searchGraphGroup(queries, k: k, parameters: parameters, keys: keys)
    }

    static let indexName = "the HNSW index"

    /// HNSW raises ef to k.
    func beamWidth(k: Int, ef: Int) -> Int { max(ef, k) }

    /// The upper layers by greedy descent, then layer 0 by the beam walk.
    func walk<Queries: WalkQueries>(_ queries: Queries, width: Int, keep: Int, keys: VectorView, scratch: GraphScratch) {
        let found = descend(queries, keys: keys, to: 0, scratch: scratch)
        walkGraph(layer(0), queries, keys: keys, entries: UnsafeBufferPointer(start: scratch.entries, count: found),
                  entryScores: queries.count == 1 ? scratch.entryScores : nil, width: width, keep: keep, limit: count,
                  scratch: scratch)
    }
}

extension HNSWIndex {
    /// HNSW's entry in the catalog: M and efConstruction at build, ef at search.
    public static let descriptor = IndexDescriptor(
        kind: .hnsw, type: HNSWIndex.self, knob: .ef,
        make: { d, _, p in try HNSWIndex(dimension: d, M: p.M, efConstruction: p.efConstruction, seed: p.seed, threads: p.threads) },
        ladder: { index, k in Calibrator.efLadder(index: index, k: k, narrowerThanK: false) },
        describe: { "ef \($0.graph.ef)" })
}
