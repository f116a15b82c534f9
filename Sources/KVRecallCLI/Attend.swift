import ArgumentParser
import Foundation
import KVRecall

/// Attention knobs shared by `attend`, `demo` and the benchmarks.
struct AttentionOptions: ParsableArguments {
    @Option(name: .short, help: "Positions retrieved beyond the static part.")
    var k: Int = 100
    @Option(help: "First positions always attended (attention sinks).")
    var sinks: Int = 4
    @Option(help: "Last positions always attended (recent window).")
    var window: Int = 64
    @Option(help: "Query heads per KV head (GQA): consecutive query rows form one group.")
    var group: Int = 1
    @Flag(help: "Landmark: rank blocks by Quest's min/max bound instead of the mean key.")
    var questBound = false
    @Option(help: "Estimate: clusters below the retrieval cut that are estimated (default: all).")
    var estimateClusters: Int?
    @Option(help: "Estimate: adaptive budget, retrieve clusters until their estimated mass reaches P (0 < P <= 1).")
    var topP: Double?
    @Option(help: "Estimate: most positions the adaptive budget retrieves.")
    var maxRetrieved: Int = 4096
    @OptionGroup var search: SearchParameterOptions

    func validate() throws {
        if k < 1 { throw ValidationError("-k must be at least 1") }
        if sinks < 0 || window < 0 { throw ValidationError("--sinks and --window must be non-negative") }
        if group < 1 { throw ValidationError("--group must be at least 1") }
        if let topP, !(topP > 0 && topP <= 1) { throw ValidationError("--top-p must be in (0, 1]") }
        if let estimateClusters, estimateClusters < 0 { throw ValidationError("--estimate-clusters must be non-negative") }
        if maxRetrieved < 1 { throw ValidationError("--max-retrieved must be at least 1") }
    }

    var parameters: AttentionParameters {
        var p = AttentionParameters()
        p.k = k
        p.sinks = sinks
        p.window = window
        p.search = search.parameters
        p.search.landmarkBound = questBound
        p.estimation.clusters = estimateClusters
        p.estimation.topP = topP
        p.estimation.maxRetrieved = maxRetrieved
        return p
    }
}

/// One method's run over a query set: per-group results, medians and mean fidelity.
struct MethodRun {
    let method: AttentionMethod
    var results: [AttentionResult] = []
    var micros: [Double] = []
    var recall = 0.0, mass = 0.0, error = 0.0, oracleMass = 0.0, oracleError = 0.0, scanned = 0.0

    var medianMicros: Double { median(micros) }

    var json: [String: Any] {
        ["method": method.rawValue,
         "outputs": results.flatMap { $0.heads.map { $0.output.map(jsonNumber) } },
         "lse": results.flatMap { $0.heads.map { jsonNumber($0.lse) } },
         "metrics": ["recall": recall, "attention_mass": mass, "output_error": error,
                     "keys_scanned_fraction": scanned, "median_query_us": medianMicros,
                     "oracle_attention_mass": oracleMass, "oracle_output_error": oracleError] as [String: Any]]
    }
}

/// Runs `method` over `groups` query groups of one head and measures fidelity.
func runMethod(_ method: AttentionMethod, snapshot: StoreSnapshot, head: HeadID, queries: [Float], groupSize: Int,
               parameters: AttentionParameters) throws -> MethodRun {
    let prepared = try method.prepare(snapshot: snapshot, head: head)
    let keys = prepared.keys, values = prepared.values
    let d = keys.dimension
    var run = MethodRun(method: method)
    let groups = queries.count / (d * groupSize)
    try queries.withUnsafeBufferPointer { qb in
        for gi in 0..<groups {
            let group = UnsafeBufferPointer(rebasing: qb[(gi * groupSize * d)..<((gi + 1) * groupSize * d)])
            let t0 = monotonicNanos()
            let result = try prepared.attend(group, parameters: parameters)
            run.micros.append(Double(monotonicNanos() - t0) / 1e3)
            let f = Attention.fidelity(of: result, queries: group, keys: keys, values: values, parameters: parameters)
            run.recall += f.recall
            run.mass += f.attentionMass
            run.error += f.outputError
            run.oracleMass += f.oracleMass
            run.oracleError += f.oracleError
            run.scanned += result.stats.keysScannedFraction
            run.results.append(result)
        }
    }
    let n = Double(max(1, groups))
    run.recall /= n; run.mass /= n; run.error /= n; run.oracleMass /= n; run.oracleError /= n; run.scanned /= n
    return run
}

