import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention

/// Profiles, plans and builds one head for `auto`, and calibrates any index it builds.
public enum HeadPlanner {
    /// Positions of the last `heldOut` of a head's `queryRows` prefill query rows, with `group` rows per position.
    public static func heldOutPositions(queryRows: Int, heldOut: Int, group: Int) -> [Int] {
        let firstRow = queryRows - heldOut
        return Array((firstRow / group)..<(queryRows / group))
    }

    /// The profile of a head from the held-out tail of its prefill queries (`queries`, `group` rows
    /// per position, positions from 0), or nil when there are too few of them.
    /// With `alignedToPositions` false the queries are not one per position (e.g. a sample of
    /// prefill queries): each is measured against every key, as the last position would be.
    public static func profile(keys: VectorView, queries: VectorView?, group: Int, calibration: CalibrationParameters,
                               attention: AttentionParameters, alignedToPositions: Bool = true) throws -> HeadProfile? {
        guard let queries, queries.count > 0 else { return nil }
        guard queries.count % group == 0 else {
            throw IndexError.invalidParameter("head \(keys.info.id) has \(queries.count) prefill query rows, not whole groups of \(group) query heads; is --group right?")
        }
        guard !alignedToPositions || queries.count / group <= keys.count else {
            throw IndexError.invalidParameter("head \(keys.info.id) has \(queries.count) prefill query rows, more than its \(keys.count) keys x \(group) query heads; is --group right?")
        }
        let rows = calibration.heldOut(of: queries.count) / group * group
        guard rows >= group else { return nil }
        let positions = alignedToPositions ? heldOutPositions(queryRows: queries.count, heldOut: rows, group: group)
            : Array(repeating: keys.count - 1, count: rows / group)
        let floats = queries.decode(rows: (queries.count - rows)..<queries.count)
        return try floats.withUnsafeBufferPointer {
            try HeadProfile.measure(keys: keys, queries: $0, group: group, positions: positions, k: attention.k,
                                    sinks: attention.sinks, window: attention.window, scale: attention.scale,
                                    softCap: attention.softCap)
        }
    }

    /// The adaptive budget of an index method (not `auto`) on one head: its profile on the
    /// held-out tail of its prefill queries and, when the caller's k leaves a query head below
    /// `policy.budgetMass`, the raised k (a plan of the head's method, whose `k` is that floor).
    /// nil without enough queries to profile.
    public static func budget(keys: VectorView, queries: VectorView?, group: Int,
                              calibration: CalibrationParameters, attention: AttentionParameters, policy: PolicyParameters,
                              alignedToPositions: Bool = true) throws -> HeadPlan? {
        guard let profile = try profile(keys: keys, queries: queries, group: group, calibration: calibration,
                                        attention: attention, alignedToPositions: alignedToPositions) else { return nil }
        let oracle = String(format: "%.2f", profile.worstOracleMass)
        guard let raised = policy.raisedK(for: profile) else {
            return HeadPlan(policy: .retrieval, profile: profile,
                            reason: "k \(attention.k) kept: every query head keeps >= \(oracle) of its mass with its exact top-\(attention.k)")
        }
        return HeadPlan(policy: .retrieval, profile: profile,
                        reason: "adaptive budget: a query head keeps only \(oracle) of its mass with its exact top-\(attention.k); \(raised.reason)",
                        k: raised.k)
    }

    /// The plan of one head: its profile on the held-out tail of its prefill queries, the output
    /// errors of the candidate policies on those queries (the estimation zone only for a head that
    /// looks diffuse: an IVF index over keys `0..<indexUpTo` is built to measure it and returned
    /// for reuse), and the policy.
    /// `.unprofiled` without enough queries.
    public static func plan(keys: VectorView, values: VectorView, queries: VectorView?, group: Int,
                            calibration: CalibrationParameters, attention: AttentionParameters, policy: PolicyParameters,
                            build: IndexBuildParameters, alignedToPositions: Bool = true,
                            indexUpTo: Int? = nil) throws -> (plan: HeadPlan, ivf: IVFIndex?) {
        guard var profile = try profile(keys: keys, queries: queries, group: group, calibration: calibration, attention: attention,
                                        alignedToPositions: alignedToPositions),
              let queries else {
            return (.unprofiled, nil)
        }
        let rows = calibration.heldOut(of: queries.count) / group * group
        let held = queries.decode(rows: (queries.count - rows)..<queries.count)
        let d = keys.dimension
        var p = attention
        p.groupSelection = .union
        // Retrieval is judged at the budget it would get (its k raised for a diffuse head).
        if let budget = policy.budget(for: profile) { p.k = max(p.k, budget) }
        let flat = FlatIndex(keys: keys)
        let selects = p.sinks + p.window < keys.count
        // A head that looks diffuse also tries the estimation zone, over an IVF index built for it.
        var ivf: IVFIndex? = nil
        var estimate: PreparedMethod? = nil
        if selects, profile.worstStaticMass < policy.streamingMass, profile.worstOracleMass < policy.diffuseMass {
            // Over the keys the head's index will hold (the rest are attended exactly), so a
            // session keeps this index instead of building it again.
            let upTo = min(keys.count, indexUpTo ?? keys.count)
            let built = try IndexCatalog.build(.ivf, keys: keys, count: upTo, parameters: build)
            estimate = try PreparedMethod(.estimate, index: built, keys: keys, values: values)
            ivf = built as? IVFIndex
        }
        var e = p
        e.k = attention.k  // the estimation zone's retrieval zone keeps the caller's k
        // One exact reference per group, shared by the candidates' errors.
        var streaming: [Double] = [], union: [Double] = [], estimated: [Double] = []
        try held.withUnsafeBufferPointer { qb in
            for gi in 0..<(rows / group) {
                let one = UnsafeBufferPointer(rebasing: qb[(gi * group * d)..<((gi + 1) * group * d)])
                let reference = ExactReference(queries: one, keys: keys, values: values, parameters: p)
                func error(_ result: AttentionResult) -> Double { Attention.fidelity(of: result, reference: reference).outputError }
                streaming.append(error(try Attention.attendStatic(queries: one, keys: keys, values: values, parameters: p)))
                union.append(selects ? error(try Attention.attend(queries: one, selector: flat, keys: keys, values: values, parameters: p)) : 0)
                if let estimate { estimated.append(error(try estimate.attend(one, keys: keys, values: values, parameters: e))) }
            }
        }
        profile.streamingError = median(streaming)
        profile.retrievalOracleError = median(union)
        if estimate != nil { profile.estimationError = median(estimated) }
        return (HeadPlan(profile: profile, parameters: policy), ivf)
    }

