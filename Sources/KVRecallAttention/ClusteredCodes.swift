import CKernels
import Foundation
import KVRecallKernels
import KVRecallSupport
import KVRecallStorage
import KVRecallIndexes

/// A head's keys and values regrouped by key similarity for the quantized scan: the experiment behind
/// issue 21's next step (docs/BENCHMARKS.md, "Groups by key similarity"), built in memory and timed by
/// `kvrecall bench attention --clustered SHARE`; sessions do not store or use it.
///
/// Positions `sinks ..< sinks + m * group` (the rest are attended exactly) are clustered by k-means
/// (m clusters) in the metric of the prefill queries' second moment C (y = k L with C = L L^T: a squared
/// distance is the mean squared score difference over those queries); each cluster's members, in
/// position order, fill groups of the code format's size, coded like groups of the positional tier
/// (a group's empty slots hold its mean key and value; their scores are set to -inf). Per group, its keys'
/// mean and covariance (in the queries' top directions, plus a per-channel rest) let a step
/// estimate the group's softmax mass without scanning it: members x exp(s q.mean + s^2 / 2 q^T Cov q),
/// a Gaussian score's mean of exp. Groups cut from a run of the cluster-sorted positions instead
/// (every group full, most of them mixing two clusters) measured 2-4x the error.
public final class ClusteredCodes: @unchecked Sendable {
    public let format: CodeFormat
    public let dimension: Int
    /// The head positions the groups hold (the others are attended exactly).
    public let covered: Range<Int>
    public let groups: Int
    /// The head position of each slot, `groups x format.group` (-1: an empty slot).
    public let positions: [Int32]
    /// Members of each group (its first slots), and their logarithms.
    public let counts: [Int]
    let logCounts: [Float]
    /// Per group, its keys' mean and the per-channel variance of what the basis leaves of them,
    /// `groups x dimension` each.
    public let means: [Float], variances: [Float]
    /// The queries' principal directions (`rank x dimension`, orthonormal rows: the top eigenvectors
    /// of their second moment), and per group its keys' covariance in them (`groups x rank x rank`):
    /// q^T Cov q is mostly (U q)^T S (U q) where queries lie, and a diagonal misses the correlations.
    public let basis: [Float], covariances: [Float]
    /// Per group its members' mean value (`groups x dimension`): the groups not scanned in one product.
    public let valueMeans: [Float]
    public let rank: Int
    /// Directions of the basis (32 measured no better than 16).
    static let basisDirections = 16
    /// The head the groups code.
    public let head: HeadID
    public let buildSeconds: Double
    let layout: kvr_code_layout
    private let rows: UnsafeMutableRawPointer

    deinit { rows.deallocate() }

    /// Code row of group `j`.
    func row(_ j: Int) -> UnsafeRawPointer { UnsafeRawPointer(rows + j * layout.row_bytes) }

