import CKernels
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// Hierarchical centroids (Squeezed Attention): a k-means tree over the centred keys, searched
/// top-down by inner product.
///
/// - Level 0 holds the fine centroids: `fineFraction x N` clusters (default 5%) of the training
///   keys, centred by their mean as in `IVFIndex`, by two-level k-means (`KMeans.trainTwoLevel`:
///   flat k-means over 6553 clusters of a 128K head took ~70-100 s, two-level ~2 s). Each coarser level clusters the centroids of
///   the level below into 1/`branching` (1/8) as many, up to `levels` levels (>= 2). A fixed branching
///   factor keeps every level's beam meaningful: a beam of B nodes expands to about 8B children,
///   of which B are kept, while the top level stays small enough to score in full.
/// - A coarse node's vector is the key-count-weighted mean of its children, i.e. the mean of every
///   key beneath it, so q·c is the mean score of its subtree (see `IVFIndex` on probing by inner product).
/// - Nodes are stored in depth-first order, so each node's children are one contiguous run of the
///   level below (scored by one kernel call) and each fine cluster's keys one list of `lists`.
/// - Search is the batched driver shared with IVF, with a `TreeQuantizer`: by beam
///   (`SearchParameters.tree.beam`): score every top-level node, keep the `beam` best, score their
///   children, keep the `beam` best, ... down to fine clusters, then score their keys exactly. Or by
///   an estimated-softmax threshold (`search(_:k:beam:threshold:scale:threads:keys:)`).
/// - Lists carry residual codes like `IVFIndex` (SQ8 by default; residual from the fine
///   centroid), scanned sequentially, the best candidates re-ranked exactly.
/// - Later adds put each new key in the list of its nearest fine centroid; the tree stays.
/// - Searches may run concurrently with each other, not with `add`.
public final class CentroidTreeIndex: InvertedFileIndex, BuildableIndex, ClusteredIndex, @unchecked Sendable {
    public static let kind = IndexKind.tree
    /// 2: lists carry residual codes (version 1 lists held only ids: rebuild).
    public static let formatVersion = 3
    /// Nodes of a level per node of the level above.
    public static let branching = 8

    /// Levels of centroids (fine = level 0).
    public let levels: Int
    public let fineFraction: Double
    /// Centroids of each level (level 0 = fine), `count_l x dimension`, depth-first order.
    public private(set) var centroids: [[Float]] = []
    /// For level l >= 1: `count_l + 1` offsets of each node's children in level l - 1 (entry 0 is empty).
    private(set) var childOffsets: [[Int]] = []
    static let indexName = "the centroid tree"
    var fineCentroids: [Float] { centroids[0] }
    /// Keys beneath each node, per level, and their logarithms (-inf for none).
    private(set) var subtreeSizes: [[Int]] = []
    private var logSizes: [[Float]] = []

    public init(dimension: Int, levels: Int = 2, fineFraction: Double = 0.05, metric: ClusterMetric = .l2,
                iterations: Int = 20, seed: UInt64 = 42, threads: Int = 2, codes: ListCodeKind = .sq8) throws {
        guard (2...32).contains(levels) else { throw IndexError.invalidParameter("levels must be in 2...32 (got \(levels))") }
        guard fineFraction > 0, fineFraction <= 1 else {
            throw IndexError.invalidParameter("fine fraction must be in (0, 1] (got \(fineFraction))")
        }
        self.levels = levels
        self.fineFraction = fineFraction
        try super.init(dimension: dimension, metric: metric, iterations: iterations, seed: seed, threads: threads, codes: codes)
    }

    public convenience init(dimension: Int, parameters: IndexBuildParameters) throws {
        try self.init(dimension: dimension, levels: parameters.levels, fineFraction: parameters.fineFraction,
                      metric: parameters.clusterMetric, iterations: parameters.iterations, seed: parameters.seed,
                      threads: parameters.threads, codes: parameters.listCodes)
    }

    public var isTrained: Bool { !centroids.isEmpty }

    /// Nodes per level, fine first.
    public var levelCounts: [Int] { centroids.map { $0.count / dimension } }

    /// Keys beneath each node of `level`.
    public func clusterSizes(level: Int) -> [Int] { subtreeSizes[level] }

    // MARK: Build

