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
