import CKernels
import Foundation
import KVRecallSupport

/// How k-means compares a row with a centroid (the indexes' cluster metric).
public enum ClusterMetric: String, Sendable, CaseIterable {
    case l2, ip
}

/// Lloyd's k-means over f32 rows, for IVF lists and centroid trees.
///
/// - Initialisation: k-means++ (D² sampling by L2 distance, for both metrics) on a seeded subset of
///   at most `max(k, min(8k, initSampleCap))` rows, so seeding stays cheap for large k.
/// - Training set: at most `maxPointsPerCentroid * k` rows, sampled with the seed (faiss: 256).
/// - Assignment: `sgemm` of a chunk of rows against all centroids. `.l2`: argmin ||c||² - 2x·c
///   (plus ||x||² for the objective). `.ip`: spherical k-means, argmax x·c/||c||, so a cluster is a
///   direction and no centroid wins merely by being long.
/// - Update: the mean of the members for both metrics. For `.ip` the stored centroid stays the
///   unnormalised mean (only the assignment normalises a copy): then q·c is the mean score of the
///   cluster's rows, which is exactly what inner-product probing needs to rank clusters.
/// - Empty clusters (faiss's repair): the largest cluster is split, its centroid copied to the
///   empty one and the two pushed apart by ±1/1024 per coordinate.
/// - Stops after `iterations` passes, or earlier when no assignment changes.
///
/// Deterministic for a seed whatever the thread count: chunk boundaries depend only on n and k,
/// each chunk is one BLAS call on one thread (OpenBLAS pinned to one thread), and sums run in
/// row order.
public enum KMeans {
    public struct Options: Sendable {
        public var k: Int
        public var metric: ClusterMetric = .l2
        /// Lloyd passes at most (0: only seeding and one assignment).
        public var iterations = 20
        public var seed: UInt64 = 42
        public var threads = 1
        /// Training rows per centroid at most (faiss: 256); more rows are subsampled.
        public var maxPointsPerCentroid = 256
        /// k-means++ seeds from at most max(k, min(8k, this)) rows.
        public var initSampleCap = 32768

        public init(k: Int, metric: ClusterMetric = .l2, iterations: Int = 20, seed: UInt64 = 42, threads: Int = 1) {
            self.k = k
            self.metric = metric
            self.iterations = iterations
            self.seed = seed
            self.threads = threads
        }
    }

    public struct Result: Sendable {
        public let k: Int
        public let dimension: Int
        /// `k x dimension`, row-major: each cluster's mean after the last update (a repaired
        /// cluster holds the perturbed copy it was given).
        public var centroids: [Float]
        /// Cluster of every input row under the final centroids.
        public var labels: [Int32]
        /// Rows per cluster under `labels`.
        public var sizes: [Int]
        /// Objective after each assignment pass over the training rows, lower is better:
        /// `.l2` the inertia Σ||x - c||², `.ip` -Σ x·c/||c||.
        public var objectiveHistory: [Double]
        /// Objective of `labels` over all input rows.
        public var objective: Double
        /// Assignment passes over the training rows.
        public var passes: Int
        /// Whether training stopped because no assignment changed.
        public var converged: Bool
        /// Empty clusters repaired by splitting, over all passes.
        public var repairs: Int
    }

    /// Clusters `rows` (`n x dimension`, row-major) into `options.k` clusters.
    public static func train(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, options: Options) throws -> Result {
        BLAS.setThreads(1)
        return try trainPinned(rows, dimension: d, options: options)
    }

