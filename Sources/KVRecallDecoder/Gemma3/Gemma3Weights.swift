import Dispatch
import Foundation

/// A dense f32 matrix `[rows, columns]`, row-major: a GGUF matrix with ggml dimensions
/// `[columns, rows]` dequantized. A linear layer computes y = W x (one row per output).
public struct Matrix: Sendable {
    public let rows: Int
    public let columns: Int
    public let values: [Float]

    public init(rows: Int, columns: Int, values: [Float]) {
        precondition(values.count == rows * columns)
        self.rows = rows
        self.columns = columns
        self.values = values
    }
}

/// One transformer block's weights (norm weights already hold Gemma's "+1").
public struct Gemma3BlockWeights: Sendable {
    public let attentionNorm: [Float]
    /// `[queryHeads * headDimension, embedding]`.
    public let query: Matrix
    /// `[kvHeads * headDimension, embedding]`.
    public let key: Matrix
    public let value: Matrix
    /// `[embedding, queryHeads * headDimension]`.
    public let output: Matrix
    /// Per-head RMS norms of q and k, `[headDimension]`.
    public let queryNorm: [Float]
    public let keyNorm: [Float]
    public let postAttentionNorm: [Float]
    public let feedForwardNorm: [Float]
    /// `[feedForward, embedding]`.
    public let gate: Matrix
    public let up: Matrix
    /// `[embedding, feedForward]`.
    public let down: Matrix
    public let postFeedForwardNorm: [Float]
}

/// Every weight of a Gemma 3 model, dequantized to f32 once at load.
public struct Gemma3Weights: Sendable {
    /// `[vocabulary, embedding]`: the input embedding and (tied) the output matrix.
    public let tokenEmbedding: Matrix
    /// The same matrix as the file's Q8_0 blocks, when it is Q8_0: decode steps compute the
    /// logits from it (a quarter of the bytes, the same weights).
    public let tokenEmbeddingQ8_0: [UInt8]?
    public let outputNorm: [Float]
    public let blocks: [Gemma3BlockWeights]

    /// Loads and checks every tensor's shape against `configuration`; blocks load in parallel.
    public init(file: GGUFFile, configuration c: Gemma3Configuration) throws {
        func matrix(_ name: String, rows: Int, columns: Int) throws -> Matrix {
            let t = try file.requireTensor(name)
            guard t.dimensions == [columns, rows] else {
                throw DecoderError("\(file.path): tensor \(name) has ggml dimensions \(t.dimensions), expected [\(columns), \(rows)]")
            }
            let values = try file.dequantize(t)
            guard values.allSatisfy(\.isFinite) else { throw DecoderError("\(file.path): tensor \(name) holds NaN or Inf") }
            return Matrix(rows: rows, columns: columns, values: values)
        }
        func vector(_ name: String, _ n: Int) throws -> [Float] {
            let t = try file.requireTensor(name)
            guard t.dimensions == [n] else {
                throw DecoderError("\(file.path): tensor \(name) has ggml dimensions \(t.dimensions), expected [\(n)]")
            }
            let v = try file.dequantize(t)
            guard v.allSatisfy(\.isFinite) else { throw DecoderError("\(file.path): tensor \(name) holds NaN or Inf") }
            return v
        }
        let e = c.embedding, q = c.queryHeads * c.headDimension, kv = c.kvHeads * c.headDimension
        tokenEmbedding = try matrix("token_embd.weight", rows: c.vocabularySize, columns: e)
        let embeddingTensor = try file.requireTensor("token_embd.weight")
        tokenEmbeddingQ8_0 = embeddingTensor.type == .q8_0 ? [UInt8](file.bytes(of: embeddingTensor)) : nil
        outputNorm = try vector("output_norm.weight", e)
        var loaded = [Result<Gemma3BlockWeights, Error>?](repeating: nil, count: c.blockCount)
        let lock = NSLock()
        DispatchQueue.concurrentPerform(iterations: c.blockCount) { i in
            let result = Result { () throws -> Gemma3BlockWeights in
                let p = "blk.\(i)."
                return Gemma3BlockWeights(
                    attentionNorm: try vector(p + "attn_norm.weight", e),
                    query: try matrix(p + "attn_q.weight", rows: q, columns: e),
                    key: try matrix(p + "attn_k.weight", rows: kv, columns: e),
                    value: try matrix(p + "attn_v.weight", rows: kv, columns: e),
                    output: try matrix(p + "attn_output.weight", rows: e, columns: q),
                    queryNorm: try vector(p + "attn_q_norm.weight", c.headDimension),
                    keyNorm: try vector(p + "attn_k_norm.weight", c.headDimension),
                    postAttentionNorm: try vector(p + "post_attention_norm.weight", e),
                    feedForwardNorm: try vector(p + "ffn_norm.weight", e),
                    gate: try matrix(p + "ffn_gate.weight", rows: c.feedForward, columns: e),
                    up: try matrix(p + "ffn_up.weight", rows: c.feedForward, columns: e),
                    down: try matrix(p + "ffn_down.weight", rows: e, columns: c.feedForward),
                    postFeedForwardNorm: try vector(p + "post_ffw_norm.weight", e))
            }
            lock.lock()
            loaded[i] = result
            lock.unlock()
        }
        blocks = try loaded.map { try $0!.get() }
    }
}
