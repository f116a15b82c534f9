import CKernels
import Dispatch

/// Inverted-file index (faiss IndexIVFFlat without the vector copy): k-means centroids over the
/// keys centred by their mean, one inverted list of key positions per centroid, exact re-ranking
/// of the probed lists straight from the store's memory map.
///
/// - Centring: keys are clustered as k - mu (mu = mean of the keys of the first add, stored).
///   For a query, q·(k - mu) = q·k - q·mu ranks keys exactly like q·k, but the clusters follow the
///   keys' spread instead of being dominated by their common offset, which is large in LLM keys.
/// - Probing is by inner product q·c for both cluster metrics. A centroid is the mean of its
///   (centred) keys, so q·c is the mean score of the list's keys (minus the constant q·mu): the
///   quantity an inner-product search wants to rank lists by. Probing by L2 distance would rank
///   lists by how close they are to q, which for out-of-distribution decode queries — far from the
///   key cloud — says little about their scores. `clusterMetric` therefore only decides how keys
///   are grouped (`.l2`: Lloyd; `.ip`: spherical, by direction) and how added keys join a list.
/// - Lists are CSR: `offsets` (nlist + 1) and `ids` (Int32, ascending within a list), rebuilt in
///   one pass on each add; no per-vector allocation.
/// - The first `add` trains (on that range, at most 256 keys per centroid, seeded); later adds
///   put each new key in the list of its nearest centroid, and the centroids stay.
/// - Probed keys are read at random positions of the map (prefetched a few keys ahead). Once a
///   head outgrows the caches each costs a cache and TLB miss, several times the per-key cost of
///   a sequential scan, so IVF beats `FlatIndex` only while it scans a small fraction of the keys.
/// - Searches may run concurrently with each other, not with `add`.
public final class IVFIndex: BuildableIndex, @unchecked Sendable {
    public static let formatVersion = 1
    /// Training keys per centroid at most (faiss's default).
    public static let maxPointsPerCentroid = 256
    /// Queries scored against the centroids by one `sgemm`; fixed, so results do not depend on threads.
    static let queryBatch = 32

    public let kind = "ivf"
    public let dimension: Int
    public private(set) var count = 0
    /// Lists asked for; nil picks `defaultNlist` of the first add's key count.
    public let requestedNlist: Int?
    /// Lists in the trained index (0 until the first add).
    public private(set) var nlist = 0
    public let metric: ClusterMetric
    public let iterations: Int
    public let seed: UInt64
    /// Threads for training and assignment.
    public var threads: Int
    /// Mean of the training keys (`dimension` floats; empty until trained).
    public private(set) var mean: [Float] = []
    /// `nlist x dimension` centroids of the centred keys, row-major.
    public private(set) var centroids: [Float] = []
    private(set) var offsets: [Int] = [0]
    private(set) var ids: [Int32] = []

    public init(dimension: Int, nlist: Int? = nil, metric: ClusterMetric = .l2, iterations: Int = 20,
                seed: UInt64 = 42, threads: Int = 2) throws {
        guard dimension >= 1 else { throw IndexError.invalidParameter("dimension must be at least 1 (got \(dimension))") }
        if let nlist, nlist < 1 { throw IndexError.invalidParameter("nlist must be at least 1 (got \(nlist))") }
        guard iterations >= 0 else { throw IndexError.invalidParameter("iterations must be >= 0 (got \(iterations))") }
        self.dimension = dimension
        self.requestedNlist = nlist
        self.metric = metric
        self.iterations = iterations
        self.seed = seed
        self.threads = max(1, threads)
    }

    public convenience init(dimension: Int, parameters: IndexBuildParameters) throws {
        try self.init(dimension: dimension, nlist: parameters.nlist, metric: parameters.clusterMetric,
                      iterations: parameters.iterations, seed: parameters.seed, threads: parameters.threads)
    }

    /// Builds over all keys of `keys`.
    public convenience init(keys: VectorView, parameters: IndexBuildParameters = IndexBuildParameters(),
                            progress: ((Int, Int) -> Void)? = nil) throws {
        try self.init(dimension: keys.dimension, parameters: parameters)
        try add(keys: keys, range: 0..<keys.count, progress: progress)
    }

