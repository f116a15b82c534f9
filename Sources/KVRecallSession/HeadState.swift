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

    init(id: HeadID, tokens: Int) {
        self.id = id
        self.tokens = tokens
    }

    /// Replaces what the head runs with (a build, a resume, a rebuild); the prepared method goes.
    func install(plan: HeadPlan?, index: (any BuildableIndex)?, calibration: SearchCalibration?) {
        self.plan = plan
        self.index = index
        self.calibration = calibration
        prepared = nil
    }

    /// The head grew by `added` tokens (an append committed).
    func appended(_ added: Int) { tokens += added }

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
