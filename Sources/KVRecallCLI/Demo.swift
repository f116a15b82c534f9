import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the main job on the bundled real sample (Data/minilm): ingest, search, report.",
        usage: "kvrecall demo [<options>]",
        discussion: """
        Ingests the MiniLM keys, values and prefill queries from Data/minilm into a temporary \
        store in each storage dtype and answers the sample's decode queries by exact top-k \
        search; then builds every index on the f32 store and runs every attention method side by \
        side (recall, attention mass, output error against exact attention, keys scanned, \
        latency).

        Example:
          kvrecall demo
        """
    )

    @Option(help: ArgumentHelp("Folder with keys.npy, values.npy, prefill_queries.npy, queries.npy (default: the repository's Data/minilm).", valueName: "dir"))
    var data: String?
    @Option(name: .short, help: "Keys per query.")
    var k: Int = 10
    @Option(help: ArgumentHelp("Keep the store here instead of a temporary folder.", valueName: "dir"))
    var store: String?
    @Option(help: "Positions each attention method retrieves beyond the static part.")
    var attentionK: Int = 100

    func run() throws {
        let dir = try data ?? locateSampleData()
        let paths = ["keys", "values", "prefill_queries", "queries"].map { "\(dir)/\($0).npy" }
        let keys = try NPY.read(path: paths[0])
        let values = try NPY.read(path: paths[1])
        let prefill = try NPY.read(path: paths[2])
        try KVStore.validateIngest(keys: keys, keysPath: paths[0], values: values, valuesPath: paths[1],
                                   queries: prefill, queriesPath: paths[2], allowNonFinite: false)
        guard keys.shape.count == 2 else { throw RunError("\(paths[0]): the demo expects [N, d] keys") }
        let d = keys.shape[1]
        let (rows, queries) = try loadQueries(path: paths[3], tensorName: nil, dimension: d)
        let n = keys.shape[0]
        guard k >= 1, k <= n else { throw RunError("-k must be in 1...\(n)") }
        print("KVRecall demo: real all-MiniLM-L6-v2 vectors from \(dir)")
        print("  \(n) keys and values, \(prefill.shape[0]) prefill queries, \(rows) decode queries, d=\(d)\n")

        let root = store ?? NSTemporaryDirectory() + "kvrecall-demo-\(UUID().uuidString)"
        defer { if store == nil { try? FileManager.default.removeItem(atPath: root) } }
        var table = TextTable(["dtype", "ingest_ms", "bytes_on_disk", "median_us", "recall@\(k)_vs_f32", "top1_score"])
        var reference: [[Int]] = []
        for dtype in DType.allCases {
            let path = root + "/" + dtype.rawValue
            let store = try KVStore(path: path, create: true)
            defer { store.close() }
            let t0 = monotonicNanos()
            try store.ingest(keys: keys, values: values, queries: prefill, first: HeadID(), dtype: dtype)
            let ingestMs = Double(monotonicNanos() - t0) / 1e6
            var micros: [Double] = []
            var tops: [[Int]] = []
            var top1: [Double] = []
            try store.read { snapshot in
                let view = try snapshot.vectors(HeadID(), .keys)
                let index = FlatIndex(keys: view)
                try queries.withUnsafeBufferPointer { qb in
                    for q in 0..<rows {
                        let t = monotonicNanos()
                        let r = try index.search(UnsafeBufferPointer(rebasing: qb[(q * d)..<((q + 1) * d)]), k: k,
                                                 parameters: SearchParameters(), keys: view)
                        micros.append(Double(monotonicNanos() - t) / 1e3)
                        tops.append(r.ids)
                        top1.append(Double(r.scores[0]))
                    }
                }
            }
            if dtype == .f32 { reference = tops }
            let rec = zip(tops, reference).map { recall(retrieved: $0, exact: $1) }.reduce(0, +) / Double(rows)
            table.add([dtype.rawValue, fmt(ingestMs, 1), "\(store.environment.fileSize())", fmt(median(micros), 1),
                       fmt(rec, 3), fmt(top1.reduce(0, +) / Double(rows), 3)])
        }
        print("Exact top-\(k) search (one query at a time; recall of f16/bf16 storage against f32):")
        print(table.render())

        // Every index on the f32 store, then every attention method side by side.
        let main = try KVStore(path: root + "/f32")
        defer { main.close() }
        print("\nIndexes over the f32 store (default parameters):")
        var build = TextTable(["index", "build_ms", "bytes"])
        for kind in [IndexKind.hnsw, .ivf, .lsh, .tree, .retrieval, .landmark] {
            let t0 = monotonicNanos()
            let index = try main.read { s in
                try IndexCatalog.build(kind, keys: try s.vectors(HeadID(), .keys), queries: try s.vectors(HeadID(), .queries),
                                       parameters: IndexBuildParameters())
            }
            let ms = Double(monotonicNanos() - t0) / 1e6
            try IndexCatalog.save(index, in: main, head: HeadID())
            build.add([kind.rawValue, fmt(ms, 1), "\(IndexCatalog.byteSize(index))"])
        }
        print(build.render())
        // The quantized tier: 4-bit codes of the keys and values, beside them.
        try main.buildCodes(HeadID(), format: CodeFormat())
        // auto: every candidate measured on the head's last prefill queries; the cheapest within the target error.
        let plan = try main.read { s in
            try HeadPlanner.plan(keys: try s.vectors(HeadID(), .keys), values: try s.vectors(HeadID(), .values),
                                 codes: try s.codes(HeadID()), queries: try s.vectors(HeadID(), .queries), group: 1,
                                 calibration: CalibrationParameters(), attention: AttentionParameters(), policy: PolicyParameters(),
                                 build: IndexBuildParameters()).plan
        }
        try plan.save(in: main, head: HeadID())
        print("\nauto chose \(plan.policy.rawValue) for this head: \(plan.reason)")
        for line in plan.candidateLines { print("  candidate \(line)") }
        if let profile = plan.profile { print("  \(profile.summary)") }
        var parameters = AttentionParameters()
        parameters.k = attentionK
        parameters.search.graph.ef = 128
        parameters.search.ivf.nprobe = 8
        let runs = try main.read { snapshot in
            try runMethods(AttentionMethod.allCases, snapshot: snapshot, head: HeadID(), queries: queries, groupSize: 1,
                           parameters: parameters).map { try $0.get() }
        }
        print("\nAttention, k=\(attentionK), sinks 4, window 64, over \(rows) decode queries (oracle = exact top-k + static part):")
        print(methodTable(runs, k: attentionK).render())
        print("This head is diffuse: exact top-\(attentionK) plus the static part holds \(fmt(runs[0].oracleMass, 3)) of the attention mass,")
        print("so top-k methods cannot beat the oracle's error; `estimate` adds the clusters below the cut, and")
        print("`quantized` every position through its 4-bit codes.")
    }
}

/// Finds Data/minilm from the working directory, the executable's folder or this source file, upwards.
func locateSampleData() throws -> String {
    var starts = [FileManager.default.currentDirectoryPath,
                  URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent().path]
    starts.append(URL(fileURLWithPath: #filePath).deletingLastPathComponent().path)
    for start in starts {
        var url = URL(fileURLWithPath: start)
        for _ in 0..<8 {
            let candidate = url.appendingPathComponent("Data/minilm")
            if FileManager.default.fileExists(atPath: candidate.appendingPathComponent("keys.npy").path) {
                return candidate.path
            }
            url.deleteLastPathComponent()
        }
    }
    throw RunError("cannot find the bundled sample Data/minilm; run from the repository or pass --data DIR")
}
