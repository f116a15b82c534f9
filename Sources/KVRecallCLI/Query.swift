import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

struct Query: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Top-k keys by inner product for each query row (exact unless --index).",
        discussion: """
        Each query row is searched on its own and timed; the median is reported. With --index, \
        ef / nprobe / beam default to the value calibrated when the index was built (kvrecall \
        build --target-recall), else to the library's defaults. --json prints:
          {"k": K, "results": [{"ids": [...], "scores": [...]}, ...],
           "stats": {"keys_scanned_fraction": x, "median_query_us": y}}

        Example:
          kvrecall query --store s --layer 2 --head 6 \\
              --queries Data/minilm/queries.npy -k 10
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions
    @Option(help: ArgumentHelp("Query vectors [M, d]: .npy or .safetensors.", valueName: "file"))
    var queries: String
    @Option(help: ArgumentHelp("Tensor name of the queries in a .safetensors file.", valueName: "name"))
    var queriesTensor: String?
    @Option(name: .short, help: "How many keys per query.")
    var k: Int = 10
    @Option(help: "Only the first N query rows.")
    var limit: Int?
    @Flag(help: "Print one JSON object.")
    var json = false
    @Option(help: "Search this index (built with `kvrecall build`) instead of exact search.")
    var index: IndexKind?
    @OptionGroup var search: SearchParameterOptions

    func validate() throws {
        if k < 1 { throw ValidationError("-k must be at least 1") }
        if let limit, limit < 1 { throw ValidationError("--limit must be at least 1") }
        if index == .hip { throw ValidationError("--index hip: HiP needs no index; use `kvrecall attend --method hip`") }
    }

    func run() throws {
        let store = try storeOptions.open(readOnly: true)
        defer { store.close() }
        let info = try store.info(headOptions.id)
        var (rows, values) = try loadQueries(path: queries, tensorName: queriesTensor, dimension: info.dimension)
        if let limit, limit < rows {
            rows = limit
            values = Array(values.prefix(limit * info.dimension))
        }
        guard info.count > 0 else { throw RunError("head \(info.id) has no keys to search") }
        // The one rule of the CLI (query and attend alike): a k above the head's keys is clamped, and said.
        let k = min(self.k, info.count)
        if k < self.k { warn("-k \(self.k) exceeds the \(info.count) keys of head \(info.id): returning all \(k)") }
        let d = info.dimension
        var all = SearchResults(k: k, queryCount: rows)
        var micros: [Double] = []
        try store.read { snapshot in
            let keys = try snapshot.vectors(headOptions.id, .keys)
            let loaded = try self.index.flatMap { $0.type == nil ? nil : $0 }.map {
                try IndexCatalog.loadCalibrated($0, snapshot: snapshot, head: headOptions.id)
            }
            let index: any VectorIndex = loaded?.index ?? FlatIndex(keys: keys)
            // ef / nprobe / beam not given: the value calibrated when the index was built.
            let params = loaded?.calibration?.resolve(search.parameters) ?? search.parameters
            // An index built before later ingests covers keys 0..<covered: the rest are searched
            // exactly and merged, so every key can come back.
            let covered = index.count
            guard covered <= keys.count else {
                throw RunError("the \(index.kind.rawValue) index of head \(info.id) covers \(covered) keys but the head holds \(keys.count); rebuild it with `kvrecall build --index \(index.kind.rawValue)`")
            }
            if covered < keys.count {
                warn("the \(index.kind.rawValue) index covers keys 0..<\(covered) of \(keys.count): the other \(keys.count - covered) are searched exactly (`kvrecall build --index \(index.kind.rawValue)` rebuilds it over every key)")
            }
            try values.withUnsafeBufferPointer { qb in
                for q in 0..<rows {
                    let one = UnsafeBufferPointer(rebasing: qb[(q * d)..<((q + 1) * d)])
                    let t0 = monotonicNanos()
                    var hits: [(id: Int, score: Float)] = []
                    if covered > 0 {
                        let r = try index.search(one, k: min(k, covered), parameters: params, keys: keys)
                        hits = r.hits(0)
                        all.stats += r.stats
                    }
                    for i in covered..<keys.count { hits.append((i, keys.score(query: one.baseAddress!, row: i))) }
                    all.stats.distanceComputations += keys.count - covered
                    all.stats.keyCount = keys.count
                    if covered < keys.count {
                        hits.sort { $0.score != $1.score ? $0.score > $1.score : $0.id < $1.id }
                    }
                    micros.append(Double(monotonicNanos() - t0) / 1e3)
                    for (j, hit) in hits.prefix(k).enumerated() {
                        all.ids[q * k + j] = hit.id
                        all.scores[q * k + j] = hit.score
                    }
                }
            }
        }
        all.stats.queries = rows
        let med = median(micros)
        if json {
            let results: [[String: Any]] = (0..<rows).map { q in
                let hits = all.hits(q)
                return ["ids": hits.map(\.id), "scores": hits.map { jsonNumber($0.score) }]
            }
            print(try jsonString(["k": k, "results": results,
                                  "stats": ["keys_scanned_fraction": all.stats.keysScannedFraction,
                                            "median_query_us": med]]))
            return
        }
        print("head \(info.id): \(info.count) keys, d=\(d), \(info.dtype.rawValue); \(rows) queries, k=\(k), \(index?.rawValue ?? "exact")")
        var table = TextTable(["query", "top ids", "top scores"])
        for q in 0..<min(rows, 20) {
            let hits = all.hits(q).prefix(5)
            table.add(["\(q)", hits.map { "\($0.id)" }.joined(separator: " "),
                       hits.map { fmt(Double($0.score), 3) }.joined(separator: " ")])
        }
        print(table.render())
        if rows > 20 { print("... \(rows - 20) more rows (use --json for all)") }
        print("keys scanned \(fmt(all.stats.keysScannedFraction * 100, 1))%, median \(fmt(med, 1)) us per query")
    }
}

/// A note on standard error (the result on standard output stays machine-readable).
func warn(_ message: String) {
    FileHandle.standardError.write("note: \(message)\n".data(using: .utf8)!)
}
