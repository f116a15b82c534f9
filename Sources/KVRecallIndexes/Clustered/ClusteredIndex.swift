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

/// IVF and the centroid tree, after faiss's `IndexIVF`: keys centred by a trained mean, each in
/// the inverted list of its nearest fine centroid, with a residual code. What differs is how the
/// centroids are trained and how a query picks lists (`ListQuantizer`); adding keys is one
/// pipeline (`addToLists`, faiss's `IndexIVF::add_core`).
protocol ClusteredIndex: BuildableIndex {
    /// Names the index in errors ("the IVF index").
    static var indexName: String { get }
    var count: Int { get set }
    var metric: ClusterMetric { get }
    var threads: Int { get }
    var mean: [Float] { get }
    var codec: ListCodec? { get }
    /// The centroids keys are assigned to: one per list, `lists x dimension`, centred like the keys.
    var fineCentroids: [Float] { get }
    var lists: InvertedLists { get set }
    var trainedLabels: TrainedLabels? { get set }
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
