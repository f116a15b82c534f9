import Foundation

/// Errors of the decoder: a bad model file, a bad request, or a call out of order.
public struct DecoderError: Error, CustomStringConvertible, Equatable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Gemma 3's shape and the constants llama.cpp hard-codes for it (not stored in the GGUF file).
public struct Gemma3Configuration: Equatable, Sendable {
    public var blockCount: Int
    public var embedding: Int
    public var feedForward: Int
    public var queryHeads: Int
    public var kvHeads: Int
    /// Key (and query) length per head.
    public var headDimension: Int
    public var valueDimension: Int
    public var vocabularySize: Int
    public var rmsEpsilon: Float
    /// RoPE base of the global layers (`rope.freq_base`).
    public var globalRopeBase: Double
    /// RoPE base of the local (sliding-window) layers: 10000 for Gemma 3.
    public var localRopeBase: Double
    /// A local layer's query at position p sees positions p-window+1 ... p.
    public var slidingWindow: Int
    public var contextLength: Int
    /// Every `globalEvery`-th block (1-based) attends globally: blocks 5, 11, 17 of 18. Gemma 3
    /// files do not store it (llama.cpp hard-codes 6); `gemma3.attention.sliding_window_pattern`
    /// overrides it when present (the tests' tiny models use it).
    public var globalEvery: Int
    /// Softmax scale of q.k: 1/sqrt(headDimension) (Gemma 3's query_pre_attn_scalar = head dim).
    public var attentionScale: Float

    public init(blockCount: Int, embedding: Int, feedForward: Int, queryHeads: Int, kvHeads: Int,
                headDimension: Int, valueDimension: Int, vocabularySize: Int, rmsEpsilon: Float = 1e-6,
                globalRopeBase: Double = 1_000_000, localRopeBase: Double = 10_000, slidingWindow: Int = 512,
                contextLength: Int = 32768, globalEvery: Int = 6, attentionScale: Float? = nil) {
        self.blockCount = blockCount
        self.embedding = embedding
        self.feedForward = feedForward
        self.queryHeads = queryHeads
        self.kvHeads = kvHeads
        self.headDimension = headDimension
        self.valueDimension = valueDimension
        self.vocabularySize = vocabularySize
        self.rmsEpsilon = rmsEpsilon
        self.globalRopeBase = globalRopeBase
        self.localRopeBase = localRopeBase
        self.slidingWindow = slidingWindow
        self.contextLength = contextLength
        self.globalEvery = globalEvery
        self.attentionScale = attentionScale ?? 1 / Float(headDimension).squareRoot()
    }

    /// True for the blocks that attend over the whole context.
    public func isGlobal(_ block: Int) -> Bool { (block + 1) % globalEvery == 0 }

    /// The global blocks in order; the KV session's layer i is `globalBlocks[i]`.
    public var globalBlocks: [Int] { (0..<blockCount).filter(isGlobal) }

    /// Query heads sharing one KV head.
    public var groupSize: Int { queryHeads / kvHeads }

    /// Reads the shape from a GGUF file's `gemma3.*` metadata, refusing other architectures.
    public init(gguf file: GGUFFile, vocabularySize: Int) throws {
        func value(_ key: String) -> GGUFValue? { file.metadata[key] }
        guard let arch = value("general.architecture")?.stringValue else {
            throw DecoderError("\(file.path): no general.architecture in the metadata (not a model GGUF)")
        }
        guard arch == "gemma3" else {
            throw DecoderError("\(file.path): architecture '\(arch)' is not supported (only gemma3)")
        }
        func int(_ key: String) throws -> Int {
            guard let v = value("gemma3.\(key)")?.intValue, v > 0 else {
                throw DecoderError("\(file.path): missing or invalid gemma3.\(key)")
            }
            return v
        }
        let heads = try int("attention.head_count")
        let kvHeads = (value("gemma3.attention.head_count_kv")?.intValue) ?? heads
        let keyLength = try int("attention.key_length")
        let valueLength = (value("gemma3.attention.value_length")?.intValue) ?? keyLength
        guard kvHeads > 0, heads % kvHeads == 0 else {
            throw DecoderError("\(file.path): \(heads) query heads cannot be grouped over \(kvHeads) KV heads")
        }
        self.init(blockCount: try int("block_count"), embedding: try int("embedding_length"),
                  feedForward: try int("feed_forward_length"), queryHeads: heads, kvHeads: kvHeads,
                  headDimension: keyLength, valueDimension: valueLength, vocabularySize: vocabularySize,
                  rmsEpsilon: Float(value("gemma3.attention.layer_norm_rms_epsilon")?.doubleValue ?? 1e-6),
                  globalRopeBase: value("gemma3.rope.freq_base")?.doubleValue ?? 1_000_000,
                  localRopeBase: 10_000,
                  slidingWindow: value("gemma3.attention.sliding_window")?.intValue ?? 512,
                  contextLength: value("gemma3.context_length")?.intValue ?? 32768,
                  globalEvery: value("gemma3.attention.sliding_window_pattern")?.intValue ?? 6)
        guard globalEvery >= 1, slidingWindow >= 1 else {
            throw DecoderError("\(file.path): the sliding window and its pattern must be positive")
        }
        guard headDimension % 2 == 0, valueDimension == headDimension else {
            throw DecoderError("\(file.path): head dimension \(headDimension) must be even and equal the value length \(valueDimension)")
        }
    }
}