    /// `train` with OpenBLAS already pinned to one thread (safe to call from worker threads).
    static func trainPinned(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, options: Options) throws -> Result {
        guard d > 0, rows.count % d == 0 else { throw KernelError("k-means rows hold \(rows.count) floats, not a multiple of the dimension \(d)") }
        let n = rows.count / d
        let k = options.k
        guard k >= 1 else { throw KernelError("k-means needs k >= 1 (got \(k))") }
        guard k <= n else { throw KernelError("k-means k = \(k) exceeds the \(n) rows") }
        guard options.iterations >= 0 else { throw KernelError("k-means iterations must be >= 0") }
        guard options.maxPointsPerCentroid >= 1 else { throw KernelError("maxPointsPerCentroid must be >= 1") }
        let threads = max(1, options.threads)
        var rng = SeededGenerator(seed: options.seed)
        let base = rows.baseAddress!

        // Training rows: all, or a seeded sample kept in row order.
        let trainCount = min(n, options.maxPointsPerCentroid * k)
        var sampled: [Float] = []
        if trainCount < n {
            let picks = sampleIndices(n: n, count: trainCount, using: &rng)
            sampled = [Float](repeating: 0, count: trainCount * d)
            sampled.withUnsafeMutableBufferPointer { out in
                for (j, i) in picks.enumerated() {
                    (out.baseAddress! + j * d).update(from: base + Int(i) * d, count: d)
                }
            }
        }
        return sampled.withUnsafeBufferPointer { sample -> Result in
            let train = trainCount < n ? sample : rows
            var centroids = seedPlusPlus(train, dimension: d, k: k, cap: options.initSampleCap, threads: threads, using: &rng)
            var labels = [Int32](repeating: -1, count: trainCount)
            var history: [Double] = []
            var converged = false
            var repairs = 0
            var passes = 0
            var sizes = [Int](repeating: 0, count: k)
            for _ in 0..<options.iterations {
                let (objective, changed) = assignPinned(train, dimension: d, centroids: centroids, metric: options.metric,
                                                  threads: threads, labels: &labels)
                history.append(objective)
                passes += 1
                if changed == 0 { converged = true; break }
                repairs += update(train, dimension: d, labels: labels, k: k, centroids: &centroids, sizes: &sizes)
            }
            if options.iterations == 0 {
                let (objective, _) = assignPinned(train, dimension: d, centroids: centroids, metric: options.metric,
                                            threads: threads, labels: &labels)
                history.append(objective)
                passes += 1
            }
            // Labels of every input row under the final centroids.
            var objective = history.last ?? 0
            if trainCount < n || !converged {
                labels = [Int32](repeating: -1, count: n)
                objective = assignPinned(rows, dimension: d, centroids: centroids, metric: options.metric,
                                   threads: threads, labels: &labels).objective
            }
            sizes = [Int](repeating: 0, count: k)
            for l in labels { sizes[Int(l)] += 1 }
            return Result(k: k, dimension: d, centroids: centroids, labels: labels, sizes: sizes,
                          objectiveHistory: history, objective: objective, passes: passes,
                          converged: converged, repairs: repairs)
        }
    }

    public static func train(_ rows: [Float], dimension: Int, options: Options) throws -> Result {
        try rows.withUnsafeBufferPointer { try train($0, dimension: dimension, options: options) }
    }

    /// Below this many clusters `trainTwoLevel` is plain `train`.
    public static let twoLevelMinimumK = 256
    /// Below this many multiply-adds per full assignment pass (n x k x d) `trainTwoLevel` is plain
    /// `train`: 20 such passes take a few seconds at most, and flat k-means places clusters better
    /// on blob-like data (two-level shares them among groups by row count; on 4096 clustered test
    /// keys recall@10 at nlist/4 fell from 0.987 to 0.958). 131072 keys x 1448 lists x 128 is 24e9.
    public static let twoLevelMinimumWork = 1 << 32