    /// Builds index `kind` over keys `0..<count` of a head, trained on all but the held-out tail of its
    /// prefill `queries` and calibrated on that tail (every query, for kinds that do not train on
    /// queries). The calibration is nil without enough queries or for kinds without a knob.
    /// `prebuilt` (e.g. the IVF index `plan` built to measure the estimation zone) is calibrated
    /// instead of building again when it is of `kind` and covers exactly `count` keys.
    public static func buildCalibrated(_ kind: IndexKind, keys: VectorView, count: Int, queries: VectorView?,
                                       build: IndexBuildParameters, calibration: CalibrationParameters,
                                       prebuilt: (any BuildableIndex)? = nil,
                                       progress: ((Int, Int) -> Void)? = nil) throws -> (index: any BuildableIndex, calibration: SearchCalibration?) {
        let indexed = keys.limited(to: count)
        let rows = queries?.count ?? 0
        let heldOut = calibration.heldOut(of: rows)
        let index: any BuildableIndex
        if let prebuilt, prebuilt.kind == kind, prebuilt.count == count {
            index = prebuilt
        } else {
            // Kinds that learn from queries (the retrieval graph) never see the held-out ones.
            index = try IndexCatalog.build(kind, keys: keys, count: count, queries: heldOut > 0 ? queries?.limited(to: rows - heldOut) : queries,
                                           parameters: build, progress: progress)
        }
        guard let queries, heldOut > 0, SearchKnob(kind: kind) != nil else { return (index, nil) }
        var parameters = calibration
        parameters.k = min(calibration.k, count)
        let held = queries.decode(rows: (rows - heldOut)..<rows)
        let found = try held.withUnsafeBufferPointer {
            try Calibrator.calibrate(index, keys: indexed, queries: $0, parameters: parameters)
        }
        return (index, found)
    }

    /// The knobs a head's planning reads.
    public struct Setup: Sendable {
        /// The attention a decode step runs with (k, sinks, window, scale, soft-cap).
        public var attention: AttentionParameters
        public var calibration = CalibrationParameters()
        /// `budgetMass` 0: no adaptive budget (k stays fixed).
        public var policy = PolicyParameters()
        public init(attention: AttentionParameters) { self.attention = attention }
    }

    /// What one head runs with after its build, for `method`: its plan (`auto`'s policy, or an
    /// index method's adaptive budget when `setup.policy.budgetMass` > 0) and the index the plan
    /// names, over keys `0..<indexUpTo` (the rest stay in the window), calibrated on the held-out
    /// tail of `queries` (`group` rows per position, or a sample). Nothing when the head has too
    /// few keys for an index.
    public static func prepareHead(method: AttentionMethod, keys: VectorView, values: VectorView, queries: VectorView?,
                                   group: Int, indexUpTo: Int, setup: Setup,
                                   build: IndexBuildParameters) throws -> (plan: HeadPlan?, index: (any BuildableIndex)?,
                                                                           calibration: SearchCalibration?) {
        let upTo = min(keys.count, max(0, indexUpTo))
        guard upTo > setup.attention.sinks else { return (nil, nil, nil) }
        let rows = queries?.count ?? 0
        // Rows per position: the group's every query head, or one (summed) query; queries that
        // are not one row set per position (a sample) are measured against every key.
        let perHead = group > 1 && rows == keys.count * group
        let aligned = perHead || rows == keys.count
        var plan: HeadPlan? = nil
        var prebuilt: IVFIndex? = nil
        if method == .auto {
            (plan, prebuilt) = try self.plan(keys: keys, values: values, queries: queries, group: perHead ? group : 1,
                                             calibration: setup.calibration, attention: setup.attention, policy: setup.policy,
                                             build: build, alignedToPositions: aligned, indexUpTo: upTo)
        } else if setup.policy.budgetMass > 0 {
            plan = try budget(keys: keys, queries: queries, group: perHead ? group : 1, calibration: setup.calibration,
                              attention: setup.attention, policy: setup.policy, alignedToPositions: aligned)
        }
        guard let kind = method == .auto ? plan?.indexKind : method.indexKind else { return (plan, nil, nil) }
        let made = try buildCalibrated(kind, keys: keys, count: upTo, queries: queries, build: build,
                                       calibration: setup.calibration, prebuilt: prebuilt)
        return (plan, made.index, made.calibration)
    }
}