    /// 4 sqrt(N), clamped to [1, N].
    public static func defaultNlist(for n: Int) -> Int {
        max(1, min(n, Int((4 * Double(n).squareRoot()).rounded())))
    }

    public var isTrained: Bool { nlist > 0 }

    /// Keys in each list.
    public var listSizes: [Int] { (0..<nlist).map { offsets[$0 + 1] - offsets[$0] } }

    /// Positions of the keys in list `l`, ascending.
    public func list(_ l: Int) -> ArraySlice<Int32> { ids[offsets[l]..<offsets[l + 1]] }

    // MARK: Build

    public func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)? = nil) throws {
        guard keys.dimension == dimension else { throw IndexError.dimensionMismatch(expected: dimension, actual: keys.dimension) }
        guard range.lowerBound == count, range.upperBound <= keys.count else {
            throw IndexError.invalidParameter("IVF adds keys in order: expected a range starting at \(count) within \(keys.count) keys, got \(range)")
        }
        guard range.upperBound <= Int(Int32.max) else { throw IndexError.invalidParameter("IVF holds at most \(Int32.max) keys") }
        guard !range.isEmpty else { return }
        var labels: [Int32]? = nil
        if !isTrained { labels = try train(keys: keys, range: range) }
        let assigned = labels ?? IVFIndex.assignKeys(keys, range: range, centroids: centroids, mean: mean, metric: metric, threads: threads)
        (offsets, ids) = IVFIndex.merge(offsets: offsets, ids: ids, lists: nlist, adding: assigned, firstID: range.lowerBound)
        count = range.upperBound
        progress?(range.count, range.count)
    }

    /// Trains mean and centroids on `range`; returns the range's labels when training saw every key.
    private func train(keys: VectorView, range: Range<Int>) throws -> [Int32]? {
        let n = range.count
        let lists = requestedNlist ?? IVFIndex.defaultNlist(for: n)
        guard lists <= n else { throw IndexError.invalidParameter("nlist \(lists) exceeds the \(n) keys to train on") }
        let mu = IVFIndex.meanKey(keys, range: range)
        let (train, all) = IVFIndex.trainingRows(keys, range: range, perCentroid: IVFIndex.maxPointsPerCentroid, k: lists, mean: mu, seed: seed)
        var options = KMeans.Options(k: lists, metric: metric, iterations: iterations, seed: seed, threads: threads)
        options.maxPointsPerCentroid = IVFIndex.maxPointsPerCentroid
        let result = try KMeans.train(train, dimension: dimension, options: options)
        mean = mu
        centroids = result.centroids
        nlist = lists
        return all ? result.labels : nil
    }

    /// CSR lists with `adding[j]` naming the list of key `firstID + j`; ids stay ascending per list.
    static func merge(offsets: [Int], ids: [Int32], lists: Int, adding labels: [Int32], firstID: Int) -> ([Int], [Int32]) {
        var newOffsets = [Int](repeating: 0, count: lists + 1)
        for l in 0..<lists { newOffsets[l + 1] = offsets.count > l + 1 ? offsets[l + 1] - offsets[l] : 0 }
        for l in labels { newOffsets[Int(l) + 1] += 1 }
        for l in 0..<lists { newOffsets[l + 1] += newOffsets[l] }
        var newIDs = [Int32](repeating: 0, count: newOffsets[lists])
        var cursor = [Int](repeating: 0, count: lists)
        newIDs.withUnsafeMutableBufferPointer { out in
            ids.withUnsafeBufferPointer { old in
                for l in 0..<lists {
                    var at = newOffsets[l]
                    if offsets.count > l + 1 {
                        for p in offsets[l]..<offsets[l + 1] { out[at] = old[p]; at += 1 }
                    }
                    cursor[l] = at
                }
            }
            for (j, l) in labels.enumerated() {
                out[cursor[Int(l)]] = Int32(firstID + j)
                cursor[Int(l)] += 1
            }
        }
        return (newOffsets, newIDs)
    }

    // MARK: Search

    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        let m = try validateSearch(queries, k: k, dimension: dimension, keys: keys)
        guard count > 0 else { throw IndexError.notBuilt("the IVF index is empty; add keys first") }
        guard keys.count >= count else {
            throw IndexError.corrupt("the index covers \(count) keys but the head holds \(keys.count)")
        }
        let nprobe = parameters.nprobe
        guard nprobe >= 1 else { throw IndexError.invalidParameter("nprobe must be at least 1 (got \(nprobe))") }
        guard nprobe <= nlist else { throw IndexError.invalidParameter("nprobe \(nprobe) exceeds nlist \(nlist)") }
        var results = SearchResults(k: k, queryCount: m)
        results.stats.keyCount = count
        results.stats.auxiliaryComputations = m * nlist
        guard m > 0 else { return results }
        let d = dimension, lists = nlist, qb = IVFIndex.queryBatch
        let batches = (m + qb - 1) / qb
        let workers = max(1, min(parameters.threads, batches))
        if workers > 1 { BLAS.setThreads(1) }
        var computations = [Int](repeating: 0, count: workers)
        let centroids = self.centroids, offsets = self.offsets, ids = self.ids
        results.ids.withUnsafeMutableBufferPointer { outIDs in
            results.scores.withUnsafeMutableBufferPointer { outScores in
                computations.withUnsafeMutableBufferPointer { work in
                    centroids.withUnsafeBufferPointer { cen in
                        offsets.withUnsafeBufferPointer { off in
                            ids.withUnsafeBufferPointer { listIDs in
                                DispatchQueue.concurrentPerform(iterations: workers) { t in
                                    let scores = UnsafeMutablePointer<Float>.allocate(capacity: qb * lists)
                                    defer { scores.deallocate() }
                                    var probe = RankedSelection(k: nprobe)
                                    var top = RankedSelection(k: k)
                                    var scanned = 0
                                    var b = t
                                    while b < batches {
                                        let lo = b * qb, rows = min(qb, m - lo)
                                        BLAS.scoresNT(m: rows, n: lists, k: d, a: queries.baseAddress! + lo * d,
                                                      b: cen.baseAddress!, c: scores)
                                        for r in 0..<rows {
                                            let q = lo + r
                                            probe.reset()
                                            probe.push(scores: scores + r * lists, count: lists)
                                            top.reset()
                                            scanned += IVFIndex.scan(query: queries.baseAddress! + q * d, lists: probe,
                                                                     offsets: off, ids: listIDs, keys: keys, into: &top)
                                            top.drain(ids: outIDs.baseAddress! + q * k, scores: outScores.baseAddress! + q * k)
                                        }
                                        b += workers
                                    }
                                    work[t] = scanned
                                }
                            }
                        }
                    }
                }
            }
        }
        results.stats.distanceComputations = computations.reduce(0, +)
        return results
    }

    /// Keys prefetched ahead of the one being scored.
    static let prefetchDistance = 8

    /// Scores every key of the selected lists into `top`; returns the keys scored. A second cursor
    /// runs `prefetchDistance` keys ahead (across list boundaries) and prefetches their rows, so
    /// the cache and TLB misses of these random reads overlap.
    @inline(__always)
    static func scan(query: UnsafePointer<Float>, lists: RankedSelection, offsets: UnsafeBufferPointer<Int>,
                     ids: UnsafeBufferPointer<Int32>, keys: VectorView, into top: inout RankedSelection) -> Int {
        let n = lists.count
        var aheadList = 0, ahead = 0, aheadEnd = 0
        @inline(__always) func prefetchNext() {
            while ahead == aheadEnd && aheadList < n {
                let l = Int(lists.id(at: aheadList))
                ahead = offsets[l]
                aheadEnd = offsets[l + 1]
                aheadList += 1
            }
            if ahead < aheadEnd {
                keys.prefetch(row: Int(ids[ahead]))
                ahead += 1
            }
        }
        for _ in 0..<prefetchDistance { prefetchNext() }
        var scanned = 0
        for j in 0..<n {
            let l = Int(lists.id(at: j))
            let lo = offsets[l], hi = offsets[l + 1]
            scanned += hi - lo
            for p in lo..<hi {
                prefetchNext()
                let id = ids[p]
                let s = keys.score(query: query, row: Int(id))
                if s >= top.threshold { top.push(s, id) }
            }
        }
        return scanned
    }

    /// The `nprobe` lists `query` probes, best first (the selection `search` makes for one query).
    public func probedLists(query: UnsafeBufferPointer<Float>, nprobe: Int) throws -> [Int] {
        guard query.count == dimension else { throw IndexError.dimensionMismatch(expected: dimension, actual: query.count) }
        guard nprobe >= 1 else { throw IndexError.invalidParameter("nprobe must be at least 1 (got \(nprobe))") }
        guard nprobe <= nlist else { throw IndexError.invalidParameter("nprobe \(nprobe) exceeds nlist \(nlist)") }
        var scores = [Float](repeating: 0, count: nlist)
        centroids.withUnsafeBufferPointer { cen in
            BLAS.scoresNT(m: 1, n: nlist, k: dimension, a: query.baseAddress!, b: cen.baseAddress!, c: &scores)
        }
        var probe = RankedSelection(k: nprobe)
        scores.withUnsafeBufferPointer { probe.push(scores: $0.baseAddress!, count: nlist) }
        var outIDs = [Int](repeating: -1, count: nprobe)
        var outScores = [Float](repeating: 0, count: nprobe)
        _ = probe.drain(ids: &outIDs, scores: &outScores)
        return outIDs
    }

    // MARK: Persistence

    public func sections() -> [String: [UInt8]] {
        var meta = ByteWriter()
        meta.write(UInt32(IVFIndex.formatVersion))
        for v in [dimension, count, requestedNlist ?? -1, nlist, iterations] { meta.write(Int64(v)) }
        meta.write(IVFIndex.metricCode(metric))
        meta.write(seed)
        var cen = ByteWriter()
        cen.write(array: mean)
        cen.write(array: centroids)
        var lists = ByteWriter()
        lists.write(array: offsets.map(Int64.init))
        lists.write(array: ids)
        return ["meta": meta.bytes, "centroids": cen.bytes, "lists": lists.bytes]
    }

    public convenience init(sections: [String: [UInt8]]) throws {
        guard let metaBytes = sections["meta"], let cenBytes = sections["centroids"], let listBytes = sections["lists"] else {
            throw IndexError.corrupt("IVF index lacks its meta, centroids or lists section")
        }
        var meta = ByteReader(metaBytes, context: "ivf meta")
        let version = Int(try meta.read(UInt32.self))
        guard version == IVFIndex.formatVersion else {
            throw IndexError.unsupportedVersion(found: version, supported: IVFIndex.formatVersion)
        }
        let v = try (0..<5).map { _ in try meta.read(Int64.self) }
        let metric = try IVFIndex.metric(code: try meta.read(UInt8.self))
        let seed = try meta.read(UInt64.self)
        guard meta.isAtEnd else { throw IndexError.corrupt("ivf meta has trailing bytes") }
        let (dimension, count, requested, nlist, iterations) = (v[0], v[1], v[2], v[3], v[4])
        guard (1...65536).contains(dimension), (0...Int64(Int32.max)).contains(count),
              requested == -1 || (1...Int64(Int32.max)).contains(requested),
              (0...max(count, 0)).contains(nlist), (nlist == 0) == (count == 0),
              (0...1_000_000).contains(iterations) else {
            throw IndexError.corrupt("IVF meta out of range (dimension \(dimension), count \(count), nlist \(nlist))")
        }
        try self.init(dimension: Int(dimension), nlist: requested == -1 ? nil : Int(requested), metric: metric,
                      iterations: Int(iterations), seed: seed)
        let d = Int(dimension), lists = Int(nlist), n = Int(count)
        var cen = ByteReader(cenBytes, context: "ivf centroids")
        let mean = try cen.readFloatArray()
        let centroids = try cen.readFloatArray()
        guard cen.isAtEnd, mean.count == (lists > 0 ? d : 0), centroids.count == lists * d,
              mean.allSatisfy(\.isFinite), centroids.allSatisfy(\.isFinite) else {
            throw IndexError.corrupt("IVF centroids do not match \(lists) lists of dimension \(d), or are not finite")
        }
        var listReader = ByteReader(listBytes, context: "ivf lists")
        let offsets = try listReader.readArray(Int64.self).map { Int(truncatingIfNeeded: $0) }
        let ids = try listReader.readArray(Int32.self)
        guard listReader.isAtEnd else { throw IndexError.corrupt("ivf lists have trailing bytes") }
        try IVFIndex.validateCSR(offsets: offsets, ids: ids, lists: lists, count: n, what: "IVF")
        self.count = n
        self.nlist = lists
        self.mean = mean
        self.centroids = centroids
        self.offsets = offsets
        self.ids = ids
    }
}