    /// Trains every level on keys `range`.
    public func train(keys: VectorView, range: Range<Int>, queries: VectorView? = nil) throws {
        try checkTrain(keys: keys, range: range)
        let labels = try trainLevels(keys: keys, range: range)
        lists = InvertedLists(lists: levelCounts[0], codeSize: codeKind.codeSize(dimension: dimension))
        trainedLabels = TrainedLabels(range: range, labels: labels)
    }

    public func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)? = nil) throws {
        try addToLists(keys: keys, range: range, progress: progress)
    }

    func didAdd() { computeSizes() }

    /// Builds every level from `range`; returns the fine cluster of each key of `range` (in final numbering).
    private func trainLevels(keys: VectorView, range: Range<Int>) throws -> [Int32] {
        let n = range.count, d = dimension
        let fine = max(1, min(n, Int((fineFraction * Double(n)).rounded())))
        let mu = meanKey(keys, range: range)
        let (rows, all) = trainingRows(keys, range: range, perCentroid: IVFIndex.maxPointsPerCentroid, k: fine,
                                                mean: mu, seed: seed)
        var options = KMeans.Options(k: fine, metric: metric, iterations: iterations, seed: seed, threads: threads)
        // Two-level k-means (restricted refinement only): a full pass over 5% of N clusters costs
        // about as much as the rest of the build, and one more changed recall by < 0.002.
        let fineResult = try KMeans.trainTwoLevel(rows, dimension: d, options: options)
        let residuals = trainingResiduals(rows, labels: fineResult.labels, centroids: fineResult.centroids, dimension: d)
        codec = residuals.withUnsafeBufferPointer { ListCodec.train(codeKind, residuals: $0, dimension: d) }
        var keyLabels = all ? fineResult.labels
            : assignKeys(keys, range: range, centroids: fineResult.centroids, mean: mu, metric: metric, threads: threads)
        // Level l clusters the nodes of level l - 1; parent[l][i] is the parent of node i of level l - 1.
        var levelCentroids = [fineResult.centroids]
        var parents: [[Int32]] = [[]]
        for l in 1..<levels {
            let below = levelCentroids[l - 1].count / d
            let k = max(1, (below + CentroidTreeIndex.branching - 1) / CentroidTreeIndex.branching)
            options = KMeans.Options(k: k, metric: metric, iterations: iterations, seed: seed &+ UInt64(l), threads: threads)
            let result = try KMeans.train(levelCentroids[l - 1], dimension: d, options: options)
            levelCentroids.append(result.centroids)
            parents.append(result.labels)
        }
        // Depth-first numbering: order[l][new] = old index; children of a node follow their parent's order.
        var order = [[Int]](repeating: [], count: levels)
        var offsets = [[Int]](repeating: [], count: levels)
        order[levels - 1] = Array(0..<(levelCentroids[levels - 1].count / d))
        for l in stride(from: levels - 1, to: 0, by: -1) {
            let below = levelCentroids[l - 1].count / d
            var rank = [Int](repeating: 0, count: order[l].count)
            for (newIndex, old) in order[l].enumerated() { rank[old] = newIndex }
            var byParent = [[Int]](repeating: [], count: order[l].count)
            for child in 0..<below { byParent[rank[Int(parents[l][child])]].append(child) }
            offsets[l] = [0]
            for group in byParent {
                order[l - 1] += group
                offsets[l].append(order[l - 1].count)
            }
        }
        var newFine = [Int32](repeating: 0, count: fine)
        for (newIndex, old) in order[0].enumerated() { newFine[old] = Int32(newIndex) }
        for i in keyLabels.indices { keyLabels[i] = newFine[Int(keyLabels[i])] }
        mean = mu
        centroids = (0..<levels).map { l in
            var out = [Float](repeating: 0, count: order[l].count * d)
            for (newIndex, old) in order[l].enumerated() {
                for t in 0..<d { out[newIndex * d + t] = levelCentroids[l][old * d + t] }
            }
            return out
        }
        childOffsets = offsets
        // Coarse vectors: key-weighted means of their children (the mean of their subtree's keys).
        var sizes = [Int](repeating: 0, count: fine)
        for l in keyLabels { sizes[Int(l)] += 1 }
        for l in 1..<levels {
            var parentSizes = [Int](repeating: 0, count: order[l].count)
            for p in 0..<parentSizes.count {
                var acc = [Double](repeating: 0, count: d)
                for c in offsets[l][p]..<offsets[l][p + 1] {
                    parentSizes[p] += sizes[c]
                    for t in 0..<d { acc[t] += Double(sizes[c]) * Double(centroids[l - 1][c * d + t]) }
                }
                if parentSizes[p] > 0 {
                    for t in 0..<d { centroids[l][p * d + t] = Float(acc[t] / Double(parentSizes[p])) }
                }
            }
            sizes = parentSizes
        }
        return keyLabels
    }

    /// Recomputes keys beneath every node from the fine lists.
    private func computeSizes() {
        let counts = levelCounts
        guard !counts.isEmpty else { subtreeSizes = []; logSizes = []; return }
        var sizes = [lists.sizes]
        for l in 1..<counts.count {
            sizes.append((0..<counts[l]).map { p in
                (childOffsets[l][p]..<childOffsets[l][p + 1]).reduce(0) { $0 + sizes[l - 1][$1] }
            })
        }
        subtreeSizes = sizes
        logSizes = sizes.map { $0.map { $0 > 0 ? Float(log(Double($0))) : -.infinity } }
    }

    // MARK: Search

    /// Beam descent with `parameters.tree.beam` nodes per level; a beam as large as the fine
    /// level scans every key, so it is exact.
    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        try parameters.tree.validate()
        return try run(queries, k: k, descent: .beam(min(parameters.tree.beam, max(1, levelCounts.max() ?? 1))),
                       threads: parameters.threads, rerank: parameters.tree.rerank, keys: keys)
    }

    /// Descent by an estimated-softmax threshold (Squeezed Attention). Each candidate node (every
    /// top-level node, then the children of the nodes kept) gets an estimated attention mass
    /// `size x exp(scale x q·c)` — the softmax numerator of its keys if each scored like its
    /// centroid — and is kept when its share of the level's estimated total reaches `threshold`.
    /// The level's total is the candidates' mass plus the mass of every subtree dropped higher up
    /// (at its ancestor's estimate), so it estimates the softmax denominator over all keys and a
    /// share means the same at every level. The best candidate is always kept, and at most `beam`
    /// (nil: no cap), by mass. `scale` is the attention scale, 1/sqrt(dimension) by default.
    /// Threshold 0 keeps every non-empty node (exact search).
    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, beam: Int? = nil, threshold: Float,
                       scale: Float? = nil, threads: Int = 1, rerank: Int = 0, keys: VectorView) throws -> SearchResults {
        guard threshold >= 0, threshold <= 1 else {
            throw IndexError.invalidParameter("threshold must be in [0, 1] (got \(threshold))")
        }
        if let beam, beam < 1 { throw IndexError.invalidParameter("beam must be at least 1 (got \(beam))") }
        let s = scale ?? 1 / Float(dimension).squareRoot()
        guard s.isFinite, s > 0 else { throw IndexError.invalidParameter("scale must be positive (got \(s))") }
        let widest = max(1, levelCounts.max() ?? 1)
        return try run(queries, k: k, descent: .threshold(threshold, cap: min(beam ?? widest, widest), scale: s),
                       threads: threads, rerank: rerank, keys: keys)
    }

    private func run(_ queries: UnsafeBufferPointer<Float>, k: Int, descent: TreeQuantizer.Descent, threads: Int,
                     rerank: Int, keys: VectorView) throws -> SearchResults {
        let m = try checkSearch(queries, k: k, keys: keys)
        let quantizer = TreeQuantizer(dimension: dimension, centroids: centroids, childOffsets: childOffsets,
                                      sizes: subtreeSizes, logSizes: logSizes, descent: descent)
        return searchInvertedLists(queries, queryCount: m, k: k, dimension: dimension, threads: threads,
                                   quantizer: quantizer, coded: CodedLists(lists: lists, codec: codec!, centroids: centroids[0]),
                                   rerank: rerank, keys: keys)
    }

    // MARK: Persistence

    public func sections() -> [String: [UInt8]] {
        var meta = ByteWriter()
        meta.write(UInt32(CentroidTreeIndex.formatVersion))
        for v in [dimension, count, levels, iterations] { meta.write(Int64(v)) }
        meta.write(fineFraction)
        meta.write(metric.code)
        meta.write(seed)
        meta.write(codeKind.code)
        var cen = ByteWriter()
        cen.write(array: mean)
        cen.write(UInt32(centroids.count))
        for level in centroids { cen.write(array: level) }
        var tree = ByteWriter()
        for l in 1..<max(1, centroids.count) { tree.write(array: childOffsets[l].map(Int64.init)) }
        writeCodedLists(to: &tree)
        return ["meta": meta.bytes, "centroids": cen.bytes, "tree": tree.bytes]
    }

    public convenience init(sections: IndexSections) throws {
        let (v, fraction, metric, seed, codeKind) = try readSection(sections, "meta", of: .tree) { meta -> ([Int64], Double, ClusterMetric, UInt64, ListCodeKind) in
            let version = Int(try meta.read(UInt32.self))
            guard version == CentroidTreeIndex.formatVersion else {
                throw IndexError.unsupportedVersion(found: version, supported: CentroidTreeIndex.formatVersion)
            }
            let v = try (0..<4).map { _ in try meta.read(Int64.self) }
            return (v, try meta.readDouble(), try ClusterMetric(code: try meta.read(UInt8.self)), try meta.read(UInt64.self),
                    try ListCodeKind(code: try meta.read(UInt8.self)))
        }
        let (dimension, count, levels, iterations) = (v[0], v[1], v[2], v[3])
        guard (1...65536).contains(dimension), (0...Int64(Int32.max)).contains(count), (2...32).contains(levels),
              (1...1_000_000).contains(iterations), fraction > 0, fraction <= 1 else {
            throw IndexError.corrupt("tree meta out of range (dimension \(dimension), count \(count), levels \(levels))")
        }
        try self.init(dimension: Int(dimension), levels: Int(levels), fineFraction: fraction, metric: metric,
                      iterations: Int(iterations), seed: seed, codes: codeKind)
        let d = Int(dimension), n = Int(count), depth = Int(levels)
        let (mean, levelCentroids) = try readSection(sections, "centroids", of: .tree) { cen -> ([Float], [[Float]]) in
            let mean = try cen.readFloatArray()
            let stored = Int(try cen.read(UInt32.self))
            guard stored == (n > 0 ? depth : 0) else {
                throw IndexError.corrupt("tree stores \(stored) levels for \(n) keys, expected \(depth)")
            }
            return (mean, try (0..<stored).map { _ in try cen.readFloatArray() })
        }
        guard mean.count == (levelCentroids.isEmpty ? 0 : d), mean.allSatisfy(\.isFinite),
              levelCentroids.allSatisfy({ !$0.isEmpty && $0.count % d == 0 && $0.allSatisfy(\.isFinite) }) else {
            throw IndexError.corrupt("tree centroids do not match dimension \(d), or are not finite")
        }
        let counts = levelCentroids.map { $0.count / d }
        let (offsets, stored) = try readSection(sections, "tree", of: .tree) { tree -> ([[Int]], (codec: ListCodec, lists: InvertedLists)) in
            var offsets: [[Int]] = [[]]
            for l in 1..<max(1, counts.count) {
                let o = try tree.readArray(Int64.self).map { Int(truncatingIfNeeded: $0) }
                guard o.count == counts[l] + 1, o.first == 0, o.last == counts[l - 1],
                      zip(o, o.dropFirst()).allSatisfy({ $0 <= $1 }) else {
                    throw IndexError.corrupt("tree level \(l) child offsets do not cover the \(counts[l - 1]) nodes below")
                }
                offsets.append(o)
            }
            return (offsets, try readCodedLists(from: &tree, listCount: counts.first ?? 0, keyCount: n, what: "tree"))
        }
        self.centroids = levelCentroids
        self.childOffsets = offsets
        try restore(mean: mean, codec: stored.codec, lists: stored.lists, count: n, snapshot: sections.mapSnapshot, what: "tree")
        computeSizes()
    }
}

