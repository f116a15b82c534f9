import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention
import KVRecallPlanning

/// Everything a session keeps for one (layer, KV head) between calls: how many tokens it holds,
/// its index with the plan and calibration it was built with, the method prepared over them, and
/// the vector views of the last call.
///
/// The session is the head's only writer (its write lease), so it knows the head's length without
/// reading the head's record, and knows that between two calls the head only grew by appends,
/// which lets a decode step continue the last step's views instead of reading them again.
final class HeadState {
    let id: HeadID
    /// Tokens the head holds (keys and values).
    private(set) var tokens: Int
    /// The index over keys `0..<index.count` (nil before a build, or for a method that needs none).
    private(set) var index: (any BuildableIndex)?
    /// The search knob calibrated for `index` on held-out prefill queries.
    private(set) var calibration: SearchCalibration?
    /// `auto`'s plan, or an index method's adaptive budget.
    private(set) var plan: HeadPlan?
    /// The method prepared over `index` (with `estimate`'s cluster summary); kept while the index
    /// only grows, rebuilt when what the head runs with is replaced.
    private var prepared: PreparedMethod?
    /// A head's stored streams inside one snapshot: keys, values and (when kept) their codes.
    struct Views {
        let keys: VectorView
        let values: VectorView
        let codes: CodeView?
    }

    /// The views of the last call, continued while only appends happened.
    private var views: Views?

    /// Keys (outside the window) the current plan, budget, index and calibration were made over:
    /// a refresh starts once the keys indexed since pass the session's fraction of these.
    var plannedOver = 0
    /// Refreshes installed (persisted with the checkpoint's refresh record).
    var refreshes = 0
    /// The refresh being built off the decode path, if any.
    var refresh: RefreshJob?
    /// Why the last refresh failed (the head kept its plan and index).
    var lastRefreshFailure: String?
    /// Query rows the store holds for the head (prefill queries, then recorded decode queries).
    private(set) var queryRows: Int
    /// Decode queries recorded since the last append (`[rows, d]`), stored with the next append.
    private(set) var pendingQueries: [Float] = []
    /// Once decode queries are recorded: the query rows stored before the first (the prefill's)
    /// and the rows per position (the group size, or 1).
    private(set) var recording: (from: Int, rowsPerPosition: Int)?

    init(id: HeadID, tokens: Int, queryRows: Int) {
        self.id = id
        self.tokens = tokens
        self.queryRows = queryRows
    }

    /// Records the query group of the step at position `tokens - 1` as training queries, laid out
    /// as the prefill stored them: the group's `group` rows per position, or one row per position. Nothing when the stored queries are not one set per position up to here
    /// (no prefill queries, a sample, a step without a query): they would no longer line up.
    func recordDecodeQueries(_ group: UnsafeBufferPointer<Float>, groupSize g: Int, dimension d: Int, dtype: DType) {
        let rows = queryRows + pendingQueries.count / d, position = tokens - 1
        guard position > 0 else { return }
        if rows == position * g {
            guard firstUnstorableValue(group, dtype: dtype) == nil else { return }
            if recording == nil { recording = (rows, g) }
            pendingQueries.append(contentsOf: group)
        } else if rows == position {
            // One row per position: the query heads take turns, so each row is a query some head
            // really issued (a sum of heads aimed at different keys is none of them).
            let one = UnsafeBufferPointer(rebasing: group[((position % g) * d)..<((position % g + 1) * d)])
            guard firstUnstorableValue(one, dtype: dtype) == nil else { return }
            if recording == nil { recording = (rows, 1) }
            pendingQueries.append(contentsOf: one)
        }
    }

    /// The pending decode queries were stored (`rows` rows).
    func queriesStored(_ rows: Int) {
        queryRows += rows
        pendingQueries.removeAll(keepingCapacity: true)
    }

