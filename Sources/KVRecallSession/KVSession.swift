import Dispatch
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention

/// How a decoder's cache is laid out and attended.
public struct SessionConfiguration: Codable, Equatable, Sendable {
    public var layers: Int
    public var kvHeads: Int
    /// Query heads sharing one KV head (GQA group size).
    public var queryHeadsPerKV: Int
    public var headDimension: Int
    public var dtype: DType
    /// Attention method for decode steps; `exact` attends everything.
    public var method: String
    /// Positions retrieved per query head beyond sinks and window (index methods; a floor when
    /// `budgetMass` raises it).
    public var k: Int
    /// Adaptive budget (index methods): at `buildIndexes` each head's k is raised (200, 400, ...
    /// positions, at most 10% of its keys) until the neediest query head keeps this much of its
    /// softmax mass with its exact top-k on the held-out prefill queries. nil keeps k fixed.
    public var budgetMass: Double?
    public var sinks: Int
    public var window: Int
    /// HNSW / retrieval graph beam width; nil: calibrated at `buildIndexes` for `targetRecall`.
    public var ef: Int?
    /// IVF lists probed; nil: calibrated at `buildIndexes`.
    public var nprobe: Int?
    /// Centroid tree: clusters kept per level; nil: calibrated at `buildIndexes`.
    public var beam: Int?
    /// Recall@k the calibrated ef / nprobe / beam must reach on held-out prefill queries.
    public var targetRecall: Double
    /// LSH: tables a key must collide in.
    public var minCollisions: Int
    /// Landmark: rank blocks by Quest's min/max bound instead of the mean key.
    public var landmarkBound: Bool
    /// Keys that left the window are indexed in batches of this many (bounded work per step).
    public var upkeepBatch: Int
    /// The store's context id for this sequence.
    public var context: UInt32
    /// Softmax scale applied to q.k; nil means 1/sqrt(headDimension).
    public var scale: Float?
    /// Logit soft-cap applied to the scaled scores (cap * tanh(s / cap)); nil for none.
    public var softCap: Float?

    public init(layers: Int, kvHeads: Int, queryHeadsPerKV: Int, headDimension: Int, dtype: DType = .f16,
                method: AttentionMethod = .retrieval, k: Int = 100, sinks: Int = 4, window: Int = 64,
                ef: Int? = nil, nprobe: Int? = nil, beam: Int? = nil, minCollisions: Int = 2, landmarkBound: Bool = false,
                upkeepBatch: Int = 64, context: UInt32 = 0, targetRecall: Double = 0.95, budgetMass: Double? = 0.9) {
        self.layers = layers
        self.kvHeads = kvHeads
        self.queryHeadsPerKV = queryHeadsPerKV
        self.headDimension = headDimension
        self.dtype = dtype
        self.method = method.rawValue
        self.k = k
        self.sinks = sinks
        self.window = window
        self.ef = ef
        self.nprobe = nprobe
        self.beam = beam
        self.targetRecall = targetRecall
        self.budgetMass = budgetMass
        self.minCollisions = minCollisions
        self.landmarkBound = landmarkBound
        self.upkeepBatch = upkeepBatch
        self.context = context
    }

    private enum CodingKeys: String, CodingKey {
        case layers, kvHeads, queryHeadsPerKV, headDimension, dtype, method, k, sinks, window, ef, nprobe, beam, minCollisions
        case landmarkBound, upkeepBatch, context, scale, targetRecall, softCap, budgetMass
    }