// MARK: - Shared by the clustered indexes (IVF, centroid tree)

extension IVFIndex {
    static func metricCode(_ metric: ClusterMetric) -> UInt8 { metric == .l2 ? 0 : 1 }

    static func metric(code: UInt8) throws -> ClusterMetric {
        switch code {
        case 0: return .l2
        case 1: return .ip
        default: throw IndexError.corrupt("unknown cluster metric code \(code)")
        }
    }

    /// Checks inverted lists read from disk: `lists + 1` non-decreasing offsets from 0 to `count`, and
    /// ids forming a permutation of 0..<count, so a damaged section can never send a scan out of bounds.
    static func validateCSR(offsets: [Int], ids: [Int32], lists: Int, count: Int, what: String) throws {
        guard offsets.count == lists + 1, offsets.first == 0, offsets.last == count, ids.count == count else {
            throw IndexError.corrupt("\(what) list offsets do not cover its \(count) keys in \(lists) lists")
        }
        for l in 0..<lists where offsets[l] > offsets[l + 1] {
            throw IndexError.corrupt("\(what) list \(l) has negative length")
        }
        var seen = [Bool](repeating: false, count: count)
        for id in ids {
            guard id >= 0, Int(id) < count, !seen[Int(id)] else {
                throw IndexError.corrupt("\(what) lists name key \(id) out of range or twice")
            }
            seen[Int(id)] = true
        }
    }

