import Foundation
import KVRecall
import KVRecallTestSupport
import Testing
@testable import KVRecallDecoder

/// A tiny random-weight Gemma 3 (two blocks: one local with a short sliding window, one global),
/// written as GGUF by the test, and a plain double-precision forward pass written here.
struct TinyGemma {
    static let embedding = 32, heads = 4, d = 16, ffn = 48, window = 8, blocks = 2
    static let vocabulary = 3 + 256 + 41

    let path: String
    /// KV heads: 1 (Gemma 3 270M's layout) or 2 (two GQA groups of 2).
    let kvHeads: Int
    /// Every tensor's values as the file stores them (f32; the embedding dequantized from Q8_0).
    var tensors: [String: [Float]] = [:]

    /// Writes the model under `directory`.
    /// `poisoned` names a tensor whose first value is written as NaN (a damaged model).
    init(directory: String, seed: UInt64, kvHeads: Int = 1, poisoned: String? = nil) throws {
        self.kvHeads = kvHeads
        var rng = SeededRandom(seed: seed)
        var writer = GGUFWriter()
        writer.set("general.architecture", .string("gemma3"))
        writer.set("gemma3.block_count", .uint32(UInt32(Self.blocks)))
        writer.set("gemma3.embedding_length", .uint32(UInt32(Self.embedding)))
        writer.set("gemma3.feed_forward_length", .uint32(UInt32(Self.ffn)))
        writer.set("gemma3.attention.head_count", .uint32(UInt32(Self.heads)))
        writer.set("gemma3.attention.head_count_kv", .uint32(UInt32(kvHeads)))
        writer.set("gemma3.attention.key_length", .uint32(UInt32(Self.d)))
        writer.set("gemma3.attention.value_length", .uint32(UInt32(Self.d)))
        writer.set("gemma3.attention.layer_norm_rms_epsilon", .float32(1e-6))
        writer.set("gemma3.rope.freq_base", .float32(1_000_000))
        writer.set("gemma3.attention.sliding_window", .uint32(UInt32(Self.window)))
        writer.set("gemma3.attention.sliding_window_pattern", .uint32(2))
        writer.set("gemma3.context_length", .uint32(4096))
        // Vocabulary: <pad>, <eos>, <bos>, 256 byte tokens, then a few pieces.
        var tokens = ["<pad>", "<eos>", "<bos>"] + (0..<256).map { String(format: "<0x%02X>", $0) }
        var types: [Int32] = [3, 3, 3] + Array(repeating: 6, count: 256)
        let pieces = ["▁", "e", "t", "a", "o", "n", "▁t", "he", "▁the", "in", "er", "an", "re", "on", "at", "en",
                      "▁a", "or", "es", "is", "it", "ar", "te", "ed", "▁s", "st", "nd", "ou", "▁o", "ng", "▁w", "le",
                      "ha", "▁c", "al", "to", "ti", "▁b", "se", "ve", "▁f"]
        tokens += pieces
        types += Array(repeating: 1, count: pieces.count)
        let scores: [Float] = tokens.indices.map { $0 < 259 ? 0 : -Float($0 - 259) }
        writer.set("tokenizer.ggml.model", .string("llama"))
        writer.set("tokenizer.ggml.tokens", .array(tokens.map { .string($0) }))
        writer.set("tokenizer.ggml.scores", .array(scores.map { .float32($0) }))
        writer.set("tokenizer.ggml.token_type", .array(types.map { .int32($0) }))
        writer.set("tokenizer.ggml.bos_token_id", .uint32(2))
        writer.set("tokenizer.ggml.eos_token_id", .uint32(1))
        writer.set("tokenizer.ggml.unknown_token_id", .uint32(3))
        writer.set("tokenizer.ggml.add_space_prefix", .bool(false))

        var stored: [String: [Float]] = [:]
        func add(_ name: String, rows: Int, columns: Int, scale: Float, half: Bool = false) {
            var values = (0..<(rows * columns)).map { _ in rng.gaussian() * scale }
            if half { values = values.map { Float(Float16($0)) } }
            if name == poisoned { values[0] = .nan }
            writer.addTensor(name: name, dimensions: rows == 1 ? [columns] : [columns, rows], values: values,
                             as: half ? .f16 : .f32)
            stored[name] = values
        }
        func norm(_ name: String, _ n: Int) {
            let values = (0..<n).map { _ in 1 + 0.2 * rng.gaussian() }
            writer.addTensor(name: name, dimensions: [n], values: values, as: .f32)
            stored[name] = values
        }
        let e = Self.embedding, q = Self.heads * Self.d, kv = kvHeads * Self.d
        // The embedding (and output matrix) as Q8_0, like the real model's: decode steps read it
        // through the Q8_0 kernel, prefills through its f32 dequantization.
        let embedding = (0..<(Self.vocabulary * e)).map { _ in rng.gaussian() * 0.5 }
        let blocks = ggmlQuantizeQ8_0(embedding)
        writer.addTensor(name: "token_embd.weight", dimensions: [e, Self.vocabulary], type: .q8_0, data: blocks)
        var dequantized = [Float](repeating: 0, count: embedding.count)
        try blocks.withUnsafeBytes { raw in
            try dequantized.withUnsafeMutableBufferPointer { out in
                try ggmlDequantize(.q8_0, from: raw.baseAddress!, count: embedding.count, into: out.baseAddress!)
            }
        }
        stored["token_embd.weight"] = dequantized
        norm("output_norm.weight", e)
        for b in 0..<Self.blocks {
            let p = "blk.\(b)."
            norm(p + "attn_norm.weight", e)
            add(p + "attn_q.weight", rows: q, columns: e, scale: 0.3)
            add(p + "attn_k.weight", rows: kv, columns: e, scale: 0.3)
            add(p + "attn_v.weight", rows: kv, columns: e, scale: 0.3)
            add(p + "attn_output.weight", rows: e, columns: q, scale: 0.2)
            norm(p + "attn_q_norm.weight", Self.d)
            norm(p + "attn_k_norm.weight", Self.d)
            norm(p + "post_attention_norm.weight", e)
            norm(p + "ffn_norm.weight", e)
            add(p + "ffn_gate.weight", rows: Self.ffn, columns: e, scale: 0.3)
            add(p + "ffn_up.weight", rows: Self.ffn, columns: e, scale: 0.3)
            add(p + "ffn_down.weight", rows: e, columns: Self.ffn, scale: 0.2)
            norm(p + "post_ffw_norm.weight", e)
        }
        path = (directory as NSString).appendingPathComponent("tiny-gemma3.gguf")
        try writer.write(to: path)
        tensors = stored
    }

