import Foundation
import KVRecall

/// How a sequence's global layers attend at decode time: a `KVSession` configured from these.
public struct DecoderAttentionOptions: Sendable {
    public var method: AttentionMethod = .exact
    public var k = 100
    public var sinks = 4
    public var window = 64
    /// Search knobs; nil: calibrated per head at the index build (`targetRecall`).
    public var ef: Int? = nil
    public var nprobe: Int? = nil
    public var beam: Int? = nil
    /// Recall@k the calibrated knobs reach on held-out prefill queries.
    public var targetRecall = 0.95
    /// Adaptive budget of index methods (`SessionConfiguration.budgetMass`): each head's k is raised
    /// until its neediest query head keeps this much mass; nil keeps k fixed.
    public var budgetMass: Double? = 0.9
    public var minCollisions: Int? = nil
    /// How the 4 query heads of the KV head share the selection (default: the union of their own top-k).
    public var groupSelection = GroupSelection.union
    public var dtype: DType = .f16
    /// Index build knobs (HNSW M, IVF nlist, graph degree...).
    public var build = IndexBuildParameters()
    /// What the retrieval graph learns from, and what `auto` profiles and the calibration holds
    /// out: every query head's own query (the default: the union selection searches with those),
    /// or the group's summed query per position.
    public var prefillQueries: PrefillQueryRule = .everyHead
    /// The session's store directory; nil for a temporary one removed at `close()`.
    public var storeDirectory: String? = nil
    /// Long decodes: when a head's plan and index are made again (`SessionConfiguration.refreshFraction`; nil: never).
    public var refreshFraction: Double? = SessionConfiguration.defaultRefreshFraction
    /// Refreshes built on a background thread (true) or within the step that starts them.
    public var refreshInBackground = true
    /// `auto`: the output error a head's plan may reach (`SessionConfiguration.targetError`).
    public var targetError = PolicyParameters().targetError
    public init() {}
}

/// Which prefill queries the session stores for each KV head.
public enum PrefillQueryRule: String, Sendable, CaseIterable {
    /// One row per position: the sum of the group's queries (what a summed-query selection searches with).
    case summed
    /// One row per position and query head of the group.
    case everyHead = "every-head"
}

/// Which positions of a prefill return logits.
public enum LogitsRequest: Sendable {
    case none, last, all
}

/// One decoding state of a Gemma 3 model. Local layers keep their sliding window in memory and
/// attend exactly; the global layers' keys, values and prefill queries go into a `KVSession`,
/// which answers every decode step's global attention with the chosen method. A prefill (any
/// number of chunks, attended exactly) comes first, then `buildIndexes()`, then decode steps.
public final class Gemma3Sequence {
    public let model: Gemma3Model
    public let session: KVSession
    public let options: DecoderAttentionOptions
    /// Tokens processed so far (the next token's position).
    public private(set) var position = 0
    /// Records every global layer's queries (all query heads) when set before the prefill.
    public var recordQueries = false
    /// Per global layer, `[tokens, queryHeads, headDimension]` of the recorded positions.
    public private(set) var recordedQueries: [[Float]]
    /// Called after each global-layer attention of a decode step with (global layer index,
    /// queries `[kvHeads, group, d]`, outputs): a hook for diagnostics such as fidelity.
    public var decodeObserver: ((Int, [Float], [Float]) throws -> Void)?
    /// Time spent in the session's global attention over all decode steps (append excluded).
    public private(set) var globalAttentionNanos: UInt64 = 0

    private let configuration: Gemma3Configuration
    private var local: [LocalWindow?]
    /// Global layers' keys and values during the prefill, `[tokens, kvHeads, d]` (exact, f32).
    private var prefillKeys: [[Float]]
    private var prefillValues: [[Float]]
    /// Global layers' prefill queries, every query head, `[tokens, queryHeads, d]` (kept for `snapshot()`).
    private var prefillQueries: [[Float]]
    private var decoding = false

