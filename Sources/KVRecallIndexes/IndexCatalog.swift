import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// An index built from a head's keys and persisted in the store. The life cycle is faiss's:
/// `train` (learn the structure: means, centroids, hyperplanes, the retrieval graph's training
/// queries), then `add` (index positions, incrementally), then `search`.
public protocol BuildableIndex: AnyObject, VectorIndex {
    /// The kind every instance has (the catalog checks a stored header against it).
    static var kind: IndexKind { get }
    /// Version of this index's on-disk sections; a reader refuses any other.
    static var formatVersion: Int { get }
    /// Restores an index from `sections()` output, refusing any damaged or inconsistent section.
    /// Large arrays stay views of `sections` (zero-copy; see `SectionArray`), so the index is
    /// valid while the sections are: inside the read transaction (of the same `mapIdentity`)
    /// that returned them, or as long as their owner lives.
    init(sections: IndexSections) throws
    /// The snapshot whose map this index's sections are views of (nil when built, or loaded as a
    /// copy). Search and add refuse keys of any other snapshot; the binding stays after the index
    /// grows (some arrays may still be views).
    var mapSnapshot: MapIdentity? { get }
    /// True once `train` ran (always for kinds that learn nothing).
    var isTrained: Bool { get }
    /// Learns what the index needs before adding, from keys `range` and, for the query-aware
    /// retrieval graph, from the head's prefill `queries` (ignored by the other kinds).
    func train(keys: VectorView, range: Range<Int>, queries: VectorView?) throws
    /// Adds keys `range` of `keys` (positions; `range.lowerBound` must equal `count`). An untrained
    /// index that can learn from keys alone trains on `range` first, so incremental callers need
    /// no separate first step.
    func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)?) throws
    /// The index as named binary sections (see `ByteWriter`).
    func sections() -> [String: [UInt8]]
    /// Makes room for `keys` keys in all, off the decode path (a build, a refresh), so one-key
    /// adds of the decode-time upkeep neither reallocate nor fault in fresh memory until the index
    /// holds that many: a graph's links doubling on a decode step stalled it 130 ms (4 MB+ copied
    /// into fresh huge pages). Kinds without large growing storage do nothing.
    func reserveCapacity(keys: Int)
}

extension BuildableIndex {
    public var kind: IndexKind { Self.kind }

    public func reserveCapacity(keys: Int) {}

    /// Restores an index from a copy of in-memory sections (`sections()` output).
    public init(sections: [String: [UInt8]]) throws {
        try self.init(sections: sections.mapValues { SectionBytes(copying: $0) })
    }
}

/// Reads section `name` of a stored index through one checked path: it must exist and `body`
/// must consume it exactly, so a missing, cut or lengthened section is `IndexError.corrupt`.
func readSection<T>(_ sections: IndexSections, _ name: String, of kind: IndexKind,
                    _ body: (inout ByteReader) throws -> T) throws -> T {
    guard let bytes = sections[name] else { throw IndexError.corrupt("\(kind.rawValue) index lacks its '\(name)' section") }
    var reader = ByteReader(bytes, context: "\(kind.rawValue) \(name)")
    let value: T
    do { value = try body(&reader) } catch let error as CorruptBytes { throw IndexError.corrupt(error.message) }
    guard reader.isAtEnd else {
        throw IndexError.corrupt("\(kind.rawValue) \(name) has \(bytes.count - reader.offset) trailing bytes")
    }
    return value
}

