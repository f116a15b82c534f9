import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// What the engine knows about one stored index kind, in one place: its type, how one is made
/// from build parameters, the search knob that trades recall for cost with the ladder calibration
/// climbs, and how that knob reads in a report. Each kind's file defines its own descriptor
/// (`HNSWIndex.descriptor`, ...); `IndexCatalog.descriptors` lists them, and the catalog, the
/// calibration, the session and the CLI ask it instead of switching over kinds.
///
/// The attention methods that read a kind (C values, names) are rows of `AttentionMethod.table`.
public struct IndexDescriptor: Sendable {
    public let kind: IndexKind
    /// The stored type (restored from sections by the catalog).
    public let type: any BuildableIndex.Type
    /// An empty index for `dimension`-wide keys of a head of `count` keys (parameters validated).
    public let make: @Sendable (_ dimension: Int, _ count: Int, _ parameters: IndexBuildParameters) throws -> any BuildableIndex
    /// The knob calibration sets on held-out queries (nil: the kind has none to calibrate).
    public let knob: SearchKnob?
    /// The knob's candidate values for a built index and k, in order of rising recall (empty
    /// without a knob): ascending for ef, nprobe and beam, descending for LSH's min-collisions.
    public let ladder: @Sendable (_ index: any VectorIndex, _ k: Int) -> [Int]
    /// The search parameters this kind reads, in words ("ef 64", "min collisions 2").
    public let describe: @Sendable (SearchParameters) -> String

    public init(kind: IndexKind, type: any BuildableIndex.Type, knob: SearchKnob?,
                make: @escaping @Sendable (Int, Int, IndexBuildParameters) throws -> any BuildableIndex,
                ladder: @escaping @Sendable (any VectorIndex, Int) -> [Int] = { _, _ in [] },
                describe: @escaping @Sendable (SearchParameters) -> String) {
        self.kind = kind
        self.type = type
        self.knob = knob
        self.make = make
        self.ladder = ladder
        self.describe = describe
    }
}

extension IndexCatalog {
    /// Every stored kind's descriptor, in the CLI's order. A new kind is its file (type and
    /// descriptor), a case of `IndexKind` and a line here.
    public static let descriptors: [IndexDescriptor] = [
        HNSWIndex.descriptor, IVFIndex.descriptor, LSHIndex.descriptor, CentroidTreeIndex.descriptor,
        RetrievalGraphIndex.descriptor, LandmarkIndex.descriptor,
    ]
}

extension IndexKind {
    /// This kind's descriptor (nil for `flat` and `hip`, which store nothing).
    public var descriptor: IndexDescriptor? { IndexCatalog.descriptors.first { $0.kind == self } }

    /// The kinds built and stored by `kvrecall build`, in the CLI's order.
    public static var stored: [IndexKind] { IndexCatalog.descriptors.map(\.kind) }

    /// The stored index type of this kind (nil for `flat` and `hip`, which store nothing).
    public var type: (any BuildableIndex.Type)? { descriptor?.type }
}

extension Calibrator {
    /// A graph's beam widths (ef), ascending, usable for `index` and k. Steps of about 1/8 where
    /// calibrated graphs land (HNSW: ef 128-512 for k 100; the retrieval graph's beam, which may be
    /// narrower than k: 24-64): a coarser step overshoots the target and scans more keys than it
    /// needs. HNSW raises an ef below k to k, so its ladder starts at k.
    public static func efLadder(index: any VectorIndex, k: Int, narrowerThanK: Bool) -> [Int] {
        let values = narrowerThanK
            ? [8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 56, 64, 72, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256, 288,
               320, 384, 448, 512, 640, 768, 1024, 1536, 2048]
            : [16, 24, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256, 288, 320, 384, 448, 512,
               640, 768, 1024, 1536, 2048]
        let usable = values.filter { (narrowerThanK || $0 >= k) && $0 <= index.count }
        return usable.isEmpty ? [max(1, min(k, index.count))] : usable
    }

    /// Counts of probed clusters (IVF lists, tree clusters per level), ascending, ending at `widest`.
    public static func clusterLadder(widest: Int) -> [Int] {
        let widest = max(1, widest)
        return [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048]
            .filter { $0 < widest } + [widest]
    }
}