    public init(model: Gemma3Model, options: DecoderAttentionOptions = DecoderAttentionOptions()) throws {
        self.model = model
        self.options = options
        let c = model.configuration
        configuration = c
        var sc = SessionConfiguration(layers: c.globalBlocks.count, kvHeads: c.kvHeads, queryHeadsPerKV: c.groupSize,
                                      headDimension: c.headDimension, dtype: options.dtype, method: options.method,
                                      k: options.k, sinks: options.sinks, window: options.window, ef: options.ef,
                                      nprobe: options.nprobe, beam: options.beam, targetRecall: options.targetRecall,
                                      budgetMass: options.budgetMass, refreshFraction: options.refreshFraction,
                                      targetError: options.targetError)
        sc.context = 0
        session = try KVSession(configuration: sc, directory: options.storeDirectory)
        session.refreshInBackground = options.refreshInBackground
        session.parameters.scale = c.attentionScale
        session.parameters.search.lsh.minCollisionsSetting = options.minCollisions
        session.parameters.groupSelection = options.groupSelection
        local = (0..<c.blockCount).map { c.isGlobal($0) ? nil : LocalWindow(window: c.slidingWindow, width: c.kvHeads * c.headDimension) }
        let globals = c.globalBlocks.count
        prefillKeys = Array(repeating: [], count: globals)
        prefillValues = Array(repeating: [], count: globals)
        prefillQueries = Array(repeating: [], count: globals)
        recordedQueries = Array(repeating: [], count: globals)
    }