    /// The store now holds `rows` query rows for the head (a truncation); pending ones are dropped.
    func queriesCut(to rows: Int) {
        queryRows = min(queryRows, rows)
        pendingQueries.removeAll()
        if let from = recording?.from, queryRows <= from { recording = nil }
    }

    /// Where the head stands with refreshes, for a session refreshing at `fraction` of the keys
    /// planned over (at least `minimum` keys later).
    func refreshStatus(fraction: Double?, minimum: Int) -> RefreshStatus {
        RefreshStatus(plannedOver: plannedOver, refreshes: refreshes, building: refresh?.upTo,
                      nextAt: fraction.map { refreshDue(fraction: $0, minimum: minimum) }, lastFailure: lastRefreshFailure)
    }

    /// Keys outside the window at which the next refresh starts.
    func refreshDue(fraction: Double, minimum: Int) -> Int {
        plannedOver + max(minimum, Int((Double(plannedOver) * fraction).rounded(.up)))
    }

    /// Replaces what the head runs with (a build, a resume, a rebuild, a refresh); the prepared method goes.
    func install(plan: HeadPlan?, index: (any BuildableIndex)?, calibration: SearchCalibration?) {
        self.plan = plan
        self.index = index
        self.calibration = calibration
        prepared = nil
    }

    /// The head grew by `added` tokens (an append committed).
    func appended(_ added: Int) { tokens += added }

    /// Lets a retrieval budget follow the head's length between refreshes: the plan's profile
    /// measured the mass every budget keeps, and the most a budget may be is a fraction of the
    /// keys, so a budget held down by that cap rises as the head grows (the profile's masses are
    /// measured again at the next refresh). The method is prepared again when k changes.
    func followLength(policy: PolicyParameters) {
        guard var plan, plan.policy == .retrieval, var profile = plan.profile, tokens > profile.keys else { return }
        profile.keys = tokens
        guard let k = policy.budget(for: profile), k > (plan.k ?? 0) else { return }
        plan.k = k
        plan.reason += "; k \(k) once the head reached \(tokens) keys"
        self.plan = plan
        prepared = nil
    }

    /// The head was cut to `count` tokens: its views are read afresh; an index holding dropped
    /// keys must be replaced by the caller.
    func truncated(to count: Int) {
        tokens = count
        views = nil
        prepared = nil
    }

    /// The head's keys and values in `snapshot`: the last call's views continued (only the blocks
    /// appended since are read), or read whole the first time or after the map moved.
    func views(in snapshot: StoreSnapshot) throws -> Views {
        let current: Views
        if let views {
            current = Views(keys: try snapshot.vectors(continuing: views.keys, count: tokens),
                            values: try snapshot.vectors(continuing: views.values, count: tokens),
                            codes: try views.codes.map { try snapshot.codes(continuing: $0, count: tokens) })
        } else {
            current = Views(keys: try snapshot.vectors(id, .keys), values: try snapshot.vectors(id, .values),
                            codes: try snapshot.codes(id))
            guard current.keys.count == tokens else {
                throw StoreError(.corrupt, "head \(id) holds \(current.keys.count) tokens, the session counted \(tokens)",
                                 path: snapshot.store.path, head: id)
            }
        }
        views = current
        return current
    }

    /// `asked` prepared over the head's index (exact until a plan exists for `auto`), kept across calls.
    func method(_ asked: AttentionMethod, keys: VectorView, values: VectorView) throws -> PreparedMethod {
        if let prepared { return prepared }
        let method = try PreparedMethod(asked == .auto && plan == nil ? .exact : asked, plan: plan, index: index,
                                        calibration: calibration, keys: keys, values: values)
        prepared = method
        return method
    }

    /// Indexes keys `index.count..<upTo` and lets the prepared method follow (no rebuild).
    func extendIndex(upTo: Int, keys: VectorView, values: VectorView) throws {
        guard let index, upTo > index.count else { return }
        try index.add(keys: keys.limited(to: upTo), range: index.count..<upTo, progress: nil)
        try prepared?.indexDidGrow(keys: keys, values: values)
    }
}
