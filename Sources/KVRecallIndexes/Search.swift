import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
/// Per-call search knobs, one typed struct per index family (faiss's `SearchParametersIVF`,
/// `SearchParametersHNSW`, ...); each index reads only its own struct and `threads`.
public struct SearchParameters: Sendable, Equatable {
    /// HNSW and the retrieval graph.
    public var graph = GraphSearchParameters()
    /// IVF.
    public var ivf = IVFSearchParameters()
    /// The centroid tree.
    public var tree = TreeSearchParameters()
    /// LSH.
    public var lsh = LSHSearchParameters()
    /// Landmark blocks.
    public var landmark = LandmarkSearchParameters()
    /// Threads to spread a query batch over.
    public var threads: Int = 1
    public init() {}

    /// Checks every knob (each index also checks its own at search time).
    public func validate() throws {
        try graph.validate(); try ivf.validate(); try tree.validate(); try lsh.validate(); try landmark.validate()
        guard threads >= 1 else { throw IndexError.invalidParameter("threads must be at least 1 (got \(threads))") }
    }
}

/// Graph beam search (HNSW, retrieval graph).
public struct GraphSearchParameters: Sendable, Equatable {
    /// Beam width used when neither the caller nor the index's calibration sets one.
    public static let defaultEf = 64
    /// Beam width set by the caller; nil leaves it to the index's calibration (`SearchCalibration`).
    public var efSetting: Int?
    /// Beam width (candidate list size). HNSW raises it to k when smaller; the retrieval graph keeps
    /// a beam that narrow and returns the best k of every key it scored.
    public var ef: Int {
        get { efSetting ?? Self.defaultEf }
        set { efSetting = newValue }
    }
    public init(ef: Int? = nil) { efSetting = ef }
    public func validate() throws {
        guard ef >= 1 else { throw IndexError.invalidParameter("ef must be at least 1") }
    }
}

/// Inverted-file probing.
public struct IVFSearchParameters: Sendable, Equatable {
    /// Lists probed when neither the caller nor the index's calibration sets it.
    public static let defaultNprobe = 8
    /// Lists probed as set by the caller; nil leaves it to the index's calibration.
    public var nprobeSetting: Int?
    /// Lists probed.
    public var nprobe: Int {
        get { nprobeSetting ?? Self.defaultNprobe }
        set { nprobeSetting = newValue }
    }
    /// Candidates (by list code score) re-ranked exactly per query; 0 picks 2k, fewer than k means k.
    public var rerank = 0
    public init(nprobe: Int? = nil) { nprobeSetting = nprobe }
    public func validate() throws {
        guard nprobe >= 1 else { throw IndexError.invalidParameter("nprobe must be at least 1 (got \(nprobe))") }
        guard rerank >= 0 else { throw IndexError.invalidParameter("rerank must be non-negative (got \(rerank))") }
    }
}

/// Centroid-tree descent.
public struct TreeSearchParameters: Sendable, Equatable {
    /// Clusters kept per level when neither the caller nor the index's calibration sets it.
    public static let defaultBeam = 8
    /// Clusters kept per level as set by the caller; nil leaves it to the index's calibration.
    public var beamSetting: Int?
    /// Clusters kept per level.
    public var beam: Int {
        get { beamSetting ?? Self.defaultBeam }
        set { beamSetting = newValue }
    }
    /// Candidates (by list code score) re-ranked exactly per query; 0 picks 2k, fewer than k means k.
    public var rerank = 0
    public init(beam: Int? = nil) { beamSetting = beam }
    public func validate() throws {
        guard beam >= 1 else { throw IndexError.invalidParameter("beam must be at least 1 (got \(beam))") }
        guard rerank >= 0 else { throw IndexError.invalidParameter("rerank must be non-negative (got \(rerank))") }
    }
}