    /// A sequence that continues from `state` (a prefill taken with `snapshot()`), with its own
    /// session and method: one prefill serves several methods.
    public convenience init(model: Gemma3Model, options: DecoderAttentionOptions, restoring state: PrefillState) throws {
        try self.init(model: model, options: options)
        let c = configuration, d = c.headDimension
        for (b, window) in state.localWindows.enumerated() {
            guard let window, let mine = local[b] else { continue }
            mine.restore(keys: window.keys, values: window.values, firstPosition: window.firstPosition)
        }
        for g in 0..<c.globalBlocks.count {
            let n = state.globalKeys[g].count / (c.kvHeads * d)
            guard n > 0 else { continue }
            let keys = Self.headMajor(state.globalKeys[g], tokens: n, heads: c.kvHeads, dimension: d)
            let values = Self.headMajor(state.globalValues[g], tokens: n, heads: c.kvHeads, dimension: d)
            try keys.withUnsafeBufferPointer { kb in
                try values.withUnsafeBufferPointer { vb in try session.append(layer: g, keys: kb, values: vb) }
            }
            let queries = Self.trainingQueries(state.globalQueries[g], tokens: n, kvHeads: c.kvHeads, group: c.groupSize,
                                               dimension: d, rule: options.prefillQueries)
            try queries.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: g, queries: $0) }
        }
        prefillKeys = state.globalKeys
        prefillValues = state.globalValues
        prefillQueries = state.globalQueries
        position = state.position
    }

    /// The state after a prefill (local windows, the global layers' keys, values and summed
    /// queries), to start other sequences from without recomputing it.
    public func snapshot() throws -> PrefillState {
        guard !decoding else { throw DecoderError("snapshot after decoding started: take it right after the prefill") }
        return PrefillState(position: position,
                            localWindows: local.map { $0.map { (keys: $0.keys, values: $0.values, firstPosition: $0.firstPosition) } },
                            globalKeys: prefillKeys, globalValues: prefillValues, globalQueries: prefillQueries)
    }

    /// Closes the session (removing a temporary store).
    public func close() { session.close() }

    /// Runs `tokens` through the model with exact attention, in chunks of `chunk` tokens, storing
    /// the global layers' keys, values and prefill queries in the session. Returns logits
    /// `[positions, vocabulary]` for the requested positions.
    @discardableResult
    public func prefill(_ tokens: [Int32], chunk: Int = 512, logits request: LogitsRequest = .last,
                        progress: ((Int, Int) -> Void)? = nil) throws -> [Float] {
        guard !decoding else { throw DecoderError("prefill after decoding started: prefill the whole prompt first") }
        guard chunk >= 1 else { throw DecoderError("the prefill chunk must hold at least one token") }
        try checkTokens(tokens)
        var out: [Float] = []
        var done = 0
        while done < tokens.count {
            let n = min(chunk, tokens.count - done)
            let isLast = done + n == tokens.count
            let rows: Range<Int>? = switch request {
            case .none: nil
            case .all: 0..<n
            case .last: isLast ? (n - 1)..<n : nil
            }
            let part = try forward(Array(tokens[done..<(done + n)]), decode: false, logitRows: rows)
            out.append(contentsOf: part)
            done += n
            progress?(done, tokens.count)
        }
        return out
    }

    /// Builds the session's indexes over the prefill (the global layers' keys outside the window).
    public func buildIndexes(progress: ((Int, Int) -> Void)? = nil) throws {
        try session.buildIndexes(parameters: options.build, progress: progress)
    }

    /// The session's report (what each head runs, `auto`'s plan and why, index, calibration), one
    /// line per global layer and KV head, each named by the model's block ("layer 5 head 0"), not
    /// by the session's layer number (0, 1, 2 for blocks 5, 11, 17).
    public func report() -> [String] {
        let blocks = model.configuration.globalBlocks
        return session.report { "layer \(blocks[$0])" }
    }

    /// One decode step: feeds `token` at the next position and returns the next-token logits
    /// `[vocabulary]`. Global attention goes through the session with the chosen method.
    public func step(_ token: Int32) throws -> [Float] {
        try checkTokens([token])
        if !decoding {
            decoding = true
            prefillKeys = prefillKeys.map { _ in [] }
            prefillValues = prefillValues.map { _ in [] }
            prefillQueries = prefillQueries.map { _ in [] }
        }
        return try forward([token], decode: true, logitRows: 0..<1)
    }

    private func checkTokens(_ tokens: [Int32]) throws {
        guard !tokens.isEmpty else { throw DecoderError("no tokens to run") }
        guard position + tokens.count <= configuration.contextLength else {
            throw DecoderError("context would reach \(position + tokens.count) tokens; the model's context length is \(configuration.contextLength)")
        }
        let vocabulary = configuration.vocabularySize
        if let bad = tokens.first(where: { $0 < 0 || Int($0) >= vocabulary }) {
            throw DecoderError("token id \(bad) is outside the vocabulary (0..<\(vocabulary))")
        }
    }

    /// The forward pass over `n` consecutive tokens starting at `position`.
    private func forward(_ tokens: [Int32], decode: Bool, logitRows: Range<Int>?) throws -> [Float] {
        let c = configuration, w = model.weights
        let n = tokens.count, e = c.embedding, d = c.headDimension
        let qWidth = c.queryHeads * d, kvWidth = c.kvHeads * d
        BLAS.setThreads(ProcessInfo.processInfo.activeProcessorCount)

        var x = [Float](repeating: 0, count: n * e)
        let scale = Float(Double(e).squareRoot())
        w.tokenEmbedding.values.withUnsafeBufferPointer { table in
            for (t, id) in tokens.enumerated() {
                let row = table.baseAddress! + Int(id) * e
                for i in 0..<e { x[t * e + i] = row[i] * scale }
            }
        }
        var h = [Float](repeating: 0, count: n * e)
        var q = [Float](repeating: 0, count: n * qWidth)
        var k = [Float](repeating: 0, count: n * kvWidth)
        var v = [Float](repeating: 0, count: n * kvWidth)
        var attended = [Float](repeating: 0, count: n * qWidth)
        var projected = [Float](repeating: 0, count: n * e)
        var gate = [Float](repeating: 0, count: n * c.feedForward)
        var up = [Float](repeating: 0, count: n * c.feedForward)
        var globalIndex = 0

        for (b, block) in w.blocks.enumerated() {
            // Attention.
            Gemma3Kernels.rmsNorm(x, rows: n, width: e, weight: block.attentionNorm, epsilon: c.rmsEpsilon, into: &h)
            Gemma3Kernels.linear(h, rows: n, block.query, into: &q)
            Gemma3Kernels.linear(h, rows: n, block.key, into: &k)
            Gemma3Kernels.linear(h, rows: n, block.value, into: &v)
            q.withUnsafeMutableBufferPointer { p in
                Gemma3Kernels.rmsNorm(p.baseAddress!, rows: n * c.queryHeads, width: d, weight: block.queryNorm,
                                      epsilon: c.rmsEpsilon, into: p.baseAddress!)
            }
            k.withUnsafeMutableBufferPointer { p in
                Gemma3Kernels.rmsNorm(p.baseAddress!, rows: n * c.kvHeads, width: d, weight: block.keyNorm,
                                      epsilon: c.rmsEpsilon, into: p.baseAddress!)
            }
            let base = c.isGlobal(b) ? c.globalRopeBase : c.localRopeBase
            Gemma3Kernels.rope(&q, tokens: n, heads: c.queryHeads, dimension: d, firstPosition: position, base: base)
            Gemma3Kernels.rope(&k, tokens: n, heads: c.kvHeads, dimension: d, firstPosition: position, base: base)

            if let window = local[b] {
                window.append(keys: k, values: v, rows: n)
                window.attend(queries: q, tokens: n, firstPosition: position, configuration: c, into: &attended)
            } else {
                try attendGlobal(globalIndex, queries: q, keys: k, values: v, tokens: n, decode: decode, into: &attended)
                globalIndex += 1
            }
            Gemma3Kernels.linear(attended, rows: n, block.output, into: &projected)
            projected.withUnsafeMutableBufferPointer { p in
                Gemma3Kernels.rmsNorm(p.baseAddress!, rows: n, width: e, weight: block.postAttentionNorm,
                                      epsilon: c.rmsEpsilon, into: p.baseAddress!)
            }
            for i in 0..<(n * e) { x[i] += projected[i] }

            // Feed-forward (GeGLU).
            Gemma3Kernels.rmsNorm(x, rows: n, width: e, weight: block.feedForwardNorm, epsilon: c.rmsEpsilon, into: &h)
            Gemma3Kernels.linear(h, rows: n, block.gate, into: &gate)
            Gemma3Kernels.linear(h, rows: n, block.up, into: &up)
            gate.withUnsafeMutableBufferPointer { g in
                up.withUnsafeBufferPointer { u in Gemma3Kernels.geglu(gate: g.baseAddress!, up: u.baseAddress!, count: g.count) }
            }
            Gemma3Kernels.linear(gate, rows: n, block.down, into: &projected)
            projected.withUnsafeMutableBufferPointer { p in
                Gemma3Kernels.rmsNorm(p.baseAddress!, rows: n, width: e, weight: block.postFeedForwardNorm,
                                      epsilon: c.rmsEpsilon, into: p.baseAddress!)
            }
            for i in 0..<(n * e) { x[i] += projected[i] }
        }
        position += n

        guard let rows = logitRows, !rows.isEmpty else { return [] }
        var normed = [Float](repeating: 0, count: rows.count * e)
        x.withUnsafeBufferPointer { xp in
            Gemma3Kernels.rmsNorm(xp.baseAddress! + rows.lowerBound * e, rows: rows.count, width: e, weight: w.outputNorm,
                                  epsilon: c.rmsEpsilon, into: &normed)
        }
        var logits = [Float](repeating: 0, count: rows.count * c.vocabularySize)
        if rows.count == 1, let blocks = w.tokenEmbeddingQ8_0 {
            Gemma3Kernels.q8_0MatrixVector(blocks, rows: c.vocabularySize, columns: e, normed, into: &logits)
        } else {
            Gemma3Kernels.linear(normed, rows: rows.count, w.tokenEmbedding, into: &logits)
        }
        return logits
    }

    /// A global layer: exact causal attention over the prefill, or the session's method at decode.
    private func attendGlobal(_ g: Int, queries q: [Float], keys k: [Float], values v: [Float], tokens n: Int,
                              decode: Bool, into out: inout [Float]) throws {
        let c = configuration, d = c.headDimension, group = c.groupSize
        if recordQueries { recordedQueries[g].append(contentsOf: q) }
        // The session wants [kvHeads, tokens, d]; the forward pass holds [tokens, kvHeads, d].
        let headMajorKeys = Self.headMajor(k, tokens: n, heads: c.kvHeads, dimension: d)
        let headMajorValues = Self.headMajor(v, tokens: n, heads: c.kvHeads, dimension: d)
        try headMajorKeys.withUnsafeBufferPointer { kb in
            try headMajorValues.withUnsafeBufferPointer { vb in try session.append(layer: g, keys: kb, values: vb) }
        }
        if decode {
            // [1, queryHeads, d] is [kvHeads, group, d] for one token.
            let start = monotonicNanos()
            let result = try q.withUnsafeBufferPointer { try session.attend(layer: g, queries: $0) }
            globalAttentionNanos += monotonicNanos() - start
            for i in 0..<result.count { out[i] = result[i] }
            try decodeObserver?(g, q, result)
            return
        }
        // Prefill: the training queries of the retrieval graph, [kvHeads, rows, d].
        let training = Self.trainingQueries(q, tokens: n, kvHeads: c.kvHeads, group: group, dimension: d,
                                            rule: options.prefillQueries)
        try training.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: g, queries: $0) }
        prefillQueries[g].append(contentsOf: q)
        prefillKeys[g].append(contentsOf: k)
        prefillValues[g].append(contentsOf: v)
        let m = prefillKeys[g].count / (c.kvHeads * d)
        prefillKeys[g].withUnsafeBufferPointer { kp in
            prefillValues[g].withUnsafeBufferPointer { vp in
                q.withUnsafeBufferPointer { qp in
                    out.withUnsafeMutableBufferPointer { op in
                        Gemma3Kernels.causalAttention(queries: qp.baseAddress!, tokens: n, firstQueryPosition: position,
                                                      keys: kp.baseAddress!, values: vp.baseAddress!, keyRows: m,
                                                      firstKeyPosition: 0, queryHeads: c.queryHeads, kvHeads: c.kvHeads,
                                                      dimension: d, window: nil, scale: c.attentionScale,
                                                      into: op.baseAddress!)
                    }
                }
            }
        }
    }

    /// `[kvHeads, rows, d]` training rows from `[tokens, kvHeads * group, d]` queries: per KV head,
    /// the group's sum per token, or every head's query (row t * group + j).
    static func trainingQueries(_ q: [Float], tokens n: Int, kvHeads: Int, group: Int, dimension d: Int,
                                rule: PrefillQueryRule) -> [Float] {
        let perToken = rule == .summed ? 1 : group
        var out = [Float](repeating: 0, count: kvHeads * n * perToken * d)
        for t in 0..<n {
            for kvh in 0..<kvHeads {
                for j in 0..<group {
                    let src = (t * kvHeads * group + kvh * group + j) * d
                    let row = rule == .summed ? t : t * group + j
                    let dst = (kvh * n * perToken + row) * d
                    for i in 0..<d { out[dst + i] += q[src + i] }
                }
            }
        }
        return out
    }

    /// `[tokens, heads, d]` rows as `[heads, tokens, d]`.
    static func headMajor(_ x: [Float], tokens n: Int, heads: Int, dimension d: Int) -> [Float] {
        swapOuterAxes(x, n, heads, dimension: d)
    }

    /// `[a, b, d]` as `[b, a, d]` (a copy; none when either axis has length 1).
    static func swapOuterAxes(_ x: [Float], _ a: Int, _ b: Int, dimension d: Int) -> [Float] {
        guard a > 1 && b > 1 else { return x }
        var out = [Float](repeating: 0, count: x.count)
        for i in 0..<a {
            for j in 0..<b {
                for c in 0..<d { out[(j * a + i) * d + c] = x[(i * b + j) * d + c] }
            }
        }
        return out
    }
}

