/// The attention methods, by the names the CLI and REPL use.
public enum AttentionMethod: String, CaseIterable, Sendable {
    /// Full attention over every position (the reference).
    case exact
    /// RetrievalAttention: the query-aware graph built from prefill queries.
    case retrieval
    /// HiP: hierarchical chunk pruning, no index.
    case hip
    /// Landmark: block representatives (mean key; Quest bound with `landmarkBound`).
    case landmark
    /// Index top-k with a key-only index.
    case hnsw, ivf, lsh, tree
    /// RetroInfer: IVF clusters as the retrieval zone, the clusters below the cut estimated from
    /// their mean key and value sum; optionally an adaptive (top-p) budget.
    case estimate

    /// The persisted index this method reads, if any.
    public var indexKind: IndexKind? {
        switch self {
        case .exact, .hip: return nil
        case .retrieval: return .retrieval
        case .landmark: return .landmark
        case .hnsw: return .hnsw
        case .ivf: return .ivf
        case .lsh: return .lsh
        case .tree: return .tree
        case .estimate: return .ivf
        }
    }

    /// The method ready to answer queries on head `id` inside `snapshot`: its selector (HiP's
    /// search or the head's persisted index; an error naming the build command when it was never
    /// built), and for `estimate` the cluster summary, computed once.
    public func prepare(snapshot: StoreSnapshot, head id: HeadID) throws -> PreparedAttention {
        let keys = try snapshot.vectors(id, .keys)
        let values = try snapshot.vectors(id, .values)
        switch self {
        case .exact:
            return PreparedAttention(method: self, keys: keys, values: values, selector: nil, summary: nil)
        case .hip:
            return PreparedAttention(method: self, keys: keys, values: values, selector: HiPSelector(keys: keys), summary: nil)
        case .estimate:
            let ivf = try IndexCatalog.load(IVFIndex.self, from: try snapshot.index(id, name: "ivf"), head: id, name: "ivf")
            return PreparedAttention(method: self, keys: keys, values: values, selector: ivf,
                                     summary: try ClusterSummary(ivf: ivf, keys: keys, values: values))
        default:
            return PreparedAttention(method: self, keys: keys, values: values,
                                     selector: try IndexCatalog.load(indexKind!, snapshot: snapshot, head: id), summary: nil)
        }
    }
}

/// An attention method bound to one head's vectors inside a read transaction.
public struct PreparedAttention {
    public let method: AttentionMethod
    public let keys: VectorView
    public let values: VectorView
    public let selector: (any VectorIndex)?
    public let summary: ClusterSummary?

    /// Attention for one GQA group (`g x d` queries).
    public func attend(_ queries: UnsafeBufferPointer<Float>, parameters: AttentionParameters) throws -> AttentionResult {
        if let summary {
            return try Attention.attendEstimated(queries: queries, summary: summary, keys: keys, values: values, parameters: parameters)
        }
        return try Attention.attend(queries: queries, selector: selector, keys: keys, values: values, parameters: parameters)
    }
}
