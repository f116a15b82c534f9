import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
/// The attention methods, by the names the CLI, the REPL, the C ABI and Python use.
///
/// `table` is the one list of methods: a new method is a case here, a row in `table` and the file
/// that attends it. The C enum (`include/kvrecall.h`, checked against `table` by a test), Python's
/// `METHODS` (checked by a test), the CLI's help and the REPL's completion all read it.
public enum AttentionMethod: String, CaseIterable, Codable, Sendable {
    case exact, retrieval, hip, landmark, hnsw, ivf, lsh, tree, estimate, streaming, quantized, auto

    /// One row of the method table.
    public struct Entry: Sendable {
        public let method: AttentionMethod
        /// Its `enum kvrecall_method` value in include/kvrecall.h (never reused for another method).
        public let cValue: Int32
        /// The stored index it reads, if any (`auto`: the one its head's plan names).
        public let index: IndexKind?
        /// One line for `--help`, the REPL and the C header.
        public let summary: String
    }

    /// Every method, in C-value order.
    public static let table: [Entry] = [
        Entry(method: .exact, cValue: 0, index: nil, summary: "full attention over every position (the reference)"),
        Entry(method: .retrieval, cValue: 1, index: .retrieval,
              summary: "RetrievalAttention: the query-aware graph built from prefill queries"),
        Entry(method: .hip, cValue: 2, index: nil, summary: "HiP: hierarchical chunk pruning, no index"),
        Entry(method: .landmark, cValue: 3, index: .landmark,
              summary: "Landmark: block representatives (mean key, or Quest's min/max bound)"),
        Entry(method: .hnsw, cValue: 4, index: .hnsw, summary: "top-k from a key-only HNSW graph"),
        Entry(method: .ivf, cValue: 5, index: .ivf, summary: "top-k from an inverted file of k-means clusters"),
        Entry(method: .lsh, cValue: 6, index: .lsh, summary: "top-k from SimHash tables (MagicPIG's LSH)"),
        Entry(method: .tree, cValue: 7, index: .tree, summary: "top-k from a hierarchical centroid tree"),
        Entry(method: .estimate, cValue: 8, index: .ivf,
              summary: "RetroInfer: IVF clusters retrieved, the clusters below the cut estimated"),
        Entry(method: .auto, cValue: 9, index: nil,
              summary: "per head, the policy its prefill queries call for (chosen at the build)"),
        Entry(method: .streaming, cValue: 10, index: nil, summary: "StreamingLLM: sinks and the recent window only"),
        Entry(method: .quantized, cValue: 11, index: nil,
              summary: "a scan of 4-bit key codes, the best candidates attended exactly, the rest through their codes"),
    ]

    /// This method's row of `table`.
    public var entry: Entry { Self.table.first { $0.method == self }! }

    /// The method of C value `value`, or nil.
    public init?(cValue value: Int32) {
        guard let entry = Self.table.first(where: { $0.cValue == value }) else { return nil }
        self = entry.method
    }

    /// The names, for messages: "exact, retrieval, ...".
    public static var names: String { allCases.map(\.rawValue).joined(separator: ", ") }

    /// The persisted index this method reads, if any (`auto`: the one its head's plan names).
    public var indexKind: IndexKind? { entry.index }

    /// Whether a session builds something per head for this method after the prompt.
    public var needsBuild: Bool { self == .auto || indexKind != nil }

    /// Whether the method reads the head's quantized tier (its codes are kept from the first token).
    public var readsCodes: Bool { self == .quantized || self == .auto }
}

/// One head's attention method with what it needs across calls: its index and, for `estimate`,
/// the cluster summary (computed once from the IVF lists). Independent of any transaction, so
/// a session or the REPL keeps one per head and passes each call the views of its transaction.
///
/// `attend` is the one dispatcher behind the CLI, the REPL, `KVSession` and the C ABI.
public final class PreparedMethod: @unchecked Sendable {
    /// The method asked for (`auto` stays `auto`).
    public let method: AttentionMethod
    /// The method that runs: `method`, or for `auto` the one its plan names.
    public let effective: AttentionMethod
    /// `auto`'s plan for this head.
    public let plan: HeadPlan?
    /// A floor on the caller's k for this head: the plan's raised k (auto's, or an index method's
    /// adaptive budget).
    public let budget: Int?
    /// The head's index of `effective.indexKind` (nil for exact, HiP and streaming, or a session head not yet indexed).
    public let index: (any BuildableIndex)?
    /// The search knob calibrated for `index` at build, used when the caller leaves it unset.
    public let calibration: SearchCalibration?
    /// `auto`'s exact candidates per query head for a quantized head.
    public let exactCandidates: Int?
    public let tailDetail: Float?
    /// The estimation zone's per-cluster statistics over the keys `index` holds.
    public private(set) var summary: ClusterSummary?