/// A local layer's sliding window: the keys and values of the last positions, `[rows, width]`,
/// trimmed in amortised batches to the `window - 1` positions a future query can still see.
final class LocalWindow {
    let window: Int
    let width: Int
    private(set) var keys: [Float] = []
    private(set) var values: [Float] = []
    /// Position of row 0.
    private(set) var firstPosition = 0
    var rows: Int { keys.count / width }

    init(window: Int, width: Int) {
        self.window = window
        self.width = width
    }

    func restore(keys k: [Float], values v: [Float], firstPosition p: Int) {
        keys = k
        values = v
        firstPosition = p
    }

    func append(keys k: [Float], values v: [Float], rows n: Int) {
        keys.append(contentsOf: k)
        values.append(contentsOf: v)
    }

    /// Exact sliding-window attention of `n` queries at positions `firstPosition...` (the rows
    /// just appended), then trims rows no future query can see.
    func attend(queries: [Float], tokens n: Int, firstPosition queryPosition: Int, configuration c: Gemma3Configuration,
                into out: inout [Float]) {
        let m = rows
        keys.withUnsafeBufferPointer { kp in
            values.withUnsafeBufferPointer { vp in
                queries.withUnsafeBufferPointer { qp in
                    out.withUnsafeMutableBufferPointer { op in
                        Gemma3Kernels.causalAttention(queries: qp.baseAddress!, tokens: n, firstQueryPosition: queryPosition,
                                                      keys: kp.baseAddress!, values: vp.baseAddress!, keyRows: m,
                                                      firstKeyPosition: firstPosition, queryHeads: c.queryHeads,
                                                      kvHeads: c.kvHeads, dimension: c.headDimension, window: window,
                                                      scale: c.attentionScale, into: op.baseAddress!)
                    }
                }
            }
        }
        let keep = window - 1
        if m > keep + max(keep, 64) {
            let drop = m - keep
            keys.removeFirst(drop * width)
            values.removeFirst(drop * width)
            firstPosition += drop
        }
    }
}