/// The centroid tree's quantizer: the top level is scored by the batch's `sgemm`, then each
/// level's kept nodes expand to their children (one contiguous run, one kernel call each), down
/// to the fine clusters whose lists are scanned.
struct TreeQuantizer: ListQuantizer {
    /// How a descent keeps nodes at each level.
    enum Descent {
        /// The `beam` best by centroid score.
        case beam(Int)
        /// Those whose share of the estimated softmax mass reaches `threshold`, at most `cap`, by mass.
        case threshold(Float, cap: Int, scale: Float)
    }

    /// Candidate buffers for one worker.
    struct Scratch {
        let scores: UnsafeMutablePointer<Float>
        let ids: UnsafeMutablePointer<Int32>
    }

    let dimension: Int
    let centroids: [[Float]]
    let childOffsets: [[Int]]
    let sizes: [[Int]]
    let logSizes: [[Float]]
    let descent: Descent

    var top: Int { centroids.count - 1 }
    var coarse: [Float] { centroids[top] }
    var coarseCount: Int { centroids[top].count / dimension }
    var maxSelected: Int {
        switch descent {
        case .beam(let b): return b
        case .threshold(_, let cap, _): return cap
        }
    }
    private var widest: Int { centroids.map { $0.count / dimension }.max()! }

    func makeScratch() -> Scratch { Scratch(scores: .allocate(capacity: widest), ids: .allocate(capacity: widest)) }
    func release(_ scratch: Scratch) { scratch.scores.deallocate(); scratch.ids.deallocate() }

