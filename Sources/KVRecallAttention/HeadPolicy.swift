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
    /// Nothing cheaper meets the error target (a short context, or a head no method serves well).
    case exact
    /// A scan of the head's key codes, the best candidates exact, the rest through their codes.
    case quantized

    /// The attention method that serves this policy.
    public var method: AttentionMethod {
        switch self {
        case .streaming: return .streaming
        case .retrieval: return .retrieval
        case .estimation: return .estimate
        case .exact: return .exact
        case .quantized: return .quantized
        }
    }

    /// The policy that runs `method` (nil for methods `auto` does not choose).
    public init?(method: AttentionMethod) {
        guard let policy = HeadPolicy.allCases.first(where: { $0.method == method }) else { return nil }
        self = policy
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
    /// The median output error (on held-out prefill queries, against exact attention) a candidate
    /// must stay within; the cheapest candidate that does is chosen (exact always does).
    public var targetError = 0.02
    /// Decode steps an index build is paid back over: its build time / horizon counts against its
    /// time per step (an index does not pay on a short generation). See `buildHorizon(keys:)`.
    public var decodeHorizon = 4096
    /// The fraction of its keys a head grows by before it is planned and built again (a session's
    /// refresh fraction); nil when it never is. A plan then serves that many decode steps, so a
    /// build is charged over the longer of `decodeHorizon` and that lifetime: a model of what an
    /// index costs per step of its life. (The planner builds an index candidate to time it, at
    /// every re-plan, so the build itself is paid whichever candidate wins.)
    public var replanFraction: Double? = nil
    /// The largest `replanFraction` taken (a head's keys times it stays an integer).
    public static let maximumReplanFraction = 1e6
    /// Fewest keys a head grows by before it is planned again (a session's refresh minimum).
    public var replanMinimumKeys = 256
    /// Exact candidates per query head the quantized method is tried with, ascending, each with
    /// every tail detail of `quantizedDetails` (cheaper tails for heads whose error allows them).
    public var quantizedCandidates = [64, 128, 256, 512]
    public var quantizedDetails: [Float] = [0.5, 2]
    /// Fewest keys an index is built for to be tried at all (below, a scan is as cheap).
    public var minimumIndexedKeys = 8192
    /// Held-out query groups the candidates are timed on (best of `timingPasses` each).
    public var timedGroups = 16
    public var timingPasses = 3
    /// A head whose keys and values take at least this many bytes is timed with cold caches (each
    /// pass after an eviction, as a decode step meets it after the model's other layers): timed
    /// warm, a method whose bytes fit in the cache (the quantized tier's codes of a 128K head) looks
    /// several times cheaper than in a decoder. nil: always warm.
    public var coldTimingBytes: Int? = 4 << 20
    public init() {}

    public func validate() throws {
        guard streamingMass > 0 && streamingMass <= 1, diffuseMass > 0 && diffuseMass <= 1 else {
            throw IndexError.invalidParameter("policy masses must be in (0, 1] (got streaming \(streamingMass), diffuse \(diffuseMass))")
        }
        guard targetError > 0 && targetError.isFinite else {
            throw IndexError.invalidParameter("the target error must be positive (got \(targetError))")
        }
        guard decodeHorizon >= 1, timedGroups >= 1, timingPasses >= 1, quantizedCandidates.allSatisfy({ $0 >= 1 }) else {
            throw IndexError.invalidParameter("decode horizon, timed groups, timing passes and quantized candidates must be positive")
        }
        if let replanFraction, !(replanFraction > 0 && replanFraction <= Self.maximumReplanFraction) {
            throw IndexError.invalidParameter("the re-plan fraction must be positive, at most \(Self.maximumReplanFraction), or nil (got \(replanFraction))")
        }
    }

    /// The decode steps a build on `keys` keys is spread over: `decodeHorizon`, or the plan's
    /// lifetime under `replanFraction` when that is longer (a 128K head re-planned at +50% serves
    /// 65536 steps).
    public func buildHorizon(keys: Int) -> Int {
        guard let replanFraction else { return decodeHorizon }
        return max(decodeHorizon, replanMinimumKeys, Int(min(Double(Int32.max), (Double(keys) * replanFraction).rounded(.up))))
    }

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
    package func raisedK(for profile: HeadProfile) -> (k: Int, reason: String)? {
        guard let b = budget(for: profile) else { return nil }
        let mass = zip(profile.budgets, profile.budgetMass).first { $0.0 == b }?.1 ?? 0
        let capped = mass >= budgetMass ? "" : " (the most allowed: \(Int(maxBudgetFraction * 100))% of the keys)"
        return (b, "k raised to \(b)\(capped): its neediest query head keeps \(String(format: "%.2f", mass)) (target \(budgetMass))")
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
    /// Quantized: exact candidates per query head, and the tail's detail (`QuantizedParameters`).
    public var exactCandidates: Int? = nil
    public var tailDetail: Float? = nil
    /// Every candidate measured at the build (error and time on held-out queries), the chosen one
    /// among them; empty for plans made before `auto` measured costs.
    public var candidates: [PlanCandidate] = []

    public init(policy: HeadPolicy, profile: HeadProfile?, reason: String, k: Int? = nil) {
        self.policy = policy
        self.profile = profile
        self.reason = reason
        self.k = k
    }

    private enum CodingKeys: String, CodingKey { case policy, profile, reason, k, exactCandidates, tailDetail, candidates }

    /// Plans stored before the cost-aware planner lack candidates; they decode with none.
    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        policy = try c.decode(HeadPolicy.self, forKey: .policy)
        profile = try c.decodeIfPresent(HeadProfile.self, forKey: .profile)
        reason = try c.decode(String.self, forKey: .reason)
        k = try c.decodeIfPresent(Int.self, forKey: .k)
        exactCandidates = try c.decodeIfPresent(Int.self, forKey: .exactCandidates)
        tailDetail = try c.decodeIfPresent(Float.self, forKey: .tailDetail)
        candidates = try c.decodeIfPresent([PlanCandidate].self, forKey: .candidates) ?? []
    }

    /// The index the plan reads (nil for streaming).
    public var indexKind: IndexKind? { policy.method.indexKind }

    /// One line: policy, reason, profile.
    public var summary: String {
        "\(policy.rawValue): \(reason)" + (profile.map { "; \($0.summary)" } ?? "")
    }

    /// The measured candidates, one line each ("quantized 256: error 0.004, 410 us per step").
    public var candidateLines: [String] {
        candidates.map { c in c.summary + (isChosen(c) ? "  <- chosen" : "") }
    }

    /// The measured candidate this plan runs (nil for a plan taken without measuring).
    public var chosenCandidate: PlanCandidate? { candidates.first(where: isChosen) }

    /// Whether `c` is the plan's policy at the plan's setting (and, quantized, its tail detail).
    func isChosen(_ c: PlanCandidate) -> Bool {
        c.policy == policy && c.setting == (policy == .quantized ? exactCandidates : k)
            && (policy != .quantized || c.tailDetail == tailDetail)
    }
}

