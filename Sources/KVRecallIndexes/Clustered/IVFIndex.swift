import CKernels
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// Inverted-file index (faiss IndexIVFScalarQuantizer by residual, plus an exact re-rank):
/// k-means centroids over the keys centred by their mean, one inverted list per centroid holding
/// its key positions and, contiguously, their residual codes (SQ8 by default, or f16); a probed
/// list is scanned sequentially by the C kernels and the best candidates are re-ranked exactly
/// from the store's memory map.
///
/// - Centring: keys are clustered as k - mu (mu = mean of the training keys, stored).
///   For a query, q·(k - mu) = q·k - q·mu ranks keys exactly like q·k, but the clusters follow the
///   keys' spread instead of being dominated by their common offset, which is large in LLM keys.
/// - Probing is by inner product q·c for both cluster metrics. A centroid is the mean of its
///   (centred) keys, so q·c is the mean score of the list's keys (minus the constant q·mu): the
///   quantity an inner-product search wants to rank lists by. Probing by L2 distance would rank
///   lists by how close they are to q, which for out-of-distribution decode queries — far from the
///   key cloud — says little about their scores. `clusterMetric` therefore only decides how keys
///   are grouped (`.l2`: Lloyd; `.ip`: spherical, by direction) and how added keys join a list.
/// - Lists are `InvertedLists` (CSR, Int32 ids ascending within a list, codes in the same order),
///   rebuilt in one pass on each add; no per-vector allocation. Search is the shared batched
///   driver with a `FlatQuantizer` (every centroid scored, the nprobe best lists scanned).
/// - Codes: residual r = k - mean - centroid, so q·k = q·mean + q·centroid + q·r and the list's
///   q·centroid is added to its codes' scores. SQ8 ranges are the per-dimension min and max of
///   the training residuals (later keys outside them are clamped; the re-rank repairs the order).
///   Memory per key: d bytes of code + 4 of id (SQ8; 2d + 4 for f16), against 2d or 4d for the keys.
/// - `train` runs two-level k-means (sqrt(nlist) groups, each split; restricted refinement; two
///   full Lloyd passes) on at most 256 keys per centroid (seeded); an untrained index trains on
///   the range of its first `add`. Adds put each new key in the list of its nearest centroid, and
///   the centroids stay.
/// - Scan (SQ8): the query's prepared vector is quantized to int8 with one scale, so a code's
///   score is one exact integer dot product (u8 x s8: two VPDPBUSD per key at d = 128 on AVX-512
///   VNNI); the added rounding is repaired by the exact re-rank (recall at equal nprobe unchanged on
///   the synthetic heads). Lists are scanned best first; candidates are selected by quickselect.
/// - Only the re-ranked candidates (2k by default) are read at random positions of the map;
///   reading every probed key there cost a cache and TLB miss each (0.30x faiss IVFFlat's QPS).
/// - Searches may run concurrently with each other, not with `add`.
public final class IVFIndex: InvertedFileIndex, BuildableIndex, ClusteredIndex, @unchecked Sendable {
    public static let kind = IndexKind.ivf
    /// 2: lists carry residual codes (version 1 lists held only ids: rebuild).
    public static let formatVersion = 3
    /// Training keys per centroid at most (faiss's default).
    public static let maxPointsPerCentroid = 256
    /// Full Lloyd passes after two-level k-means (`KMeans.trainTwoLevel`): on the synthetic 128K
    /// heads (seed 0, and held-out seed 1) two bring recall@100 at equal keys scanned back to that
    /// of 20 full passes from k-means++, in a fifth of the time (12.4 s -> 2.5 s per head).
    public static let fullKMeansPasses = 2

    /// Lists asked for; nil picks `defaultNlist` of the first add's key count.
    public let requestedNlist: Int?
    /// Lists in the trained index (0 until the first add).
    public private(set) var nlist = 0
    /// `nlist x dimension` centroids of the centred keys, row-major.
    public private(set) var centroids: [Float] = []
    static let indexName = "the IVF index"
    var fineCentroids: [Float] { centroids }