    /// Mean of keys `range`, accumulated in double precision.
    static func meanKey(_ keys: VectorView, range: Range<Int>) -> [Float] {
        let d = keys.dimension
        var sums = [Double](repeating: 0, count: d)
        let chunk = 4096
        let buffer = UnsafeMutablePointer<Float>.allocate(capacity: chunk * d)
        defer { buffer.deallocate() }
        var i = range.lowerBound
        while i < range.upperBound {
            let n = IVFIndex.decodeRun(keys, from: i, upTo: min(range.upperBound, i + chunk), into: buffer)
            for r in 0..<n {
                let row = buffer + r * d
                for t in 0..<d { sums[t] += Double(row[t]) }
            }
            i += n
        }
        let inv = 1 / Double(max(1, range.count))
        return sums.map { Float($0 * inv) }
    }

    /// Decodes rows `from..<upTo` (stopping early at no boundary: blocks are walked) as f32; returns the rows.
    static func decodeRun(_ keys: VectorView, from: Int, upTo: Int, into out: UnsafeMutablePointer<Float>) -> Int {
        var i = from
        while i < upTo {
            let take = min(keys.blockSize - i % keys.blockSize, upTo - i)
            keys.decodeRows(keys.row(i), count: take, into: out + (i - from) * keys.dimension)
            i += take
        }
        return upTo - from
    }

