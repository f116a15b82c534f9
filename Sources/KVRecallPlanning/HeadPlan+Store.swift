import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention

/// Where a head's plan is stored, beside its indexes (one JSON section `plan`).
public enum PlanRecord: String, Sendable {
    /// `auto`'s plan: the policy, its profile, errors and k (`kvrecall build --index auto`, a session with `auto`).
    case auto
    /// An index method's adaptive budget (a session with `budgetMass`): the k it raised.
    case budget

    static let section = "plan"
}

extension HeadPlan {
    /// Stores the plan as head `id`'s `record`.
    public func save(in store: KVStore, head id: HeadID, as record: PlanRecord = .auto) throws {
        try store.saveIndex(id, name: record.rawValue, sections: [PlanRecord.section: Array(try JSONEncoder().encode(self))])
    }

    /// Head `id`'s stored `record`, or nil when none was saved.
    public static func load(snapshot: StoreSnapshot, head id: HeadID, record: PlanRecord = .auto) throws -> HeadPlan? {
        guard let sections = try snapshot.index(id, name: record.rawValue) else { return nil }
        let rebuild = record == .auto ? "rebuild it with `kvrecall build --index auto`" : "build the session's indexes again"
        guard let bytes = sections[PlanRecord.section] else {
            throw IndexError.corrupt("the \(record.rawValue) record of head \(id) lacks its plan; \(rebuild)")
        }
        do {
            return try JSONDecoder().decode(HeadPlan.self, from: Data(bytes.array))
        } catch {
            throw IndexError.corrupt("the \(record.rawValue) plan of head \(id) is unreadable (\(error)); \(rebuild)")
        }
    }
}
