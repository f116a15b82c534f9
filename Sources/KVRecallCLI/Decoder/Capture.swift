import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface
import KVRecallDecoder

struct Capture: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Capture real decoder traces: a global layer's keys, values and queries as .npy.",
        usage: "kvrecall capture --text <file> --tokens <tokens> --out <dir> [<options>]",
        discussion: """
        Runs BOS + the first tokens of --text through Gemma 3 with exact attention \
        and writes, per block in --layers (global blocks: 5, 11, 17), into --out:
          layerLL_keys.npy             [N, 256]: keys after q/k norm and RoPE
                                       (N = --tokens)
          layerLL_values.npy           [N, 256]
          layerLL_prefill_queries.npy  [(N - D) * 4, 256]: queries of positions
                                       0..<N-D, every query head: row 4t + h
          layerLL_queries.npy          [D * 4, 256]: queries of the last D
                                       positions (--decode-queries); 4
                                       consecutive rows form one GQA group
          manifest.json                what was captured, from which model/text
        Queries are not pre-scaled: the engine's default scale 1/sqrt(256) gives \
        the model's attention. Feed them to the engine, e.g.:
          kvrecall ingest --store s --keys out/layer05_keys.npy \\
              --values out/layer05_values.npy \\
              --queries out/layer05_prefill_queries.npy --layer 5
          kvrecall attend --store s --layer 5 --group 4 --method exact \\
              --queries out/layer05_queries.npy

        Example:
          kvrecall capture --text Data/text/short.txt --tokens 1024 \\
              --layers 5,11,17 --out /tmp/trace
        """
    )

    @OptionGroup var modelOptions: ModelOptions
    @Option(help: ArgumentHelp("UTF-8 text to run.", valueName: "file"))
    var text: String
    @Option(help: "Tokens captured (BOS included).")
    var tokens: Int
    @Option(help: "Global blocks to capture, comma-separated.")
    var layers: String = "5,11,17"
    @Option(parsing: .unconditional, help: "Positions at the end whose queries are the decode queries (default: 256, at most a quarter of --tokens).")
    var decodeQueries: Int?

    /// The decode queries asked for, else 256 but at most a quarter of the tokens (at least 1), so
    /// the default works for any --tokens (it used to refuse --tokens 256 with its own default).
    var decodeCount: Int { decodeQueries ?? max(1, min(256, tokens / 4)) }
    @Option(help: ArgumentHelp("Output directory (created).", valueName: "dir"))
    var out: String
    @Option(help: "Element type of the written arrays: f32, or f16 (half the bytes; for small samples).")
    var dtype: String = "f32"

    func validate() throws {
        if tokens < 2 { throw ValidationError("--tokens must be at least 2 (got \(tokens))") }
        if let decodeQueries, decodeQueries < 1 || decodeQueries >= tokens {
            throw ValidationError("--decode-queries must be in 1..<\(tokens) (--tokens) (got \(decodeQueries))")
        }
        _ = try blocks()
        if dtype != "f32" && dtype != "f16" { throw ValidationError("--dtype must be f32 or f16 (got '\(dtype)')") }
    }

    func blocks() throws -> [Int] {
        try layers.split(separator: ",").map {
            guard let b = Int($0.trimmingCharacters(in: .whitespaces)), b >= 0 else {
                throw ValidationError("--layers must list block numbers, comma-separated (got '\(layers)')")
            }
            return b
        }
    }

    func run() throws {
        let model = try modelOptions.load()
        let c = model.configuration
        let wanted = try blocks()
        for b in wanted where !(b < c.blockCount && c.isGlobal(b)) {
            throw RunError("block \(b) is not a global block of this model (global: \(c.globalBlocks.map(String.init).joined(separator: ", ")))")
        }
        let all = [model.tokenizer.bosID] + model.tokenizer.encode(try readText(text))
        guard all.count >= tokens else { throw RunError("\(text): has \(all.count) tokens (with BOS), fewer than --tokens \(tokens)") }
        guard tokens <= c.contextLength else { throw RunError("--tokens \(tokens) exceeds the context length \(c.contextLength)") }
        try FileManager.default.createDirectory(atPath: out, withIntermediateDirectories: true)

        var options = DecoderAttentionOptions()
        options.method = .exact
        options.dtype = .f32
        let sequence = try Gemma3Sequence(model: model, options: options)
        defer { sequence.close() }
        sequence.recordQueries = true
        let start = monotonicNanos()
        try sequence.prefill(Array(all[0..<tokens]), logits: .none, progress: ProgressBar("capture").update)
        note("prefill: \(tokens) tokens in \(fmt(Double(monotonicNanos() - start) / 1e9, 2)) s")

        let d = c.headDimension, g = c.queryHeads, n = tokens, split = tokens - decodeCount
        var files: [String] = []
        for b in wanted {
            let layer = c.globalBlocks.firstIndex(of: b)!
            let name = String(format: "layer%02d", b)
            let (keys, values) = try sequence.session.store.read { snapshot -> ([Float], [Float]) in
                let id = HeadID(context: 0, layer: UInt16(layer), head: 0)
                let k = try snapshot.vectors(id, .keys), v = try snapshot.vectors(id, .values)
                return (k.decode(rows: 0..<k.count), v.decode(rows: 0..<v.count))
            }
            let queries = sequence.recordedQueries[layer]  // [n, g, d]: row t*g + h
            func write(_ suffix: String, _ rows: Int, _ floats: [Float]) throws {
                let path = (out as NSString).appendingPathComponent("\(name)_\(suffix).npy")
                try NPY.write(Tensor(name: suffix, shape: [rows, d], dtype: dtype == "f16" ? .f16 : .f32, floats: floats), to: path)
                files.append(path)
            }
            try write("keys", n, keys)
            try write("values", n, values)
            try write("prefill_queries", split * g, Array(queries[0..<(split * g * d)]))
            try write("queries", decodeCount * g, Array(queries[(split * g * d)..<(n * g * d)]))
        }
        let manifest: [String: Any] = [
            "model": (model.path as NSString).lastPathComponent, "text": text, "tokens": tokens,
            "decode_queries": decodeCount, "blocks": wanted, "query_heads_per_kv": g / c.kvHeads,
            "head_dimension": d, "scale": Double(c.attentionScale), "dtype": dtype,
            "layout": "keys/values [N, d]; queries [positions * query_heads, d], row position*query_heads + head",
        ]
        try (try jsonString(manifest) + "\n").write(toFile: (out as NSString).appendingPathComponent("manifest.json"),
                                                    atomically: true, encoding: .utf8)
        for f in files { print(f) }
    }
}
