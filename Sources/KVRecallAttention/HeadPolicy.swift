import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes

/// What a (layer, KV head) needs at decode, chosen from its prefill queries (DuoAttention's
/// streaming and retrieval heads; RetroInfer's estimation zone for diffuse heads).
public enum HeadPolicy: String, Codable, CaseIterable, Sendable {
    /// Sinks and the recent window hold (nearly) all the mass: attend them only, no index.
    case streaming
    /// A few distant keys matter: the retrieval graph finds them.
    case retrieval
    /// Diffuse: the top-k holds too little of the mass; retrieval zone plus estimation zone (IVF).
    case estimation

    /// The attention method that serves this policy.
    public var method: AttentionMethod {
        switch self {
        case .streaming: return .streaming
        case .retrieval: return .retrieval
        case .estimation: return .estimate
        }
    }
}

/// How a head's attention spends its mass, measured on held-out prefill queries with exact
/// attention over each query's causal prefix. Every figure is per query head of the GQA group
/// (mean over the queries), so a group is judged by its neediest head.
public struct HeadProfile: Codable, Equatable, Sendable {
    /// Query rows measured (positions x query heads).
    public var queries: Int
    /// Keys the last measured query saw.
    public var keys: Int
    /// Mean mass on the sinks and the window, per query head.
    public var staticMass: [Double]
    /// Mean mass on the static part plus the exact top-k of the rest (the oracle's), per query head.
    public var oracleMass: [Double]
    /// Mean effective support exp(entropy) in positions, per query head.
    public var effectiveSupport: [Double]
    /// The k, sinks and window the masses were measured with.
    public var k: Int
    public var sinks: Int
    public var window: Int
    /// Median output error over the held-out query groups (every query head, over all keys) of:
    /// sinks+window only; the union of each head's exact top-k (what retrieval approximates);
    /// the estimation zone over an IVF index (measured only for heads that looked diffuse).
    public var streamingError: Double? = nil
    public var retrievalOracleError: Double? = nil
    public var estimationError: Double? = nil
    /// Budgets (positions retrieved per query head) tried, and the mass the neediest query head keeps
    /// with each (static part plus its exact top-b, mean over the queries).
    public var budgets: [Int] = []
    public var budgetMass: [Double] = []
    static let budgets = [100, 200, 400, 800, 1600, 3200]

    /// Mass the neediest query head keeps on the static part / with the oracle's top-k.
    public var worstStaticMass: Double { staticMass.min() ?? 0 }
    public var worstOracleMass: Double { oracleMass.min() ?? 0 }

    /// One line for `build`, `info`, the REPL's `explain` and the session report.
    public var summary: String {
        func list(_ xs: [Double], _ digits: Int = 2) -> String { xs.map { String(format: "%.\(digits)f", $0) }.joined(separator: "/") }
        var text = "mass on sinks+window \(list(staticMass)), with top-\(k) \(list(oracleMass)), effective support \(list(effectiveSupport, 0)) positions (per query head, \(queries) held-out queries)"
        var errors: [String] = []
        if let e = streamingError { errors.append("streaming \(String(format: "%.3f", e))") }
        if let e = retrievalOracleError { errors.append("exact top-k union \(String(format: "%.3f", e))") }
        if let e = estimationError { errors.append("estimation \(String(format: "%.3f", e))") }
        if !errors.isEmpty { text += "; median output error: " + errors.joined(separator: ", ") }
        return text
    }