/// One candidate `auto` measured for a head at its build: median output error and time per decode
/// step on held-out prefill queries, and the build it needs.
public struct PlanCandidate: Codable, Equatable, Sendable {
    public var policy: HeadPolicy
    /// Exact candidates (quantized) or k (retrieval); nil for the others.
    public var setting: Int?
    /// Quantized: the tail's detail.
    public var tailDetail: Float? = nil
    public var error: Double
    /// Median time per step (one query group), microseconds.
    public var micros: Double
    /// Seconds its index took to build (0 without one).
    public var buildSeconds: Double
    /// What the choice compares: time per step plus the build spread over the horizon
    /// (`PolicyParameters.buildHorizon(keys:)`).
    public var cost: Double

    public init(policy: HeadPolicy, setting: Int?, error: Double, micros: Double, buildSeconds: Double, cost: Double) {
        self.policy = policy
        self.setting = setting
        self.error = error
        self.micros = micros
        self.buildSeconds = buildSeconds
        self.cost = cost
    }

    public var summary: String {
        let name = policy.rawValue + (setting.map { " \($0)" } ?? "") + (tailDetail.map { " detail \(String(format: "%g", $0))" } ?? "")
        var text = "\(name): error \(String(format: "%.4f", error)), \(String(format: "%.0f", micros)) us per step"
        if buildSeconds > 0 { text += ", built in \(String(format: "%.2f", buildSeconds)) s (cost \(String(format: "%.0f", cost)) us)" }
        return text
    }
}