    /// Two-level k-means for many clusters (faiss's `two_level_clustering`): `options.k` clusters
    /// as ~sqrt(k) coarse groups of the rows (k-means, `train`), each group then split by its own
    /// k-means into a share of the k clusters proportional to its rows, then `refinePasses` Lloyd
    /// passes in which a row is compared only with the clusters of the `probeGroups` groups whose
    /// coarse centroids lie nearest its own group's. A pass costs about n x (k/sqrt(k)) x probeGroups
    /// x d instead of n x k x d, so 6553 clusters of 131072 rows train in seconds, not minutes.
    /// Then `fullPasses` ordinary Lloyd passes (update, assignment against every cluster). Labels
    /// are those of the last pass (after restricted passes only: a row's best cluster among its
    /// candidates).
    /// Deterministic for a seed whatever the thread count: groups are trained and assigned one
    /// per thread, each with its own seed, in fixed order. Falls back to `train` when k is below
    /// `twoLevelMinimumK`, a full pass costs less than `minimumWork`, or the rows are too few.
    public static func trainTwoLevel(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, options: Options,
                                     refinePasses: Int = 2, probeGroups: Int = 4, fullPasses: Int = 0,
                                     minimumWork: Int = twoLevelMinimumWork) throws -> Result {
        guard d > 0, rows.count % d == 0 else { throw KernelError("k-means rows hold \(rows.count) floats, not a multiple of the dimension \(d)") }
        let n = rows.count / d
        let k = options.k
        guard refinePasses >= 0, probeGroups >= 1, fullPasses >= 0 else {
            throw KernelError("refine and full passes must be >= 0 and probe groups >= 1")
        }
        let groups = Int(Double(k).squareRoot().rounded())
        let work = min(n, options.maxPointsPerCentroid * k).multipliedReportingOverflow(by: k * d)
        guard k >= twoLevelMinimumK, k <= n, groups >= 2, n >= 4 * k, work.overflow || work.partialValue >= minimumWork else {
            return try train(rows, dimension: d, options: options)
        }
        let threads = max(1, options.threads)
        BLAS.setThreads(1)
        var coarseOptions = options
        coarseOptions.k = groups
        let coarse = try train(rows, dimension: d, options: coarseOptions)
        // Members of each group, in row order.
        var memberOffsets = [Int](repeating: 0, count: groups + 1)
        for l in coarse.labels { memberOffsets[Int(l) + 1] += 1 }
        for g in 0..<groups { memberOffsets[g + 1] += memberOffsets[g] }
        var members = [Int32](repeating: 0, count: n)
        var fill = memberOffsets
        for (i, l) in coarse.labels.enumerated() { members[fill[Int(l)]] = Int32(i); fill[Int(l)] += 1 }
        let sizes = (0..<groups).map { memberOffsets[$0 + 1] - memberOffsets[$0] }
        let share = splitCounts(k: k, sizes: sizes)
        var firstCluster = [Int](repeating: 0, count: groups + 1)
        for g in 0..<groups { firstCluster[g + 1] = firstCluster[g] + share[g] }
        let base = rows.baseAddress!
        var centroids = [Float](repeating: 0, count: k * d)
        var labels = [Int32](repeating: -1, count: n)
        var repairs = [Int](repeating: 0, count: groups)
        let order = (0..<groups).sorted { sizes[$0] > sizes[$1] || (sizes[$0] == sizes[$1] && $0 < $1) }
        // Each group's own k-means, groups spread over the threads (largest first).
        try centroids.withUnsafeMutableBufferPointer { cen in
            try labels.withUnsafeMutableBufferPointer { lab in
                try repairs.withUnsafeMutableBufferPointer { rep in
                    let cen = cen, lab = lab, rep = rep
                    let failure = LockedError()
                    ChunkPlan(count: groups, chunk: 1, threads: threads).run { _, chunks in
                        for (j, _) in chunks {
                            let g = order[j]
                            let kg = share[g]
                            guard kg > 0 else { continue }
                            let lo = memberOffsets[g], cnt = sizes[g]
                            var local = [Float](repeating: 0, count: cnt * d)
                            local.withUnsafeMutableBufferPointer { l in
                                for r in 0..<cnt { (l.baseAddress! + r * d).update(from: base + Int(members[lo + r]) * d, count: d) }
                            }
                            var o = options
                            o.k = kg
                            o.threads = 1
                            o.seed = options.seed &+ 0x9E37_79B9_7F4A_7C15 &* UInt64(g + 1)
                            do {
                                let r = try local.withUnsafeBufferPointer { try trainPinned($0, dimension: d, options: o) }
                                (cen.baseAddress! + firstCluster[g] * d).update(from: r.centroids, count: kg * d)
                                for i in 0..<cnt { lab[Int(members[lo + i])] = Int32(firstCluster[g]) + r.labels[i] }
                                rep[g] = r.repairs
                            } catch { failure.set(error) }
                        }
                    }
                    if let error = failure.error { throw error }
                }
            }
        }
        // Candidate clusters per group: those of the probeGroups groups nearest its coarse centroid.
        let near = nearestGroups(coarse.centroids, dimension: d, groups: groups, count: min(groups, probeGroups), metric: options.metric)
        var history: [Double] = []
        var passes = coarse.passes
        var totalRepairs = repairs.reduce(0, +) + coarse.repairs
        var converged = false
        var clusterSizes = [Int](repeating: 0, count: k)
        var objective = 0.0
        for pass in 0...refinePasses {
            let (obj, changed) = restrictedAssign(rows, dimension: d, centroids: centroids, members: members,
                                                  memberOffsets: memberOffsets, firstCluster: firstCluster, near: near,
                                                  metric: options.metric, threads: threads, labels: &labels)
            history.append(obj)
            objective = obj
            passes += 1
            if changed == 0 && pass > 0 { converged = true; break }
            if pass == refinePasses { break }
            // No empty-cluster repair here: a cluster belongs to its group's candidates, and a copy of
            // another group's largest cluster would sit where that group's rows never look.
            totalRepairs += update(rows, dimension: d, labels: labels, k: k, centroids: &centroids, sizes: &clusterSizes, repair: false)
        }
        // Full Lloyd passes (every row against every cluster) to finish.
        for _ in 0..<fullPasses {
            totalRepairs += update(rows, dimension: d, labels: labels, k: k, centroids: &centroids, sizes: &clusterSizes)
            objective = assignPinned(rows, dimension: d, centroids: centroids, metric: options.metric, threads: threads, labels: &labels).objective
        }
        clusterSizes = [Int](repeating: 0, count: k)
        for l in labels { clusterSizes[Int(l)] += 1 }
        return Result(k: k, dimension: d, centroids: centroids, labels: labels, sizes: clusterSizes,
                      objectiveHistory: history, objective: objective, passes: passes, converged: converged,
                      repairs: totalRepairs)
    }

