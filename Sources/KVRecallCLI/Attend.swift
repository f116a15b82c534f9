import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

/// `-k`, `--sinks`, `--window`: what top-k attention attends (and what `build --index auto`
/// profiles and calibrates for).
struct BudgetOptions: ParsableArguments {
    @Option(name: .short, parsing: .unconditional, help: "Positions retrieved beyond the static part (also the k of calibrated recall@k).")
    var k: Int = 100
    @Option(parsing: .unconditional, help: "First positions always attended (attention sinks).")
    var sinks: Int = 4
    @Option(parsing: .unconditional, help: "Last positions always attended (recent window).")
    var window: Int = 64

    /// The attention parameters with these three set (everything else at its default).
    var attention: AttentionParameters { AttentionParameters(k: k, sinks: sinks, window: window) }
}

/// Attention knobs shared by `attend`, `demo` and the benchmarks.
struct AttentionOptions: ParsableArguments {
    @OptionGroup var budget: BudgetOptions
    var k: Int { budget.k }
    var sinks: Int { budget.sinks }
    var window: Int { budget.window }
    @Option(help: "Query heads per KV head (GQA): consecutive query rows form one group.")
    var group: Int = 1
    @Option(help: "GQA selection: union (every head's own top-k, attended by all), union-capped (the union capped at k), summed (one search with the group's summed query).")
    var groupSelection: GroupSelection = .union
    @Flag(help: "Landmark: rank blocks by Quest's min/max bound instead of the mean key.")
    var questBound = false
    @Option(help: "Estimate: clusters below the retrieval cut that are estimated (default: all).")
    var estimateClusters: Int?
    @Option(help: "Estimate: adaptive budget, retrieve clusters until their estimated mass reaches P (0 < P <= 1).")
    var topP: Double?
    @Option(help: "Estimate: most positions the adaptive budget retrieves.")
    var maxRetrieved: Int = 4096
    @OptionGroup var search: SearchParameterOptions
    @OptionGroup var quantized: QuantizedOptions

    func validate() throws {
        if group < 1 { throw ValidationError("--group must be at least 1") }
        try validateSettings { try parameters.validate() }
    }

    var parameters: AttentionParameters {
        var p = budget.attention
        p.search = search.parameters
        p.groupSelection = groupSelection
        p.search.landmark.bound = questBound
        p.estimation.clusters = estimateClusters
        p.estimation.topP = topP
        p.estimation.maxRetrieved = maxRetrieved
        quantized.apply(to: &p)
        return p
    }
}

/// JSON form of a method's run (`attend --json`); the run itself and the table are shared with the
/// REPL and the demo (KVRecall's MethodComparison.swift).
extension MethodRun {
    var json: [String: Any] {
        ["method": method.rawValue,
         "outputs": results.flatMap { $0.heads.map { $0.output.map(jsonNumber) } },
         "lse": results.flatMap { $0.heads.map { jsonNumber($0.lse) } },
         "effective_method": effective.rawValue,
         // (a metric that is not finite is null: JSONSerialization refused the whole output)
         "metrics": ["recall": recall, "attention_mass": mass, "output_error": error,
                     "median_output_error": median(errors), "median_oracle_output_error": median(oracleErrors),
                     "keys_scanned_fraction": scanned, "median_query_us": medianMicros,
                     "oracle_attention_mass": oracleMass, "oracle_output_error": oracleError].mapValues(jsonNumber) as [String: Any]]
    }
}

