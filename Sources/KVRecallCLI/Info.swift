import ArgumentParser
import Foundation
import KVRecall

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List a store's heads: dimension, dtype, counts, bytes, indexes (and the keys each covers when fewer than the head's).",
        discussion: "Example: kvrecall info --store s --json"
    )

    @OptionGroup var storeOptions: StoreOptions
    @Flag(help: "Print one JSON object instead of a table.")
    var json = false

    func run() throws {
        let store = try storeOptions.open(readOnly: true)
        defer { store.close() }
        let heads = try store.heads()
        let indexes = try store.indexNames()
        let bytes = store.environment.fileSize()
        // Keys each index covers (an index built before later ingests covers a prefix).
        var coverage: [HeadID: [String: Int]] = [:]
        for h in heads where indexes[h.id] != nil {
            for (name, covered) in try store.indexCoverage(h.id) {
                if let covered { coverage[h.id, default: [:]][name] = covered }
            }
        }
        func indexText(_ h: HeadInfo) -> String {
            (indexes[h.id] ?? []).sorted().map { name in
                guard let covered = coverage[h.id]?[name] else { return name }
                return covered == h.count ? name : "\(name) \(covered)/\(h.count) keys"
            }.joined(separator: ", ")
        }
        if json {
            let list: [[String: Any]] = heads.map { h in
                ["context": Int(h.id.context), "layer": Int(h.id.layer), "head": Int(h.id.head),
                 "dimension": h.dimension, "dtype": h.dtype.rawValue, "count": h.count,
                 "prefill_queries": h.queryCount, "block_size": h.blockSize,
                 "vector_bytes": (2 * h.count + h.queryCount) * h.bytesPerVector,
                 "indexes": (indexes[h.id] ?? []).sorted(),
                 "index_coverage": coverage[h.id] ?? [:]]
            }
            print(try jsonString(["path": store.path, "format_version": Int(KVStore.formatVersion),
                                  "bytes_on_disk": bytes, "heads": list]))
            return
        }
        print("store \(store.path): format \(KVStore.formatVersion), \(heads.count) heads, \(bytes) bytes on disk")
        var table = TextTable(["head", "d", "dtype", "keys", "prefill_q", "vector_bytes", "indexes"])
        for h in heads {
            table.add([h.id.description, "\(h.dimension)", h.dtype.rawValue, "\(h.count)", "\(h.queryCount)",
                       "\((2 * h.count + h.queryCount) * h.bytesPerVector)", indexText(h)])
        }
        print(table.render())
    }
}