    public static func trainTwoLevel(_ rows: [Float], dimension: Int, options: Options,
                                     refinePasses: Int = 2, probeGroups: Int = 4, fullPasses: Int = 0,
                                     minimumWork: Int = twoLevelMinimumWork) throws -> Result {
        try rows.withUnsafeBufferPointer {
            try trainTwoLevel($0, dimension: dimension, options: options, refinePasses: refinePasses, probeGroups: probeGroups,
                              fullPasses: fullPasses, minimumWork: minimumWork)
        }
    }

    /// `k` clusters shared among groups in proportion to their sizes (largest remainder), every
    /// non-empty group at least one, none more than its rows. Requires k <= sum of sizes.
    static func splitCounts(k: Int, sizes: [Int]) -> [Int] {
        let n = sizes.reduce(0, +)
        var share = sizes.map { s in s == 0 ? 0 : min(s, max(1, k * s / n)) }
        var total = share.reduce(0, +)
        // Too many (the floors of 1): take from the groups with the most clusters per row.
        while total > k {
            var best = -1
            for g in sizes.indices where share[g] > 1 {
                if best < 0 || share[g] * sizes[best] > share[best] * sizes[g] { best = g }
            }
            share[best] -= 1
            total -= 1
        }
        // Too few: give to the groups with the most rows per cluster (room permitting).
        while total < k {
            var best = -1
            for g in sizes.indices where share[g] < sizes[g] {
                if best < 0 || sizes[g] * (share[best] + 1) > sizes[best] * (share[g] + 1) { best = g }
            }
            share[best] += 1
            total += 1
        }
        return share
    }