/// LSH candidate filter.
public struct LSHSearchParameters: Sendable, Equatable {
    /// Collisions required when neither the caller nor the index's calibration sets them.
    public static let defaultMinCollisions = 2
    /// Collisions set by the caller; nil leaves them to the index's calibration (`SearchCalibration`).
    public var minCollisionsSetting: Int?
    /// Tables a key must collide in to be a candidate.
    public var minCollisions: Int {
        get { minCollisionsSetting ?? Self.defaultMinCollisions }
        set { minCollisionsSetting = newValue }
    }
    public init(minCollisions: Int? = nil) { minCollisionsSetting = minCollisions }
    public func validate() throws {
        guard minCollisions >= 1 else {
            throw IndexError.invalidParameter("min-collisions must be at least 1 (got \(minCollisions))")
        }
    }
}

/// Landmark block selection.
public struct LandmarkSearchParameters: Sendable, Equatable {
    /// Blocks kept (0 picks ceil(4k / block size)).
    public var blocks = 0
    /// Rank blocks by Quest's per-channel min/max upper bound instead of the mean key.
    public var bound = false
    public init(blocks: Int = 0, bound: Bool = false) { self.blocks = blocks; self.bound = bound }
    public func validate() throws {
        guard blocks >= 0 else { throw IndexError.invalidParameter("blocks must be non-negative (got \(blocks))") }
    }
}

/// What one search touched, summed over its queries.
public struct SearchStats: Sendable, Equatable {
    /// Query-key inner products computed (re-ranking and scanning), over all queries.
    public var distanceComputations = 0
    /// Other work: centroid or hash scores, over all queries.
    public var auxiliaryComputations = 0
    /// Queries searched.
    public var queries = 0
    /// Keys in the searched set.
    public var keyCount = 0

    public init(distanceComputations: Int = 0, auxiliaryComputations: Int = 0, queries: Int = 0, keyCount: Int = 0) {
        self.distanceComputations = distanceComputations
        self.auxiliaryComputations = auxiliaryComputations
        self.queries = queries
        self.keyCount = keyCount
    }

    /// Mean fraction of keys scored per query (DESIGN.md section 6: keys scanned).
    public var keysScannedFraction: Double {
        guard queries > 0, keyCount > 0 else { return 0 }
        return Double(distanceComputations) / Double(queries) / Double(keyCount)
    }

    public static func += (a: inout SearchStats, b: SearchStats) {
        a.distanceComputations += b.distanceComputations
        a.auxiliaryComputations += b.auxiliaryComputations
        a.queries += b.queries
        a.keyCount = max(a.keyCount, b.keyCount)
    }
}

/// Results of a batch search: `queryCount x k` ids and scores, row-major, best first per query.
/// Rows with fewer than `k` hits are padded with id -1 and score -inf.
public struct SearchResults: Sendable {
    public let k: Int
    public let queryCount: Int
    public var ids: [Int]
    public var scores: [Float]
    public var stats: SearchStats

    public init(k: Int, queryCount: Int) {
        self.k = k
        self.queryCount = queryCount
        ids = [Int](repeating: -1, count: k * queryCount)
        scores = [Float](repeating: -.infinity, count: k * queryCount)
        stats = SearchStats(queries: queryCount)
    }

    /// The hits of query `q`, best first, without padding.
    public func hits(_ q: Int) -> [(id: Int, score: Float)] {
        (0..<k).compactMap { j in ids[q * k + j] >= 0 ? (ids[q * k + j], scores[q * k + j]) : nil }
    }

    /// Writes the content of a selection as row `q`.
    mutating func store(_ top: TopK<Int>, query q: Int) {
        for (j, hit) in top.sorted().enumerated() {
            ids[q * k + j] = hit.id
            scores[q * k + j] = hit.score
        }
    }
}

/// The index abstraction (faiss's `Index` is the model): fixed dimension, vectors addressed by
/// position, batch search with per-call parameters and statistics. Indexes hold only their own
/// structure; the key vectors are read from the store's memory map through a `VectorView`
/// passed to each call, valid inside one read transaction.
public protocol VectorIndex {
    var kind: IndexKind { get }
    var dimension: Int { get }
    /// Keys indexed (positions 0..<count).
    var count: Int { get }
    /// Top-`k` by inner product for `queries` (`m x dimension`, row-major f32).
    func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                keys: VectorView) throws -> SearchResults
    /// Top-`k` of each query of one GQA group (`g x dimension`, row-major; same results layout as
    /// `search`). Graph indexes share the work (one walk reads each reached key once for every
    /// head); the default is the batched `search`.
    func searchGroup(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                     keys: VectorView) throws -> SearchResults
}