    /// Clusters and codes the head's positions outside sinks and window (`queries`: the head's
    /// prefill queries, at least 16 rows, which define the metric).
    public init(keys: VectorView, values: VectorView, queries: VectorView, format requested: CodeFormat,
                sinks: Int, window: Int, seed: UInt64 = 42, threads: Int = 1) throws {
        let start = monotonicNanos()
        let n = keys.count, d = keys.dimension
        let format = requested.fitted(to: keys.dtype)
        let size = format.group
        if let problem = format.problem(dimension: d, blockSize: keys.blockSize) { throw IndexError.invalidParameter(problem) }
        guard values.count == n else { throw IndexError.corrupt("head has \(n) keys but \(values.count) values") }
        guard values.dimension == d else { throw IndexError.dimensionMismatch(expected: d, actual: values.dimension) }
        guard queries.dimension == d else {
            throw IndexError.invalidParameter("the head's prefill queries have dimension \(queries.dimension), its keys \(d)")
        }
        guard queries.count >= 16 else {
            throw IndexError.invalidParameter("clustering needs at least 16 of the head's prefill queries (it has \(queries.count)): they define the metric")
        }
        let first = min(max(0, sinks), n)
        // As many clusters as whole groups the positions fill (a cluster's groups: its members in runs of `size`).
        let m = max(0, n - max(0, window) - first) / size
        guard m >= 2 else { throw IndexError.invalidParameter("too few positions outside sinks and window to cluster (\(n) keys)") }
        covered = first..<(first + m * size)
        dimension = d
        head = keys.info.id
        self.format = format
        layout = format.kernelLayout(dimension: d)

        let k = keys.decode(rows: covered), v = values.decode(rows: covered)
        // The metric's factor: C = Q^T Q / r (plus a little of its trace), C = L L^T.
        let count = queries.count
        let q = queries.decode(rows: 0..<count)
        // Summed in double: with fewer queries than d the moment is singular, and float rounding
        // left eigenvalues below the regularisation's (layer 5 with 16-200 queries did not factor).
        let moment = q.withUnsafeBufferPointer { BLAS.secondMoment($0.baseAddress!, rows: count, dimension: d) }
        let second = moment.map { Float($0) }
        let factor = try Self.cholesky(moment, d, queries: count)
        var metric = [Float](repeating: 0, count: m * size * d)
        BLAS.gemm(m: m * size, n: d, k: d, a: k, b: factor, c: &metric)
        let options = KMeans.Options(k: m, metric: .l2, iterations: 20, seed: seed, threads: threads)
        let labels = try KMeans.train(metric, dimension: d, options: options).labels
        // Each cluster in groups of at most `size` of its members (in position order); a group's
        // empty slots are coded as its members' mean key and value (so the stored mean value is
        // the members'), scored -inf and weigh nothing.
        var members = [[Int]](repeating: [], count: m)
        for i in 0..<(m * size) { members[Int(labels[i])].append(i) }
        var pieces: [ArraySlice<Int>] = []
        for list in members where !list.isEmpty {
            for at in stride(from: 0, to: list.count, by: size) { pieces.append(list[at..<min(list.count, at + size)]) }
        }
        groups = pieces.count
        counts = pieces.map { $0.count }
        logCounts = counts.map { log(Float($0)) }
        positions = pieces.flatMap { piece in piece.map { Int32(first + $0) } + Array(repeating: Int32(-1), count: size - piece.count) }

        let r = min(Self.basisDirections, d)
        let u = Self.principalDirections(second, d, rank: r)
        let G = groups
        rows = UnsafeMutableRawPointer.allocate(byteCount: G * layout.row_bytes, alignment: 64)
        var means = [Float](repeating: 0, count: G * d), variances = [Float](repeating: 0, count: G * d)
        var covariances = [Float](repeating: 0, count: G * r * r), valueMeans = [Float](repeating: 0, count: G * d)
        var gk = [Float](repeating: 0, count: size * d), gv = [Float](repeating: 0, count: size * d)
        var projected = [Float](repeating: 0, count: size * r), back = [Float](repeating: 0, count: size * d)
        for (j, piece) in pieces.enumerated() {
            let c0 = piece.count
            var meanValue = [Float](repeating: 0, count: d)
            for (i, p) in piece.enumerated() {
                for c in 0..<d { gk[i * d + c] = k[p * d + c]; gv[i * d + c] = v[p * d + c] }
            }
            for c in 0..<d {
                var sum: Float = 0, sumV: Float = 0
                for i in 0..<c0 { sum += gk[i * d + c]; sumV += gv[i * d + c] }
                means[j * d + c] = sum / Float(c0)
                meanValue[c] = sumV / Float(c0)
                valueMeans[j * d + c] = meanValue[c]
            }
            for i in c0..<size { for c in 0..<d { gk[i * d + c] = means[j * d + c]; gv[i * d + c] = meanValue[c] } }
            format.encodeGroup(keys: gk, values: gv, dimension: d, into: rows + j * layout.row_bytes)
            // Centred keys X (the empty slots centre to 0); P = X U^T, their coordinates in the
            // basis; S = P^T P / members, and the per-channel variance of the rest X - P U.
            for i in 0..<size { for c in 0..<d { gk[i * d + c] -= means[j * d + c] } }
            BLAS.scoresNT(m: size, n: r, k: d, a: gk, b: u, c: &projected)
            for a in 0..<r {
                for b in 0..<r {
                    var x: Float = 0
                    for i in 0..<c0 { x += projected[i * r + a] * projected[i * r + b] }
                    covariances[(j * r + a) * r + b] = x / Float(c0)
                }
            }
            BLAS.gemm(m: size, n: d, k: r, a: projected, b: u, c: &back)
            for c in 0..<d {
                var x: Float = 0
                for i in 0..<c0 { let e = gk[i * d + c] - back[i * d + c]; x += e * e }
                variances[j * d + c] = x / Float(c0)
            }
        }
        self.means = means
        self.variances = variances
        self.covariances = covariances
        self.valueMeans = valueMeans
        basis = u
        rank = r
        buildSeconds = Double(monotonicNanos() - start) / 1e9
    }