    /// Logits `[tokens, vocabulary]` of every position by a plain double-precision forward pass:
    /// full causal attention recomputed per layer, no caches, no BLAS.
    func referenceLogits(_ ids: [Int32]) -> [[Double]] {
        let e = Self.embedding, d = Self.d, h = Self.heads, n = ids.count
        func w(_ name: String) -> [Double] { tensors[name]!.map(Double.init) }
        func matvec(_ m: [Double], rows: Int, cols: Int, _ x: [Double]) -> [Double] {
            (0..<rows).map { r in (0..<cols).reduce(0.0) { $0 + m[r * cols + $1] * x[$1] } }
        }
        func rms(_ x: [Double], _ weight: [Double]) -> [Double] {
            let inv = 1 / ((x.reduce(0) { $0 + $1 * $1 } / Double(x.count)) + 1e-6).squareRoot()
            return x.indices.map { x[$0] * inv * weight[$0] }
        }
        func rope(_ x: [Double], position: Int, base: Double) -> [Double] {
            var y = x
            for i in 0..<(d / 2) {
                let angle = Double(position) * pow(base, -2 * Double(i) / Double(d))
                y[i] = x[i] * cos(angle) - x[i + d / 2] * sin(angle)
                y[i + d / 2] = x[i] * sin(angle) + x[i + d / 2] * cos(angle)
            }
            return y
        }
        let table = w("token_embd.weight")
        var x: [[Double]] = ids.map { id in (0..<e).map { table[Int(id) * e + $0] * Double(e).squareRoot() } }
        for b in 0..<Self.blocks {
            let p = "blk.\(b).", global = b == 1
            let base = global ? 1_000_000.0 : 10_000.0
            var queries: [[[Double]]] = [], keys: [[[Double]]] = [], values: [[[Double]]] = []
            let group = h / kvHeads
            for t in 0..<n {
                let hn = rms(x[t], w(p + "attn_norm.weight"))
                let qAll = matvec(w(p + "attn_q.weight"), rows: h * d, cols: e, hn)
                queries.append((0..<h).map { head in
                    rope(rms(Array(qAll[(head * d)..<((head + 1) * d)]), w(p + "attn_q_norm.weight")), position: t, base: base)
                })
                let kAll = matvec(w(p + "attn_k.weight"), rows: kvHeads * d, cols: e, hn)
                let vAll = matvec(w(p + "attn_v.weight"), rows: kvHeads * d, cols: e, hn)
                keys.append((0..<kvHeads).map { kvh in
                    rope(rms(Array(kAll[(kvh * d)..<((kvh + 1) * d)]), w(p + "attn_k_norm.weight")), position: t, base: base)
                })
                values.append((0..<kvHeads).map { kvh in Array(vAll[(kvh * d)..<((kvh + 1) * d)]) })
            }
            for t in 0..<n {
                var attended: [Double] = []
                let first = global ? 0 : max(0, t - Self.window + 1)
                for head in 0..<h {
                    let kvh = head / group
                    let scores = (first...t).map { j in (0..<d).reduce(0.0) { $0 + queries[t][head][$1] * keys[j][kvh][$1] } / Double(d).squareRoot() }
                    let peak = scores.max()!
                    let weights = scores.map { exp($0 - peak) }
                    let total = weights.reduce(0, +)
                    var o = [Double](repeating: 0, count: d)
                    for (i, j) in (first...t).enumerated() { for c in 0..<d { o[c] += weights[i] / total * values[j][kvh][c] } }
                    attended += o
                }
                let projected = rms(matvec(w(p + "attn_output.weight"), rows: e, cols: h * d, attended), w(p + "post_attention_norm.weight"))
                x[t] = zip(x[t], projected).map(+)
            }
            for t in 0..<n {
                let hn = rms(x[t], w(p + "ffn_norm.weight"))
                let gate = matvec(w(p + "ffn_gate.weight"), rows: Self.ffn, cols: e, hn)
                let up = matvec(w(p + "ffn_up.weight"), rows: Self.ffn, cols: e, hn)
                let c = (2 / Double.pi).squareRoot()
                let act = zip(gate, up).map { g, u in 0.5 * g * (1 + tanh(c * (g + 0.044715 * g * g * g))) * u }
                let down = rms(matvec(w(p + "ffn_down.weight"), rows: e, cols: Self.ffn, act), w(p + "post_ffw_norm.weight"))
                x[t] = zip(x[t], down).map(+)
            }
        }
        return x.map { row in matvec(table, rows: Self.vocabulary, cols: e, rms(row, w("output_norm.weight"))) }
    }
}