struct Attend: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Top-k attention for query rows, with fidelity against exact attention.",
        discussion: """
        Each query group attends exactly to the static part (--sinks first
        and --window last positions) plus k positions chosen by the method:
        exact (everything), retrieval (RetrievalAttention graph), hip,
        landmark, an index (hnsw, ivf, lsh, tree), estimate (RetroInfer: IVF
        clusters retrieved, the rest estimated; --top-p for an adaptive
        budget), streaming (sinks and window only), or auto (per head, what
        `build --index auto` chose from the head's prefill queries).
        Index-backed methods need `kvrecall build --index NAME` first
        (retrieval also needs prefill queries); ef, nprobe and beam default
        to the values calibrated at build for --target-recall.
        --method all (or a comma-separated list) prints methods side by side.
        Metrics: recall@k against exact top-k, attention mass held by the
        attended set, output relative error, keys scanned, latency. --json
        prints {"method", "effective_method", "outputs", "lse", "metrics":
        {...}} (an array for several; metrics include median_output_error and
        its oracle's).

        Example:
          kvrecall attend --store s --layer 2 --head 6 \\
              --queries Data/minilm/queries.npy --method hip -k 100
          kvrecall attend --store s --layer 5 --group 4 --method auto \\
              --queries trace/layer05_queries.npy
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions
    @Option(help: ArgumentHelp("Query vectors [M, d] .npy.", valueName: "file"))
    var queries: String
    @Option(help: ArgumentHelp("An attention method (\(AttentionMethod.allCases.map(\.rawValue).joined(separator: ", "))), a comma-separated list of them, or all (every method whose index is built).",
                               valueName: "method"),
            completion: .list(AttentionMethod.allCases.map(\.rawValue) + ["all"]))
    var method: String = "exact"
    @Option(help: "Only the first N query rows.")
    var limit: Int?
    @OptionGroup var attention: AttentionOptions
    @Flag(help: "Print JSON.")
    var json = false

    func validate() throws {
        if let limit, limit < 1 { throw ValidationError("--limit must be at least 1") }
        _ = try parseMethodList(method, allowed: AttentionMethod.allCases)
    }

    func run() throws {
        let store = try storeOptions.open(readOnly: true)
        defer { store.close() }
        let info = try store.info(headOptions.id)
        // The CLI's one rule for k (query alike): above the head's keys it is clamped, and said.
        if attention.k > info.count {
            warn("-k \(attention.k) exceeds the \(info.count) keys of head \(info.id): every key is attended")
        }
        var (rows, values) = try loadQueries(path: queries, tensorName: nil, dimension: info.dimension)
        if let limit, limit < rows { rows = limit; values = Array(values.prefix(limit * info.dimension)) }
        guard rows % attention.group == 0 else {
            throw RunError("\(rows) query rows do not form whole groups of \(attention.group)")
        }
        let built = try store.records(of: headOptions.id)
        let listed = try parseMethodList(method, allowed: AttentionMethod.allCases)
        let methods = listed ?? AttentionMethod.available(built: built)
        let runs = try store.read { snapshot in
            try runMethods(methods, snapshot: snapshot, head: headOptions.id, queries: values,
                           groupSize: attention.group, parameters: attention.parameters).map { try $0.get() }
        }
        for run in runs {
            for (group, result) in run.results.enumerated() {
                if let j = result.firstNonFiniteHead {
                    throw RunError("\(run.method.rawValue): the attention of query row \(group * attention.group + j) \(AttentionResult.notFinite)")
                }
            }
        }
        if json {
            print(try jsonString(methods.count > 1 || listed == nil ? runs.map(\.json) as Any : runs[0].json))
            return
        }
        print("head \(info.id): \(info.count) keys, d=\(info.dimension); \(rows / attention.group) query groups of \(attention.group); k=\(attention.k), sinks \(attention.sinks), window \(attention.window)")
        print(methodTable(runs, k: attention.k).render())
        for run in runs {
            if let plan = run.plan { print("auto: \(run.effective.rawValue) (\(plan.reason))") }
            if let calibration = run.calibration { print("\(run.effective.rawValue): calibrated \(calibration.summary)") }
        }
        let skipped = AttentionMethod.allCases.filter { m in m.requiredRecord.map { !built.contains($0) } ?? false }
        if listed == nil && !skipped.isEmpty {
            print("not built (kvrecall build --index NAME; quantized: kvrecall codes): \(skipped.map(\.rawValue).joined(separator: ", "))")
        }
    }
}