    /// Measures `queries` (`rows x d`, row-major; row `i` is query head `i % group` of position
    /// `positions[i / group]`), each against keys `0...position` of `keys`, scaled by `scale` and
    /// soft-capped by `softCap` (as `AttentionParameters`).
    public static func measure(keys: VectorView, queries: UnsafeBufferPointer<Float>, group: Int, positions: [Int],
                               k: Int, sinks: Int, window: Int, scale: Float? = nil, softCap: Float? = nil) throws -> HeadProfile {
        let d = keys.dimension
        guard group >= 1, queries.count == positions.count * group * d, !positions.isEmpty else {
            throw IndexError.invalidParameter("profile: \(queries.count / max(1, d)) query rows for \(positions.count) positions of \(group) query heads")
        }
        guard let last = positions.max(), last < keys.count, positions.allSatisfy({ $0 >= 0 }) else {
            throw IndexError.invalidParameter("profile: query positions must lie within the head's \(keys.count) keys")
        }
        let transform = ScoreTransform(scale: scale ?? 1 / Float(d).squareRoot(), softCap: softCap)
        var staticMass = [Double](repeating: 0, count: group)
        var oracleMass = [Double](repeating: 0, count: group)
        var support = [Double](repeating: 0, count: group)
        // Mass with the exact top-b for the budgets b the policy may raise k to.
        let budgets = HeadProfile.budgets.filter { $0 >= k }
        var budgetMass = [[Double]](repeating: [Double](repeating: 0, count: budgets.count), count: group)
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: keys.count + keys.blockSize)
        defer { scores.deallocate() }
        var weights = [Double](repeating: 0, count: keys.count)
        for (p, position) in positions.enumerated() {
            let n = position + 1
            let prefix = keys.limited(to: n)
            for h in 0..<group {
                let query = queries.baseAddress! + (p * group + h) * d
                for b in 0..<prefix.blockCount { prefix.scores(query: query, block: b, into: scores + b * prefix.blockSize) }
                var top = -Float.infinity
                for i in 0..<n {
                    scores[i] = transform(scores[i])
                    top = max(top, scores[i])
                }
                var total = 0.0
                for i in 0..<n {
                    let w = exp(Double(scores[i] - top))
                    weights[i] = w
                    total += w
                }
                var entropy = 0.0, fixed = 0.0
                var rest: [Double] = []
                rest.reserveCapacity(n)
                let windowStart = max(min(sinks, n), n - window)
                for i in 0..<n {
                    let w = weights[i] / total
                    if w > 0 { entropy -= w * log(w) }
                    if i < sinks || i >= windowStart { fixed += w } else { rest.append(w) }
                }
                rest.sort(by: >)
                var prefix = 0.0, taken = 0
                for (b, budget) in budgets.enumerated() {
                    while taken < min(budget, rest.count) { prefix += rest[taken]; taken += 1 }
                    budgetMass[h][b] += min(1, fixed + prefix)
                }
                let kept = rest.prefix(k).reduce(0, +)
                staticMass[h] += fixed
                oracleMass[h] += min(1, fixed + kept)
                support[h] += exp(entropy)
            }
        }
        let count = Double(positions.count)
        var profile = HeadProfile(queries: positions.count * group, keys: last + 1, staticMass: staticMass.map { $0 / count },
                                  oracleMass: oracleMass.map { $0 / count }, effectiveSupport: support.map { $0 / count },
                                  k: k, sinks: sinks, window: window)
        profile.budgets = budgets
        profile.budgetMass = budgets.indices.map { b in (0..<group).map { budgetMass[$0][b] / count }.min() ?? 0 }
        return profile
    }
}

/// The thresholds that turn a profile into a policy.
public struct PolicyParameters: Sendable, Equatable, Codable {
    /// A head whose every query head keeps at least this much mass on sinks and window streams.
    public var streamingMass = 0.95
    /// A head whose neediest query head keeps less than this with the oracle's top-k is diffuse.
    public var diffuseMass = 0.80
    /// A retrieval head's k is raised (to 200, 400, ... positions) until its neediest query head
    /// keeps this much mass with its exact top-k, within `maxBudgetFraction` of the keys.
    public var budgetMass = 0.90
    public var maxBudgetFraction = 0.10
    public init() {}

    public func validate() throws {
        guard streamingMass > 0 && streamingMass <= 1, diffuseMass > 0 && diffuseMass <= 1 else {
            throw IndexError.invalidParameter("policy masses must be in (0, 1] (got streaming \(streamingMass), diffuse \(diffuseMass))")
        }
    }

    /// Streaming when every query head keeps `streamingMass` on sinks+window; estimation when the
    /// head looked diffuse and the estimation zone measured a lower error than the exact top-k
    /// union (retrieval's best case); otherwise retrieval.
    /// The k a retrieval head needs: the smallest budget whose mass reaches `budgetMass` (at most
    /// `maxBudgetFraction` of the keys); nil when the profiled k already does, or nothing fits.
    public func budget(for profile: HeadProfile) -> Int? {
        let cap = max(profile.k, Int(Double(profile.keys) * maxBudgetFraction))
        let fitting = zip(profile.budgets, profile.budgetMass).filter { $0.0 <= cap }
        guard let first = fitting.first, first.1 < budgetMass else { return nil }
        return fitting.first(where: { $0.1 >= budgetMass })?.0 ?? fitting.last?.0
    }

    /// `budget(for:)` with the words that explain it: "k raised to B[ (the most allowed …)]: its
    /// neediest query head keeps M (target T)".
    func raisedK(for profile: HeadProfile) -> (k: Int, reason: String)? {
        guard let b = budget(for: profile) else { return nil }
        let mass = zip(profile.budgets, profile.budgetMass).first { $0.0 == b }?.1 ?? 0
        let capped = mass >= budgetMass ? "" : " (the most allowed: \(Int(maxBudgetFraction * 100))% of the keys)"
        return (b, "k raised to \(b)\(capped): its neediest query head keeps \(String(format: "%.2f", mass)) (target \(budgetMass))")
    }

    public func policy(for profile: HeadProfile) -> HeadPolicy {
        if profile.worstStaticMass >= streamingMass { return .streaming }
        if profile.worstOracleMass < diffuseMass, let estimated = profile.estimationError,
           estimated < (profile.retrievalOracleError ?? .infinity) {
            return .estimation
        }
        return .retrieval
    }
}