/// A prompt prefilled once with exact attention: the state every method continues from, the
/// next-token logits of its last position and the prefill's time.
public struct PrefilledPrompt: Sendable {
    public let state: PrefillState
    public let logits: [Float]
    public let seconds: Double
}

extension Gemma3Sequence {
    /// Prefills `tokens` with exact attention on a temporary sequence and keeps its snapshot.
    public static func prefillPrompt(model: Gemma3Model, tokens: [Int32],
                                     progress: ((Int, Int) -> Void)? = nil) throws -> PrefilledPrompt {
        var options = DecoderAttentionOptions()
        options.method = .exact
        let sequence = try Gemma3Sequence(model: model, options: options)
        defer { sequence.close() }
        let start = monotonicNanos()
        let logits = try sequence.prefill(tokens, logits: .last, progress: progress)
        return PrefilledPrompt(state: try sequence.snapshot(), logits: logits,
                               seconds: Double(monotonicNanos() - start) / 1e9)
    }
}

/// A sequence's state right after its prefill: enough to continue decoding under any method.
public struct PrefillState: Sendable {
    public let position: Int
    let localWindows: [(keys: [Float], values: [Float], firstPosition: Int)?]
    /// Per global layer, `[tokens, kvHeads, d]`; queries `[tokens, queryHeads, d]`.
    let globalKeys: [[Float]]
    let globalValues: [[Float]]
    let globalQueries: [[Float]]
}