/// max |a - b| / max |b|.
func relativeMaxError(_ a: [Float], _ b: [Double]) -> Double {
    let scale = b.map(abs).max() ?? 1
    return zip(a, b).map { abs(Double($0) - $1) }.max()! / max(scale, 1e-12)
}

@Suite struct Gemma3ForwardTests {
    /// 100 tokens: past the local window's trimming point (window - 1 + 64 rows), so trimming is checked too.
    static let ids: [Int32] = {
        var rng = SeededRandom(seed: 5)
        return [2] + (0..<99).map { _ in Int32.random(in: 3..<Int32(TinyGemma.vocabulary), using: &rng) }
    }()

    @Test func configurationReadsTheTinyModel() throws {
        let dir = TemporaryDirectory("tiny-gemma")
        let tiny = try TinyGemma(directory: dir.path, seed: 7)
        let model = try Gemma3Model(path: tiny.path)
        let c = model.configuration
        #expect(c.blockCount == 2 && c.embedding == 32 && c.queryHeads == 4 && c.kvHeads == 1 && c.headDimension == 16)
        #expect(c.globalBlocks == [1])
        #expect(c.slidingWindow == 8 && c.vocabularySize == TinyGemma.vocabulary)
        #expect(abs(c.attentionScale - 0.25) < 1e-7)
    }

