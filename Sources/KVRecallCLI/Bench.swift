import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface
import CKernels

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks (release builds only): medians and ratios against baselines run in the same process.",
        subcommands: [BenchExact.self, BenchANN.self, BenchSession.self, BenchAttention.self]
    )
}

/// Options every benchmark shares: the data files and the query count.
struct BenchData: ParsableArguments {
    @Option(help: ArgumentHelp("Keys [N, d] .npy (e.g. from Tools/make_synthetic.py).", valueName: "file"))
    var keys: String
    @Option(help: ArgumentHelp("Queries [M, d] .npy.", valueName: "file"))
    var queries: String
    @Option(help: "Queries to time (the first N rows).")
    var limit: Int = 200
    @Option(name: .short, help: "Keys per query.")
    var k: Int = 100
    @Option(help: ArgumentHelp("Append results as JSON lines in the Tools/bench schema to this file.", valueName: "file"))
    var json: String?
    @Option(help: ArgumentHelp("Scratch folder for temporary stores (default: system temp).", valueName: "dir"))
    var scratch: String?

    func load() throws -> (keys: Tensor, d: Int, queries: [Float], rows: Int) {
        let keyTensor = try NPY.read(path: keys)
        guard keyTensor.shape.count == 2 else { throw FormatError(path: keys, problem: .badShape("keys must be [N, d]")) }
        var (rows, q) = try loadQueries(path: queries, tensorName: nil, dimension: keyTensor.shape[1])
        if rows > limit {
            rows = limit
            q = Array(q.prefix(limit * keyTensor.shape[1]))
        }
        return (keyTensor, keyTensor.shape[1], q, rows)
    }

    func temporaryStore(_ label: String) throws -> (KVStore, () -> Void) {
        let path = (scratch ?? NSTemporaryDirectory()) + "/kvrecall-bench-\(label)-\(UUID().uuidString)"
        var options = Environment.Options()
        options.noSync = true
        let store = try KVStore(path: path, create: true, options: options)
        return (store, { store.close(); try? FileManager.default.removeItem(atPath: path) })
    }

    /// Appends `records` to the JSON list in `--json` (the Tools/bench schema), creating it if needed.
    func emit(_ records: [[String: Any]]) throws {
        guard let json else { return }
        var all: [Any] = []
        if let data = FileManager.default.contents(atPath: json), !data.isEmpty {
            guard let existing = try? JSONSerialization.jsonObject(with: data) as? [Any] else {
                throw RunError("\(json): exists but is not a JSON list of benchmark records")
            }
            all = existing
        }
        all += records as [Any]
        let data = try JSONSerialization.data(withJSONObject: all, options: [.prettyPrinted, .sortedKeys])
        guard FileManager.default.createFile(atPath: json, contents: data) else { throw RunError("\(json): cannot write") }
    }
}

/// Times `body` once per query row (after one warm-up pass) and returns the per-query microseconds.
func timePerQuery(rows: Int, d: Int, queries: [Float], passes: Int = 3,
                  _ body: (UnsafeBufferPointer<Float>) throws -> Void) rethrows -> [Double] {
    var best = [Double](repeating: .infinity, count: rows)
    try queries.withUnsafeBufferPointer { qb in
        for pass in 0...passes {
            for q in 0..<rows {
                let one = UnsafeBufferPointer(rebasing: qb[(q * d)..<((q + 1) * d)])
                let t0 = monotonicNanos()
                try body(one)
                let us = Double(monotonicNanos() - t0) / 1e3
                if pass > 0 { best[q] = min(best[q], us) }  // pass 0 warms the page cache
            }
        }
    }
    return best
}