/// Runs `body` with views of in-memory sections (valid only inside it): validating what is about
/// to be written costs no copy of an index's bytes.
func withViews(of sections: [String: [UInt8]], _ body: (IndexSections) throws -> Void) throws {
    func view(_ rest: ArraySlice<(key: String, value: [UInt8])>, _ views: IndexSections) throws {
        guard let (name, bytes) = rest.first else { return try body(views) }
        try bytes.withUnsafeBytes { raw in
            var more = views
            more[name] = SectionBytes(view: raw, owner: nil)
            try view(rest.dropFirst(), more)
        }
    }
    try view(ArraySlice(sections.sorted { $0.key < $1.key }), [:])
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
    /// IVF and tree: how the lists keep their keys' residual codes (SQ8: d bytes per key; f16: 2d).
    public var listCodes: ListCodeKind = .sq8
    /// LSH: tables (L) and bits per table (K). MagicPIG uses K=10, L=150.
    public var tables = 150
    public var bits = 10
    /// Retrieval graph: degree cap, exact neighbours per training query, training queries given exact top keys.
    public var graphDegree = 128
    public var queryNeighbours = 100
    public var trainingQueries = 4096
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

    /// Checks every knob; the one rule the CLI, the REPL, the session and the index types share.
    public func validate() throws {
        func check(_ ok: Bool, _ message: @autoclosure () -> String) throws {
            if !ok { throw IndexError.invalidParameter(message()) }
        }
        try check((2...1024).contains(M), "M must be in 2...1024 (got \(M))")
        try check(efConstruction >= 1, "ef-construction must be at least 1 (got \(efConstruction))")
        if let nlist { try check(nlist >= 1, "nlist must be at least 1 (got \(nlist))") }
        try check(iterations >= 1, "k-means iterations must be at least 1 (got \(iterations))")
        try check((1...1024).contains(tables), "tables must be in 1...1024 (got \(tables))")
        try check((1...16).contains(bits), "bits must be in 1...16 (got \(bits))")
        try check((2...1024).contains(graphDegree), "graph degree must be in 2...1024 (got \(graphDegree))")
        try check(queryNeighbours >= 2, "query neighbours must be at least 2 (got \(queryNeighbours))")
        try check(trainingQueries >= 1, "training queries must be at least 1 (got \(trainingQueries))")
        try check((0...255).contains(localNeighbours), "local neighbours must be in 0...255 (got \(localNeighbours))")
        try check((0...255).contains(connectivitySlots), "connectivity slots must be in 0...255 (got \(connectivitySlots))")
        try check(landmarkBlockSize >= 1, "landmark block size must be at least 1 (got \(landmarkBlockSize))")
        try check((2...32).contains(levels), "levels must be in 2...32 (got \(levels))")
        try check(fineFraction > 0 && fineFraction <= 1, "fine fraction must be in (0, 1] (got \(fineFraction))")
        try check(threads >= 1, "threads must be at least 1 (got \(threads))")
    }
}


/// Loads and saves indexes by kind.
public enum IndexCatalog {
    /// Section holding the kind's format version (u32) and its name: the one header every stored index has.
    static let headerSection = "header"

    /// Persists `index` as index `name` (default: its kind) of head `id`, replacing any earlier one, in one
    /// transaction, with the search knob calibrated for it, if any.
    public static func save<T: BuildableIndex>(_ index: T, in store: KVStore, head id: HeadID, name: String? = nil,
                                               calibration: SearchCalibration? = nil) throws {
        var sections = index.sections()
        if let calibration { sections[calibrationSection] = try calibration.encoded() }
        var header = ByteWriter()
        header.write(UInt32(T.formatVersion))
        header.write(array: Array(T.kind.rawValue.utf8))
        sections[headerSection] = header.bytes
        // Validated once when written: what is stored is what a reader accepts (read in place, no copy).
        try withViews(of: sections) { _ = try T(sections: $0) }
        // The coverage record lets `info`, a query and a resumed session see which keys the index holds.
        try store.saveIndex(id, name: name ?? T.kind.rawValue, sections: sections, covering: index.count)
    }