    @Test(arguments: [(1, 1), (5, 1), (64, 1), (5, 2)])
    func prefillEqualsTheDoubleReference(chunk: Int, kvHeads: Int) throws {
        let dir = TemporaryDirectory("tiny-gemma")
        let tiny = try TinyGemma(directory: dir.path, seed: 11, kvHeads: kvHeads)
        let model = try Gemma3Model(path: tiny.path)
        let sequence = try Gemma3Sequence(model: model)
        defer { sequence.close() }
        let logits = try sequence.prefill(Self.ids, chunk: chunk, logits: .all)
        let reference = tiny.referenceLogits(Self.ids)
        #expect(logits.count == Self.ids.count * TinyGemma.vocabulary)
        let error = relativeMaxError(logits, reference.flatMap { $0 })
        #expect(error < 1e-4, "chunk \(chunk): relative error \(error)")
    }

    @Test(arguments: [1, 2])
    func decodeStepsThroughTheSessionEqualTheReference(kvHeads: Int) throws {
        let dir = TemporaryDirectory("tiny-gemma")
        let tiny = try TinyGemma(directory: dir.path, seed: 13, kvHeads: kvHeads)
        let model = try Gemma3Model(path: tiny.path)
        var options = DecoderAttentionOptions()
        options.method = .exact
        options.dtype = .f32
        let sequence = try Gemma3Sequence(model: model, options: options)
        defer { sequence.close() }
        let prompt = 9
        var logits = [try sequence.prefill(Array(Self.ids[0..<prompt]), chunk: 4, logits: .last)]
        try sequence.buildIndexes()
        for t in prompt..<Self.ids.count { logits.append(try sequence.step(Self.ids[t])) }
        #expect(try sequence.session.length(layer: 0) == Self.ids.count)
        let reference = tiny.referenceLogits(Self.ids)
        for (i, row) in logits.enumerated() {
            let position = prompt - 1 + i
            let error = relativeMaxError(row, reference[position])
            #expect(error < 1e-4, "position \(position): relative error \(error)")
        }
    }

    @Test func aSnapshotContinuesLikeTheOriginal() throws {
        let dir = TemporaryDirectory("tiny-gemma")
        let tiny = try TinyGemma(directory: dir.path, seed: 17, kvHeads: 2)
        let model = try Gemma3Model(path: tiny.path)
        var options = DecoderAttentionOptions()
        options.dtype = .f32
        let original = try Gemma3Sequence(model: model, options: options)
        defer { original.close() }
        _ = try original.prefill(Array(Self.ids[0..<80]), chunk: 5)
        let restored = try Gemma3Sequence(model: model, options: options, restoring: try original.snapshot())
        defer { restored.close() }
        #expect(restored.position == 80)
        for t in 80..<Self.ids.count {
            let a = try original.step(Self.ids[t]), b = try restored.step(Self.ids[t])
            #expect(a == b)
        }
    }

    /// A tiny model's sequence with `method` (k 4, sinks 1, window 2), prefilled with BOS and
    /// `length` random tokens and its indexes built; the prompt's ids come back with it.
    static func prefilledSequence(_ dir: TemporaryDirectory, modelSeed: UInt64, kvHeads: Int = 1, method: AttentionMethod,
                                  promptSeed: UInt64, length: Int) throws -> (Gemma3Sequence, [Int32]) {
        let tiny = try TinyGemma(directory: dir.path, seed: modelSeed, kvHeads: kvHeads)
        let model = try Gemma3Model(path: tiny.path)
        var options = DecoderAttentionOptions()
        options.method = method
        options.k = 4
        options.sinks = 1
        options.window = 2
        let sequence = try Gemma3Sequence(model: model, options: options)
        var ids: [Int32] = [2]
        var rng = SeededRandom(seed: promptSeed)
        for _ in 0..<length { ids.append(Int32.random(in: 3..<Int32(TinyGemma.vocabulary), using: &rng)) }
        _ = try sequence.prefill(ids, chunk: 64)
        try sequence.buildIndexes()
        return (sequence, ids)
    }

