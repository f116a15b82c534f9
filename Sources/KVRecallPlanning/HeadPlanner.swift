import CKernels
import Foundation
import Synchronization
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

    /// `auto`'s plan for one head, by measurement: on the held-out tail of its prefill queries
    /// (`group` rows per position), every candidate's median output error against exact attention
    /// and its median time per decode step: exact, streaming, the quantized method at a few numbers
    /// of exact candidates (when the head keeps `codes`), the retrieval graph with the head's budget
    /// (built over keys `0..<indexUpTo`, its build spread over `policy.buildHorizon(keys:)` steps, when
    /// it holds at least `policy.minimumIndexedKeys`), and for a head that looks diffuse the
    /// estimation zone over an IVF index. The cheapest candidate within `policy.targetError` wins;
    /// exact is one of them, so no plan is measured slower than exact attention. A large head is
    /// timed with cold caches (`policy.coldTimingBytes`), as a decoder meets it. The index the
    /// winner reads comes back built and calibrated.
    /// Without enough queries: quantized when the head keeps codes, else exact.
    public static func plan(keys: VectorView, values: VectorView, codes: CodeView? = nil, queries: VectorView?, group: Int,
                            calibration: CalibrationParameters, attention: AttentionParameters, policy: PolicyParameters,
                            build: IndexBuildParameters, alignedToPositions: Bool = true,
                            indexUpTo: Int? = nil, concurrentHeads: Int = 1) throws -> (plan: HeadPlan, index: (any BuildableIndex)?, calibration: SearchCalibration?) {
        try policy.validate()
        guard let profile = try profile(keys: keys, queries: queries, group: group, calibration: calibration, attention: attention,
                                        alignedToPositions: alignedToPositions),
              let queries else {
            let fallback = codes != nil
                ? HeadPlan(policy: .quantized, profile: nil, reason: "no prefill queries to measure: the quantized method by default")
                : HeadPlan(policy: .exact, profile: nil, reason: "no prefill queries to measure and no codes: exact attention")
            return (fallback, nil, nil)
        }
        let d = keys.dimension
        let rows = calibration.heldOut(of: queries.count) / group * group
        let held = queries.decode(rows: (queries.count - rows)..<queries.count)
        let groups = rows / group
        var p = attention
        p.groupSelection = .union
        let upTo = min(keys.count, max(0, indexUpTo ?? keys.count))

        // The candidates, each a prepared method with the parameters it runs with.
        struct Candidate {
            let policy: HeadPolicy
            let setting: Int?
            var detail: Float? = nil
            let method: PreparedMethod
            let parameters: AttentionParameters
            let buildSeconds: Double
            var index: (any BuildableIndex)? = nil
            var calibration: SearchCalibration? = nil
            var errors: [Double] = []
            var micros: [Double] = []
        }
        var candidates: [Candidate] = []
        /// A candidate reading an index of `kind` over keys `0..<upTo`, built and calibrated now (its build time counts).
        func indexed(_ policy: HeadPolicy, kind: IndexKind, method: AttentionMethod, setting: Int?,
                     parameters: AttentionParameters) throws -> Candidate {
            let start = monotonicNanos()
            let built = try buildCalibrated(kind, keys: keys, count: upTo, queries: queries, build: build, calibration: calibration)
            var candidate = Candidate(policy: policy, setting: setting,
                                      method: try PreparedMethod(method, index: built.index, calibration: built.calibration,
                                                                 keys: keys, values: values),
                                      parameters: parameters, buildSeconds: Double(monotonicNanos() - start) / 1e9)
            candidate.index = built.index
            candidate.calibration = built.calibration
            return candidate
        }
        candidates.append(Candidate(policy: .exact, setting: nil, method: try PreparedMethod(.exact, index: nil, keys: keys, values: values),
                                    parameters: p, buildSeconds: 0))
        candidates.append(Candidate(policy: .streaming, setting: nil, method: try PreparedMethod(.streaming, index: nil, keys: keys, values: values),
                                    parameters: p, buildSeconds: 0))
        if codes != nil {
            for m in policy.quantizedCandidates {
                for detail in policy.quantizedDetails {
                    var q = p
                    q.quantized.candidates = m
                    q.quantized.tailDetail = detail
                    candidates.append(Candidate(policy: .quantized, setting: m, detail: detail,
                                                method: try PreparedMethod(.quantized, index: nil, keys: keys, values: values),
                                                parameters: q, buildSeconds: 0))
                }
            }
        }
        let selects = p.sinks + p.window < keys.count
        if selects && upTo >= policy.minimumIndexedKeys {
            // Retrieval at the budget it would get (its k raised for a diffuse head).
            var r = p
            if let budget = policy.budget(for: profile) { r.k = max(r.k, budget) }
            // A budget at the exact-selection fraction selects by a scan of every key (exact's score
            // pass, and more): never cheaper than exact attention, so its graph is not built (on a
            // diffuse 128K head the build alone took minutes).
            if Double(r.k) < PreparedMethod.exactSelectionFraction * Double(upTo) {
                candidates.append(try indexed(.retrieval, kind: .retrieval, method: .retrieval, setting: r.k, parameters: r))
            }
        }
        if selects, profile.worstStaticMass < policy.streamingMass, profile.worstOracleMass < policy.diffuseMass, upTo > p.sinks {
            // A head that looks diffuse also tries the estimation zone, over an IVF index.
            candidates.append(try indexed(.estimation, kind: .ivf, method: .estimate, setting: nil, parameters: p))
        }

        // Errors on every held-out group; times on the first `timedGroups`, the candidates
        // interleaved per group so that they share the machine's load alike.
        let headBytes = keys.count * (keys.bytesPerRow + values.bytesPerRow)
        let evictor = policy.coldTimingBytes.map { headBytes >= $0 } == true ? CacheEvictor() : nil
        try held.withUnsafeBufferPointer { qb in
            for gi in 0..<groups {
                let one = UnsafeBufferPointer(rebasing: qb[(gi * group * d)..<((gi + 1) * group * d)])
                let reference = ExactReference(queries: one, keys: keys, values: values, parameters: p)
                for c in candidates.indices {
                    let candidate = candidates[c]
                    func run() throws -> AttentionResult {
                        try candidate.method.attend(one, keys: keys, values: values, codes: codes, parameters: candidate.parameters)
                    }
                    let result = try run()
                    candidates[c].errors.append(candidate.policy == .exact ? 0 : Attention.fidelity(of: result, reference: reference).outputError)
                    if gi < policy.timedGroups {
                        var fastest = Double.infinity
                        for _ in 0..<policy.timingPasses {
                            evictor?.evict()
                            fastest = min(fastest, try microseconds(run, concurrent: concurrentHeads, load: evictor))
                        }
                        candidates[c].micros.append(fastest)
                    }
                }
            }
        }
        let horizon = policy.buildHorizon(keys: upTo)
        let measured = candidates.map { c -> PlanCandidate in
            let micros = median(c.micros)
            var candidate = PlanCandidate(policy: c.policy, setting: c.setting, error: median(c.errors), micros: micros,
                                          buildSeconds: c.buildSeconds, cost: micros + c.buildSeconds * 1e6 / Double(horizon))
            candidate.tailDetail = c.detail
            return candidate
        }
        // The cheapest within the target (exact always is); ties to the earlier (simpler) one.
        var best = 0
        for (i, c) in measured.enumerated() where c.error <= policy.targetError && c.cost < measured[best].cost { best = i }
        let chosen = measured[best], exact = measured[0]
        var reason = chosen.policy == .exact
            ? "no candidate within the target error \(policy.targetError) is cheaper than exact attention (\(String(format: "%.0f", exact.micros)) us per step)"
            : "\(chosen.policy.rawValue)\(chosen.setting.map { " \($0)" } ?? "")\(chosen.tailDetail.map { " detail \(String(format: "%g", $0))" } ?? ""): error \(String(format: "%.4f", chosen.error)) within the target \(policy.targetError), \(String(format: "%.0f", chosen.cost)) us per step against exact's \(String(format: "%.0f", exact.micros)) us (\(String(format: "%.2f", chosen.cost / max(exact.micros, 1e-9)))x)"
        if chosen.buildSeconds > 0 { reason += "; its build (\(String(format: "%.2f", chosen.buildSeconds)) s) spread over \(horizon) steps" }
        if chosen.policy == .retrieval, let raised = policy.raisedK(for: profile) { reason += "; \(raised.reason)" }
        var plan = HeadPlan(policy: chosen.policy, profile: profile, reason: reason,
                            k: chosen.policy == .retrieval ? chosen.setting : nil)
        plan.exactCandidates = chosen.policy == .quantized ? chosen.setting : nil
        plan.tailDetail = chosen.policy == .quantized ? chosen.tailDetail : nil
        plan.candidates = measured
        return (plan, candidates[best].index, candidates[best].calibration)
    }

    /// Microseconds one call of `run` takes, with `load` (when given) streaming memory on
    /// `concurrent - 1` other cores meanwhile: a session's KV heads attend in parallel, one per
    /// core, and contend for memory. Timed alone, a 128K head's quantized step looked 2.2x cheaper
    /// than it ran beside the other head (docs/BENCHMARKS.md, "Helpers woken before the step, planning
    /// beside a load, candidates beside the tail"). Copies of the call itself would not do: they
    /// read the same bytes and share them in the cache.
    static func microseconds(_ run: () throws -> AttentionResult, concurrent: Int, load: CacheEvictor?) throws -> Double {
        guard concurrent > 1, let load else {
            let t0 = monotonicNanos()
            _ = try run()
            return Double(monotonicNanos() - t0) / 1e3
        }
        let streaming = Atomic<Int>(0), finished = Atomic<Bool>(false)
        var micros = 0.0
        var failure: Error?
        SpinJoin.run(tasks: concurrent, threads: concurrent) { i in
            guard i == 0 else {
                streaming.wrappingAdd(1, ordering: .releasing)
                load.stream(lane: i * 64) { finished.load(ordering: .acquiring) }
                return
            }
            // The call starts once the load runs on every other core: a helper that started late
            // (or never: the call then runs alone after 10 ms) would leave it timed alone.
            let deadline = monotonicNanos() + 10_000_000
            while streaming.load(ordering: .acquiring) < concurrent - 1, monotonicNanos() < deadline { kvr_cpu_relax() }
            let t0 = monotonicNanos()
            do { _ = try run() } catch { failure = error }
            micros = Double(monotonicNanos() - t0) / 1e3
            finished.store(true, ordering: .releasing)
        }
        if let failure { throw failure }
        return micros
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
        /// KV heads a decode step attends at once, one per core (a session's heads per layer, up to
        /// its threads and the cores): `auto` times each candidate while the other `concurrentHeads - 1`
        /// cores stream memory, as those heads would (with cold timing only).
        public var concurrentHeads = 1
        public init(attention: AttentionParameters) { self.attention = attention }
    }

    /// What one head runs with after its build, for `method`: its plan (`auto`'s policy, or an
    /// index method's adaptive budget when `setup.policy.budgetMass` > 0) and the index the plan
    /// names, over keys `0..<indexUpTo` (the rest stay in the window), calibrated on the held-out
    /// tail of `queries` (`group` rows per position, or a sample). Nothing when the head has too
    /// few keys for an index. `rowsPerPosition` says how the queries line up with positions when
    /// the caller knows it (a session's recorded decode queries may end before the last key: the
    /// last step's query is stored with the next append); nil tells it from the counts.
    public static func prepareHead(method: AttentionMethod, keys: VectorView, values: VectorView, codes: CodeView?, queries: VectorView?,
                                   group: Int, indexUpTo: Int, setup: Setup, build: IndexBuildParameters,
                                   rowsPerPosition: Int? = nil) throws -> (plan: HeadPlan?, index: (any BuildableIndex)?,
                                                                           calibration: SearchCalibration?) {
        let upTo = min(keys.count, max(0, indexUpTo))
        guard upTo > setup.attention.sinks else { return (nil, nil, nil) }
        let rows = queries?.count ?? 0
        // Rows per position: the group's every query head, or one (summed) query; queries that
        // are not one row set per position (a sample) are measured against every key.
        let perHead: Bool, aligned: Bool
        if let rowsPerPosition, rowsPerPosition == 1 || rowsPerPosition == group, rows % rowsPerPosition == 0,
           rows / rowsPerPosition <= keys.count {
            perHead = group > 1 && rowsPerPosition == group
            aligned = true
        } else {
            perHead = group > 1 && rows == keys.count * group
            aligned = perHead || rows == keys.count
        }
        if method == .auto {
            return try self.plan(keys: keys, values: values, codes: codes, queries: queries, group: perHead ? group : 1,
                                 calibration: setup.calibration, attention: setup.attention, policy: setup.policy, build: build,
                                 alignedToPositions: aligned, indexUpTo: upTo, concurrentHeads: setup.concurrentHeads)
        }
        var plan: HeadPlan? = nil
        if setup.policy.budgetMass > 0 {
            plan = try budget(keys: keys, queries: queries, group: perHead ? group : 1, calibration: setup.calibration,
                              attention: setup.attention, policy: setup.policy, alignedToPositions: aligned)
        }
        guard let kind = method.indexKind else { return (plan, nil, nil) }
        let made = try buildCalibrated(kind, keys: keys, count: upTo, queries: queries, build: build, calibration: setup.calibration)
        return (plan, made.index, made.calibration)
    }
}