    /// Each group's estimated log-mass for `g` queries (`g x d`) at softmax scale `s`, `g x groups`:
    /// log(members) + s q.mean + s^2 / 2 q^T Cov q, the quadratic term in two parts: q's coordinates
    /// in the basis against the group's covariance there, and the rest of q (q - U^T U q) against
    /// the rest's per-channel variance.
    public func logMasses(queries: UnsafePointer<Float>, g: Int, scale s: Float) -> [Float] {
        let d = dimension, G = groups, r = rank
        var estimate = [Float](repeating: 0, count: g * G)
        BLAS.scoresNT(m: g, n: G, k: d, a: queries, b: means, c: &estimate, alpha: s)
        var coordinates = [Float](repeating: 0, count: g * r), inBasis = [Float](repeating: 0, count: g * d)
        BLAS.scoresNT(m: g, n: r, k: d, a: queries, b: basis, c: &coordinates)
        BLAS.gemm(m: g, n: d, k: r, a: coordinates, b: basis, c: &inBasis)
        let squares = (0..<(g * d)).map { (queries[$0] - inBasis[$0]) * (queries[$0] - inBasis[$0]) }
        BLAS.scoresNT(m: g, n: G, k: d, a: squares, b: variances, c: &estimate, alpha: s * s / 2, beta: 1)
        // x^T S x = vec(x x^T) . vec(S): one product of the heads' outer products with the groups' S.
        var outer = [Float](repeating: 0, count: g * r * r)
        for h in 0..<g { for a in 0..<r { for b in 0..<r { outer[(h * r + a) * r + b] = coordinates[h * r + a] * coordinates[h * r + b] } } }
        BLAS.scoresNT(m: g, n: G, k: r * r, a: outer, b: covariances, c: &estimate, alpha: s * s / 2, beta: 1)
        for h in 0..<g { for j in 0..<G { estimate[h * G + j] += logCounts[j] } }
        return estimate
    }

    /// The top `rank` eigenvectors of a symmetric positive semi-definite `a` (`d x d`) as orthonormal
    /// rows, by subspace iteration (60 passes from a fixed start, Gram-Schmidt after each).
    static func principalDirections(_ a: [Float], _ d: Int, rank r: Int) -> [Float] {
        var v = [Float](repeating: 0, count: r * d)
        for t in 0..<r { for c in 0..<d { v[t * d + c] = Float((c * 7919 + t * 104729) % 1009) / 1009 - 0.5 + (c == t ? 1 : 0) } }
        var next = [Float](repeating: 0, count: r * d)
        for _ in 0..<60 {
            BLAS.gemm(m: r, n: d, k: d, a: v, b: a, c: &next)  // (V A)^T = A V^T: a is symmetric
            for t in 0..<r {
                for p in 0..<t {
                    var dot: Float = 0
                    for c in 0..<d { dot += next[t * d + c] * next[p * d + c] }
                    for c in 0..<d { next[t * d + c] -= dot * next[p * d + c] }
                }
                var norm: Float = 0
                for c in 0..<d { norm += next[t * d + c] * next[t * d + c] }
                let inv = norm > 0 ? 1 / norm.squareRoot() : 0
                for c in 0..<d { next[t * d + c] *= inv }
            }
            swap(&v, &next)
        }
        return v
    }

    /// The lower factor L of a symmetric positive semi-definite `a` (`d x d`), L L^T = a + eps I
    /// (eps: 1e-6 of the largest diagonal entry, so a rank-deficient moment still factors).
    static func cholesky(_ a: [Double], _ d: Int, queries: Int) throws -> [Float] {
        let largest = (0..<d).map { a[$0 * d + $0] }.max() ?? 0
        let eps = max(1e-12, 1e-6 * largest)
        var l = [Double](repeating: 0, count: d * d)
        for i in 0..<d {
            for j in 0...i {
                var s = a[i * d + j] + (i == j ? eps : 0)
                for t in 0..<j { s -= l[i * d + t] * l[j * d + t] }
                if i == j {
                    guard s > 0, s.isFinite else {
                        throw IndexError.invalidParameter("the second moment of the head's \(queries) prefill queries (dimension \(d)) does not factor: are they finite?")
                    }
                    l[i * d + i] = s.squareRoot()
                } else {
                    l[i * d + j] = s / l[j * d + j]
                }
            }
        }
        return l.map { Float($0) }
    }
}