extension VectorIndex {
    public func searchGroup(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                            keys: VectorView) throws -> SearchResults {
        try search(queries, k: k, parameters: parameters, keys: keys)
    }
}

/// Validates a search call's shape against an index and its keys.
/// An index whose sections are views of a snapshot's map is valid only while a snapshot of the
/// same identity is open: the one the caller's keys come from (checked before a search or add).
package func checkIndexSnapshot(_ indexSnapshot: MapIdentity?, keys: VectorView) throws {
    if let indexSnapshot, indexSnapshot != keys.snapshot {
        throw IndexError.invalidParameter("""
            the index was loaded as views of another snapshot (\(indexSnapshot)) than the keys' \
            (\(keys.snapshot.map { "\($0)" } ?? "a heap copy, not a snapshot")): \
            load it in the snapshot that uses it, or with `copy: true` to keep it across snapshots
            """)
    }
}

extension BuildableIndex {
    /// The one search preamble: the keys are of the index's snapshot and dimension, the queries'
    /// shape and `k` are valid (`validateSearch`), the index holds keys, and the head holds at
    /// least the keys the index covers. `name` names the index in errors ("the IVF index").
    /// Returns the query count.
    package func checkSearch(_ queries: UnsafeBufferPointer<Float>, k: Int, keys: VectorView, name: String) throws -> Int {
        let m = try validateSearch(queries, k: k, dimension: dimension, keys: keys, indexSnapshot: mapSnapshot)
        guard count > 0, isTrained else { throw IndexError.notBuilt("\(name) is empty; add keys first") }
        guard keys.count >= count else {
            throw IndexError.corrupt("\(name) covers \(count) keys but the head holds \(keys.count)")
        }
        return m
    }

    /// The one add preamble: the keys are of the index's snapshot and dimension, and `range`
    /// continues the index (it starts at `count`) within the keys. `name` names the index in
    /// errors ("IVF").
    package func checkAdd(keys: VectorView, range: Range<Int>, name: String) throws {
        try checkIndexSnapshot(mapSnapshot, keys: keys)
        guard keys.dimension == dimension else { throw IndexError.dimensionMismatch(expected: dimension, actual: keys.dimension) }
        guard range.lowerBound == count, range.upperBound <= keys.count else {
            throw IndexError.invalidParameter(
                "\(name) adds keys in order: expected a range starting at \(count) within \(keys.count) keys, got \(range)")
        }
    }
}

package func validateSearch(_ queries: UnsafeBufferPointer<Float>, k: Int, dimension: Int, keys: VectorView,
                            indexSnapshot: MapIdentity? = nil) throws -> Int {
    try checkIndexSnapshot(indexSnapshot, keys: keys)
    guard keys.dimension == dimension else {
        throw IndexError.dimensionMismatch(expected: dimension, actual: keys.dimension)
    }
    guard queries.count % dimension == 0 else {
        throw IndexError.dimensionMismatch(expected: dimension, actual: queries.count)
    }
    guard k >= 1 else { throw IndexError.invalidParameter("k must be at least 1 (got \(k))") }
    guard k <= keys.count else {
        throw IndexError.invalidParameter("k = \(k) exceeds the \(keys.count) keys of head \(keys.info.id)")
    }
    return queries.count / dimension
}

/// Errors of index building and search.
public enum IndexError: Error, CustomStringConvertible, Equatable, Sendable {
    case dimensionMismatch(expected: Int, actual: Int)
    case invalidParameter(String)
    case notBuilt(String)
    case corrupt(String)
    case unsupportedVersion(found: Int, supported: Int)

    public var description: String {
        switch self {
        case .dimensionMismatch(let e, let a): return "dimension mismatch: the index has dimension \(e), the data \(a)"
        case .invalidParameter(let m): return "invalid parameter: \(m)"
        case .notBuilt(let m): return m
        case .corrupt(let m): return "corrupt index: \(m)"
        case .unsupportedVersion(let f, let s):
            return "index format version \(f) is not supported (this build reads version \(s)); rebuild the index"
        }
    }
}