    /// For each group, the `count` groups whose centroids are nearest its own (itself first):
    /// by L2 for `.l2`, by cosine for `.ip`.
    static func nearestGroups(_ centroids: [Float], dimension d: Int, groups: Int, count: Int, metric: ClusterMetric) -> [[Int]] {
        var rows = centroids
        if metric == .ip {
            for g in 0..<groups {
                var s: Float = 0
                for t in 0..<d { s += rows[g * d + t] * rows[g * d + t] }
                let inv: Float = s > 0 ? 1 / s.squareRoot() : 0
                for t in 0..<d { rows[g * d + t] *= inv }
            }
        }
        var out: [[Int]] = []
        for g in 0..<groups {
            var scored: [(Float, Int)] = []
            for h in 0..<groups {
                var v: Float = 0
                for t in 0..<d {
                    switch metric {
                    case .l2: let e = rows[g * d + t] - rows[h * d + t]; v += e * e
                    case .ip: v -= rows[g * d + t] * rows[h * d + t]
                    }
                }
                scored.append((h == g ? -.infinity : v, h))
            }
            scored.sort { $0.0 < $1.0 || ($0.0 == $1.0 && $0.1 < $1.1) }
            out.append(scored.prefix(count).map(\.1))
        }
        return out
    }

    /// One assignment pass in which the rows of each group are compared only with the clusters of
    /// `near[group]`. Groups run over threads; each group's rows are one `assign` call on one thread.
    static func restrictedAssign(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, centroids: [Float], members: [Int32],
                                 memberOffsets: [Int], firstCluster: [Int], near: [[Int]], metric: ClusterMetric,
                                 threads: Int, labels: inout [Int32]) -> (objective: Double, changed: Int) {
        let groups = near.count
        var objectives = [Double](repeating: 0, count: groups)
        var changes = [Int](repeating: 0, count: groups)
        let base = rows.baseAddress!
        labels.withUnsafeMutableBufferPointer { lab in
            objectives.withUnsafeMutableBufferPointer { obj in
                changes.withUnsafeMutableBufferPointer { chg in
                    let lab = lab, obj = obj, chg = chg
                    ChunkPlan(count: groups, chunk: 1, threads: threads).run { _, chunks in
                        for (g, _) in chunks {
                            let lo = memberOffsets[g], cnt = memberOffsets[g + 1] - lo
                            guard cnt > 0 else { continue }
                            // Candidate clusters (global numbers) and their centroids.
                            var global: [Int] = []
                            for h in near[g] { global += firstCluster[h]..<firstCluster[h + 1] }
                            guard !global.isEmpty else { continue }
                            var subset = [Float](repeating: 0, count: global.count * d)
                            for (j, c) in global.enumerated() {
                                for t in 0..<d { subset[j * d + t] = centroids[c * d + t] }
                            }
                            var local = [Float](repeating: 0, count: cnt * d)
                            local.withUnsafeMutableBufferPointer { l in
                                for r in 0..<cnt { (l.baseAddress! + r * d).update(from: base + Int(members[lo + r]) * d, count: d) }
                            }
                            var localLabels = [Int32](repeating: -1, count: cnt)
                            let (o, _) = local.withUnsafeBufferPointer {
                                assignPinned($0, dimension: d, centroids: subset, metric: metric, threads: 1, labels: &localLabels)
                            }
                            var changed = 0
                            for r in 0..<cnt {
                                let row = Int(members[lo + r])
                                let label = Int32(global[Int(localLabels[r])])
                                if lab[row] != label { lab[row] = label; changed += 1 }
                            }
                            obj[g] = o
                            chg[g] = changed
                        }
                    }
                }
            }
        }
        return (objectives.reduce(0, +), changes.reduce(0, +))
    }

    /// Rows per assignment chunk for `k` centroids: about 2 MB of scores, independent of threads.
    @inline(__always)
    static func chunkRows(k: Int) -> Int { min(4096, max(32, (1 << 19) / max(1, k))) }

