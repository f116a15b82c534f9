import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// The labels k-means gave the keys of `range` when training saw every one of them, kept for
/// the `add` of the same range (so it does not assign them again).
struct TrainedLabels {
    let range: Range<Int>
    let labels: [Int32]
}

/// What IVF and the centroid tree share, after faiss's `IndexIVF`: keys centred by a trained
/// mean, each in the inverted list of its nearest fine centroid with the code of its residual.
/// They differ in how the centroids are trained and how a query picks lists (`ListQuantizer`);
/// their settings, state and add pipeline (`addToLists`, faiss's `IndexIVF::add_core`) are here.
public class InvertedFileIndex: @unchecked Sendable {
    public let dimension: Int
    public internal(set) var count = 0
    public internal(set) var mapSnapshot: MapIdentity?
    public let metric: ClusterMetric
    public let iterations: Int
    public let seed: UInt64
    /// Threads for training and assignment.
    public var threads: Int
    /// Mean of the training keys (`dimension` floats; empty until trained).
    public internal(set) var mean: [Float] = []
    /// How lists code their keys.
    public let codeKind: ListCodeKind
    /// The trained codec (SQ8 ranges); nil until trained.
    var codec: ListCodec?
    /// One inverted list per fine centroid.
    public internal(set) var lists = InvertedLists(lists: 0)
    /// Labels of the keys `train` clustered when it saw every one of them, kept for the `add` of
    /// the same range (so the first add does not assign them again).
    var trainedLabels: TrainedLabels?

    init(dimension: Int, metric: ClusterMetric, iterations: Int, seed: UInt64, threads: Int, codes: ListCodeKind) throws {
        guard dimension >= 1 else { throw IndexError.invalidParameter("dimension must be at least 1 (got \(dimension))") }
        guard iterations >= 1 else { throw IndexError.invalidParameter("k-means iterations must be at least 1 (got \(iterations))") }
        self.dimension = dimension
        self.metric = metric
        self.iterations = iterations
        self.seed = seed
        self.threads = max(1, threads)
        self.codeKind = codes
    }

    // MARK: The stored lists

    /// Writes the codec (an empty one before training) and the lists.
    func writeCodedLists(to writer: inout ByteWriter) {
        (codec ?? ListCodec.train(codeKind, residuals: UnsafeBufferPointer(start: nil, count: 0), dimension: dimension))
            .write(to: &writer)
        lists.write(to: &writer)
    }

    /// Reads what `writeCodedLists` wrote, checked: the codec of the index's kind, `listCount`
    /// lists of `keyCount` keys. `what` names the index in errors ("IVF").
    func readCodedLists(from reader: inout ByteReader, listCount: Int, keyCount: Int, what: String) throws
        -> (codec: ListCodec, lists: InvertedLists) {
        let codec = try ListCodec.read(from: &reader, dimension: dimension, what: what)
        guard codec.kind == codeKind else {
            throw IndexError.corrupt("\(what) lists hold \(codec.kind.rawValue) codes, meta says \(codeKind.rawValue)")
        }
        return (codec, try InvertedLists.read(from: &reader, lists: listCount, keyCount: keyCount, codeSize: codec.codeSize, what: what))
    }

    /// Adopts state read from stored sections, once every section checked out (codes validated here).
    func restore(mean: [Float], codec: ListCodec, lists: InvertedLists, count: Int, snapshot: MapIdentity?, what: String) throws {
        try codec.validate(lists.codes, what: what)
        self.mean = mean
        self.codec = count > 0 ? codec : nil
        self.lists = lists
        self.count = count
        mapSnapshot = snapshot
    }
}

/// An inverted-file index kind: how it names itself, which centroids keys join, what it updates
/// after an add.
protocol ClusteredIndex: InvertedFileIndex, BuildableIndex {
    /// Names the index in errors ("the IVF index").
    static var indexName: String { get }
    /// The centroids keys are assigned to: one per list, `lists x dimension`, centred like the keys.
    var fineCentroids: [Float] { get }
    /// Called after keys were added (the tree recomputes its subtree sizes).
    func didAdd()
}

extension ClusteredIndex {
    func didAdd() {}

    /// The checks `train` starts with: the keys' dimension, not trained yet, a non-empty range
    /// within the keys.
    func checkTrain(keys: VectorView, range: Range<Int>) throws {
        guard keys.dimension == dimension else { throw IndexError.dimensionMismatch(expected: dimension, actual: keys.dimension) }
        guard !isTrained else { throw IndexError.invalidParameter("\(Self.indexName) is already trained") }
        guard !range.isEmpty, range.upperBound <= keys.count else {
            throw IndexError.invalidParameter("\(Self.indexName) trains on a non-empty range within \(keys.count) keys, got \(range)")
        }
    }

    /// Adds keys `range` (faiss's `add_core`): an untrained index trains on them first; each key
    /// goes to the list of its nearest fine centroid (the labels training gave, when it saw these
    /// very keys), with the code of its residual, the lists rebuilt in one pass.
    func addToLists(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)?) throws {
        try checkAdd(keys: keys, range: range, name: Self.indexName)
        guard range.upperBound <= Int(Int32.max) else { throw IndexError.invalidParameter("\(Self.indexName) holds at most \(Int32.max) keys") }
        guard !range.isEmpty else { return }
        if !isTrained { try train(keys: keys, range: range, queries: nil) }
        let labels = trainedLabels.flatMap { $0.range == range ? $0.labels : nil }
            ?? assignKeys(keys, range: range, centroids: fineCentroids, mean: mean, metric: metric, threads: threads)
        trainedLabels = nil
        let codes = encodeKeys(keys, range: range, labels: labels, centroids: fineCentroids, mean: mean, codec: codec!, threads: threads)
        lists.append(labels: labels, firstID: range.lowerBound, codes: codes)
        count = range.upperBound
        didAdd()
        progress?(range.count, range.count)
    }

    /// The one search preamble with the index's name.
    func checkSearch(_ queries: UnsafeBufferPointer<Float>, k: Int, keys: VectorView) throws -> Int {
        try checkSearch(queries, k: k, keys: keys, name: Self.indexName)
    }
}