    /// Decodes a checkpointed configuration; knobs added later (beam, min-collisions, landmark
    /// bound) take their defaults when an older checkpoint lacks them (the budget: none, as
    /// those sessions were built with a fixed k).
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        layers = try c.decode(Int.self, forKey: .layers)
        kvHeads = try c.decode(Int.self, forKey: .kvHeads)
        queryHeadsPerKV = try c.decode(Int.self, forKey: .queryHeadsPerKV)
        headDimension = try c.decode(Int.self, forKey: .headDimension)
        dtype = try c.decode(DType.self, forKey: .dtype)
        method = try c.decode(String.self, forKey: .method)
        k = try c.decode(Int.self, forKey: .k)
        sinks = try c.decode(Int.self, forKey: .sinks)
        window = try c.decode(Int.self, forKey: .window)
        ef = try c.decodeIfPresent(Int.self, forKey: .ef)
        nprobe = try c.decodeIfPresent(Int.self, forKey: .nprobe)
        beam = try c.decodeIfPresent(Int.self, forKey: .beam)
        targetRecall = try c.decodeIfPresent(Double.self, forKey: .targetRecall) ?? 0.95
        minCollisions = try c.decodeIfPresent(Int.self, forKey: .minCollisions) ?? 2
        landmarkBound = try c.decodeIfPresent(Bool.self, forKey: .landmarkBound) ?? false
        scale = try c.decodeIfPresent(Float.self, forKey: .scale)
        softCap = try c.decodeIfPresent(Float.self, forKey: .softCap)
        // Sessions saved before the knob: auto raised k at 0.9, the other methods kept it fixed.
        budgetMass = try c.decodeIfPresent(Double.self, forKey: .budgetMass) ?? (method == AttentionMethod.auto.rawValue ? 0.9 : nil)
        upkeepBatch = try c.decode(Int.self, forKey: .upkeepBatch)
        context = try c.decode(UInt32.self, forKey: .context)
    }

    /// The attention parameters of a decode step under this configuration.
    public var attentionParameters: AttentionParameters {
        var p = AttentionParameters(k: k, sinks: sinks, window: window, ef: ef, nprobe: nprobe, beam: beam)
        p.search.lsh.minCollisions = minCollisions
        p.search.landmark.bound = landmarkBound
        p.scale = scale
        p.softCap = softCap
        return p
    }

    /// Checks shapes, the method name and every knob.
    public func validate() throws {
        guard layers >= 1, kvHeads >= 1, queryHeadsPerKV >= 1, headDimension >= 1 else {
            throw SessionError.invalidArgument("layers, KV heads, query heads per KV head and head dimension must be positive")
        }
        guard layers <= Int(UInt16.max), kvHeads <= Int(UInt16.max) else {
            throw SessionError.invalidArgument("at most 65535 layers and KV heads")
        }
        guard headDimension <= 65536 else {
            throw SessionError.invalidArgument("head dimension \(headDimension) is out of range 1...65536")
        }
        guard AttentionMethod(rawValue: method) != nil else {
            throw SessionError.invalidArgument("unknown method '\(method)' (one of \(AttentionMethod.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard upkeepBatch >= 1 else { throw SessionError.invalidArgument("the upkeep batch must be at least 1 (got \(upkeepBatch))") }
        if let budgetMass, !(budgetMass > 0 && budgetMass <= 1) {
            throw SessionError.invalidArgument("the budget mass must be in (0, 1], or none for a fixed k (got \(budgetMass))")
        }
        // The attention knobs follow the library's one rule (the CLI and the REPL run it too).
        do { try attentionParameters.validate() } catch let error as IndexError {
            if case .invalidParameter(let message) = error { throw SessionError.invalidArgument(message) }
            throw error
        }
    }

    public var attentionMethod: AttentionMethod { AttentionMethod(rawValue: method)! }
}

extension AttentionMethod {
    /// Whether `buildIndexes` plans or indexes a head for this method.
    var needsIndexOrPlan: Bool { self == .auto || indexKind != nil }
}

/// Errors of the decoder session.
public enum SessionError: Error, CustomStringConvertible, Equatable {
    case invalidArgument(String)
    case wrongOrder(String)
    case unknownLayer(Int, layers: Int)

    public var description: String {
        switch self {
        case .invalidArgument(let m): return "invalid argument: \(m)"
        case .wrongOrder(let m): return "call out of order: \(m)"
        case .unknownLayer(let l, let n): return "layer \(l) does not exist (the session has \(n) layers)"
        }
    }
}

/// A decoder-facing KV cache: append each step's keys and values per layer, attend each step's
/// queries per layer for all heads. Vectors live in a KVRecall store; each KV head keeps an
/// index of the keys that have left the window (built once after prefill, then extended in
/// small batches), while the sinks, the window and any not-yet-indexed keys are attended exactly.
///
/// Thread-safety: one decoder thread drives a session; heads are spread over the cores inside
/// `attend`. Not for concurrent calls.
public final class KVSession {
    public let configuration: SessionConfiguration
    public let store: KVStore
    private let temporaryDirectory: String?
    /// Per (layer, kv head): the in-memory index of keys 0..<index.count.
    private var indexes: [[(any BuildableIndex)?]]
    /// Per (layer, kv head): the method prepared over `indexes` (dropped when its index grows).
    private var methods: [[PreparedMethod?]]
    /// Per (layer, kv head): `auto`'s plan, and the search knob calibrated for the index.
    private var plans: [[HeadPlan?]]
    private var calibrations: [[SearchCalibration?]]
    private var prepared = false
    public var parameters: AttentionParameters
    /// Threads `attend` spreads the KV heads over (at least 1).
    public var threads = ProcessInfo.processInfo.activeProcessorCount
    /// The write lease of this session's heads (no other session or ingest writes them meanwhile).
    private var writerLock: HeadWriterLock?
    /// What `init(resuming:)` found and did; nil for a session opened with `init(configuration:directory:)`.
    public private(set) var resumeReport: ResumeReport?

    static let configurationKey = "kvrecall.session"

    /// Opens a session on `directory` (a new or existing store), or on a temporary store removed
    /// at `close()` when `directory` is nil. An existing session's configuration must match.
    public init(configuration: SessionConfiguration, directory: String?) throws {
        try configuration.validate()
        self.configuration = configuration
        var options = Environment.Options()
        options.noSync = true  // decode steps commit without fsync; checkpoint() syncs
        if let directory {
            store = try KVStore(path: directory, create: true, options: options)
            temporaryDirectory = nil
        } else {
            KVSession.removeOrphanedTemporaryStores()
            let path = NSTemporaryDirectory() + "\(KVSession.temporaryPrefix)\(getpid())-\(UUID().uuidString)"
            store = try KVStore(path: path, create: true, options: options)
            temporaryDirectory = path
        }
        indexes = Array(repeating: Array(repeating: nil, count: configuration.kvHeads), count: configuration.layers)
        methods = Array(repeating: Array(repeating: nil, count: configuration.kvHeads), count: configuration.layers)
        plans = Array(repeating: Array(repeating: nil, count: configuration.kvHeads), count: configuration.layers)
        calibrations = Array(repeating: Array(repeating: nil, count: configuration.kvHeads), count: configuration.layers)
        parameters = configuration.attentionParameters
        do {
            let ids = (0..<configuration.layers).flatMap { l in (0..<configuration.kvHeads).map { headID(l, $0) } }
            writerLock = try store.lockHeads(ids)
            try checkStoredConfiguration()
            try createHeads()
        } catch {
            close()
            throw error
        }
    }

    /// A store that already holds a session of this context must hold this very configuration:
    /// the heads' shapes, the method (and so its indexes) and the knobs all come from it.
    private func checkStoredConfiguration() throws {
        guard let raw = try? store.info(headID(0, 0)).metadata[KVSession.configurationKey] else { return }
        guard let stored = try? JSONDecoder().decode(SessionConfiguration.self, from: Data(raw.utf8)) else {
            throw SessionError.invalidArgument("\(store.path) holds a session configuration this build cannot read")
        }
        guard stored != configuration else { return }
        let mine = try JSONSerialization.jsonObject(with: JSONEncoder().encode(configuration)) as? [String: Any] ?? [:]
        let theirs = try JSONSerialization.jsonObject(with: JSONEncoder().encode(stored)) as? [String: Any] ?? [:]
        let differing = Set(mine.keys).union(theirs.keys).sorted().filter { key in
            "\(mine[key] ?? "none")" != "\(theirs[key] ?? "none")"
        }.map { "\($0) \(theirs[$0] ?? "none") (asked \(mine[$0] ?? "none"))" }
        throw SessionError.invalidArgument("\(store.path) holds a session with a different configuration: \(differing.joined(separator: ", ")); resume it (its configuration comes from the store) or use another directory")
    }

    /// What resuming a session found and did (the crash contract, docs/ARCHITECTURE.md "Contracts").
    public struct ResumeReport: Sendable, Equatable {
        /// Tokens every layer and head holds after resuming.
        public var tokens: Int
        /// The longest layer before resuming (more than `tokens` when a step was cut short).
        public var longest: Int
        /// Heads whose saved index was loaded.
        public var indexesLoaded: Int
        /// Heads whose index was rebuilt from their keys (missing, or covering dropped keys).
        public var indexesRebuilt: Int
        /// Heads left without an index although their method needs one (no index was saved since
        /// `buildIndexes`): they attend exactly until `buildIndexes` runs again.
        public var indexesMissing: Int

        public var description: String {
            var text = "resumed at \(tokens) tokens per layer"
            if longest > tokens { text += " (layers that had reached \(longest) were cut back to the last step every layer completed)" }
            text += "; \(indexesLoaded) indexes loaded"
            if indexesRebuilt > 0 { text += ", \(indexesRebuilt) rebuilt" }
            if indexesMissing > 0 { text += "; \(indexesMissing) heads have no saved index: call buildIndexes (they attend exactly until then)" }
            return text
        }
    }

    /// Reopens a session from its store, with its saved configuration, in a consistent state:
    /// every layer and head is cut back to the last step every layer completed (the shortest
    /// layer; appends are atomic per layer, so a layer's heads always agree); prefill queries are
    /// cut to the count every head has (none when no token survived); indexes saved by the last
    /// checkpoint are loaded, and a head whose index is missing
    /// (not checkpointed since `buildIndexes`) is rebuilt when any head of the session has one.
    /// `resumeReport` says what was done.
    public convenience init(resuming directory: String) throws {
        let probe = try KVStore(path: directory)
        let heads = try probe.heads()
        probe.close()
        guard let raw = heads.first(where: { $0.metadata[KVSession.configurationKey] != nil })?.metadata[KVSession.configurationKey],
              let configuration = try? JSONDecoder().decode(SessionConfiguration.self, from: Data(raw.utf8)) else {
            throw SessionError.invalidArgument("\(directory) holds no KVRecall session")
        }
        try self.init(configuration: configuration, directory: directory)
        let mine = heads.filter { $0.id.context == configuration.context }
        let tokens = mine.map(\.count).min() ?? 0
        let longest = mine.map(\.count).max() ?? 0
        // Prefill queries are training data, not positions (a group may store several per
        // position): equal across heads (a crash between layers' calls), none if no token survived.
        let queryTokens = tokens == 0 ? 0 : (mine.map(\.queryCount).min() ?? 0)
        let ids = mine.map(\.id)
        try store.truncate(ids, to: tokens, queryTokens: queryTokens)
        var loaded = 0, missing: [(Int, Int)] = []
        let auto = configuration.attentionMethod == .auto
        if auto || configuration.attentionMethod.indexKind != nil {
            try store.read { snapshot in
                for layer in 0..<configuration.layers {
                    for head in 0..<configuration.kvHeads {
                        let id = headID(layer, head)
                        let plan = auto || configuration.budgetMass != nil ? try HeadPlan.load(snapshot: snapshot, head: id) : nil
                        if auto && plan == nil { missing.append((layer, head)); continue }
                        plans[layer][head] = plan
                        guard let kind = auto ? plan?.indexKind : configuration.attentionMethod.indexKind else {
                            loaded += 1  // a streaming head: its plan is all it needs
                            continue
                        }
                        if try snapshot.index(id, name: kind.rawValue) != nil {
                            // A copy: the session keeps it across its own appends, and a view would
                            // pin nothing (the pages could be reused once the snapshot ends).
                            let stored = try IndexCatalog.loadCalibrated(kind, snapshot: snapshot, head: id, copy: true)
                            if stored.index.count <= tokens {
                                indexes[layer][head] = stored.index
                                calibrations[layer][head] = stored.calibration
                                methods[layer][head] = nil
                                loaded += 1
                                continue
                            }
                        }
                        missing.append((layer, head))
                    }
                }
            }
        }
        var rebuilt = 0, unindexed = 0
        if loaded > 0 {
            prepared = true
            for (layer, head) in missing where try rebuildIndex(layer: layer, head: head) { rebuilt += 1 }
        } else if tokens > configuration.sinks + configuration.window {
            unindexed = missing.count
        }
        resumeReport = ResumeReport(tokens: tokens, longest: longest, indexesLoaded: loaded, indexesRebuilt: rebuilt,
                                    indexesMissing: unindexed)
    }

    /// Cuts every layer and head back to `tokens` (rollback of speculative tokens, repair after a
    /// failed step) in one transaction. Prefill queries are training data, not positions: they stay,
    /// unless `tokens` is 0 (a reset). An index holding
    /// dropped keys is rebuilt from the remaining ones (its stored copy is deleted with the keys),
    /// so later attention never sees a position that no longer exists. Longer than the session:
    /// an error.
    public func truncate(to tokens: Int) throws {
        let ids = (0..<configuration.layers).flatMap { l in (0..<configuration.kvHeads).map { headID(l, $0) } }
        let longest = try ids.map { try store.info($0).count }.max() ?? 0
        guard tokens >= 0, tokens <= longest else {
            throw SessionError.invalidArgument("cannot truncate to \(tokens) tokens: the session holds \(longest)")
        }
        try store.truncate(ids, to: tokens, queryTokens: tokens == 0 ? 0 : nil)
        for layer in 0..<configuration.layers {
            for head in 0..<configuration.kvHeads {
                methods[layer][head] = nil
                if let index = indexes[layer][head], index.count > tokens {
                    indexes[layer][head] = nil
                    try rebuildIndex(layer: layer, head: head)
                }
            }
        }
    }

    /// Builds one head's index afresh over its keys outside the window (as `buildIndexes` does):
    /// with `auto`, the head is profiled and planned first (its plan names the index, if any); the
    /// index is calibrated on the held-out tail of the head's prefill queries. False when the head
    /// has too few keys for an index or its plan needs none.
    @discardableResult
    private func rebuildIndex(layer: Int, head: Int, parameters build: IndexBuildParameters = IndexBuildParameters()) throws -> Bool {
        let method = configuration.attentionMethod
        guard method == .auto || method.indexKind != nil else { return false }
        let id = headID(layer, head)
        let g = configuration.queryHeadsPerKV
        var calibration = CalibrationParameters()
        calibration.targetRecall = configuration.targetRecall
        calibration.k = configuration.k
        let built = try store.read { snapshot -> (plan: HeadPlan?, index: (any BuildableIndex)?, calibration: SearchCalibration?) in
            let keys = try snapshot.vectors(id, .keys)
            let queries = try snapshot.vectors(id, .queries)
            let upTo = max(0, keys.count - configuration.window)
            guard upTo > configuration.sinks else { return (nil, nil, nil) }
            var plan: HeadPlan? = nil
            // Rows per position: the group's every query head, or one (summed) query; queries
            // that are not one row set per position (a sample) are measured against every key.
            let perHead = g > 1 && queries.count == keys.count * g
            let aligned = perHead || queries.count == keys.count
            var policy = PolicyParameters()
            policy.budgetMass = configuration.budgetMass ?? 0  // 0: no budget ever raises k
            if method == .auto {
                plan = try HeadPlanner.plan(keys: keys, values: try snapshot.vectors(id, .values), queries: queries,
                                            group: perHead ? g : 1, calibration: calibration, attention: parameters,
                                            policy: policy, build: build, alignedToPositions: aligned).plan
            } else if configuration.budgetMass != nil {
                plan = try HeadPlanner.budget(keys: keys, queries: queries, group: perHead ? g : 1,
                                              calibration: calibration, attention: parameters, policy: policy,
                                              alignedToPositions: aligned)
            }
            guard let kind = method == .auto ? plan?.indexKind : method.indexKind else { return (plan, nil, nil) }
            let made = try HeadPlanner.buildCalibrated(kind, keys: keys, count: upTo, queries: queries, build: build,
                                                       calibration: calibration)
            return (plan, made.index, made.calibration)
        }
        plans[layer][head] = built.plan
        indexes[layer][head] = built.index
        calibrations[layer][head] = built.calibration
        methods[layer][head] = nil
        return built.index != nil
    }

    /// `auto`'s plan for (`layer`, `head`), or an index method's adaptive budget (its `k`); nil
    /// before `buildIndexes`, without prefill queries, or for a method with neither.
    public func plan(layer: Int, head: Int) throws -> HeadPlan? {
        try checkLayer(layer)
        guard head >= 0 && head < configuration.kvHeads else { throw SessionError.invalidArgument("KV head \(head) does not exist") }
        return plans[layer][head]
    }

    /// The search knob calibrated for (`layer`, `head`)'s index at build (nil without one).
    public func calibration(layer: Int, head: Int) throws -> SearchCalibration? {
        try checkLayer(layer)
        guard head >= 0 && head < configuration.kvHeads else { throw SessionError.invalidArgument("KV head \(head) does not exist") }
        return calibrations[layer][head]
    }

    /// One line per head: what runs (`auto`'s policy and why), its index and calibration.
    /// `layerName` names a session layer as the caller knows it (a decoder: the model's block).
    public func report(layerName: (Int) -> String = { "layer \($0)" }) -> [String] {
        var lines: [String] = []
        for layer in 0..<configuration.layers {
            for head in 0..<configuration.kvHeads {
                var line = "\(layerName(layer)) head \(head): "
                if let plan = plans[layer][head] {
                    line += configuration.attentionMethod == .auto ? "\(plan.policy.rawValue) (\(plan.reason))"
                        : "\(configuration.method) (\(plan.reason))"
                } else {
                    line += configuration.method
                    // Built, but nothing to plan or index: say why rather than just the method's name.
                    if prepared, indexes[layer][head] == nil, configuration.attentionMethod.needsIndexOrPlan,
                       let n = try? store.info(headID(layer, head)).count, n - configuration.window <= configuration.sinks {
                        line += " (all \(n) keys are sinks or in the window: attended exactly, nothing to index)"
                    }
                }
                if let index = indexes[layer][head] { line += "; \(index.kind.rawValue) over \(index.count) keys" }
                if let c = calibrations[layer][head] { line += "; calibrated \(c.summary)" }
                if let profile = plans[layer][head]?.profile { line += "; \(profile.summary)" }
                lines.append(line)
            }
        }
        return lines
    }

    deinit { close() }

    static let temporaryPrefix = "kvrecall-session-"

    /// Removes the temporary stores of sessions whose process is gone (killed before `close()`):
    /// their names carry the owner's process id.
    static func removeOrphanedTemporaryStores() {
        let folder = NSTemporaryDirectory()
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: folder) else { return }
        for name in names where name.hasPrefix(temporaryPrefix) {
            let rest = name.dropFirst(temporaryPrefix.count)
            guard let dash = rest.firstIndex(of: "-"), let pid = pid_t(rest[..<dash]), pid > 0 else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH {
                try? FileManager.default.removeItem(atPath: folder + name)
            }
        }
    }

    /// Closes the store (and removes a temporary one).
    public func close() {
        guard store.environment.isOpen else { return }
        writerLock?.release()
        writerLock = nil
        store.close()
        if let temporaryDirectory { try? FileManager.default.removeItem(atPath: temporaryDirectory) }
    }

    func headID(_ layer: Int, _ head: Int) -> HeadID {
        HeadID(context: configuration.context, layer: UInt16(layer), head: UInt16(head))
    }

    private func createHeads() throws {
        let encoded = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
        for layer in 0..<configuration.layers {
            for head in 0..<configuration.kvHeads {
                var metadata: [String: String] = [:]
                if layer == 0 && head == 0 { metadata[KVSession.configurationKey] = encoded }
                try store.createHead(headID(layer, head), dimension: configuration.headDimension, dtype: configuration.dtype,
                                     metadata: metadata)
            }
        }
    }

    private func checkLayer(_ layer: Int) throws {
        guard layer >= 0 && layer < configuration.layers else { throw SessionError.unknownLayer(layer, layers: configuration.layers) }
    }

    /// Keys of (`layer`, `head`) held by its index (0 before `buildIndexes` or for exact/HiP).
    public func indexedCount(layer: Int, head: Int) throws -> Int {
        try checkLayer(layer)
        guard head >= 0 && head < configuration.kvHeads else {
            throw SessionError.invalidArgument("KV head \(head) does not exist (the session has \(configuration.kvHeads))")
        }
        return indexes[layer][head]?.count ?? 0
    }

    /// Tokens cached for `layer`.
    public func length(layer: Int) throws -> Int {
        try checkLayer(layer)
        return try store.info(headID(layer, 0)).count
    }

    /// Appends `tokens` new tokens to every KV head of `layer`: `keys` and `values` are
    /// `[kvHeads, tokens, headDimension]`, row-major. Keys that leave the window are indexed in
    /// batches of `upkeepBatch`.
    public func append(layer: Int, keys: UnsafeBufferPointer<Float>, values: UnsafeBufferPointer<Float>) throws {
        try checkLayer(layer)
        let d = configuration.headDimension, h = configuration.kvHeads
        guard keys.count == values.count, keys.count > 0, keys.count % (h * d) == 0 else {
            throw SessionError.invalidArgument("keys and values must both hold [\(h) heads, tokens, \(d)] floats (got \(keys.count) and \(values.count))")
        }
        let tokens = keys.count / (h * d)
        // Every head's rows are checked before any is written, so bad input never leaves the layer
        // with some heads one token longer than others.
        // A finite value beyond the storage type (f16: |x| > 65504) is refused like NaN: stored, it
        // would be Inf and attention would answer NaN.
        for (label, data) in [("keys", keys), ("values", values)] {
            if let bad = firstUnstorableValue(data, dtype: configuration.dtype) {
                let row = bad.index / d
                throw SessionError.invalidArgument("append to layer \(layer): \(label) of KV head \(row / tokens), token \(row % tokens), "
                                                   + "column \(bad.index % d) \(bad.problem); nothing was appended")
            }
        }
        // One write transaction for every head of the layer: a failure or a crash leaves all or none.
        try store.appendAtomically((0..<h).map { head in
            let span = (head * tokens * d)..<((head + 1) * tokens * d)
            return .keysAndValues(headID(layer, head), keys: UnsafeBufferPointer(rebasing: keys[span]),
                                  values: UnsafeBufferPointer(rebasing: values[span]))
        }, allowNonFinite: true)  // checked above
        if prepared { try upkeep(layer: layer, force: false) }
    }

    /// Stores a prompt's prefill queries for `layer`: `[kvHeads, tokens, headDimension]` (one
    /// representative query head per KV head, or the group's sum); the retrieval graph learns from them.
    public func appendPrefillQueries(layer: Int, queries: UnsafeBufferPointer<Float>) throws {
        try checkLayer(layer)
        let d = configuration.headDimension, h = configuration.kvHeads
        guard queries.count > 0, queries.count % (h * d) == 0 else {
            throw SessionError.invalidArgument("queries must hold [\(h) heads, tokens, \(d)] floats (got \(queries.count))")
        }
        let tokens = queries.count / (h * d)
        if let bad = firstUnstorableValue(queries, dtype: configuration.dtype) {
            let row = bad.index / d
            throw SessionError.invalidArgument("prefill queries of layer \(layer): KV head \(row / tokens), token \(row % tokens), "
                                               + "column \(bad.index % d) \(bad.problem); nothing was appended")
        }
        try store.appendAtomically((0..<h).map { head in
            .queries(headID(layer, head), UnsafeBufferPointer(rebasing: queries[(head * tokens * d)..<((head + 1) * tokens * d)]))
        })
    }

    /// Builds every head's index once, over the keys outside the window (after prefill).
    /// With `auto` each head is profiled on its prefill queries and gets the index its plan names;
    /// every index is calibrated on the held-out tail of the head's prefill queries.
    public func buildIndexes(parameters build: IndexBuildParameters = IndexBuildParameters(),
                             progress: ((Int, Int) throws -> Void)? = nil) throws {
        let method = configuration.attentionMethod
        guard method == .auto || method.indexKind != nil else { prepared = true; return }
        let total = configuration.layers * configuration.kvHeads
        var done = 0
        for layer in 0..<configuration.layers {
            for head in 0..<configuration.kvHeads {
                try rebuildIndex(layer: layer, head: head, parameters: build)
                done += 1
                try progress?(done, total)  // a throw aborts the build between heads
            }
        }
        prepared = true
    }

    /// Indexes keys that have left the window, in whole batches (all of them with `force`).
    private func upkeep(layer: Int, force: Bool) throws {
        for head in 0..<configuration.kvHeads {
            guard let index = indexes[layer][head] else { continue }
            let id = headID(layer, head)
            try store.read { snapshot in
                let keys = try snapshot.vectors(id, .keys)
                let upTo = max(index.count, keys.count - configuration.window)
                let pending = upTo - index.count
                guard pending >= configuration.upkeepBatch || (force && pending > 0) else { return }
                try index.add(keys: keys.limited(to: upTo), range: index.count..<upTo, progress: nil)
                methods[layer][head] = nil
            }
        }
    }

    /// Attention for one decode step of `layer`: `queries` is `[kvHeads, queryHeadsPerKV, headDimension]`;
    /// returns the outputs in the same layout. KV heads run in parallel.
    public func attend(layer: Int, queries: UnsafeBufferPointer<Float>) throws -> [Float] {
        try attendWithLSE(layer: layer, queries: queries).outputs
    }

    /// `attend`, with each query head's log-sum-exp of its scaled scores (`[kvHeads, queryHeadsPerKV]`)
    /// beside the outputs, so the result merges exactly with attention over other positions.
    public func attendWithLSE(layer: Int, queries: UnsafeBufferPointer<Float>) throws -> (outputs: [Float], lse: [Float]) {
        try checkLayer(layer)
        let d = configuration.headDimension, h = configuration.kvHeads, g = configuration.queryHeadsPerKV
        guard queries.count == h * g * d else {
            throw SessionError.invalidArgument("queries must hold [\(h) KV heads, \(g) query heads, \(d)] = \(h * g * d) floats (got \(queries.count))")
        }
        if let row = firstNonFiniteRow(queries, dimension: d) {
            throw SessionError.invalidArgument("query of KV head \(row / g), query head \(row % g) holds NaN or Inf")
        }
        var outputs = [Float](repeating: 0, count: h * g * d)
        var lse = [Float](repeating: 0, count: h * g)
        let failures = FirstError()
        let workers = max(1, min(threads, h))
        try store.read { snapshot in
            let prepared = try (0..<h).map { try preparedMethod(snapshot: snapshot, layer: layer, head: $0) }
            outputs.withUnsafeMutableBufferPointer { out in
                lse.withUnsafeMutableBufferPointer { lseOut in
                    DispatchQueue.concurrentPerform(iterations: workers) { worker in
                        for head in stride(from: worker, to: h, by: workers) {
                            do {
                                let group = UnsafeBufferPointer(rebasing: queries[(head * g * d)..<((head + 1) * g * d)])
                                let result = try attendHead(snapshot: snapshot, layer: layer, head: head, method: prepared[head], queries: group)
                                if let j = result.firstNonFiniteHead {  // never NaN for finite input: an error
                                    throw SessionError.invalidArgument("attention of layer \(layer), KV head \(head), query head \(j) \(AttentionResult.notFinite)")
                                }
                                for (j, partial) in result.heads.enumerated() {
                                    for c in 0..<d { out[(head * g + j) * d + c] = partial.output[c] }
                                    lseOut[head * g + j] = partial.lse
                                }
                            } catch {
                                failures.record(error)
                            }
                        }
                    }
                }
            }
        }
        if let error = failures.first { throw error }
        return (outputs, lse)
    }

    /// Keys and values cached for KV head `head` of `layer`.
    public func length(layer: Int, head: Int) throws -> Int {
        try checkLayer(layer)
        guard head >= 0 && head < configuration.kvHeads else {
            throw SessionError.invalidArgument("KV head \(head) does not exist (the session has \(configuration.kvHeads))")
        }
        return try store.info(headID(layer, head)).count
    }

    /// The full attention result (attended positions, statistics) of one KV head's query group.
    public func attendDetailed(layer: Int, head: Int, queries: UnsafeBufferPointer<Float>) throws -> AttentionResult {
        try checkLayer(layer)
        guard head >= 0 && head < configuration.kvHeads else { throw SessionError.invalidArgument("KV head \(head) does not exist") }
        return try store.read { snapshot in
            try attendHead(snapshot: snapshot, layer: layer, head: head,
                           method: try preparedMethod(snapshot: snapshot, layer: layer, head: head), queries: queries)
        }
    }

    /// The head's method over its current index, prepared once and kept until the index grows.
    private func preparedMethod(snapshot: StoreSnapshot, layer: Int, head: Int) throws -> PreparedMethod {
        if let cached = methods[layer][head] { return cached }
        let id = headID(layer, head)
        let planned = configuration.attentionMethod == .auto
        let method = try PreparedMethod(planned && plans[layer][head] == nil ? .exact : configuration.attentionMethod,
                                        plan: plans[layer][head], index: indexes[layer][head],
                                        calibration: calibrations[layer][head],
                                        keys: try snapshot.vectors(id, .keys), values: try snapshot.vectors(id, .values))
        methods[layer][head] = method
        return method
    }

    /// One head's query group through the shared dispatcher (`PreparedMethod.attend`): keys not
    /// yet indexed are attended exactly like the window, and everything before `buildIndexes`.
    private func attendHead(snapshot: StoreSnapshot, layer: Int, head: Int, method: PreparedMethod,
                            queries group: UnsafeBufferPointer<Float>) throws -> AttentionResult {
        let id = headID(layer, head)
        let keys = try snapshot.vectors(id, .keys)
        let values = try snapshot.vectors(id, .values)
        guard keys.count > 0 else { throw SessionError.wrongOrder("attend before any key was appended to layer \(layer)") }
        return try method.attend(group, keys: keys, values: values, parameters: parameters)
    }

    /// Indexes every pending key and writes the indexes and vectors durably, so the session can
    /// be resumed with `init(resuming:)`.
    public func checkpoint() throws {
        for layer in 0..<configuration.layers {
            try upkeep(layer: layer, force: true)
            for head in 0..<configuration.kvHeads {
                if let index = indexes[layer][head] {
                    try IndexCatalog.save(index, in: store, head: headID(layer, head), calibration: calibrations[layer][head])
                }
                try plans[layer][head]?.save(in: store, head: headID(layer, head))
            }
        }
        try store.environment.sync()
    }
}

/// Keeps the first error thrown by parallel work.
final class FirstError: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var first: Error?
    func record(_ error: Error) {
        lock.lock()
        if first == nil { first = error }
        lock.unlock()
    }
}