    /// Labels each row with its nearest centroid (`.l2`) or best-aligned one (`.ip`: by x·c/||c||);
    /// ties go to the lower centroid. Returns the objective (see `Result.objectiveHistory`) and how
    /// many labels changed. `centroids` is `k x dimension` (unnormalised for `.ip`).
    @discardableResult
    public static func assign(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, centroids: [Float], metric: ClusterMetric,
                              threads: Int, labels: inout [Int32]) -> (objective: Double, changed: Int) {
        let n = rows.count / d
        let k = centroids.count / d
        precondition(labels.count == n && k >= 1, "labels must have one slot per row")
        guard n > 0 else { return (0, 0) }
        BLAS.setThreads(1)
        return assignPinned(rows, dimension: d, centroids: centroids, metric: metric, threads: threads, labels: &labels)
    }

    /// `assign` with OpenBLAS already pinned to one thread.
    static func assignPinned(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, centroids: [Float], metric: ClusterMetric,
                             threads: Int, labels: inout [Int32]) -> (objective: Double, changed: Int) {
        let n = rows.count / d
        let k = centroids.count / d
        guard n > 0 else { return (0, 0) }
        // .l2 ranks by ||c||² - 2x·c; .ip by x·ĉ, so scores use the normalised copy.
        var assignCentroids = centroids
        var bias = [Float](repeating: 0, count: k)
        centroids.withUnsafeBufferPointer { c in
            for j in 0..<k {
                let norm2 = kvr_dot_f32(c.baseAddress! + j * d, c.baseAddress! + j * d, d)
                switch metric {
                case .l2: bias[j] = norm2
                case .ip:
                    let inv: Float = norm2 > 0 ? 1 / norm2.squareRoot() : 0
                    for t in 0..<d { assignCentroids[j * d + t] *= inv }
                }
            }
        }
        let chunk = chunkRows(k: k)
        let plan = ChunkPlan(count: n, chunk: chunk, threads: threads)
        var chunkObjective = [Double](repeating: 0, count: plan.chunks)
        var chunkChanged = [Int](repeating: 0, count: plan.chunks)
        labels.withUnsafeMutableBufferPointer { lab in
            chunkObjective.withUnsafeMutableBufferPointer { obj in
                chunkChanged.withUnsafeMutableBufferPointer { chg in
                    assignCentroids.withUnsafeBufferPointer { cen in
                        bias.withUnsafeBufferPointer { bias in
                            plan.run(scratch: chunk * k) { _, chunks, scores in
                                for (c, range) in chunks {
                                    let x = rows.baseAddress! + range.lowerBound * d
                                    let (o, ch) = assignChunk(x, rows: range.count, dimension: d, centroids: cen.baseAddress!, k: k,
                                                              bias: bias.baseAddress!, metric: metric, scores: scores,
                                                              labels: lab.baseAddress! + range.lowerBound)
                                    obj[c] = o
                                    chg[c] = ch
                                }
                            }
                        }
                    }
                }
            }
        }
        return (chunkObjective.reduce(0, +), chunkChanged.reduce(0, +))
    }

    /// One chunk: one `sgemm`, then a best-column scan per row.
    private static func assignChunk(_ x: UnsafePointer<Float>, rows m: Int, dimension d: Int, centroids: UnsafePointer<Float>,
                                    k: Int, bias: UnsafePointer<Float>, metric: ClusterMetric,
                                    scores: UnsafeMutablePointer<Float>, labels: UnsafeMutablePointer<Int32>) -> (Double, Int) {
        var objective: Double = 0
        var changed = 0
        switch metric {
        case .l2:
            // scores = ||c||² - 2 x·c, by sgemm accumulating onto the broadcast norms.
            for r in 0..<m { (scores + r * k).update(from: bias, count: k) }
            BLAS.scoresNT(m: m, n: k, k: d, a: x, b: centroids, c: scores, alpha: -2, beta: 1)
            for r in 0..<m {
                let (j, v) = argMin(scores + r * k, count: k)
                let xr = x + r * d
                objective += Double(max(0, kvr_dot_f32(xr, xr, d) + v))
                if labels[r] != Int32(j) { labels[r] = Int32(j); changed += 1 }
            }
        case .ip:
            BLAS.scoresNT(m: m, n: k, k: d, a: x, b: centroids, c: scores)
            for r in 0..<m {
                let row = scores + r * k
                for j in 0..<k { row[j] = -row[j] }
                let (j, v) = argMin(row, count: k)
                objective += Double(v)
                if labels[r] != Int32(j) { labels[r] = Int32(j); changed += 1 }
            }
        }
        return (objective, changed)
    }

