import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

struct BenchANN: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ann",
        abstract: "Recall versus speed of one index kind over a sweep of its search parameter.",
        usage: "kvrecall bench ann --keys <file> --queries <file> --index <kind>\n    --sweep <sweep> [<options>]",
        discussion: """
        Ingests the keys into a temporary store, builds the index (timed), computes exact top-k \
        by Flat, then for each sweep value answers every query one at a time on one thread and \
        reports recall@k, queries per second, median latency and the fraction of keys scanned. \
        The swept parameter is ef (hnsw), nprobe (ivf), min-collisions (lsh) or beam (tree). \
        --key-queries adds a second, in-distribution query set (held-out keys).

        Example:
          kvrecall bench ann --keys syn/keys.npy --queries syn/queries.npy \\
              --key-queries syn/key_queries.npy --index hnsw \\
              --sweep 16,32,64,128,256,512,1024 -k 10 --json out.jsonl
        """
    )

    @OptionGroup var data: BenchData
    @Option(help: ArgumentHelp("Prefill queries [P, d] .npy, for the retrieval index.", valueName: "file"))
    var prefill: String?
    @Option(help: ArgumentHelp("In-distribution queries (e.g. held-out keys) [M, d] .npy.", valueName: "file"))
    var keyQueries: String?
    @Option(help: ArgumentHelp("Index kind.", valueName: "kind"))
    var index: IndexKind
    @Option(help: "Comma-separated values of the swept search parameter.")
    var sweep: String
    @Option(help: "IVF, tree: candidates re-ranked exactly per query (0: 2k).")
    var rerank: Int = 0
    @Option(name: .customLong("repeat"),
            help: "Timed passes over all queries after one warm-up pass; each query keeps its best (as peers.py --repeat).")
    var repeats: Int = 1
    @OptionGroup var build: BuildParameterOptions

    func validate() throws {
        guard index.type != nil else {
            throw ValidationError("--index must be one of \(IndexKind.stored.map(\.rawValue).joined(separator: ", ")) (got '\(index.rawValue)')")
        }
        if sweepValues.isEmpty { throw ValidationError("--sweep needs comma-separated positive integers (got '\(sweep)')") }
        if rerank < 0 { throw ValidationError("--rerank must be non-negative (got \(rerank))") }
        if repeats < 1 { throw ValidationError("--repeat must be at least 1 (got \(repeats))") }
    }

    var sweepValues: [Int] { sweep.split(separator: ",").compactMap { Int($0.trimmingCharacters(in: .whitespaces)) }.filter { $0 > 0 } }

    var parameterName: String {
        switch index {
        case .hnsw: return "ef"
        case .ivf: return "nprobe"
        case .lsh: return "min_collisions"
        case .tree: return "beam"
        case .retrieval: return "ef"
        case .landmark: return "blocks"
        case .flat, .hip: return "-"
        }
    }

    /// The record's params: the swept value, and for clustered indexes their codes and metric (one plotted line each).
    func searchParams(_ value: Int) -> [String: Any] {
        var p: [String: Any] = [parameterName: value]
        if index == .ivf || index == .tree {
            p["codes"] = build.listCodes.rawValue
            p["metric"] = build.clusterMetric.rawValue
        }
        return p
    }

    func run() throws {
        BLAS.setThreads(1)
        let kind = index
        let (keyTensor, d, decode, decodeRows) = try data.load()
        var sets: [(name: String, rows: Int, values: [Float])] = [("ood:" + data.queries, decodeRows, decode)]
        if let keyQueries {
            var (rows, values) = try loadQueries(path: keyQueries, tensorName: nil, dimension: d)
            if rows > data.limit { rows = data.limit; values = Array(values.prefix(rows * d)) }
            sets.append(("ind:" + keyQueries, rows, values))
        }
        let (store, cleanup) = try data.temporaryStore("ann")
        defer { cleanup() }
        let prefillTensor = try prefill.map { try NPY.read(path: $0) }
        try store.ingest(keys: keyTensor, values: keyTensor, queries: prefillTensor, first: HeadID(), dtype: .f32)
        let start = monotonicNanos()
        let built = try store.read { s in
            try IndexCatalog.build(kind, keys: try s.vectors(HeadID(), .keys), queries: try s.vectors(HeadID(), .queries),
                                   parameters: build.parameters)
        }
        let buildSeconds = Double(monotonicNanos() - start) / 1e9
        let bytes = IndexCatalog.byteSize(built)
        print("\(kind.rawValue) over \(keyTensor.shape[0]) x \(d): built in \(fmt(buildSeconds, 2)) s with \(build.threads) threads, \(bytes) bytes")
        var table = TextTable(["query_set", parameterName, "recall@\(data.k)", "qps", "median_us", "keys_scanned"])
        var records: [[String: Any]] = []
        try store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            for set in sets {
                let truth = try set.values.withUnsafeBufferPointer {
                    try FlatIndex(keys: keys).search($0, k: data.k, parameters: SearchParameters(), keys: keys)
                }
                for value in sweepValues {
                    var p = SearchParameters()
                    p.ivf.rerank = rerank
                    p.tree.rerank = rerank
                    switch kind {
                    case .hnsw: p.graph.ef = value
                    case .ivf: p.ivf.nprobe = value
                    case .lsh: p.lsh.minCollisions = value
                    case .tree: p.tree.beam = value
                    case .retrieval: p.graph.ef = value
                    case .landmark: p.landmark.blocks = value
                    case .flat, .hip: break
                    }
                    var recallSum = 0.0
                    var stats = SearchStats()
                    var micros: [Double] = []
                    var q = 0
                    let total = try timePerQuery(rows: set.rows, d: d, queries: set.values, passes: repeats) { one in
                        let r = try built.search(one, k: data.k, parameters: p, keys: keys)
                        if q < set.rows {
                            recallSum += recall(retrieved: r.ids, exact: truth.ids[(q * data.k)..<((q + 1) * data.k)])
                            stats += r.stats
                        }
                        q += 1
                    }
                    micros = total
                    let rec = recallSum / Double(set.rows)
                    let qps = 1e6 / (micros.reduce(0, +) / Double(micros.count))
                    let med = median(micros)
                    table.add([String(set.name.prefix(4)), "\(value)", fmt(rec, 3), fmt(qps, 0), fmt(med, 1), fmt(stats.keysScannedFraction, 4)])
                    records.append(["library": "kvrecall", "method": kind.rawValue, "params": searchParams(value),
                                    "build_params": ["M": build.M, "ef_construction": build.efConstruction, "nlist": build.nlist ?? -1,
                                                     "tables": build.tables, "bits": build.bits, "cluster_metric": build.clusterMetric.rawValue,
                                                     "list_codes": build.listCodes.rawValue, "rerank": rerank,
                                                     "threads": build.threads] as [String: Any],
                                    "k": data.k, "query_set": set.name.hasPrefix("ood") ? "decode" : "heldout_keys",
                                    "recall": rec, "qps": qps, "median_us": med, "build_s": buildSeconds,
                                    "keys_scanned_fraction": stats.keysScannedFraction, "index_bytes": bytes])
                }
            }
        }
        print(table.render())
        try data.emit(records)
    }
}