    /// Centred training rows for k-means: all of `range` when it holds at most `perCentroid * k` keys
    /// (`all` is then true and row j is key `range.lowerBound + j`), else a seeded sample of that size.
    static func trainingRows(_ keys: VectorView, range: Range<Int>, perCentroid: Int, k: Int, mean: [Float],
                      seed: UInt64) -> (rows: [Float], all: Bool) {
        let d = keys.dimension, n = range.count
        let m = min(n, perCentroid * k)
        var rows = [Float](repeating: 0, count: m * d)
        rows.withUnsafeMutableBufferPointer { out in
            if m == n {
                _ = IVFIndex.decodeRun(keys, from: range.lowerBound, upTo: range.upperBound, into: out.baseAddress!)
            } else {
                var rng = SeededGenerator(seed: seed ^ 0x5EED_5A3E_1E00_0000)
                for (j, i) in KMeans.sampleIndices(n: n, count: m, using: &rng).enumerated() {
                    keys.decodeRow(range.lowerBound + Int(i), into: out.baseAddress! + j * d)
                }
            }
            for r in 0..<m {
                for t in 0..<d { out[r * d + t] -= mean[t] }
            }
        }
        return (rows, m == n)
    }

    /// Labels keys `range` (centred by `mean`) with their cluster under `centroids`, in chunks.
    static func assignKeys(_ keys: VectorView, range: Range<Int>, centroids: [Float], mean: [Float], metric: ClusterMetric,
                    threads: Int) -> [Int32] {
        let d = keys.dimension
        var labels = [Int32](repeating: -1, count: range.count)
        let chunk = 16384
        var buffer = [Float](repeating: 0, count: min(chunk, range.count) * d)
        var chunkLabels: [Int32] = []
        var i = range.lowerBound
        while i < range.upperBound {
            let n = min(chunk, range.upperBound - i)
            buffer.withUnsafeMutableBufferPointer { out in
                _ = IVFIndex.decodeRun(keys, from: i, upTo: i + n, into: out.baseAddress!)
                for r in 0..<n {
                    for t in 0..<d { out[r * d + t] -= mean[t] }
                }
            }
            chunkLabels = [Int32](repeating: -1, count: n)
            buffer.withUnsafeBufferPointer { rows in
                _ = KMeans.assign(UnsafeBufferPointer(rebasing: rows[0..<(n * d)]), dimension: d, centroids: centroids,
                              metric: metric, threads: threads, labels: &chunkLabels)
            }
            for r in 0..<n { labels[i - range.lowerBound + r] = chunkLabels[r] }
            i += n
        }
        return labels
    }
}

