import CKernels
import Dispatch

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
        guard d > 0, rows.count % d == 0 else { throw IndexError.dimensionMismatch(expected: d, actual: rows.count) }
        let n = rows.count / d
        let k = options.k
        guard k >= 1 else { throw IndexError.invalidParameter("k-means needs k >= 1 (got \(k))") }
        guard k <= n else { throw IndexError.invalidParameter("k-means k = \(k) exceeds the \(n) rows") }
        guard options.iterations >= 0 else { throw IndexError.invalidParameter("k-means iterations must be >= 0") }
        guard options.maxPointsPerCentroid >= 1 else { throw IndexError.invalidParameter("maxPointsPerCentroid must be >= 1") }
        BLAS.setThreads(1)
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
                let (objective, changed) = assign(train, dimension: d, centroids: centroids, metric: options.metric,
                                                  threads: threads, labels: &labels)
                history.append(objective)
                passes += 1
                if changed == 0 { converged = true; break }
                repairs += update(train, dimension: d, labels: labels, k: k, centroids: &centroids, sizes: &sizes)
            }
            if options.iterations == 0 {
                let (objective, _) = assign(train, dimension: d, centroids: centroids, metric: options.metric,
                                            threads: threads, labels: &labels)
                history.append(objective)
                passes += 1
            }
            // Labels of every input row under the final centroids.
            var objective = history.last ?? 0
            if trainCount < n || !converged {
                labels = [Int32](repeating: -1, count: n)
                objective = assign(rows, dimension: d, centroids: centroids, metric: options.metric,
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
        let chunks = (n + chunk - 1) / chunk
        var chunkObjective = [Double](repeating: 0, count: chunks)
        var chunkChanged = [Int](repeating: 0, count: chunks)
        let workers = max(1, min(threads, chunks))
        labels.withUnsafeMutableBufferPointer { lab in
            chunkObjective.withUnsafeMutableBufferPointer { obj in
                chunkChanged.withUnsafeMutableBufferPointer { chg in
                    assignCentroids.withUnsafeBufferPointer { cen in
                        bias.withUnsafeBufferPointer { bias in
                            DispatchQueue.concurrentPerform(iterations: workers) { t in
                                let scores = UnsafeMutablePointer<Float>.allocate(capacity: chunk * k)
                                defer { scores.deallocate() }
                                var c = t
                                while c < chunks {
                                    let lo = c * chunk, rowsHere = min(chunk, n - lo)
                                    let x = rows.baseAddress! + lo * d
                                    let (o, ch) = assignChunk(x, rows: rowsHere, dimension: d, centroids: cen.baseAddress!, k: k,
                                                              bias: bias.baseAddress!, metric: metric, scores: scores,
                                                              labels: lab.baseAddress! + lo)
                                    obj[c] = o
                                    chg[c] = ch
                                    c += workers
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
    static func argMin(_ p: UnsafePointer<Float>, count: Int) -> (Int, Float) {
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
                       centroids: inout [Float], sizes: inout [Int]) -> Int {
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
        return repairEmpty(centroids: &centroids, sizes: &sizes, dimension: d)
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
        let chunks = (m + chunk - 1) / chunk
        var chunkSums = [Double](repeating: 0, count: chunks)
        let workers = max(1, min(threads, chunks))
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
                            let body = { (w: Int) in
                                let dots = UnsafeMutablePointer<Float>.allocate(capacity: chunk)
                                defer { dots.deallocate() }
                                var b = w
                                while b < chunks {
                                    let lo = b * chunk, cnt = min(chunk, m - lo)
                                    kvr_scores_f32(centre, x + lo * d, cnt, d, dots)
                                    var s: Double = 0
                                    for r in 0..<cnt {
                                        let v = max(0, np[lo + r] - 2 * dots[r] + cn)
                                        if v < dp[lo + r] { dp[lo + r] = v }
                                        s += Double(dp[lo + r])
                                    }
                                    sp[b] = s
                                    b += workers
                                }
                            }
                            if workers == 1 { body(0) } else { DispatchQueue.concurrentPerform(iterations: workers, execute: body) }
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

    /// `count` distinct indices of 0..<n, drawn with the generator, in increasing order.
    static func sampleIndices(n: Int, count: Int, using rng: inout SeededGenerator) -> [Int32] {
        var perm = (0..<Int32(n)).map { $0 }
        for i in 0..<count {
            let j = i + Int(rng.next() % UInt64(n - i))
            perm.swapAt(i, j)
        }
        return perm[0..<count].sorted()
    }
}