    public init(dimension: Int, nlist: Int? = nil, metric: ClusterMetric = .l2, iterations: Int = 20,
                seed: UInt64 = 42, threads: Int = 2, codes: ListCodeKind = .sq8) throws {
        if let nlist, nlist < 1 { throw IndexError.invalidParameter("nlist must be at least 1 (got \(nlist))") }
        requestedNlist = nlist
        try super.init(dimension: dimension, metric: metric, iterations: iterations, seed: seed, threads: threads, codes: codes)
    }

    public convenience init(dimension: Int, parameters: IndexBuildParameters) throws {
        try self.init(dimension: dimension, nlist: parameters.nlist, metric: parameters.clusterMetric,
                      iterations: parameters.iterations, seed: parameters.seed, threads: parameters.threads,
                      codes: parameters.listCodes)
    }

    /// 4 sqrt(N), clamped to [1, N].
    public static func defaultNlist(for n: Int) -> Int {
        max(1, min(n, Int((4 * Double(n).squareRoot()).rounded())))
    }

    public var isTrained: Bool { nlist > 0 }

    /// Keys in each list.
    public var listSizes: [Int] { lists.sizes }

    /// Positions of the keys in list `l`, ascending.
    public func list(_ l: Int) -> Slice<SectionArray<Int32>> { lists.list(l) }

    /// Bytes the lists hold per key: code plus id.
    public var bytesPerKey: Int { codeKind.codeSize(dimension: dimension) + MemoryLayout<Int32>.size }

    // MARK: Build

    /// Trains mean and centroids on keys `range` (k-means on at most 256 keys per centroid, seeded).
    public func train(keys: VectorView, range: Range<Int>, queries: VectorView? = nil) throws {
        try checkTrain(keys: keys, range: range)
        let n = range.count
        let lists = requestedNlist ?? IVFIndex.defaultNlist(for: n)
        guard lists <= n else { throw IndexError.invalidParameter("nlist \(lists) exceeds the \(n) keys to train on") }
        let mu = meanKey(keys, range: range)
        let (train, all) = trainingRows(keys, range: range, perCentroid: IVFIndex.maxPointsPerCentroid, k: lists, mean: mu, seed: seed)
        var options = KMeans.Options(k: lists, metric: metric, iterations: iterations, seed: seed, threads: threads)
        options.maxPointsPerCentroid = IVFIndex.maxPointsPerCentroid
        let result = try KMeans.trainTwoLevel(train, dimension: dimension, options: options,
                                              fullPasses: IVFIndex.fullKMeansPasses)
        let residuals = trainingResiduals(train, labels: result.labels, centroids: result.centroids, dimension: dimension)
        let trained = residuals.withUnsafeBufferPointer { ListCodec.train(codeKind, residuals: $0, dimension: dimension) }
        mean = mu
        centroids = result.centroids
        nlist = lists
        codec = trained
        self.lists = InvertedLists(lists: lists, codeSize: trained.codeSize)
        trainedLabels = all ? TrainedLabels(range: range, labels: result.labels) : nil
    }

