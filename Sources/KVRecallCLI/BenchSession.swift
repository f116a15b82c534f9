import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

struct BenchSession: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "session",
        abstract: "Per-token decode time of a KVSession: exact attention against a retrieval method.",
        usage: "kvrecall bench session --data <dir> [<options>]",
        discussion: """
        Fills every (layer, KV head) of two sessions (exact, and --method) with --context tokens \
        of the synthetic set (keys, values and prefill queries from Tools/make_synthetic.py; \
        heads take different rotations of it), builds the retrieval indexes, then decodes \
        --steps tokens: per layer, append one token's K/V for all KV heads and attend its GQA \
        query groups. Reports per-token attention time over all layers (median), the speed-up, \
        recall@k of the retrieved set against exact top-k, the output error against exact attention \
        and the exact top-k oracle's (sinks + window + each query head's exact top-k; medians over \
        the first head of each layer at about 8 steps), the tail of the step times (p99 against the \
        whole run's median and against the median of the 101 steps around each step, beside the \
        exact session's; --slowest lists the worst steps and the refreshes in them), and resident memory.

        Example:
          kvrecall bench session --data Tools/bench/out/synth --layers 4 \\
              --kv-heads 8 --group 4 --context 32768
        """
    )

    @Option(help: ArgumentHelp("Synthetic set folder (keys, values, prefill_queries, queries .npy).", valueName: "dir"))
    var data: String
    @Option var layers: Int = 4
    @Option var kvHeads: Int = 8
    @Option(help: "Query heads per KV head.")
    var group: Int = 4
    @Option(help: "Prompt tokens per head.")
    var context: Int = 32768
    @Option(help: "Decode steps timed.")
    var steps: Int = 16
    @Option(help: "Retrieval method of the second session.")
    var method: AttentionMethod = .retrieval
    @Option(help: "Storage type of the keys and values.") var dtype: DType = .f16
    @Option(name: .short) var k: Int = 100
    @Option(help: "Graph beam width (default: calibrated per head at build for --target-recall).")
    var ef: Int?
    @Option(help: "Recall@k the calibrated search knobs reach on held-out prefill queries.")
    var targetRecall: Double = 0.95
    @Option(help: "GQA selection of the retrieval session: union, union-capped, summed.")
    var groupSelection: GroupSelection = .union
    @Option(help: ArgumentHelp("Folder for the two stores (default: system temp; removed afterwards).", valueName: "dir"))
    var scratch: String?
    @Option(help: "Retrieval graph: most prefill queries each head's graph trains on (spread over positions).")
    var trainingQueries: Int = IndexBuildParameters().trainingQueries
    @Option(help: ArgumentHelp("The method session's refresh fraction (long decodes: plans and indexes made again off the decode path); 'none': never.",
                               valueName: "fraction"))
    var refreshFraction: String = SessionConfiguration.defaultRefreshFraction.map { "\($0)" } ?? "none"
    @Option(help: "Keys that left the window a head's index takes at once (the session's upkeep batch).")
    var upkeepBatch: Int = SessionConfiguration.defaultUpkeepBatch
    @Option(help: "auto: the output error a head's plan may reach against exact attention on its held-out prefill queries.")
    var targetError: Double = PolicyParameters().targetError
    @Option(help: "Also list the N slowest steps of the method session: append and attention time, refreshes started or installed then.")
    var slowest: Int = 0

    func validate() throws {
        if !(targetError > 0 && targetError.isFinite) { throw ValidationError("--target-error must be a positive number (got \(targetError))") }
        if slowest < 0 { throw ValidationError("--slowest must be at least 0 (got \(slowest))") }
        if upkeepBatch < 1 { throw ValidationError("--upkeep-batch must be at least 1 (got \(upkeepBatch))") }
        if layers < 1 || kvHeads < 1 || group < 1 || context < 256 || steps < 1 { throw ValidationError("sizes must be positive, context >= 256") }
        if trainingQueries < 1 { throw ValidationError("--training-queries must be at least 1 (got \(trainingQueries))") }
        _ = try refresh()
    }

    func refresh() throws -> Double? { try parseRefreshFraction(refreshFraction) }

    func run() throws {
        BLAS.setThreads(1)
        let keys = try NPY.read(path: "\(data)/keys.npy"), values = try NPY.read(path: "\(data)/values.npy")
        let prefill = try NPY.read(path: "\(data)/prefill_queries.npy"), decode = try NPY.read(path: "\(data)/queries.npy")
        let d = keys.shape[1], n = keys.shape[0]
        guard context + steps <= n else { throw RunError("--context + --steps exceeds the \(n) keys of \(data)") }
        let (kf, vf, pf, qf) = (keys.floats(), values.floats(), prefill.floats(), decode.floats())
        let base = scratch ?? NSTemporaryDirectory()
        var sessions: [KVSession] = []
        defer { sessions.forEach { s in let path = s.store.path; s.close(); try? FileManager.default.removeItem(atPath: path) } }
        for m in [AttentionMethod.exact, method] {
            let config = SessionConfiguration(layers: layers, kvHeads: kvHeads, queryHeadsPerKV: group, headDimension: d,
                                              dtype: dtype, method: m, k: k, ef: ef,
                                              upkeepBatch: upkeepBatch, targetRecall: targetRecall, refreshFraction: try refresh(),
                                              targetError: targetError)
            sessions.append(try KVSession(configuration: config, directory: base + "/kvrecall-bench-\(m.rawValue)-\(UUID().uuidString)"))
            sessions[sessions.count - 1].parameters.groupSelection = groupSelection
        }
        // Head h of layer l reads the synthetic set rotated by a per-head offset.
        func rotated(_ source: [Float], rows: Int, start: Int, count: Int) -> [Float] {
            var out = [Float](); out.reserveCapacity(count * d)
            for r in 0..<count { let i = (start + r) % rows; out += source[(i * d)..<((i + 1) * d)] }
            return out
        }
        let fill0 = monotonicNanos()
        for layer in 0..<layers {
            var kBuf = [Float](), vBuf = [Float](), pBuf = [Float]()
            for head in 0..<kvHeads {
                let offset = (layer * kvHeads + head) * 9973 % (n - context - steps + 1)
                kBuf += rotated(kf, rows: n, start: offset, count: context)
                vBuf += rotated(vf, rows: n, start: offset, count: context)
                pBuf += rotated(pf, rows: prefill.shape[0], start: 0, count: prefill.shape[0])
            }
            for s in sessions {
                try kBuf.withUnsafeBufferPointer { kb in try vBuf.withUnsafeBufferPointer { vb in try s.append(layer: layer, keys: kb, values: vb) } }
                if s.configuration.method != .exact {  // the graph trains on them, auto profiles, calibration holds out
                    try pBuf.withUnsafeBufferPointer { try s.appendPrefillQueries(layer: layer, queries: $0) }
                }
            }
        }
        let fillSeconds = Double(monotonicNanos() - fill0) / 1e9
        let build0 = monotonicNanos()
        var buildParameters = IndexBuildParameters()
        buildParameters.threads = 2
        buildParameters.trainingQueries = trainingQueries
        try sessions[1].buildIndexes(parameters: buildParameters)
        let buildSeconds = Double(monotonicNanos() - build0) / 1e9
        print("\(layers) layers x \(kvHeads) KV heads x \(group) query heads, d=\(d), \(dtype.rawValue), context \(context): filled in \(fmt(fillSeconds, 1)) s, \(method) indexes built in \(fmt(buildSeconds, 1)) s")
        var times: [[Double]] = [[], []]
        var stepTimes: [[Double]] = [[], []]  // append (with the index upkeep and refresh installs) + attend
        var appendTimes: [Double] = []  // the method session's appends, per step
        var events: [String] = []  // refreshes started or installed during each step (--slowest)
        func refreshState() throws -> [RefreshStatus?] {
            guard slowest > 0 else { return [] }
            var all: [RefreshStatus?] = []
            for l in 0..<layers { for h in 0..<kvHeads { all.append(try sessions[1].refreshStatus(layer: l, head: h)) } }
            return all
        }
        // Fidelity of the method session's first head per layer, at 8 steps spread over the run.
        var recalls: [Double] = [], errors: [Double] = [], oracleErrors: [Double] = []
        let measureEvery = max(1, steps / 8)
        for step in 0..<steps {
            var elapsed = [0.0, 0.0], whole = [0.0, 0.0]
            let before = try refreshState()
            for layer in 0..<layers {
                var kBuf = [Float](), vBuf = [Float](), qBuf = [Float]()
                for head in 0..<kvHeads {
                    let offset = (layer * kvHeads + head) * 9973 % (n - context - steps + 1)
                    let row = (offset + context + step) % n
                    kBuf += kf[(row * d)..<((row + 1) * d)]
                    vBuf += vf[(row * d)..<((row + 1) * d)]
                    // A GQA group's query heads look for the same keys: one decode query, per-head scales.
                    let qi = (step * kvHeads + head + layer * 131) % decode.shape[0]
                    for g in 0..<group {
                        let scale = 1 + 0.1 * Float(g % 3) - 0.05 * Float(g / 3)
                        qBuf += qf[(qi * d)..<((qi + 1) * d)].map { $0 * scale }
                    }
                }
                for (i, s) in sessions.enumerated() {
                    let a0 = monotonicNanos()
                    try kBuf.withUnsafeBufferPointer { kb in try vBuf.withUnsafeBufferPointer { vb in try s.append(layer: layer, keys: kb, values: vb) } }
                    let t0 = monotonicNanos()
                    _ = try qBuf.withUnsafeBufferPointer { try s.attend(layer: layer, queries: $0) }
                    let t1 = monotonicNanos()
                    elapsed[i] += Double(t1 - t0) / 1e3
                    whole[i] += Double(t1 - a0) / 1e3
                }
                if step % measureEvery == 0 || step == steps - 1 {
                    let f = try sessions[1].store.read { snapshot -> FidelityMetrics in
                        let id = HeadID(layer: UInt16(layer), head: 0)
                        let keys = try snapshot.vectors(id, .keys), values = try snapshot.vectors(id, .values)
                        let p = sessions[1].parameters
                        return try qBuf.withUnsafeBufferPointer { qb -> FidelityMetrics in
                            let groupQueries = UnsafeBufferPointer(rebasing: qb[0..<(group * d)])
                            let result = try sessions[1].attendDetailed(layer: layer, head: 0, queries: groupQueries)
                            return Attention.fidelity(of: result, queries: groupQueries, keys: keys, values: values, parameters: p)
                        }
                    }
                    recalls.append(f.recall)
                    errors.append(f.outputError)
                    oracleErrors.append(f.oracleError)
                }
            }
            times[0].append(elapsed[0]); times[1].append(elapsed[1])
            stepTimes[0].append(whole[0]); stepTimes[1].append(whole[1])
            appendTimes.append(whole[1] - elapsed[1])
            let after = try refreshState()
            events.append(zip(before, after).enumerated().compactMap { i, pair -> String? in
                let (b, a) = pair
                guard let b, let a else { return nil }
                if a.refreshes > b.refreshes { return "L\(i / kvHeads)H\(i % kvHeads) installed" }
                if a.building != nil && b.building == nil { return "L\(i / kvHeads)H\(i % kvHeads) started" }
                return nil
            }.joined(separator: ", "))
        }
        let exactMs = median(times[0]) / 1e3, retrievalMs = median(times[1]) / 1e3
        var table = TextTable(["method", "per_token_ms", "per_layer_ms", "speedup", "recall@\(k)", "output_error", "oracle_error"])
        table.add(["exact", fmt(exactMs, 2), fmt(exactMs / Double(layers), 3), "1.00x", "1.000", "0.0000", ""])
        table.add([method.rawValue, fmt(retrievalMs, 2), fmt(retrievalMs / Double(layers), 3), fmt(exactMs / retrievalMs, 2) + "x",
                   fmt(median(recalls), 3), fmt(median(errors), 4), fmt(median(oracleErrors), 4)])
        print(table.render())
        // Step times' tail (issue 25: refreshes are built off the decode path, so p99 stays near the median).
        func percentile(_ x: [Double], _ p: Double) -> Double {
            let sorted = x.sorted()
            return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
        }
        var refreshes = 0
        for l in 0..<layers { for h in 0..<kvHeads { refreshes += try sessions[1].refreshStatus(layer: l, head: h)?.refreshes ?? 0 } }
        // A step's cost grows with the keys, so over a run that grows the context much (1024 + 3000
        // steps) the last steps alone sit ~1.6x above the whole run's median; the local ratio divides
        // each step by the median of the 101 steps around it, so only spikes count.
        func localRatios(_ x: [Double]) -> [Double] {
            x.indices.map { i in
                let lo = max(0, min(i - 50, x.count - 101)), hi = min(x.count, lo + 101)
                return x[i] / median(Array(x[lo..<hi]))
            }
        }
        for (name, label, series) in [(method.rawValue, "attention", times[1]), (method.rawValue, "step (append + attention)", stepTimes[1]),
                                      ("exact (baseline)", "step (append + attention)", stepTimes[0])] {
            let p50 = median(series), p99 = percentile(series, 0.99), local = percentile(localRatios(series), 0.99)
            print("\(name) \(label) ms over \(steps) steps: median \(fmt(p50 / 1e3, 3)), p99 \(fmt(p99 / 1e3, 3)) (\(fmt(p99 / p50, 2))x), max \(fmt((series.max() ?? 0) / 1e3, 2)); p99 over the local median \(fmt(local, 2))x")
        }
        if slowest > 0 {
            print("slowest \(min(slowest, steps)) steps of \(method.rawValue) (ms): step, append, attention, refreshes")
            for i in stepTimes[1].indices.sorted(by: { stepTimes[1][$0] > stepTimes[1][$1] }).prefix(slowest) {
                print("  step \(i): \(fmt(stepTimes[1][i] / 1e3, 3)) = append \(fmt(appendTimes[i] / 1e3, 3)) + attention \(fmt(times[1][i] / 1e3, 3))  \(events[i])")
            }
        }
        print("refreshes installed: \(refreshes) over \(layers * kvHeads) heads (refresh fraction \(refreshFraction))")
        // What the method session chose per head (auto's policies; every index's calibrated knob).
        let report = sessions[1].report()
        if let first = report.first { print("head policies and calibration (\(report.count) heads), first: \(first)") }
        if method == .auto {
            var counts: [String: Int] = [:]
            for l in 0..<layers { for h in 0..<kvHeads { if let p = try sessions[1].plan(layer: l, head: h) { counts[p.policy.rawValue, default: 0] += 1 } } }
            print("auto policies: " + counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
        }
        print("resident memory: \(residentMegabytes()) MB (both sessions' maps and indexes)")
    }
}

/// VmRSS of this process in MB, from /proc/self/status.
func residentMegabytes() -> Int {
    guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
          let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return -1 }
    return (Int(line.split(separator: " ").dropFirst().first ?? "0") ?? 0) / 1024
}
