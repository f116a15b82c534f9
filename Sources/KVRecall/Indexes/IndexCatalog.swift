import Foundation

/// An index built from a head's keys and persisted in the store.
public protocol BuildableIndex: AnyObject, VectorIndex {
    /// Version of this index's on-disk sections; a reader refuses any other.
    static var formatVersion: Int { get }
    /// Restores an index from `sections()` output.
    init(sections: [String: [UInt8]]) throws
    /// Adds keys `range` of `keys` (positions; `range.lowerBound` must equal `count`): incremental add.
    func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)?) throws
    /// The index as named binary sections (see `ByteWriter`).
    func sections() -> [String: [UInt8]]
}

/// How an index is built. Names follow faiss and hnswlib.
public struct IndexBuildParameters: Sendable {
    /// HNSW: neighbours per node on upper layers (2M on layer 0).
    public var M = 16
    /// HNSW: candidate list size while inserting.
    public var efConstruction = 200
    /// IVF: number of clusters; nil picks 4 sqrt(N).
    public var nlist: Int? = nil
    /// k-means iterations (IVF, centroid tree).
    public var iterations = 20
    /// k-means and list assignment by inner product or by L2 distance.
    public var clusterMetric: ClusterMetric = .l2
    /// LSH: tables (L) and bits per table (K). MagicPIG uses K=10, L=150.
    public var tables = 150
    public var bits = 10
    /// Retrieval graph: degree cap, exact neighbours per training query, training queries used.
    public var graphDegree = 48
    public var queryNeighbours = 100
    public var trainingQueries = 8192
    public var localNeighbours = 8
    /// Landmark: positions per block.
    public var landmarkBlockSize = 64
    public var connectivitySlots = 2
    /// Centroid tree: levels (2+), and fine centroids as a fraction of N (Squeezed Attention: 5%).
    public var levels = 2
    public var fineFraction = 0.05
    public var seed: UInt64 = 42
    /// Threads for the build.
    public var threads = 2
    public init() {}
}

/// How k-means compares a key with a centroid.
public enum ClusterMetric: String, Sendable, CaseIterable {
    case l2, ip
}

/// Loads and saves indexes by kind name.
public enum IndexCatalog {
    /// Section holding the kind name and the kind's format version.
    static let headerSection = "header"

    /// Persists `index` as index `name` of head `id` (replacing any earlier one) in one transaction.
    public static func save(_ index: some BuildableIndex, kindVersion: Int, in store: KVStore, head id: HeadID, name: String? = nil) throws {
        var sections = index.sections()
        var header = ByteWriter()
        header.write(UInt32(kindVersion))
        header.write(array: Array(index.kind.utf8))
        sections[headerSection] = header.bytes
        try store.saveIndex(id, name: name ?? index.kind, sections: sections)
    }

    /// Restores index `name` of head `id` as type `T`, checking kind and version.
    public static func load<T: BuildableIndex>(_ type: T.Type, from sections: [String: [UInt8]]?, head id: HeadID, name: String) throws -> T {
        guard let sections else {
            throw IndexError.notBuilt("no '\(name)' index for head \(id); build it first with `kvrecall build --index \(name)`")
        }
        guard let raw = sections[headerSection] else { throw IndexError.corrupt("index '\(name)' has no header") }
        var reader = ByteReader(raw, context: "index '\(name)' header")
        let version = Int(try reader.read(UInt32.self))
        guard version == T.formatVersion else { throw IndexError.unsupportedVersion(found: version, supported: T.formatVersion) }
        return try T(sections: sections)
    }
}

/// The index kinds `kvrecall build` knows.
public enum IndexKind: String, CaseIterable, Sendable {
    case hnsw, ivf, lsh, tree
    /// RetrievalAttention's query-aware graph, trained on the head's prefill queries.
    case retrieval
    /// Landmark attention's block representatives (mean key, and min/max for Quest's bound).
    case landmark

    var type: any BuildableIndex.Type {
        switch self {
        case .hnsw: return HNSWIndex.self
        case .lsh: return LSHIndex.self
        case .retrieval: return RetrievalGraphIndex.self
        case .landmark: return LandmarkIndex.self
        case .ivf: return IVFIndex.self
        case .tree: return CentroidTreeIndex.self
        }
    }
}

extension IndexCatalog {
    /// An empty index of `kind` for `dimension`, configured by `parameters` for a head of `count` keys.
    public static func make(_ kind: IndexKind, dimension: Int, count: Int, parameters p: IndexBuildParameters) throws -> any BuildableIndex {
        switch kind {
        case .hnsw:
            return try HNSWIndex(dimension: dimension, M: p.M, efConstruction: p.efConstruction, seed: p.seed, threads: p.threads)
        case .lsh:
            return try LSHIndex(dimension: dimension, tables: p.tables, bits: p.bits, seed: p.seed, threads: p.threads)
        case .retrieval:
            return try RetrievalGraphIndex(dimension: dimension, M: p.graphDegree, queryNeighbours: p.queryNeighbours,
                                           maxTrainingQueries: p.trainingQueries, efConstruction: min(p.efConstruction, 64),
                                           connectivitySlots: p.connectivitySlots, localNeighbours: p.localNeighbours,
                                           threads: p.threads)
        case .landmark:
            return try LandmarkIndex(dimension: dimension, blockSize: p.landmarkBlockSize)
        case .ivf:
            return try IVFIndex(dimension: dimension, parameters: p)
        case .tree:
            return try CentroidTreeIndex(dimension: dimension, parameters: p)
        }
    }

    /// Builds `kind` over all keys of a view (inside its read transaction). The retrieval graph
    /// also needs the head's prefill `queries`.
    public static func build(_ kind: IndexKind, keys: VectorView, queries: VectorView? = nil, parameters: IndexBuildParameters,
                             progress: ((Int, Int) -> Void)? = nil) throws -> any BuildableIndex {
        guard keys.count > 0 else { throw IndexError.invalidParameter("head \(keys.info.id) has no keys to index") }
        let index = try make(kind, dimension: keys.dimension, count: keys.count, parameters: parameters)
        if let graph = index as? RetrievalGraphIndex {
            guard let queries else { throw IndexError.notBuilt("the retrieval index is built from prefill queries; none were given") }
            try graph.build(keys: keys, queries: queries, progress: progress)
        } else {
            try index.add(keys: keys, range: 0..<keys.count, progress: progress)
        }
        return index
    }

    /// Persists any index under its kind name.
    public static func save(_ index: any BuildableIndex, in store: KVStore, head id: HeadID) throws {
        try saveOpened(index, store: store, head: id)
    }

    private static func saveOpened<T: BuildableIndex>(_ index: T, store: KVStore, head id: HeadID) throws {
        try save(index, kindVersion: T.formatVersion, in: store, head: id)
    }

    /// Loads index `kind` of head `id` inside a snapshot.
    public static func load(_ kind: IndexKind, snapshot: StoreSnapshot, head id: HeadID) throws -> any BuildableIndex {
        try load(kind.type, from: try snapshot.index(id, name: kind.rawValue), head: id, name: kind.rawValue)
    }

    /// Bytes an index occupies (sum of its sections).
    public static func byteSize(_ index: any BuildableIndex) -> Int {
        index.sections().values.reduce(0) { $0 + $1.count }
    }
}