/// The `k` best (score, id) pairs, in a binary min-heap over flat arrays whose root is the worst
/// kept pair (ties rank the lower id first, as `TopK`). Reused across queries: `reset` keeps the
/// storage, `drain` writes the pairs best first without allocating.
struct RankedSelection {
    let k: Int
    private(set) var count = 0
    private var scores: [Float]
    private var ids: [Int32]

    init(k: Int) {
        precondition(k > 0, "k must be positive")
        self.k = k
        scores = [Float](repeating: 0, count: k)
        ids = [Int32](repeating: 0, count: k)
    }

    @inline(__always) mutating func reset() { count = 0 }

    /// Score a candidate must reach to be considered; -inf while not full.
    @inline(__always) var threshold: Float { count < k ? -.infinity : scores[0] }

    /// Kept id `i` (heap order, not ranked).
    @inline(__always) func id(at i: Int) -> Int32 { ids[i] }

    /// Kept score `i` (heap order).
    @inline(__always) func score(at i: Int) -> Float { scores[i] }

    @inline(__always)
    static func worse(_ s1: Float, _ i1: Int32, _ s2: Float, _ i2: Int32) -> Bool { s1 < s2 || (s1 == s2 && i1 > i2) }

    @inline(__always)
    mutating func push(_ s: Float, _ id: Int32) {
        if count < k {
            var i = count
            count += 1
            scores[i] = s
            ids[i] = id
            while i > 0 {
                let p = (i - 1) / 2
                guard RankedSelection.worse(scores[i], ids[i], scores[p], ids[p]) else { break }
                scores.swapAt(i, p)
                ids.swapAt(i, p)
                i = p
            }
            return
        }
        guard RankedSelection.worse(scores[0], ids[0], s, id) else { return }
        scores[0] = s
        ids[0] = id
        siftDown()
    }

    /// Pushes `n` scores with ids 0..<n.
    @inline(__always)
    mutating func push(scores s: UnsafePointer<Float>, count n: Int) {
        for i in 0..<n where count < k || s[i] >= scores[0] { push(s[i], Int32(i)) }
    }

    private mutating func siftDown() {
        var i = 0
        while true {
            let l = 2 * i + 1
            if l >= count { return }
            var w = l
            if l + 1 < count && RankedSelection.worse(scores[l + 1], ids[l + 1], scores[l], ids[l]) { w = l + 1 }
            guard RankedSelection.worse(scores[w], ids[w], scores[i], ids[i]) else { return }
            scores.swapAt(i, w)
            ids.swapAt(i, w)
            i = w
        }
    }

    /// Writes the kept pairs best first to `ids`/`scores` and empties the selection; returns how many.
    @discardableResult
    mutating func drain(ids outIDs: UnsafeMutablePointer<Int>, scores outScores: UnsafeMutablePointer<Float>) -> Int {
        let n = count
        while count > 0 {
            outIDs[count - 1] = Int(ids[0])
            outScores[count - 1] = scores[0]
            count -= 1
            if count > 0 {
                scores[0] = scores[count]
                ids[0] = ids[count]
                siftDown()
            }
        }
        return n
    }
}
