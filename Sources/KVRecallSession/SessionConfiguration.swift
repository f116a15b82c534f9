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
    public var method: AttentionMethod
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
    /// LSH: tables a key must collide in; nil: calibrated at `buildIndexes` (a head no value
    /// serves selects by an exact scan).
    public var minCollisions: Int?
    /// Landmark: rank blocks by Quest's min/max bound instead of the mean key.
    public var landmarkBound: Bool
    /// Keys that left the window are indexed in batches of this many (`defaultUpkeepBatch`).
    public var upkeepBatch: Int
    /// Refresh (issue 25): once the keys a head's index received after its plan was made pass this
    /// fraction of the keys the plan was made over, the head is planned, budgeted, indexed and
    /// calibrated again over all its keys, trained on its prefill and decode queries, off the decode
    /// path; the result replaces the old one at a step boundary. nil: never (plan once, after the prompt).
    public var refreshFraction: Double?
    /// `auto` (issue 21): the median output error against exact attention, on a head's held-out
    /// queries, its plan may reach; the cheapest candidate within it wins (exact when none is
    /// cheaper). Default `PolicyParameters().targetError`.
    public var targetError: Double
    /// The store's context id for this sequence.
    public var context: UInt32
    /// Softmax scale applied to q.k; nil means 1/sqrt(headDimension).
    public var scale: Float?
    /// Logit soft-cap applied to the scaled scores (cap * tanh(s / cap)); nil for none.
    public var softCap: Float?
    /// The quantized tier every head keeps from its first token (`quantized` and `auto` read it;
    /// nil for the other methods: no codes).
    public var codes: CodeFormat?

    public init(layers: Int, kvHeads: Int, queryHeadsPerKV: Int, headDimension: Int, dtype: DType = .f16,
                method: AttentionMethod = .retrieval, k: Int = 100, sinks: Int = 4, window: Int = 64,
                ef: Int? = nil, nprobe: Int? = nil, beam: Int? = nil, minCollisions: Int? = nil, landmarkBound: Bool = false,
                upkeepBatch: Int = SessionConfiguration.defaultUpkeepBatch, context: UInt32 = 0, targetRecall: Double = 0.95, budgetMass: Double? = 0.9,
                refreshFraction: Double? = SessionConfiguration.defaultRefreshFraction,
                targetError: Double = PolicyParameters().targetError) {
        self.layers = layers
        self.kvHeads = kvHeads
        self.queryHeadsPerKV = queryHeadsPerKV
        self.headDimension = headDimension
        self.dtype = dtype
        self.method = method
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
        self.refreshFraction = refreshFraction
        self.targetError = targetError
        self.context = context
        codes = method.readsCodes ? CodeFormat().fitted(to: dtype) : nil
    }

    private enum CodingKeys: String, CodingKey {
        case layers, kvHeads, queryHeadsPerKV, headDimension, dtype, method, k, sinks, window, ef, nprobe, beam, minCollisions
        case landmarkBound, upkeepBatch, context, scale, targetRecall, softCap, budgetMass, codes, refreshFraction
        case targetError
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
        method = try c.decode(AttentionMethod.self, forKey: .method)
        k = try c.decode(Int.self, forKey: .k)
        sinks = try c.decode(Int.self, forKey: .sinks)
        window = try c.decode(Int.self, forKey: .window)
        ef = try c.decodeIfPresent(Int.self, forKey: .ef)
        nprobe = try c.decodeIfPresent(Int.self, forKey: .nprobe)
        beam = try c.decodeIfPresent(Int.self, forKey: .beam)
        targetRecall = try c.decodeIfPresent(Double.self, forKey: .targetRecall) ?? 0.95
        minCollisions = try c.decodeIfPresent(Int.self, forKey: .minCollisions)
        landmarkBound = try c.decodeIfPresent(Bool.self, forKey: .landmarkBound) ?? false
        scale = try c.decodeIfPresent(Float.self, forKey: .scale)
        softCap = try c.decodeIfPresent(Float.self, forKey: .softCap)
        // Sessions saved before the knob: auto raised k at 0.9, the other methods kept it fixed.
        budgetMass = try c.decodeIfPresent(Double.self, forKey: .budgetMass) ?? (method == .auto ? 0.9 : nil)
        codes = try c.decodeIfPresent(CodeFormat.self, forKey: .codes)  // sessions before the tier kept none
        upkeepBatch = try c.decode(Int.self, forKey: .upkeepBatch)
        // Sessions saved before the refresh get it (it changes no stored data, only upkeep).
        refreshFraction = c.contains(.refreshFraction) ? try c.decodeIfPresent(Double.self, forKey: .refreshFraction)
            : SessionConfiguration.defaultRefreshFraction
        targetError = try c.decodeIfPresent(Double.self, forKey: .targetError) ?? PolicyParameters().targetError
        context = try c.decode(UInt32.self, forKey: .context)
    }

    /// Encodes every knob; a refresh fraction of none is written as null, so that decoding tells
    /// it from a configuration saved before the knob existed.
    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(layers, forKey: .layers)
        try c.encode(kvHeads, forKey: .kvHeads)
        try c.encode(queryHeadsPerKV, forKey: .queryHeadsPerKV)
        try c.encode(headDimension, forKey: .headDimension)
        try c.encode(dtype, forKey: .dtype)
        try c.encode(method, forKey: .method)
        try c.encode(k, forKey: .k)
        try c.encode(sinks, forKey: .sinks)
        try c.encode(window, forKey: .window)
        try c.encodeIfPresent(ef, forKey: .ef)
        try c.encodeIfPresent(nprobe, forKey: .nprobe)
        try c.encodeIfPresent(beam, forKey: .beam)
        try c.encode(targetRecall, forKey: .targetRecall)
        try c.encodeIfPresent(minCollisions, forKey: .minCollisions)
        try c.encode(landmarkBound, forKey: .landmarkBound)
        try c.encodeIfPresent(scale, forKey: .scale)
        try c.encodeIfPresent(softCap, forKey: .softCap)
        try c.encodeIfPresent(budgetMass, forKey: .budgetMass)
        try c.encodeIfPresent(codes, forKey: .codes)
        try c.encode(upkeepBatch, forKey: .upkeepBatch)
        try c.encode(context, forKey: .context)
        if let refreshFraction { try c.encode(refreshFraction, forKey: .refreshFraction) } else { try c.encodeNil(forKey: .refreshFraction) }
        try c.encode(targetError, forKey: .targetError)
    }

    /// The refresh fraction by measurement (docs/BENCHMARKS.md "Long generations").
    public static let defaultRefreshFraction: Double? = 0.5
    /// The largest refresh fraction taken (a head's keys times it stays an integer); none never refreshes.
    public static let maximumRefreshFraction = PolicyParameters.maximumReplanFraction  // it becomes the planner's re-plan fraction
    /// Keys that left the window a head's index takes at once: 1, each key as it leaves (batches
    /// of 64 made one step in 64 pay for 64 inserts: step p99 8x its median; measured in
    /// docs/BENCHMARKS.md "Step times while refreshing").
    public static let defaultUpkeepBatch = 1

    /// The attention parameters of a decode step under this configuration.
    public var attentionParameters: AttentionParameters {
        var p = AttentionParameters(k: k, sinks: sinks, window: window, ef: ef, nprobe: nprobe, beam: beam)
        p.search.lsh.minCollisionsSetting = minCollisions
        p.search.landmark.bound = landmarkBound
        p.scale = scale
        p.softCap = softCap
        return p
    }

    /// Checks shapes and every knob.
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
        if let refreshFraction, !(refreshFraction > 0 && refreshFraction <= Self.maximumRefreshFraction) {
            throw SessionError.invalidArgument("the refresh fraction must be a positive number up to \(Int(Self.maximumRefreshFraction)), or none to never refresh (got \(refreshFraction))")
        }
        guard targetError > 0 && targetError.isFinite else {
            throw SessionError.invalidArgument("the target error must be a positive number (got \(targetError))")
        }
        guard upkeepBatch >= 1 else { throw SessionError.invalidArgument("the upkeep batch must be at least 1 (got \(upkeepBatch))") }
        if let problem = codes?.problem(dimension: headDimension, blockSize: KVStore.defaultBlockSize) {
            throw SessionError.invalidArgument(problem)
        }
        if method == .quantized && codes == nil {
            throw SessionError.invalidArgument("the quantized method needs a code format (codes)")
        }
        if let budgetMass, !(budgetMass > 0 && budgetMass <= 1) {
            throw SessionError.invalidArgument("the budget mass must be in (0, 1], or none for a fixed k (got \(budgetMass))")
        }
        // The attention knobs follow the library's one rule (the CLI and the REPL run it too).
        do { try attentionParameters.validate() } catch let error as IndexError {
            if case .invalidParameter(let message) = error { throw SessionError.invalidArgument(message) }
            throw error
        }
    }
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