extension Attention {
    /// The quantized method over `clusters`: each group's mass estimated from its keys' mean and
    /// covariance; the groups of the largest estimated shares for any query head, as many slots as
    /// `scanShare` of the covered positions (every group at 1), scanned through their codes; each
    /// head's best `candidates` of them attended exactly with the positions the groups do not hold,
    /// the other scanned positions through their codes (the quantized tail), every group not
    /// scanned through its estimated mass and its mean value; all merged by log-sum-exp. With `tail`
    /// off, only the exact part (no scanned tail, no estimates). No soft cap (the estimates assume
    /// raw scores).
    public static func attendClustered(queries: UnsafeBufferPointer<Float>, clusters: ClusteredCodes, keys: VectorView,
                                       values: VectorView, parameters: AttentionParameters, scanShare: Double) throws -> AttentionResult {
        let d = keys.dimension, n = keys.count
        guard queries.count % d == 0, queries.count > 0 else { throw IndexError.dimensionMismatch(expected: d, actual: queries.count) }
        guard clusters.head == keys.info.id else {
            throw IndexError.invalidParameter("these clusters code head \(clusters.head), not head \(keys.info.id)")
        }
        guard clusters.dimension == d, values.dimension == d else {
            throw IndexError.dimensionMismatch(expected: clusters.dimension, actual: values.dimension == clusters.dimension ? d : values.dimension)
        }
        guard values.count == n else { throw IndexError.corrupt("head has \(n) keys but \(values.count) values") }
        guard clusters.covered.upperBound <= n else {
            throw IndexError.corrupt("the clusters cover positions \(clusters.covered) of a head of \(n): the head was cut; cluster it again")
        }
        let g = queries.count / d
        guard g <= 64 else { throw IndexError.invalidParameter("at most 64 query heads per KV head (got \(g))") }
        guard scanShare > 0, scanShare <= 1 else { throw IndexError.invalidParameter("the scanned share must be in (0, 1] (got \(scanShare))") }
        let score = ScoreTransform(parameters, dimension: d)
        guard score.softCap == nil else { throw IndexError.invalidParameter("clustered estimates assume no soft cap") }
        let q = parameters.quantized, s = score.scale
        let G = clusters.groups, size = clusters.format.group
        let fixed = Array(0..<clusters.covered.lowerBound) + Array(clusters.covered.upperBound..<n)

        let estimate = clusters.logMasses(queries: queries.baseAddress!, g: g, scale: s)
        // A group's share of its head's estimated mass, the largest over the heads, ranks it.
        // Groups scanned: as many slots as `scanShare` of the covered positions (empty slots count),
        // every group at 1.
        let budget = scanShare >= 1 ? G : max(1, min(G, Int((scanShare * Double(clusters.covered.count / size)).rounded(.up))))
        var share = [Float](repeating: -.infinity, count: G)
        var row = [Float](repeating: 0, count: G)
        for h in 0..<g {
            let lse: Float = row.withUnsafeMutableBufferPointer { r in
                estimate.withUnsafeBufferPointer { r.baseAddress!.update(from: $0.baseAddress! + h * G, count: G) }
                let top = kvr_max(r.baseAddress!, G)
                return top + log(kvr_exp_sub(r.baseAddress!, G, top))
            }
            for j in 0..<G { share[j] = max(share[j], estimate[h * G + j] - lse) }
        }
        var ranked = (0..<G).map { kvr_pair_key(share[$0], Int32($0)) }
        _ = ranked.withUnsafeMutableBufferPointer { kvr_select_u64($0.baseAddress!, G, budget) }
        var isScanned = [Bool](repeating: false, count: G)
        for key in ranked[0..<budget] { isScanned[Int(kvr_pair_id(key))] = true }
        let scanned = (0..<G).filter { isScanned[$0] }, skipped = (0..<G).filter { !isScanned[$0] }

        // The scanned groups' scores, `g x (budget * size)`, split over the cores as the quantized method's.
        let stride = budget * size
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: g * stride)
        defer { scores.deallocate() }
        let parts = max(1, min(parameters.threads, budget / 16))
        let groupsOf = (0..<parts).map { p in (budget * p / parts)..<(budget * (p + 1) / parts) }
        let kernelLayout = clusters.layout
        var picks = [[[UInt64]]](repeating: [], count: parts)
        var masses = [TailMasses](repeating: TailMasses(), count: parts)
        picks.withUnsafeMutableBufferPointer { out in
            masses.withUnsafeMutableBufferPointer { tailOut in
                SpinJoin.run(tasks: parts, threads: parts) { p in
                    var layout = kernelLayout
                    let range = groupsOf[p], first = range.lowerBound * size, count = range.count * size
                    let rows = UnsafeMutablePointer<UnsafeRawPointer?>.allocate(capacity: range.count)
                    let q8 = UnsafeMutablePointer<Int8>.allocate(capacity: (g + 3) / 4 * 4 * layout.padded)
                    let dots = UnsafeMutablePointer<Int32>.allocate(capacity: g * size)
                    let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 3 * layout.padded)
                    defer { rows.deallocate(); q8.deallocate(); dots.deallocate(); scratch.deallocate() }
                    for (t, j) in range.enumerated() { rows[t] = clusters.row(scanned[j]) }
                    kvr_code_scores(queries.baseAddress!, g, d, rows, range.count, &layout, s, scores + first, stride, q8, dots, scratch)
                    for (t, j) in range.enumerated() where clusters.counts[scanned[j]] < size {
                        for h in 0..<g { (scores + h * stride + first + t * size + clusters.counts[scanned[j]]).update(repeating: -.infinity, count: size - clusters.counts[scanned[j]]) }
                    }
                    if q.candidates > 0 { out[p] = partPicks(scores: scores, g: g, stride: stride, first: first, count: count, take: q.candidates) }
                    if q.tail { tailOut[p] = tailMasses(scores: scores, g: g, coded: stride, group: size, groups: range) }
                }
            }
        }
        // Each head's best candidates over the parts (slots), attended exactly with the fixed positions.
        let slots = q.candidates > 0 ? unionOfBest(picks, g: g, take: q.candidates, below: stride) : []
        let retrieved = slots.map { Int(clusters.positions[scanned[$0 / size] * size + $0 % size]) }
        let attended = sortedPositions(fixed, retrieved, below: n)
        var heads = attended.withUnsafeBufferPointer {
            AttentionKernel.attendGroup(queries: queries.baseAddress!, g: g, positions: $0, keys: keys, values: values,
                                        score: score, parts: parameters.threads)
        }
        guard q.tail else {
            let stats = SearchStats(distanceComputations: attended.count * g, auxiliaryComputations: (stride + G) * g, queries: g, keyCount: n)
            return AttentionResult(heads: heads, retrieved: retrieved, attended: attended, stats: stats)
        }
        // The scanned groups' tail, as the quantized method's.
        removeFromTail(slots, scores: scores, g: g, coded: stride, group: size, parts: groupsOf, masses: &masses)
        let plan = TailPlan(masses, exact: heads, groups: budget, parameters: q)
        let slices = tailSlices(groupsOf)
        var tails = [[PartialAttention]](repeating: [], count: slices.count)
        tails.withUnsafeMutableBufferPointer { out in
            SpinJoin.run(tasks: slices.count, threads: parts) { t in
                let slice = slices[t]
                out[t] = tailPartials(scores: scores, g: g, stride: stride, layout: kernelLayout, row: { clusters.row(scanned[$0]) },
                                      part: groupsOf[slice.part], groups: slice.groups, dimension: values.dimension,
                                      masses: masses[slice.part], plan: plan)
            }
        }
        for h in 0..<g { heads[h] = PartialAttention.merged([heads[h]] + tails.map { $0[h] }) }
        // The groups not scanned: estimated mass times mean value, as one product of the heads'
        // masses (0 for the scanned groups) with the groups' mean values.
        if !skipped.isEmpty {
            let dv = values.dimension
            var weights = [Float](repeating: 0, count: g * G), sum = [Float](repeating: 0, count: g * dv)
            var reference = [Float](repeating: -.infinity, count: g), totals = [Float](repeating: 0, count: g)
            weights.withUnsafeMutableBufferPointer { w in
                for h in 0..<g {
                    let r = w.baseAddress! + h * G
                    estimate.withUnsafeBufferPointer { r.update(from: $0.baseAddress! + h * G, count: G) }
                    for j in scanned { r[j] = -.infinity }
                    reference[h] = kvr_max(r, G)
                    totals[h] = kvr_exp_sub(r, G, reference[h])  // the scanned groups' weights: exp(-inf) = 0
                }
            }
            BLAS.gemm(m: g, n: dv, k: G, a: weights, b: clusters.valueMeans, c: &sum)
            for h in 0..<g where totals[h] > 0 {
                let part = PartialAttention(output: (0..<dv).map { sum[h * dv + $0] / totals[h] }, lse: reference[h] + log(totals[h]))
                heads[h] = heads[h].merged(with: part)
            }
        }
        let stats = SearchStats(distanceComputations: attended.count * g, auxiliaryComputations: (stride + G) * g, queries: g, keyCount: n)
        var result = AttentionResult(heads: heads, retrieved: retrieved, attended: attended, stats: stats)
        result.estimatedClusters = skipped.count
        result.estimated = skipped.map { j in Array(clusters.positions[(j * size)..<(j * size + clusters.counts[j])]) }
        return result
    }
}