/// A head's decision under `auto`: the policy, the profile it came from and the index it reads.
/// Stored per head as the `auto` record (section `plan`, JSON).
public struct HeadPlan: Codable, Equatable, Sendable {
    public var policy: HeadPolicy
    public var profile: HeadProfile?
    /// Why the policy was chosen, in words (thresholds included).
    public var reason: String
    /// Retrieval: positions retrieved per query head when the profiled k leaves too much mass
    /// out (a floor on the caller's k); nil keeps the caller's.
    public var k: Int?

    public init(policy: HeadPolicy, profile: HeadProfile?, reason: String, k: Int? = nil) {
        self.policy = policy
        self.profile = profile
        self.reason = reason
        self.k = k
    }

    /// The plan for `profile` under `parameters`, with its reason.
    public init(profile: HeadProfile, parameters: PolicyParameters) {
        let policy = parameters.policy(for: profile)
        let staticText = String(format: "%.2f", profile.worstStaticMass), oracleText = String(format: "%.2f", profile.worstOracleMass)
        let reason: String
        switch policy {
        case .streaming:
            reason = "every query head keeps >= \(parameters.streamingMass) of its mass on sinks+window (least \(staticText))"
        case .estimation:
            reason = "diffuse: a query head keeps only \(oracleText) of its mass with the exact top-\(profile.k) (< \(parameters.diffuseMass)), and the estimation zone's error \(String(format: "%.3f", profile.estimationError ?? 0)) beats the exact top-k union's \(String(format: "%.3f", profile.retrievalOracleError ?? 0))"
        case .retrieval:
            if profile.worstOracleMass < parameters.diffuseMass, let estimated = profile.estimationError {
                reason = "diffuse (a query head keeps \(oracleText) with the exact top-\(profile.k)), but the exact top-k union's error \(String(format: "%.3f", profile.retrievalOracleError ?? 0)) beats the estimation zone's \(String(format: "%.3f", estimated))"
            } else {
                reason = "sinks+window hold \(staticText) (< \(parameters.streamingMass)); the top-\(profile.k) brings every query head to >= \(oracleText) (>= \(parameters.diffuseMass))"
            }
        }
        let raised = policy == .retrieval ? parameters.raisedK(for: profile) : nil
        self.init(policy: policy, profile: profile, reason: reason + (raised.map { "; " + $0.reason } ?? ""), k: raised?.k)
    }

    /// Without prefill queries there is nothing to profile: retrieval, the method that never drops distant keys.
    public static let unprofiled = HeadPlan(policy: .retrieval, profile: nil,
                                            reason: "no prefill queries to profile: retrieval by default")

    /// The index the plan reads (nil for streaming).
    public var indexKind: IndexKind? { policy.method.indexKind }

    static let recordName = "auto"
    static let section = "plan"

    /// One line: policy, reason, profile.
    public var summary: String {
        "\(policy.rawValue): \(reason)" + (profile.map { "; \($0.summary)" } ?? "")
    }
}

extension HeadPlan {
    /// Stores the plan as head `id`'s `auto` record.
    public func save(in store: KVStore, head id: HeadID) throws {
        try store.saveIndex(id, name: Self.recordName, sections: [Self.section: Array(try JSONEncoder().encode(self))])
    }

    /// The stored plan of head `id`, or nil when `build --index auto` never ran for it.
    public static func load(snapshot: StoreSnapshot, head id: HeadID) throws -> HeadPlan? {
        guard let sections = try snapshot.index(id, name: recordName) else { return nil }
        guard let bytes = sections[section] else { throw IndexError.corrupt("the auto record of head \(id) lacks its plan; rebuild it with `kvrecall build --index auto`") }
        do {
            return try JSONDecoder().decode(HeadPlan.self, from: Data(bytes.array))
        } catch {
            throw IndexError.corrupt("the auto plan of head \(id) is unreadable (\(error)); rebuild it with `kvrecall build --index auto`")
        }
    }
}

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
    /// looks diffuse: an IVF index is built to measure it and returned for reuse), and the policy.
    /// `.unprofiled` without enough queries.
    public static func plan(keys: VectorView, values: VectorView, queries: VectorView?, group: Int,
                            calibration: CalibrationParameters, attention: AttentionParameters, policy: PolicyParameters,
                            build: IndexBuildParameters, alignedToPositions: Bool = true) throws -> (plan: HeadPlan, ivf: IVFIndex?) {
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
            let built = try IndexCatalog.make(.ivf, dimension: d, count: keys.count, parameters: build) as! IVFIndex
            try built.train(keys: keys, range: 0..<keys.count, queries: nil)
            try built.add(keys: keys, range: 0..<keys.count, progress: nil)
            estimate = try PreparedMethod(.estimate, index: built, keys: keys, values: values)
            ivf = built
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
            index = try IndexCatalog.make(kind, dimension: keys.dimension, count: count, parameters: build)
            let training = kind == .retrieval && heldOut > 0 ? queries?.limited(to: rows - heldOut) : queries
            try index.train(keys: indexed, range: 0..<count, queries: training)
            try index.add(keys: indexed, range: 0..<count, progress: progress)
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
}
