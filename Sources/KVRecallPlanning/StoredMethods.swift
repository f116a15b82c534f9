import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention

extension AttentionMethod {
    /// The stored record this method needs on a head: its index, `auto`'s plan, or the quantized
    /// tier's codes (named `codes` among a head's records, see `KVStore.records(of:)`).
    public var requiredRecord: String? {
        switch self {
        case .auto: return PlanRecord.auto.rawValue
        case .quantized: return KVStore.codesRecord
        default: return indexKind?.rawValue
        }
    }

    /// The method ready to answer queries on head `id` inside `snapshot`, with the head's
    /// persisted index and its calibration (an error naming the build command when it was never built).
    public func prepare(snapshot: StoreSnapshot, head id: HeadID) throws -> PreparedAttention {
        let keys = try snapshot.vectors(id, .keys)
        let values = try snapshot.vectors(id, .values)
        var plan: HeadPlan? = nil
        if self == .auto {
            guard let stored = try HeadPlan.load(snapshot: snapshot, head: id) else {
                throw IndexError.notBuilt("no auto plan for head \(id); build it first with `kvrecall build --index auto`")
            }
            plan = stored
        }
        let kind = plan?.indexKind ?? indexKind
        let loaded = try kind.map { try IndexCatalog.loadCalibrated($0, snapshot: snapshot, head: id) }
        let method = try PreparedMethod(self, plan: plan, index: loaded?.index, calibration: loaded?.calibration,
                                        keys: keys, values: values)
        return PreparedAttention(method: method, keys: keys, values: values, codes: try snapshot.codes(id))
    }
}

/// Prepared methods kept across read transactions of a store, as the REPL does between commands:
/// an entry is reused while the snapshot sees the same last write in the same map
/// (`ReadTransaction.mapIdentity`), so an index rebuilt by another process is loaded again, an
/// unchanged one is not, and its sections, views of the map, stay valid.
public final class PreparedMethodCache {
    private var entries: [String: (identity: MapIdentity, method: PreparedMethod)] = [:]

    public init() {}

    /// `method` on head `id`, bound to `snapshot`'s views; loaded and prepared only when needed.
    public func prepare(_ method: AttentionMethod, snapshot: StoreSnapshot, head id: HeadID) throws -> PreparedAttention {
        let key = "\(id)/\(method.rawValue)"
        let identity = snapshot.txn.mapIdentity
        let keys = try snapshot.vectors(id, .keys)
        let values = try snapshot.vectors(id, .values)
        if let entry = entries[key], entry.identity == identity {
            return PreparedAttention(method: entry.method, keys: keys, values: values, codes: try snapshot.codes(id))
        }
        let prepared = try method.prepare(snapshot: snapshot, head: id)
        entries[key] = (identity, prepared.method)
        return prepared
    }

    public func removeAll() { entries = [:] }
}

extension KVStore {
    /// What `records(of:)` calls a head's quantized tier.
    public static let codesRecord = "codes"

    /// The records a head holds, by the names `AttentionMethod.requiredRecord` uses: its stored
    /// indexes and plans, and `codes` when it keeps the quantized tier.
    public func records(of id: HeadID) throws -> Set<String> {
        var records = try indexNames()[id] ?? []
        if (try? info(id).codes) ?? nil != nil { records.insert(KVStore.codesRecord) }
        return records
    }
}
