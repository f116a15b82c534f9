import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

struct Replay: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replay a real decode trace through a decoder session, step by step, against exact attention.",
        discussion: """
        Prefills a session with the sample's keys, values and prefill queries, builds the \
        method's index, then for each trace step appends that token's key and value and attends \
        its query, comparing the output with exact attention over the same cache (trace_*.npy \
        from Tools/extract_kv.py --trace).

        Example:
          kvrecall replay --method retrieval
        """
    )

    @Option(help: ArgumentHelp("Folder with keys, values, prefill_queries and trace_{queries,keys,values}.npy (default: Data/minilm).", valueName: "dir"))
    var data: String?
    @Option(help: "Attention method of the session.")
    var method: AttentionMethod = .retrieval
    @OptionGroup var attention: AttentionOptions
    @Flag(help: "Print every step.")
    var verbose = false

    func run() throws {
        let dir = try data ?? locateSampleData()
        func load(_ name: String) throws -> Tensor { try NPY.read(path: "\(dir)/\(name).npy") }
        let keys = try load("keys"), values = try load("values"), prefill = try load("prefill_queries")
        let tq = try load("trace_queries"), tk = try load("trace_keys"), tv = try load("trace_values")
        let d = keys.shape[1]
        guard tq.shape == tk.shape, tk.shape == tv.shape, tq.shape[1] == d else {
            throw RunError("\(dir): trace_queries/keys/values must share one [steps, \(d)] shape")
        }
        var config = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: d, dtype: .f32,
                                          method: method, k: attention.k, sinks: attention.sinks,
                                          window: attention.window, ef: attention.search.knobs.ef, nprobe: attention.search.knobs.nprobe, beam: attention.search.knobs.beam)
        config.upkeepBatch = 16
        let session = try KVSession(configuration: config, directory: nil)
        defer { session.close() }
        session.parameters.search = attention.parameters.search
        session.parameters.estimation = attention.parameters.estimation
        try keys.floats().withUnsafeBufferPointer { k in
            try values.floats().withUnsafeBufferPointer { v in try session.append(layer: 0, keys: k, values: v) }
        }
        try prefill.floats().withUnsafeBufferPointer { try session.appendPrefillQueries(layer: 0, queries: $0) }
        let t0 = monotonicNanos()
        try session.buildIndexes()
        print("session: \(keys.shape[0]) prompt tokens, d=\(d), method \(method); indexes built in \(fmt(Double(monotonicNanos() - t0) / 1e6, 1)) ms")
        let steps = tq.shape[0]
        let (qs, ks, vs) = (tq.floats(), tk.floats(), tv.floats())
        var errors: [Double] = [], micros: [Double] = []
        var exactParameters = AttentionParameters()
        exactParameters.k = attention.k
        for t in 0..<steps {
            let row = (t * d)..<((t + 1) * d)
            try ks.withUnsafeBufferPointer { k in
                try vs.withUnsafeBufferPointer { v in
                    try session.append(layer: 0, keys: UnsafeBufferPointer(rebasing: k[row]), values: UnsafeBufferPointer(rebasing: v[row]))
                }
            }
            let start = monotonicNanos()
            let out = try qs.withUnsafeBufferPointer { try session.attend(layer: 0, queries: UnsafeBufferPointer(rebasing: $0[row])) }
            micros.append(Double(monotonicNanos() - start) / 1e3)
            let exact = try session.store.read { snapshot -> PartialAttention in
                let keys = try snapshot.vectors(HeadID(), .keys), values = try snapshot.vectors(HeadID(), .values)
                return try qs.withUnsafeBufferPointer {
                    try Attention.attend(queries: UnsafeBufferPointer(rebasing: $0[row]), selector: nil, keys: keys, values: values,
                                         parameters: exactParameters).heads[0]
                }
            }
            errors.append(relativeError(out, exact.output))
            if verbose { print("step \(t): tokens \(keys.shape[0] + t + 1), output error \(fmt(errors.last!, 4)), \(fmt(micros.last!, 1)) us") }
        }
        var table = TextTable(["steps", "final_tokens", "mean_error", "median_error", "max_error", "median_us"])
        table.add(["\(steps)", "\(keys.shape[0] + steps)", fmt(errors.reduce(0, +) / Double(steps), 4), fmt(median(errors), 4),
                   fmt(errors.max() ?? 0, 4), fmt(median(micros), 1)])
        print(table.render())
    }
}
