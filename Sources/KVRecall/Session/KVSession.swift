import Dispatch
import Foundation

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
    public var k: Int
    public var sinks: Int
    public var window: Int
    /// HNSW / retrieval graph beam width.
    public var ef: Int
    /// IVF (and `estimate`) lists probed.
    public var nprobe: Int
    /// Centroid tree: clusters kept per level.
    public var beam: Int
    /// LSH: tables a key must collide in.
    public var minCollisions: Int
    /// Landmark: rank blocks by Quest's min/max bound instead of the mean key.
    public var landmarkBound: Bool
    /// Keys that left the window are indexed in batches of this many (bounded work per step).
    public var upkeepBatch: Int
    /// The store's context id for this sequence.
    public var context: UInt32

    public init(layers: Int, kvHeads: Int, queryHeadsPerKV: Int, headDimension: Int, dtype: DType = .f16,
                method: AttentionMethod = .retrieval, k: Int = 100, sinks: Int = 4, window: Int = 64,
                ef: Int = 400, nprobe: Int = 64, beam: Int = 8, minCollisions: Int = 2, landmarkBound: Bool = false,
                upkeepBatch: Int = 64, context: UInt32 = 0) {
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
        self.minCollisions = minCollisions
        self.landmarkBound = landmarkBound
        self.upkeepBatch = upkeepBatch
        self.context = context
    }

    private enum CodingKeys: String, CodingKey {
        case layers, kvHeads, queryHeadsPerKV, headDimension, dtype, method, k, sinks, window, ef, nprobe, beam, minCollisions
        case landmarkBound, upkeepBatch, context
    }

    /// Decodes a checkpointed configuration; knobs added later (beam, min-collisions, landmark
    /// bound) take their defaults when an older checkpoint lacks them.
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
        ef = try c.decode(Int.self, forKey: .ef)
        nprobe = try c.decode(Int.self, forKey: .nprobe)
        beam = try c.decodeIfPresent(Int.self, forKey: .beam) ?? 8
        minCollisions = try c.decodeIfPresent(Int.self, forKey: .minCollisions) ?? 2
        landmarkBound = try c.decodeIfPresent(Bool.self, forKey: .landmarkBound) ?? false
        upkeepBatch = try c.decode(Int.self, forKey: .upkeepBatch)
        context = try c.decode(UInt32.self, forKey: .context)
    }

    /// The attention parameters of a decode step under this configuration.
    public var attentionParameters: AttentionParameters {
        var p = AttentionParameters()
        p.k = k
        p.sinks = sinks
        p.window = window
        p.search.graph.ef = ef
        p.search.ivf.nprobe = nprobe
        p.search.tree.beam = beam
        p.search.lsh.minCollisions = minCollisions
        p.search.landmark.bound = landmarkBound
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
        guard AttentionMethod(rawValue: method) != nil else {
            throw SessionError.invalidArgument("unknown method '\(method)' (one of \(AttentionMethod.allCases.map(\.rawValue).joined(separator: ", ")))")
        }
        guard upkeepBatch >= 1 else { throw SessionError.invalidArgument("the upkeep batch must be at least 1 (got \(upkeepBatch))") }
        // The attention knobs follow the library's one rule (the CLI and the REPL run it too).
        do { try attentionParameters.validate() } catch let error as IndexError {
            if case .invalidParameter(let message) = error { throw SessionError.invalidArgument(message) }
            throw error
        }
    }

    public var attentionMethod: AttentionMethod { AttentionMethod(rawValue: method)! }
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
    private var prepared = false
    public var parameters: AttentionParameters

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
        parameters = configuration.attentionParameters
        try createHeads()
    }

    /// Reopens a checkpointed session from its store, with its saved configuration and indexes.
    public convenience init(resuming directory: String) throws {
        let probe = try KVStore(path: directory)
        let heads = try probe.heads()
        probe.close()
        guard let raw = heads.first(where: { $0.metadata[KVSession.configurationKey] != nil })?.metadata[KVSession.configurationKey],
              let configuration = try? JSONDecoder().decode(SessionConfiguration.self, from: Data(raw.utf8)) else {
            throw SessionError.invalidArgument("\(directory) holds no checkpointed session")
        }
        try self.init(configuration: configuration, directory: directory)
        try store.read { snapshot in
            for layer in 0..<configuration.layers {
                for head in 0..<configuration.kvHeads {
                    let id = headID(layer, head)
                    if let kind = configuration.attentionMethod.indexKind, try snapshot.index(id, name: kind.rawValue) != nil {
                        indexes[layer][head] = try IndexCatalog.load(kind, snapshot: snapshot, head: id)
                        methods[layer][head] = nil
                        prepared = true
                    }
                }
            }
        }
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
        for (label, data) in [("keys", keys), ("values", values)] {
            if let row = firstNonFiniteRow(data, dimension: d) {
                throw SessionError.invalidArgument("\(label) of KV head \(row / tokens), token \(row % tokens) hold NaN or Inf; nothing was appended")
            }
        }
        for head in 0..<h {
            let span = (head * tokens * d)..<((head + 1) * tokens * d)
            try store.append(headID(layer, head), keys: UnsafeBufferPointer(rebasing: keys[span]),
                             values: UnsafeBufferPointer(rebasing: values[span]), allowNonFinite: true)  // checked above
        }
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
        for head in 0..<h {
            try store.appendQueries(headID(layer, head),
                                    queries: UnsafeBufferPointer(rebasing: queries[(head * tokens * d)..<((head + 1) * tokens * d)]))
        }
    }

    /// Builds every head's index once, over the keys outside the window (after prefill).
    public func buildIndexes(parameters build: IndexBuildParameters = IndexBuildParameters(),
                             progress: ((Int, Int) -> Void)? = nil) throws {
        guard let kind = configuration.attentionMethod.indexKind else { prepared = true; return }
        let total = configuration.layers * configuration.kvHeads
        var done = 0
        for layer in 0..<configuration.layers {
            for head in 0..<configuration.kvHeads {
                let id = headID(layer, head)
                indexes[layer][head] = try store.read { snapshot -> (any BuildableIndex)? in
                    let keys = try snapshot.vectors(id, .keys)
                    let upTo = max(0, keys.count - configuration.window)
                    guard upTo > configuration.sinks else { return nil }
                    let index = try IndexCatalog.make(kind, dimension: keys.dimension, count: upTo, parameters: build)
                    let indexed = keys.limited(to: upTo)
                    try index.train(keys: indexed, range: 0..<upTo, queries: try snapshot.vectors(id, .queries))
                    try index.add(keys: indexed, range: 0..<upTo, progress: nil)
                    return index
                }
                methods[layer][head] = nil
                done += 1
                progress?(done, total)
            }
        }
        prepared = true
    }

    /// Indexes keys that have left the window, in whole batches (all of them with `force`).
    private func upkeep(layer: Int, force: Bool) throws {
        guard configuration.attentionMethod.indexKind != nil else { return }
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
        try checkLayer(layer)
        let d = configuration.headDimension, h = configuration.kvHeads, g = configuration.queryHeadsPerKV
        guard queries.count == h * g * d else {
            throw SessionError.invalidArgument("queries must hold [\(h) KV heads, \(g) query heads, \(d)] = \(h * g * d) floats (got \(queries.count))")
        }
        if let row = firstNonFiniteRow(queries, dimension: d) {
            throw SessionError.invalidArgument("query of KV head \(row / g), query head \(row % g) holds NaN or Inf")
        }
        var outputs = [Float](repeating: 0, count: h * g * d)
        let failures = FirstError()
        try store.read { snapshot in
            let prepared = try (0..<h).map { try preparedMethod(snapshot: snapshot, layer: layer, head: $0) }
            outputs.withUnsafeMutableBufferPointer { out in
                DispatchQueue.concurrentPerform(iterations: h) { head in
                    do {
                        let group = UnsafeBufferPointer(rebasing: queries[(head * g * d)..<((head + 1) * g * d)])
                        let result = try attendHead(snapshot: snapshot, layer: layer, head: head, method: prepared[head], queries: group)
                        for (j, partial) in result.heads.enumerated() {
                            for c in 0..<d { out[(head * g + j) * d + c] = partial.output[c] }
                        }
                    } catch {
                        failures.record(error)
                    }
                }
            }
        }
        if let error = failures.first { throw error }
        return outputs
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
        let method = try PreparedMethod(configuration.attentionMethod, index: indexes[layer][head],
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
                if let index = indexes[layer][head] { try IndexCatalog.save(index, in: store, head: headID(layer, head)) }
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