/// The side-by-side table of several methods' runs.
func methodTable(_ runs: [MethodRun], k: Int) -> TextTable {
    let exactMicros = runs.first { $0.method == .exact }?.medianMicros
    var table = TextTable(["method", "recall@\(k)", "attn_mass", "output_err", "oracle_err", "keys_scanned", "median_us", "vs_exact"])
    for r in runs {
        table.add([r.method.rawValue, fmt(r.recall, 3), fmt(r.mass, 3), fmt(r.error, 4), fmt(r.oracleError, 4),
                   fmt(r.scanned, 4), fmt(r.medianMicros, 1), exactMicros.map { fmt(r.medianMicros / $0, 3) + "x" } ?? ""])
    }
    return table
}

struct Attend: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Top-k attention for query rows, with fidelity against exact attention.",
        discussion: """
        Each query group attends exactly to the static part (--sinks first and --window last
        positions) plus k positions chosen by the method: exact (everything), retrieval
        (RetrievalAttention graph), hip, landmark, an index (hnsw, ivf, lsh, tree), or estimate
        (RetroInfer: IVF clusters retrieved, the rest estimated; --top-p for an adaptive budget). Index-backed
        methods need `kvrecall build --index NAME` first (retrieval also needs prefill queries).
        --method all prints every method side by side. Metrics: recall@k against exact top-k,
        attention mass held by the attended set, output relative error, keys scanned, latency.
        --json prints {"method", "outputs", "lse", "metrics": {...}} (an array for all).

        Example:
          kvrecall attend --store s --layer 2 --head 6 --queries Data/minilm/queries.npy --method hip -k 100
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions
    @Option(help: ArgumentHelp("Query vectors [M, d] .npy.", valueName: "file"))
    var queries: String
    @Option(help: "exact, retrieval, hip, landmark, hnsw, ivf, lsh, tree, estimate, or all.")
    var method: String = "exact"
    @Option(help: "Only the first N query rows.")
    var limit: Int?
    @OptionGroup var attention: AttentionOptions
    @Flag(help: "Print JSON.")
    var json = false

    func validate() throws {
        if method != "all" && AttentionMethod(rawValue: method) == nil {
            throw ValidationError("--method must be one of \(AttentionMethod.allCases.map(\.rawValue).joined(separator: ", ")), all (got '\(method)')")
        }
        if let limit, limit < 1 { throw ValidationError("--limit must be at least 1") }
    }

    func run() throws {
        let store = try storeOptions.open(readOnly: true)
        defer { store.close() }
        let info = try store.info(headOptions.id)
        var (rows, values) = try loadQueries(path: queries, tensorName: nil, dimension: info.dimension)
        if let limit, limit < rows { rows = limit; values = Array(values.prefix(limit * info.dimension)) }
        guard rows % attention.group == 0 else {
            throw RunError("\(rows) query rows do not form whole groups of \(attention.group)")
        }
        let built = try store.indexNames()[headOptions.id] ?? []
        let methods: [AttentionMethod] = method == "all"
            ? AttentionMethod.allCases.filter { $0.indexKind.map { built.contains($0.rawValue) } ?? true }
            : [AttentionMethod(rawValue: method)!]
        let runs = try store.read { snapshot in
            try methods.map { try runMethod($0, snapshot: snapshot, head: headOptions.id, queries: values,
                                            groupSize: attention.group, parameters: attention.parameters) }
        }
        if json {
            print(try jsonString(method == "all" ? runs.map(\.json) as Any : runs[0].json))
            return
        }
        print("head \(info.id): \(info.count) keys, d=\(info.dimension); \(rows / attention.group) query groups of \(attention.group); k=\(attention.k), sinks \(attention.sinks), window \(attention.window)")
        print(methodTable(runs, k: attention.k).render())
        let skipped = AttentionMethod.allCases.filter { m in m.indexKind.map { !built.contains($0.rawValue) } ?? false }
        if method == "all" && !skipped.isEmpty {
            print("not built (kvrecall build --index NAME): \(skipped.map(\.rawValue).joined(separator: ", "))")
        }
    }
}
