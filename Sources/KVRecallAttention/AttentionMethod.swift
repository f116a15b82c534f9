import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
/// The attention methods, by the names the CLI and REPL use.
public enum AttentionMethod: String, CaseIterable, Sendable {
    /// Full attention over every position (the reference).
    case exact
    /// RetrievalAttention: the query-aware graph built from prefill queries.
    case retrieval
    /// HiP: hierarchical chunk pruning, no index.
    case hip
    /// Landmark: block representatives (mean key; Quest bound with `search.landmark.bound`).
    case landmark
    /// Index top-k with a key-only index.
    case hnsw, ivf, lsh, tree
    /// RetroInfer: IVF clusters as the retrieval zone, the clusters below the cut estimated from
    /// their mean key and value sum; optionally an adaptive (top-p) budget.
    case estimate
    /// StreamingLLM: the sinks and the recent window only, nothing retrieved.
    case streaming
    /// Per head, what its prefill queries call for (`HeadPlan`: streaming, retrieval or
    /// estimation), as chosen by `kvrecall build --index auto` or the session's build.
    case auto

    /// The persisted index this method reads, if any (`auto`: the one its head's plan names).
    public var indexKind: IndexKind? {
        switch self {
        case .exact, .hip, .streaming, .auto: return nil
        case .retrieval: return .retrieval
        case .landmark: return .landmark
        case .hnsw: return .hnsw
        case .ivf: return .ivf
        case .lsh: return .lsh
        case .tree: return .tree
        case .estimate: return .ivf
        }
    }

    /// The stored record this method needs on a head: its index, or `auto`'s plan.
    public var requiredRecord: String? { self == .auto ? HeadPlan.recordName : indexKind?.rawValue }

    /// The method ready to answer queries on head `id` inside `snapshot`, with the head's
    /// persisted index and its calibration (an error naming the build command when it was never built).
    public func prepare(snapshot: StoreSnapshot, head id: HeadID) throws -> PreparedAttention {
        let keys = try snapshot.vectors(id, .keys)
        let values = try snapshot.vectors(id, .values)
        var plan: HeadPlan? = nil
        if self == .auto {
            guard let stored = try HeadPlan.load(snapshot: snapshot, head: id) else {
                throw IndexError.notBuilt("no auto plan for head \(id); build it first with `kvrecall build --index auto`")
            }
            plan = stored
        }
        let kind = plan?.indexKind ?? indexKind
        let loaded = try kind.map { try IndexCatalog.loadCalibrated($0, snapshot: snapshot, head: id) }
        let method = try PreparedMethod(self, plan: plan, index: loaded?.index, calibration: loaded?.calibration,
                                        keys: keys, values: values)
        return PreparedAttention(method: method, keys: keys, values: values)
    }
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
    /// The estimation zone's per-cluster statistics over the keys `index` holds.
    public let summary: ClusterSummary?

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
        self.index = effective.indexKind == nil ? nil : index
        self.calibration = self.index == nil ? nil : calibration
        if effective == .estimate, let ivf = index as? IVFIndex {
            summary = try ClusterSummary(ivf: ivf, keys: keys, values: values)
        } else {
            summary = nil
        }
    }

    /// Index methods select by an exact scan instead of their index when k (per query head)
    /// reaches this fraction of the indexed keys: a graph walk for that many neighbours scores a
    /// large part of the keys anyway, at random. Measured on Gemma 3's budgeted heads (k = 10% of
    /// the keys): the search was 2.7x slower than exact attention (docs/BENCHMARKS.md).
    public static let exactSelectionFraction = 0.05

    /// The search parameters a call runs with: the caller's, with the calibrated knob filled in
    /// where the caller left it unset.
    public func searchParameters(_ parameters: SearchParameters) -> SearchParameters {
        calibration?.resolve(parameters) ?? parameters
    }

    /// Attention for one GQA group (`g x d` queries, row-major) over a head's `keys` and `values`.
    /// Keys beyond the index (appended since it was built or extended) are attended exactly, like
    /// the window; when the static part covers every position the result is exact attention.
    public func attend(_ queries: UnsafeBufferPointer<Float>, keys: VectorView, values: VectorView,
                       parameters: AttentionParameters) throws -> AttentionResult {
        var p = parameters
        p.search = searchParameters(parameters.search)
        if let budget, budget > p.k { p.k = budget }
        let n = keys.count
        var selector: (any VectorIndex)? = nil
        switch effective {
        case .exact:
            break
        case .streaming:
            return try Attention.attendStatic(queries: queries, keys: keys, values: values, parameters: p)
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
                selector = summary == nil && Double(p.k) >= PreparedMethod.exactSelectionFraction * Double(index.count)
                    ? FlatIndex(keys: keys) : index
            }
        }
        guard let selector, p.sinks + p.window < n else {
            return try Attention.attend(queries: queries, selector: nil, keys: keys, values: values, parameters: p)
        }
        if let summary {
            return try Attention.attendEstimated(queries: queries, summary: summary, keys: keys, values: values, parameters: p)
        }
        return try Attention.attend(queries: queries, selector: selector, keys: keys, values: values, parameters: p)
    }
}

/// Prepared methods kept across read transactions of a store, as the REPL does between commands:
/// an entry is reused while the snapshot sees the same last write in the same map
/// (`ReadTransaction.mapIdentity`), so an index rebuilt by another process is loaded again, an
/// unchanged one is not, and its sections, views of the map, stay valid.
public final class PreparedMethodCache {
    private var entries: [String: (identity: MapIdentity, method: PreparedMethod)] = [:]

    public init() {}

    /// `method` on head `id`, bound to `snapshot`'s views; loaded and prepared only when needed.
    public func prepare(_ method: AttentionMethod, snapshot: StoreSnapshot, head id: HeadID) throws -> PreparedAttention {
        let key = "\(id)/\(method.rawValue)"
        let identity = snapshot.txn.mapIdentity
        let keys = try snapshot.vectors(id, .keys)
        let values = try snapshot.vectors(id, .values)
        if let entry = entries[key], entry.identity == identity {
            return PreparedAttention(method: entry.method, keys: keys, values: values)
        }
        let prepared = try method.prepare(snapshot: snapshot, head: id)
        entries[key] = (identity, prepared.method)
        return prepared
    }

    public func removeAll() { entries = [:] }
}

/// A prepared method bound to one head's vectors inside a read transaction.
public struct PreparedAttention {
    public let method: PreparedMethod
    public let keys: VectorView
    public let values: VectorView

    public init(method: PreparedMethod, keys: VectorView, values: VectorView) {
        self.method = method
        self.keys = keys
        self.values = values
    }

    /// Attention for one GQA group (`g x d` queries).
    public func attend(_ queries: UnsafeBufferPointer<Float>, parameters: AttentionParameters) throws -> AttentionResult {
        try method.attend(queries, keys: keys, values: values, parameters: parameters)
    }
}