    /// Prepares `method` with `index`, the head's index of `method.indexKind` (or nil: a method
    /// needing an index then attends every position exactly, as a session does before its build).
    /// `auto` needs the head's `plan` and the index it names. `keys` and `values` are read only
    /// for `estimate`'s cluster summary.
    public init(_ method: AttentionMethod, plan: HeadPlan? = nil, index: (any BuildableIndex)?,
                calibration: SearchCalibration? = nil, keys: VectorView, values: VectorView) throws {
        let effective: AttentionMethod
        if method == .auto {
            guard let plan else { throw IndexError.notBuilt("method auto needs the head's plan (kvrecall build --index auto)") }
            effective = plan.policy.method
        } else {
            effective = method
        }
        if let index, index.kind != effective.indexKind {
            throw IndexError.invalidParameter("method \(effective.rawValue) reads a \(effective.indexKind?.rawValue ?? "no") index, not \(index.kind.rawValue)")
        }
        self.method = method
        self.effective = effective
        self.plan = method == .auto ? plan : nil
        // auto's plan, or an index method's adaptive budget, raises the caller's k.
        self.budget = effective.indexKind != nil ? plan?.k : nil
        self.exactCandidates = effective == .quantized ? plan?.exactCandidates : nil
        self.tailDetail = effective == .quantized ? plan?.tailDetail : nil
        self.index = effective.indexKind == nil ? nil : index
        self.calibration = self.index == nil ? nil : calibration
        if effective == .estimate, let ivf = index as? IVFIndex {
            summary = try ClusterSummary(ivf: ivf, keys: keys, values: values)
        } else {
            summary = nil
        }
    }

    /// Follows the index after it grew (a session indexing keys that left the window): the
    /// estimation zone's summary takes in the new keys only. Not concurrent with `attend`.
    public func indexDidGrow(keys: VectorView, values: VectorView) throws {
        if let ivf = index as? IVFIndex, summary != nil { try summary!.extend(ivf: ivf, keys: keys, values: values) }
    }

    /// Index methods select by an exact scan instead of their index when k (per query head)
    /// reaches this fraction of the indexed keys: a graph walk for that many neighbours scores a
    /// large part of the keys anyway, at random. Measured on Gemma 3's budgeted heads (k = 10% of
    /// the keys): the search was 2.7x slower than exact attention (docs/BENCHMARKS.md).
    public static let exactSelectionFraction = 0.05

    /// Whether the head's calibration found no value of its knob reaching the target recall, and
    /// the caller left that knob to it: the index cannot find this head's keys.
    public func cannotServe(_ parameters: SearchParameters) -> Bool {
        guard let calibration, !calibration.reached else { return false }
        return !calibration.knob.isSet(in: parameters)
    }

    /// The search parameters a call runs with: the caller's, with the calibrated knob filled in
    /// where the caller left it unset.
    public func searchParameters(_ parameters: SearchParameters) -> SearchParameters {
        calibration?.resolve(parameters) ?? parameters
    }

    /// Attention for one GQA group (`g x d` queries, row-major) over a head's `keys` and `values`.
    /// Keys beyond the index (appended since it was built or extended) are attended exactly, like
    /// the window; when the static part covers every position the result is exact attention.
    /// `quantized` reads the head's `codes` (an error without them).
    public func attend(_ queries: UnsafeBufferPointer<Float>, keys: VectorView, values: VectorView, codes: CodeView? = nil,
                       parameters: AttentionParameters) throws -> AttentionResult {
        var p = parameters
        p.search = searchParameters(parameters.search)
        if let budget, budget > p.k { p.k = budget }
        if let exactCandidates { p.quantized.candidates = exactCandidates }
        if let tailDetail { p.quantized.tailDetail = tailDetail }
        let n = keys.count
        var selector: (any VectorIndex)? = nil
        var scan = false
        switch effective {
        case .exact:
            break
        case .streaming:
            return try Attention.attendStatic(queries: queries, keys: keys, values: values, parameters: p)
        case .quantized:
            guard let codes else {
                throw IndexError.notBuilt("head \(keys.info.id) keeps no codes for the quantized method; build them with `kvrecall codes` (a session keeps them from its first token)")
            }
            return try Attention.attendQuantized(queries: queries, codes: codes, keys: keys, values: values, parameters: p)
        case .hip:
            selector = HiPSelector(keys: keys)
        default:
            if let index {
                guard index.count <= n else {
                    throw IndexError.corrupt("the \(index.kind.rawValue) index covers \(index.count) keys but the head holds \(n)")
                }
                if index.count < n { p.window = max(p.window, n - index.count) }
                // A large k (an adaptive budget on a diffuse head) makes a search score much of the
                // index through random reads; an exact scan reads the keys in order and is exact.
                // So does an index whose calibration found no knob value reaching the target recall
                // on this head (LSH on Gemma 3's heads: recall@100 below 0.25), unless the caller
                // set the knob.
                scan = Double(p.k) >= PreparedMethod.exactSelectionFraction * Double(index.count) || cannotServe(parameters.search)
                selector = summary == nil && scan ? FlatIndex(keys: keys) : index
            }
        }
        guard let selector, p.sinks + p.window < n else {
            return try Attention.attend(queries: queries, selector: nil, keys: keys, values: values, parameters: p)
        }
        if let summary {
            return try Attention.attendEstimated(queries: queries, summary: summary, keys: keys, values: values, parameters: p,
                                                 exactZone: scan)
        }
        return try Attention.attend(queries: queries, selector: selector, keys: keys, values: values, parameters: p)
    }
}

/// A prepared method bound to one head's vectors inside a read transaction.
public struct PreparedAttention {
    public let method: PreparedMethod
    public let keys: VectorView
    public let values: VectorView
    /// The head's quantized tier, when it keeps one.
    public let codes: CodeView?

    public init(method: PreparedMethod, keys: VectorView, values: VectorView, codes: CodeView? = nil) {
        self.method = method
        self.keys = keys
        self.values = values
        self.codes = codes
    }

    /// Attention for one GQA group (`g x d` queries).
    public func attend(_ queries: UnsafeBufferPointer<Float>, parameters: AttentionParameters) throws -> AttentionResult {
        try method.attend(queries, keys: keys, values: values, codes: codes, parameters: parameters)
    }
}