    /// Index and value of the smallest of `count` floats (the first on ties). Four independent
    /// lanes keep the compare chains short; plain scalar code, so debug builds stay fast too.
    @inline(__always)
    package static func argMin(_ p: UnsafePointer<Float>, count: Int) -> (Int, Float) {
        var v0 = p[0], v1 = Float.infinity, v2 = Float.infinity, v3 = Float.infinity
        var i0 = 0, i1 = 0, i2 = 0, i3 = 0
        var i = 1
        while i + 4 <= count {
            let a = p[i], b = p[i + 1], c = p[i + 2], d = p[i + 3]
            if a < v0 { v0 = a; i0 = i }
            if b < v1 { v1 = b; i1 = i + 1 }
            if c < v2 { v2 = c; i2 = i + 2 }
            if d < v3 { v3 = d; i3 = i + 3 }
            i += 4
        }
        while i < count {
            if p[i] < v0 { v0 = p[i]; i0 = i }
            i += 1
        }
        // Each lane holds its first minimum; combine preferring the lower index on ties.
        var best = v0, at = i0
        if v1 < best || (v1 == best && i1 < at && v1 < .infinity) { best = v1; at = i1 }
        if v2 < best || (v2 == best && i2 < at && v2 < .infinity) { best = v2; at = i2 }
        if v3 < best || (v3 == best && i3 < at && v3 < .infinity) { best = v3; at = i3 }
        return (at, best)
    }

    /// Lloyd update: centroids become the means of their rows; empty clusters are repaired.
    /// Returns the number of repairs.
    static func update(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, labels: [Int32], k: Int,
                       centroids: inout [Float], sizes: inout [Int], repair: Bool = true) -> Int {
        var sums = [Double](repeating: 0, count: k * d)
        sizes = [Int](repeating: 0, count: k)
        let x = rows.baseAddress!
        sums.withUnsafeMutableBufferPointer { s in
            for (i, l) in labels.enumerated() {
                let c = Int(l)
                sizes[c] += 1
                let dst = s.baseAddress! + c * d, src = x + i * d
                for t in 0..<d { dst[t] += Double(src[t]) }
            }
        }
        for c in 0..<k where sizes[c] > 0 {
            let inv = 1 / Double(sizes[c])
            for t in 0..<d { centroids[c * d + t] = Float(sums[c * d + t] * inv) }
        }
        return repair ? repairEmpty(centroids: &centroids, sizes: &sizes, dimension: d) : 0
    }

    /// faiss's empty-cluster repair, deterministic: each empty cluster takes a perturbed copy of
    /// the currently largest cluster's centroid, which is perturbed the other way; the two share
    /// its count until the next assignment.
    static func repairEmpty(centroids: inout [Float], sizes: inout [Int], dimension d: Int) -> Int {
        let eps: Float = 1 / 1024
        var repairs = 0
        for ci in sizes.indices where sizes[ci] == 0 {
            var cj = 0
            for j in sizes.indices where sizes[j] > sizes[cj] { cj = j }
            guard sizes[cj] > 1 else { break }
            for t in 0..<d {
                let v = centroids[cj * d + t]
                let up = v * (1 + eps), down = v * (1 - eps)
                centroids[ci * d + t] = t % 2 == 0 ? up : down
                centroids[cj * d + t] = t % 2 == 0 ? down : up
            }
            sizes[ci] = sizes[cj] / 2
            sizes[cj] -= sizes[ci]
            repairs += 1
        }
        return repairs
    }