    /// Restores index `name` of head `id` as type `T`: the header must name `T`'s kind and format
    /// version, then `T` validates its sections (once: the index keeps views of them).
    public static func load<T: BuildableIndex>(_ type: T.Type, from sections: IndexSections?, head id: HeadID, name: String) throws -> T {
        guard let sections else {
            throw IndexError.notBuilt("no '\(name)' index for head \(id); build it first with `kvrecall build --index \(name)`")
        }
        let (version, kind) = try readSection(sections, headerSection, of: T.kind) { reader -> (Int, String) in
            let version = Int(try reader.read(UInt32.self))
            let name = try reader.readArray(UInt8.self, maxCount: 64)
            return (version, String(decoding: name, as: UTF8.self))
        }
        guard kind == T.kind.rawValue else {
            throw IndexError.corrupt("index '\(name)' of head \(id) holds a '\(kind)' index, not '\(T.kind.rawValue)'")
        }
        guard version == T.formatVersion else { throw IndexError.unsupportedVersion(found: version, supported: T.formatVersion) }
        return try T(sections: sections)
    }
}

/// Every kind of index: the six `kvrecall build` stores, exact `flat`, and `hip` (a selector
/// that needs no index).
public enum IndexKind: String, CaseIterable, Sendable {
    case hnsw, ivf, lsh, tree
    /// RetrievalAttention's query-aware graph, trained on the head's prefill queries.
    case retrieval
    /// Landmark attention's block representatives (mean key, and min/max for Quest's bound).
    case landmark
    /// Exact search over every key.
    case flat
    /// HiP's hierarchical chunk pruning (no stored structure).
    case hip
}

extension IndexCatalog {
    /// An empty index of `kind` for `dimension`, configured by `parameters` for a head of `count` keys.
    public static func make(_ kind: IndexKind, dimension: Int, count: Int, parameters p: IndexBuildParameters) throws -> any BuildableIndex {
        try p.validate()
        guard let descriptor = kind.descriptor else {
            throw IndexError.invalidParameter("'\(kind.rawValue)' is not a stored index kind (one of \(IndexKind.stored.map(\.rawValue).joined(separator: ", ")))")
        }
        return try descriptor.make(dimension, count, p)
    }

    /// Builds `kind` over keys `0..<count` of a view (all of them by default; inside its read
    /// transaction): `train` then `add`, the one build path of the CLI, the planner and the session.
    /// The retrieval graph trains on `queries` (the head's prefill queries); the other kinds ignore them.
    public static func build(_ kind: IndexKind, keys: VectorView, count: Int? = nil, queries: VectorView? = nil,
                             parameters: IndexBuildParameters, progress: ((Int, Int) -> Void)? = nil) throws -> any BuildableIndex {
        let count = min(count ?? keys.count, keys.count)
        guard count > 0 else { throw IndexError.invalidParameter("head \(keys.info.id) has no keys to index") }
        let indexed = keys.limited(to: count)
        let index = try make(kind, dimension: keys.dimension, count: count, parameters: parameters)
        try index.train(keys: indexed, range: 0..<count, queries: queries)
        try index.add(keys: indexed, range: 0..<count, progress: progress)
        return index
    }

    /// Restores index `name` from in-memory sections (a copy of them).
    public static func load<T: BuildableIndex>(_ type: T.Type, from sections: [String: [UInt8]]?, head id: HeadID, name: String) throws -> T {
        try load(type, from: sections?.mapValues { SectionBytes(copying: $0) }, head: id, name: name)
    }

    /// Loads index `kind` of head `id` inside a snapshot, as views of the map (valid while a
    /// snapshot of the same `mapIdentity` is open) or, with `copy`, as a copy that owns its bytes
    /// (for a caller that keeps the index across its own writes, as a session does).
    public static func load(_ kind: IndexKind, snapshot: StoreSnapshot, head id: HeadID, copy: Bool = false) throws -> any BuildableIndex {
        guard let type = kind.type else { throw IndexError.invalidParameter("'\(kind.rawValue)' is not a stored index kind") }
        return try load(type, from: try snapshot.index(id, name: kind.rawValue, copy: copy), head: id, name: kind.rawValue)
    }

    /// Bytes an index occupies (sum of its sections).
    public static func byteSize(_ index: any BuildableIndex) -> Int {
        index.sections().values.reduce(0) { $0 + $1.count }
    }
}