    public func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)? = nil) throws {
        try addToLists(keys: keys, range: range, progress: progress)
    }

    // MARK: Search

    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        let m = try checkSearch(queries, k: k, keys: keys)
        let nprobe = parameters.ivf.nprobe
        try parameters.ivf.validate()
        guard nprobe <= nlist else { throw IndexError.invalidParameter("nprobe \(nprobe) exceeds nlist \(nlist)") }
        return searchInvertedLists(queries, queryCount: m, k: k, dimension: dimension, threads: parameters.threads,
                                   quantizer: FlatQuantizer(coarse: centroids, coarseCount: nlist, maxSelected: nprobe),
                                   coded: CodedLists(lists: lists, codec: codec!, centroids: centroids),
                                   rerank: parameters.ivf.rerank, keys: keys)
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
        var probe = TopK<Int32>(k: nprobe)
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
        meta.write(metric.code)
        meta.write(seed)
        meta.write(codeKind.code)
        var cen = ByteWriter()
        cen.write(array: mean)
        cen.write(array: centroids)
        var lists = ByteWriter()
        writeCodedLists(to: &lists)
        return ["meta": meta.bytes, "centroids": cen.bytes, "lists": lists.bytes]
    }

    public convenience init(sections: IndexSections) throws {
        let (v, metric, seed, codeKind) = try readSection(sections, "meta", of: .ivf) { meta -> ([Int64], ClusterMetric, UInt64, ListCodeKind) in
            let version = Int(try meta.read(UInt32.self))
            guard version == IVFIndex.formatVersion else {
                throw IndexError.unsupportedVersion(found: version, supported: IVFIndex.formatVersion)
            }
            let v = try (0..<5).map { _ in try meta.read(Int64.self) }
            return (v, try ClusterMetric(code: try meta.read(UInt8.self)), try meta.read(UInt64.self),
                    try ListCodeKind(code: try meta.read(UInt8.self)))
        }
        let (dimension, count, requested, nlist, iterations) = (v[0], v[1], v[2], v[3], v[4])
        guard (1...65536).contains(dimension), (0...Int64(Int32.max)).contains(count),
              requested == -1 || (1...Int64(Int32.max)).contains(requested),
              (0...max(count, 0)).contains(nlist), (nlist == 0) == (count == 0),
              (1...1_000_000).contains(iterations) else {
            throw IndexError.corrupt("IVF meta out of range (dimension \(dimension), count \(count), nlist \(nlist))")
        }
        try self.init(dimension: Int(dimension), nlist: requested == -1 ? nil : Int(requested), metric: metric,
                      iterations: Int(iterations), seed: seed, codes: codeKind)
        let d = Int(dimension), lists = Int(nlist), n = Int(count)
        let (mean, centroids) = try readSection(sections, "centroids", of: .ivf) { try ($0.readFloatArray(), $0.readFloatArray()) }
        guard mean.count == (lists > 0 ? d : 0), centroids.count == lists * d,
              mean.allSatisfy(\.isFinite), centroids.allSatisfy(\.isFinite) else {
            throw IndexError.corrupt("IVF centroids do not match \(lists) lists of dimension \(d), or are not finite")
        }
        let stored = try readSection(sections, "lists", of: .ivf) { try readCodedLists(from: &$0, listCount: lists, keyCount: n, what: "IVF") }
        self.nlist = lists
        self.centroids = centroids
        try restore(mean: mean, codec: stored.codec, lists: stored.lists, count: n, snapshot: sections.mapSnapshot, what: "IVF")
    }
}

/// IVF's quantizer: every centroid scored, the `maxSelected` best lists probed.
struct FlatQuantizer: ListQuantizer {
    let coarse: [Float]
    let coarseCount: Int
    let maxSelected: Int

    static var keepsCentroidScores: Bool { true }

    /// Every centroid's pair key, the `maxSelected` best kept by quickselect, then sorted: O(nlist)
    /// branch-free work instead of a heap fed in random order.
    @inline(__always)
    func selectOrdered(query: UnsafePointer<Float>, coarseScores: UnsafeMutablePointer<Float>,
                       selected: inout TopK<Int32>, into order: UnsafeMutablePointer<UInt64>,
                       scratch: Void) -> (count: Int, scored: Int) {
        for j in 0..<coarseCount { order[j] = kvr_pair_key(coarseScores[j], Int32(truncatingIfNeeded: j)) }
        let n = min(maxSelected, coarseCount)
        _ = kvr_select_u64(order, coarseCount, n)
        kvr_sort_u64(order, n)
        return (n, 0)
    }

    func makeScratch() {}
    func release(_ scratch: Void) {}

    @inline(__always)
    func select(query: UnsafePointer<Float>, coarseScores: UnsafeMutablePointer<Float>,
                into selected: inout TopK<Int32>, scratch: Void) -> Int {
        selected.push(scores: coarseScores, count: coarseCount)
        return 0
    }
}

extension IVFIndex {
    /// IVF's entry in the catalog: nlist k-means lists, nprobe probed at search.
    public static let descriptor = IndexDescriptor(
        kind: .ivf, type: IVFIndex.self, knob: .nprobe,
        make: { d, _, p in try IVFIndex(dimension: d, parameters: p) },
        ladder: { index, _ in Calibrator.clusterLadder(widest: (index as? IVFIndex)?.nlist ?? 1) },
        describe: { "nprobe \($0.ivf.nprobe)" })
}