    /// k-means++ seeding on a seeded subset of `rows`: the first centre uniformly, each next one
    /// with probability proportional to its squared distance to the nearest centre chosen so far.
    static func seedPlusPlus(_ rows: UnsafeBufferPointer<Float>, dimension d: Int, k: Int, cap: Int, threads: Int,
                             using rng: inout SeededGenerator) -> [Float] {
        let n = rows.count / d
        let m = min(n, max(k, min(8 * k, cap)))
        var subset: [Float]
        if m < n {
            let picks = sampleIndices(n: n, count: m, using: &rng)
            subset = [Float](repeating: 0, count: m * d)
            for (j, i) in picks.enumerated() {
                for t in 0..<d { subset[j * d + t] = rows[Int(i) * d + t] }
            }
        } else {
            subset = Array(rows)
        }
        var centroids = [Float](repeating: 0, count: k * d)
        var dist = [Float](repeating: .infinity, count: m)
        var norms = [Float](repeating: 0, count: m)
        let chunk = 2048
        let plan = ChunkPlan(count: m, chunk: chunk, threads: threads)
        let chunks = plan.chunks
        var chunkSums = [Double](repeating: 0, count: chunks)
        subset.withUnsafeBufferPointer { xs in
            let x = xs.baseAddress!
            for i in 0..<m { norms[i] = kvr_dot_f32(x + i * d, x + i * d, d) }
            var pick = Int(rng.next() % UInt64(m))
            for c in 0..<k {
                for t in 0..<d { centroids[c * d + t] = x[pick * d + t] }
                if c == k - 1 { break }
                // dist[i] = min(dist[i], ||x_i - c||²), and per-chunk sums, in parallel over fixed chunks.
                let cn = kvr_dot_f32(x + pick * d, x + pick * d, d)
                let centre = x + pick * d
                dist.withUnsafeMutableBufferPointer { distBuffer in
                    norms.withUnsafeBufferPointer { np in
                        chunkSums.withUnsafeMutableBufferPointer { sumBuffer in
                            let dp = distBuffer, sp = sumBuffer
                            plan.run(scratch: chunk) { _, owned, dots in
                                for (b, range) in owned {
                                    let lo = range.lowerBound
                                    kvr_scores_f32(centre, x + lo * d, range.count, d, dots)
                                    var s: Double = 0
                                    for r in 0..<range.count {
                                        let v = max(0, np[lo + r] - 2 * dots[r] + cn)
                                        if v < dp[lo + r] { dp[lo + r] = v }
                                        s += Double(dp[lo + r])
                                    }
                                    sp[b] = s
                                }
                            }
                        }
                    }
                }
                let total = chunkSums.reduce(0, +)
                let u = Double(rng.next() >> 11) / Double(1 << 53)
                if !(total > 0) {
                    pick = Int(rng.next() % UInt64(m))  // every row sits on a centre: any row will do
                    continue
                }
                var target = u * total
                var b = 0
                while b < chunks - 1 && target >= chunkSums[b] { target -= chunkSums[b]; b += 1 }
                while chunkSums[b] == 0 && b > 0 { b -= 1 }  // rounding ran past the last chunk with mass
                let lo = b * chunk, hi = min(m, lo + chunk)
                pick = hi - 1
                for r in lo..<hi {
                    target -= Double(dist[r])
                    if target < 0 && dist[r] > 0 { pick = r; break }
                }
                if dist[pick] == 0 {  // rounding at the chunk's end: take its last row with mass
                    for r in stride(from: hi - 1, through: lo, by: -1) where dist[r] > 0 { pick = r; break }
                }
            }
        }
        return centroids
    }

    /// The first error thrown by any of several workers.
    final class LockedError: @unchecked Sendable {
        private let lock = NSLock()
        private var first: Error?
        func set(_ e: Error) { lock.lock(); if first == nil { first = e }; lock.unlock() }
        var error: Error? { lock.lock(); defer { lock.unlock() }; return first }
    }

    /// `count` distinct indices of 0..<n, drawn with the generator, in increasing order.
    package static func sampleIndices(n: Int, count: Int, using rng: inout SeededGenerator) -> [Int32] {
        var perm = (0..<Int32(n)).map { $0 }
        for i in 0..<count {
            let j = i + Int(rng.next() % UInt64(n - i))
            perm.swapAt(i, j)
        }
        return perm[0..<count].sorted()
    }
}