    @Test(arguments: AttentionMethod.allCases)
    func everySessionMethodDecodes(method: AttentionMethod) throws {
        // A longer prompt so the index holds keys outside the static part.
        let dir = TemporaryDirectory("tiny-gemma")
        let (sequence, ids) = try Self.prefilledSequence(dir, modelSeed: 19, method: method, promptSeed: 3, length: 300)
        defer { sequence.close(); withExtendedLifetime(dir) {} }
        for t in 0..<5 {
            let logits = try sequence.step(ids[t + 1])
            #expect(logits.count == TinyGemma.vocabulary && logits.allSatisfy(\.isFinite))
        }
    }

    /// The session's report names each global layer by the model's block (the tiny model's global
    /// block is 1): eval --json's "heads" said "layer 0/1/2" for Gemma 3's blocks 5/11/17.
    @Test func reportNamesTheModelsBlocks() throws {
        let dir = TemporaryDirectory("tiny-gemma")
        let (sequence, _) = try Self.prefilledSequence(dir, modelSeed: 23, kvHeads: 2, method: .auto, promptSeed: 5, length: 200)
        defer { sequence.close(); withExtendedLifetime(dir) {} }
        let lines = sequence.report()
        #expect(lines.count == 2 && lines[0].hasPrefix("layer 1 head 0: ") && lines[1].hasPrefix("layer 1 head 1: "), "\(lines)")
        #expect(lines.allSatisfy { !$0.hasPrefix("layer 0") })
    }

    @Test func q8_0MatrixVectorEqualsTheDequantizedProduct() throws {
        var rng = SeededRandom(seed: 29)
        let rows = 37, columns = 96
        let values = (0..<(rows * columns)).map { _ in rng.gaussian() }
        let blocks = ggmlQuantizeQ8_0(values)
        var dequantized = [Float](repeating: 0, count: values.count)
        try blocks.withUnsafeBytes { raw in
            try dequantized.withUnsafeMutableBufferPointer { out in
                try ggmlDequantize(.q8_0, from: raw.baseAddress!, count: values.count, into: out.baseAddress!)
            }
        }
        let x = (0..<columns).map { _ in rng.gaussian() }
        var out = [Float](repeating: 0, count: rows)
        Gemma3Kernels.q8_0MatrixVector(blocks, rows: rows, columns: columns, x, into: &out)
        for r in 0..<rows {
            let expected = (0..<columns).reduce(0.0) { $0 + Double(dequantized[r * columns + $1]) * Double(x[$1]) }
            #expect(abs(Double(out[r]) - expected) < 1e-4 * max(1, abs(expected)), "row \(r)")
        }
    }

    @Test func aNonFiniteWeightIsRefusedByName() throws {
        let dir = TemporaryDirectory("tiny-gemma")
        let tiny = try TinyGemma(directory: dir.path, seed: 31, poisoned: "blk.1.ffn_up.weight")
        #expect(throws: DecoderError("\(tiny.path): tensor blk.1.ffn_up.weight holds NaN or Inf")) {
            _ = try Gemma3Model(path: tiny.path)
        }
    }

    @Test func badRequestsAreRefused() throws {
        let dir = TemporaryDirectory("tiny-gemma")
        let tiny = try TinyGemma(directory: dir.path, seed: 23)
        let model = try Gemma3Model(path: tiny.path)
        let sequence = try Gemma3Sequence(model: model)
        defer { sequence.close() }
        #expect(throws: DecoderError.self) { try sequence.prefill([]) }
        #expect(throws: DecoderError.self) { try sequence.prefill([2, Int32(TinyGemma.vocabulary)]) }
        #expect(throws: DecoderError.self) { try sequence.prefill([2, -1]) }
        _ = try sequence.step(2)
        #expect(throws: DecoderError.self) { try sequence.prefill([5]) }
        #expect(throws: DecoderError.self) { try Gemma3Model.resolvePath(dir.path + "/missing.gguf") }
    }
}
