import ArgumentParser
import CKernels
import Dispatch
import Foundation
import KVRecall
import KVRecallInterface

/// `kvrecall bench attention`: a head's decode-step attention per method, timed beside the memory
/// floor of exact attention (a pass that only reads the head's key and value bytes, split over the
/// same cores), with each method's output error against exact attention.
struct BenchAttention: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "attention",
        abstract: "Decode-step attention per method against the memory floor and exact attention, one head.",
        usage: "kvrecall bench attention --store <dir> --queries <file> [<options>]",
        discussion: """
        Every query group is attended by each method (timed, best of
        --passes after a warm-up) and the floor is timed the same way: a
        kernel that reads the head's key and value bytes once, over --threads
        cores, and does nothing else. Exact attention cannot beat the floor; a
        method is a win only where it beats exact attention. Reports medians
        over the groups and their ratios within this run.

        --cold evicts the caches before every timed call (a decoder reads a
        head after its other layers went through the cache): then the floor
        is memory's bandwidth, not the cache's.

        Example (a 32K Gemma 3 capture, see docs/BENCHMARKS.md):
          kvrecall ingest --store s --keys t/layer05_keys.npy \\
              --values t/layer05_values.npy --dtype f16 --layer 5
          kvrecall bench attention --store s --layer 5 --group 4 \\
              --queries t/layer05_queries.npy --method exact,quantized
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions
    @Option(help: ArgumentHelp("Query vectors [M, d] .npy (groups of --group rows).", valueName: "file"))
    var queries: String
    @Option(help: ArgumentHelp("Comma-separated methods (index methods need their index built).", valueName: "methods"))
    var method: String = "exact"
    @Option(help: "Query heads per KV head.")
    var group: Int = 1
    @Option(help: "Query groups timed (the first N).")
    var limit: Int = 32
    @Option(help: "Timed passes per group (after one warm-up); the best counts.")
    var passes: Int = 5
    @Option(help: "Softmax scale (default 1/sqrt(d); Gemma 3: 0.0625).")
    var scale: Float?
    @Option(help: "Cores one head's passes are split over (default: all).")
    var threads: Int = ProcessInfo.processInfo.activeProcessorCount
    @OptionGroup var budget: BudgetOptions
    @OptionGroup var quantized: QuantizedOptions
    @Option(help: ArgumentHelp("Also time the quantized method over the head's positions regrouped by key similarity, scanning as many group slots as this share of its positions (1: every group) and estimating the others (an experiment toward issue 21: built in memory from the head's prefill queries, not stored; docs/BENCHMARKS.md).", valueName: "share"))
    var clustered: Double?
    @Flag(help: "Evict the caches before every timed call (a 96 MB read), as a decoder's other layers do: the head is read from memory, not from the last-level cache.")
    var cold = false
    @Flag(help: "Print JSON.")
    var json = false

    func validate() throws {
        if group < 1 || limit < 1 || passes < 1 || threads < 1 {
            throw ValidationError("--group, --limit, --passes and --threads must be at least 1")
        }
        _ = try methods()
        if let clustered, !(clustered > 0 && clustered <= 1) { throw ValidationError("--clustered must be in (0, 1] (got \(clustered))") }
    }

    func methods() throws -> [AttentionMethod] {
        try method.split(separator: ",", omittingEmptySubsequences: false).map {
            let name = $0.trimmingCharacters(in: .whitespaces)
            guard let m = AttentionMethod(rawValue: name) else {
                throw ValidationError("--method: no method '\(name)' (one of \(AttentionMethod.names))")
            }
            return m
        }
    }

    func run() throws {
        let store = try storeOptions.open(readOnly: true)
        defer { store.close() }
        let info = try store.info(headOptions.id)
        let d = info.dimension
        var (rows, values) = try loadQueries(path: queries, tensorName: nil, dimension: d)
        guard rows >= group, rows % group == 0 else { throw RunError("\(rows) query rows do not form whole groups of \(group)") }
        let groups = min(limit, rows / group)
        rows = groups * group
        values = Array(values.prefix(rows * d))
        var parameters = budget.attention
        parameters.threads = threads
        quantized.apply(to: &parameters)
        if let scale { parameters.scale = scale }
        let methods = try methods()
        let report = try store.read { snapshot -> [[String: Any]] in
            let keys = try snapshot.vectors(headOptions.id, .keys), vals = try snapshot.vectors(headOptions.id, .values)
            let evictor = cold ? CacheEvictor() : nil
            let evict: (() -> Void)? = evictor.map { e in { e.evict() } }
            let floor = (0..<groups).map { _ in best(of: passes, before: evict) { _ = readFloor(keys: keys, values: vals, parts: threads) } }
            let runs = try runMethods(methods, snapshot: snapshot, head: headOptions.id, queries: values, groupSize: group,
                                      parameters: parameters, repetitions: passes + 1, beforeEach: evict).map { try $0.get() }
            let floorMs = median(floor) / 1e3
            let bytes = keys.count * (keys.bytesPerRow + vals.bytesPerRow)
            var lines: [[String: Any]] = [["method": "floor", "median_ms": floorMs, "gb_per_s": Double(bytes) / floorMs / 1e6]]
            let exactMs = runs.first { $0.method == .exact }.map { bestPerGroup($0.micros) / 1e3 }
            for run in runs {
                let ms = bestPerGroup(run.micros) / 1e3
                var line: [String: Any] = ["method": run.method.rawValue, "effective": run.effective.rawValue, "median_ms": ms,
                                           "vs_floor": ms / floorMs, "median_output_error": median(run.errors),
                                           "keys_scanned_fraction": run.scanned]
                if let exactMs { line["vs_exact"] = ms / exactMs }
                lines.append(line)
            }
            if let share = clustered {
                var line = try timeClustered(share: share, snapshot: snapshot, keys: keys, values: vals, queries: values,
                                             parameters: parameters, groups: groups, evict: evict)
                let ms = line["median_ms"] as! Double
                line["vs_floor"] = ms / floorMs
                if let exactMs { line["vs_exact"] = ms / exactMs }
                lines.append(line)
            }
            return lines
        }
        if json {
            print(try jsonString(["head": "\(info.id)", "keys": info.count, "dimension": d, "dtype": info.dtype.rawValue,
                                  "groups": groups, "group": group, "threads": threads, "results": report]))
            return
        }
        print("head \(info.id): \(info.count) keys x \(d) \(info.dtype.rawValue); \(groups) groups of \(group); \(threads) threads; best of \(passes) per group, medians\(cold ? "; caches evicted before every call" : "")")
        var table = TextTable(["method", "median_ms", "vs_floor", "vs_exact", "median_error", "keys_scanned"])
        for line in report {
            let ms = line["median_ms"] as! Double
            let name = line["method"] as! String
            if name == "floor" {
                table.add(["floor (read K and V)", fmt(ms, 3), "1.00x", "", "", fmt((line["gb_per_s"] as! Double), 1) + " GB/s"])
                continue
            }
            table.add([name, fmt(ms, 3), fmt(line["vs_floor"] as! Double, 2) + "x",
                       (line["vs_exact"] as? Double).map { fmt($0, 2) + "x" } ?? "", fmt(line["median_output_error"] as! Double, 4),
                       fmt((line["keys_scanned_fraction"] as! Double) * 100, 1) + "%"])
        }
        print(table.render())
    }

    /// `--clustered`: the head's positions clustered and coded in memory (timed apart), then each
    /// query group attended through them (best of `passes`) and its error against exact attention
    /// (the mean over the group's heads; the median over the groups, as for the methods).
    func timeClustered(share: Double, snapshot: StoreSnapshot, keys: VectorView, values: VectorView, queries: [Float],
                       parameters: AttentionParameters, groups: Int, evict: (() -> Void)?) throws -> [String: Any] {
        let d = keys.dimension
        let clusters = try ClusteredCodes(keys: keys, values: values, queries: try snapshot.vectors(headOptions.id, .queries),
                                          format: keys.info.codes ?? CodeFormat(), sinks: parameters.sinks, window: parameters.window,
                                          threads: threads)
        var micros: [Double] = [], errors: [Double] = [], scanned: [Double] = []
        for gi in 0..<groups {
            let slice = Array(queries[(gi * group * d)..<((gi + 1) * group * d)])
            try slice.withUnsafeBufferPointer { qb in
                let exact = try Attention.attend(queries: qb, selector: nil, keys: keys, values: values, parameters: parameters)
                var result: Result<AttentionResult, Error>?
                micros.append(best(of: passes, before: evict) {
                    result = Result { try Attention.attendClustered(queries: qb, clusters: clusters, keys: keys, values: values,
                                                                    parameters: parameters, scanShare: share) }
                })
                let r = try result!.get()
                errors.append((0..<group).reduce(0.0) { $0 + relativeError(r.heads[$1].output, exact.heads[$1].output) } / Double(group))
                scanned.append(Double(r.stats.auxiliaryComputations) / Double(group * keys.count))
            }
        }
        return ["method": "quantized, clusters (scan \(fmt(share * 100, 0))%; built in \(fmt(clusters.buildSeconds, 1)) s)",
                "effective": "quantized", "median_ms": median(micros) / 1e3, "median_output_error": median(errors),
                "keys_scanned_fraction": median(scanned), "build_s": clusters.buildSeconds]
    }

    /// The median over groups of each group's best pass (`micros` holds passes + 1 timings per
    /// group, the first a warm-up).
    func bestPerGroup(_ micros: [Double]) -> Double {
        let per = passes + 1
        return median(stride(from: 0, to: micros.count, by: per).map { micros[($0 + 1)..<min(micros.count, $0 + per)].min() ?? micros[$0] })
    }
}

/// The best of `passes` timings of `body` (after one warm-up; `before` untimed before each), in microseconds.
func best(of passes: Int, before: (() -> Void)? = nil, _ body: () -> Void) -> Double {
    body()
    var fastest = Double.infinity
    for _ in 0..<passes {
        before?()
        let t0 = monotonicNanos()
        body()
        fastest = min(fastest, Double(monotonicNanos() - t0) / 1e3)
    }
    return fastest
}

/// Reads every key and value byte of a head once, positions split into `parts` run in parallel:
/// what exact attention cannot go below.
func readFloor(keys: VectorView, values: VectorView, parts: Int) -> UInt64 {
    let n = keys.count
    let parts = max(1, min(parts, n / 2048))
    var folds = [UInt64](repeating: 0, count: parts)
    folds.withUnsafeMutableBufferPointer { out in
        DispatchQueue.concurrentPerform(iterations: parts) { p in
            var fold: UInt64 = 0
            var i = n * p / parts
            let end = n * (p + 1) / parts
            while i < end {
                let inBlock = i % keys.blockSize
                let rows = min(keys.blockSize - inBlock, end - i)
                fold ^= kvr_read_bytes(keys.row(i), rows * keys.bytesPerRow)
                fold ^= kvr_read_bytes(values.row(i), rows * values.bytesPerRow)
                i += rows
            }
            out[p] = fold
        }
    }
    return folds.reduce(0, ^)
}