    func select(query q: UnsafePointer<Float>, coarseScores row: UnsafeMutablePointer<Float>,
                into kept: inout TopK<Int32>, scratch: Scratch) -> Int {
        let d = dimension, top = self.top
        let candScores = scratch.scores, candIDs = scratch.ids
        var mass = MassEstimate()
        var scored = 0
        // Top level: every non-empty node is a candidate.
        var n = 0
        for j in 0..<coarseCount where sizes[top][j] > 0 {
            candScores[n] = row[j]; candIDs[n] = Int32(j); n += 1
        }
        Self.select(descent, logSizes: logSizes[top], scores: candScores, ids: candIDs, count: n, mass: &mass, into: &kept)
        for l in stride(from: top, to: 0, by: -1) {
            n = 0
            centroids[l - 1].withUnsafeBufferPointer { c in
                for j in 0..<kept.count {
                    let p = Int(kept.id(at: j))
                    let a = childOffsets[l][p], e = childOffsets[l][p + 1]
                    guard e > a else { continue }
                    let base = n
                    kvr_scores_f32(q, c.baseAddress! + a * d, e - a, d, candScores + base)
                    scored += e - a
                    for child in a..<e where sizes[l - 1][child] > 0 {
                        candScores[n] = candScores[base + child - a]
                        candIDs[n] = Int32(child)
                        n += 1
                    }
                }
            }
            Self.select(descent, logSizes: logSizes[l - 1], scores: candScores, ids: candIDs, count: n, mass: &mass, into: &kept)
        }
        return scored
    }

