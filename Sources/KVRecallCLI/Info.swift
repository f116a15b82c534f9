import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

struct Info: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List a store's heads: dimension, dtype, counts, bytes, indexes (and the keys each covers when fewer than the head's), the quantized tier's code format, auto's policy per head and each index's calibrated search knob.",
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
        // auto's plan and every index's calibration, per head.
        var plans: [HeadID: HeadPlan] = [:]
        var calibrations: [HeadID: [String: SearchCalibration]] = [:]
        // A session's refreshes per head (long generations: plans and indexes made again while decoding).
        var refreshes: [HeadID: RefreshStatus] = [:]
        try store.read { snapshot in
            for h in heads {
                for name in indexes[h.id] ?? [] {
                    if name == "refresh" {
                        refreshes[h.id] = try RefreshStatus.load(snapshot: snapshot, head: h.id)
                    } else if name == "auto" {
                        plans[h.id] = try HeadPlan.load(snapshot: snapshot, head: h.id)
                    } else if let kind = IndexKind(rawValue: name), kind.type != nil,
                              let c = try? IndexCatalog.loadCalibrated(kind, snapshot: snapshot, head: h.id).calibration {
                        calibrations[h.id, default: [:]][name] = c
                    }
                }
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
                 "index_coverage": coverage[h.id] ?? [:],
                 "codes": h.codes.map { f -> [String: Any] in
                     ["key_bits": f.keyBits, "value_bits": f.valueBits, "group": f.group, "order": f.order.rawValue,
                      "coded_groups": h.codedGroups, "bytes_per_position": f.bytesPerPosition(dimension: h.dimension)]
                 } ?? NSNull(),
                 "auto": plans[h.id].map { p -> [String: Any] in
                     var o: [String: Any] = ["policy": p.policy.rawValue, "reason": p.reason]
                     if let f = p.profile {
                         o["static_mass"] = f.staticMass; o["oracle_mass"] = f.oracleMass; o["effective_support"] = f.effectiveSupport
                         o["streaming_error"] = f.streamingError ?? NSNull(); o["retrieval_oracle_error"] = f.retrievalOracleError ?? NSNull()
                         o["estimation_error"] = f.estimationError ?? NSNull()
                     }
                     o["candidates"] = p.candidates.map { c -> [String: Any] in
                         ["policy": c.policy.rawValue, "setting": c.setting ?? NSNull(), "tail_detail": c.tailDetail.map { Double($0) } ?? NSNull(),
                          "error": c.error, "micros_per_step": c.micros, "build_s": c.buildSeconds, "cost": c.cost]
                     }
                     return o
                 } ?? NSNull(),
                 "refresh": refreshes[h.id].map { ["planned_over": $0.plannedOver, "refreshes": $0.refreshes] as [String: Any] } ?? NSNull(),
                 "calibration": (calibrations[h.id] ?? [:]).mapValues { c -> [String: Any] in
                     ["knob": c.knob.rawValue, "value": c.value, "recall": c.recall, "target_recall": c.targetRecall,
                      "keys_scanned_fraction": c.keysScanned, "k": c.k, "queries": c.queries, "reached": c.reached]
                 }] as [String: Any]
            }
            print(try jsonString(["path": store.path, "format_version": Int(try store.recordedVersion()),
                                  "bytes_on_disk": bytes, "heads": list]))
            return
        }
        print("store \(store.path): format \(try store.recordedVersion()), \(heads.count) heads, \(bytes) bytes on disk")
        var table = TextTable(["head", "d", "dtype", "keys", "prefill_q", "vector_bytes", "indexes"])
        for h in heads {
            table.add([h.id.description, "\(h.dimension)", h.dtype.rawValue, "\(h.count)", "\(h.queryCount)",
                       "\((2 * h.count + h.queryCount) * h.bytesPerVector)", indexText(h)])
        }
        print(table.render())
        for h in heads {
            if let f = h.codes { print("\(h.id) codes: \(h.codedGroups) groups, \(f)") }
            if let plan = plans[h.id] {
                print("\(h.id) auto: \(plan.summary)")
                for line in plan.candidateLines { print("  candidate \(line)") }
            }
            if let refresh = refreshes[h.id] { print("\(h.id) refresh: \(refresh.summary)") }
            for (name, c) in (calibrations[h.id] ?? [:]).sorted(by: { $0.key < $1.key }) { print("\(h.id) \(name): calibrated \(c.summary)") }
        }
    }
}
