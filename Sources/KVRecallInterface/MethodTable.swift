import KVRecall
// Presentation of method runs, shared by `kvrecall attend` / `demo` and the REPL's `compare`.

/// The side-by-side table of several methods' runs (recall against exact top-k, attention mass,
/// output error, the oracle's error, keys scanned, median latency and latency relative to exact).
public func methodTable(_ runs: [MethodRun], k: Int) -> TextTable {
    let exactMicros = runs.first { $0.method == .exact }?.medianMicros
    var table = TextTable(["method", "recall@\(k)", "attn_mass", "output_err", "oracle_err", "keys_scanned", "median_us", "vs_exact"])
    for r in runs {
        table.add([r.method.rawValue, fmt(r.recall, 3), fmt(r.mass, 3), fmt(r.error, 4), fmt(r.oracleError, 4),
                   fmt(r.scanned, 4), fmt(r.medianMicros, 1), exactMicros.map { fmt(r.medianMicros / $0, 3) + "x" } ?? ""])
    }
    return table
}