    /// Estimated softmax mass of the subtrees dropped so far, relative to exp(`reference`).
    struct MassEstimate {
        var reference = -Double.infinity
        var dropped: Double = 0
    }

    /// Keeps the candidates of one level (ids of non-empty nodes, with their centroid scores).
    @inline(__always)
    private static func select(_ descent: Descent, logSizes: [Float], scores: UnsafeMutablePointer<Float>,
                               ids: UnsafePointer<Int32>, count n: Int, mass: inout MassEstimate,
                               into kept: inout TopK<Int32>) {
        kept.reset()
        switch descent {
        case .beam:
            for i in 0..<n where scores[i] >= kept.threshold { kept.push(scores[i], ids[i]) }
        case .threshold(let threshold, _, let scale):
            guard n > 0 else { return }
            // Log of the estimated mass: log(size) + scale q·c.
            var top: Float = -.infinity
            var argTop = 0
            for i in 0..<n {
                scores[i] = logSizes[Int(ids[i])] + scale * scores[i]
                if scores[i] > top { top = scores[i]; argTop = i }
            }
            let reference = max(mass.reference, Double(top))
            let dropped = mass.reference.isFinite ? mass.dropped * exp(mass.reference - reference) : 0
            var total = dropped
            for i in 0..<n { total += exp(Double(scores[i]) - reference) }
            let cut = Double(threshold) * total
            kept.push(scores[argTop], ids[argTop])
            for i in 0..<n where i != argTop && scores[i] >= kept.threshold && exp(Double(scores[i]) - reference) >= cut {
                kept.push(scores[i], ids[i])
            }
            var keptMass: Double = 0
            for j in 0..<kept.count { keptMass += exp(Double(kept.score(at: j)) - reference) }
            mass = MassEstimate(reference: reference, dropped: max(0, total - keptMass))
        }
    }
}

extension CentroidTreeIndex {
    /// The centroid tree's entry in the catalog: levels of centroids, a beam of clusters per level at search.
    public static let descriptor = IndexDescriptor(
        kind: .tree, type: CentroidTreeIndex.self, knob: .beam,
        make: { d, _, p in try CentroidTreeIndex(dimension: d, parameters: p) },
        ladder: { index, _ in Calibrator.clusterLadder(widest: (index as? CentroidTreeIndex)?.levelCounts.max() ?? 1) },
        describe: { "beam \($0.tree.beam)" })
}