struct BenchExact: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "exact",
        abstract: "Exact top-k: our scan over f32/f16/bf16 storage beside a bare cblas_sgemv, one thread.",
        usage: "kvrecall bench exact --keys <file> --queries <file> [<options>]",
        discussion: """
        Example (see docs/BENCHMARKS.md):
          python3 Tools/make_synthetic.py --out /tmp/syn
          .build/release/kvrecall bench exact --keys /tmp/syn/keys.npy \\
              --queries /tmp/syn/queries.npy -k 100
        """
    )

    @OptionGroup var data: BenchData

    func run() throws {
        BLAS.setThreads(1)
        let (keyTensor, d, queries, rows) = try data.load()
        let n = keyTensor.shape[0]
        let keys = keyTensor.floats()
        print("exact top-\(data.k) over \(n) x \(d) keys, \(rows) queries, one thread; per-query medians of the best of 3 passes")
        var table = TextTable(["method", "median_ms", "vs_sgemv", "vs_ours_f32"])
        var records: [[String: Any]] = []

        // Baseline: bare cblas_sgemv over the same f32 matrix, contiguous in memory (no selection).
        var scores = [Float](repeating: 0, count: n)
        let sgemv = keys.withUnsafeBufferPointer { kb in
            scores.withUnsafeMutableBufferPointer { sb in
                timePerQuery(rows: rows, d: d, queries: queries) { q in
                    BLAS.gemv(n: n, k: d, a: kb.baseAddress!, x: q.baseAddress!, y: sb.baseAddress!)
                }
            }
        }
        let sgemvMs = median(sgemv) / 1e3
        table.add(["cblas_sgemv f32 (scores only)", fmt(sgemvMs, 3), "1.00x", ""])
        // Our f32 kernel and selection over the same contiguous memory: separates kernel cost from map cost.
        var top = TopK<Int>(k: data.k)
        let contiguous = keys.withUnsafeBufferPointer { kb in
            scores.withUnsafeMutableBufferPointer { sb in
                timePerQuery(rows: rows, d: d, queries: queries) { q in
                    kvr_scores_f32(q.baseAddress!, kb.baseAddress!, n, d, sb.baseAddress!)
                    top.reset()
                    top.push(scores: sb.baseAddress!, count: n, firstID: 0)
                }
            }
        }
        let contiguousMs = median(contiguous) / 1e3
        table.add(["kvrecall kernel f32 (top-\(data.k), heap memory)", fmt(contiguousMs, 3), fmt(contiguousMs / sgemvMs, 2) + "x", ""])
        var oursF32 = 0.0
        for dtype in DType.allCases {
            let (store, cleanup) = try data.temporaryStore(dtype.rawValue)
            defer { cleanup() }
            try store.ingest(keys: keyTensor, values: keyTensor, queries: nil, first: HeadID(), dtype: dtype)
            let micros = try store.read { snapshot in
                let view = try snapshot.vectors(HeadID(), .keys)
                let index = FlatIndex(keys: view)
                return try timePerQuery(rows: rows, d: d, queries: queries) { q in
                    _ = try index.search(q, k: data.k, parameters: SearchParameters(), keys: view)
                }
            }
            let ms = median(micros) / 1e3
            if dtype == .f32 { oursF32 = ms }
            table.add(["kvrecall flat \(dtype.rawValue) (top-\(data.k), LMDB map)", fmt(ms, 3),
                       fmt(ms / sgemvMs, 2) + "x", fmt(ms / oursF32, 2) + "x"])
            records.append(["library": "kvrecall", "method": "flat-\(dtype.rawValue)", "params": [String: Any](),
                            "k": data.k, "query_set": data.queries, "recall": 1.0, "qps": 1e3 / ms,
                            "median_us": ms * 1e3, "build_s": 0, "keys_scanned_fraction": 1.0, "index_bytes": 0])
        }
        records.append(["library": "cblas", "method": "sgemv-f32", "params": [String: Any](), "k": data.k,
                        "query_set": data.queries, "recall": 1.0, "qps": 1e3 / sgemvMs, "median_us": sgemvMs * 1e3,
                        "build_s": 0, "keys_scanned_fraction": 1.0, "index_bytes": 0])
        print(table.render())
        try data.emit(records)
    }
}
