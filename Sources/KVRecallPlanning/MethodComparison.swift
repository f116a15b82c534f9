import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention
/// One attention method's run over a query set: per-group results, latencies and mean fidelity.
/// Shared by `kvrecall attend`, `kvrecall demo` and the REPL's `attend` / `compare`.
public struct MethodRun: Sendable {
    public let method: AttentionMethod
    /// One result per query group.
    public var results: [AttentionResult] = []
    /// Latency of every timed `attend` call, in microseconds.
    public var micros: [Double] = []
    /// Means over the groups of the fidelity metrics and of the keys-scanned fraction.
    public var recall = 0.0, mass = 0.0, error = 0.0, oracleMass = 0.0, oracleError = 0.0, scanned = 0.0
    /// What ran on the head: `method`, or `auto`'s choice; the plan behind it; the calibration and
    /// search parameters the calls used.
    public var effective: AttentionMethod
    public var plan: HeadPlan?
    public var calibration: SearchCalibration?
    public var search = SearchParameters()
    /// Output error of every group, and the oracle's (for medians).
    public var errors: [Double] = []
    public var oracleErrors: [Double] = []

    public init(method: AttentionMethod) {
        self.method = method
        effective = method
    }

    init(prepared: PreparedMethod, parameters: AttentionParameters) {
        self.init(method: prepared.method)
        effective = prepared.effective
        plan = prepared.plan
        calibration = prepared.calibration
        search = prepared.searchParameters(parameters.search)
    }

    public var medianMicros: Double { median(micros) }
}

/// Runs `method` over the query groups in `queries` (`groupSize` rows of the head's dimension
/// each) of head `head` and measures fidelity against exact attention. Each group is attended
/// `repetitions` times (all timed, the first result kept), for a steadier median latency when
/// there are few queries.
public func runMethod(_ method: AttentionMethod, snapshot: StoreSnapshot, head: HeadID, queries: [Float], groupSize: Int,
                      parameters: AttentionParameters, repetitions: Int = 1, cache: PreparedMethodCache? = nil) throws -> MethodRun {
    try runMethods([method], snapshot: snapshot, head: head, queries: queries, groupSize: groupSize,
                   parameters: parameters, repetitions: repetitions, cache: cache)[0].get()
}

/// Runs several methods over the same query groups (`beforeEach`, untimed, before every timed call):
/// each group's exact reference (scores, exact
/// output, top-k, oracle) is computed once and shared by every method's fidelity. A method that
/// cannot be prepared or fails gives its error and the others go on. With a `cache`, methods
/// prepared by an earlier call on the same data are reused.
public func runMethods(_ methods: [AttentionMethod], snapshot: StoreSnapshot, head: HeadID, queries: [Float], groupSize: Int,
                       parameters: AttentionParameters, repetitions: Int = 1,
                       cache: PreparedMethodCache? = nil, beforeEach: (() -> Void)? = nil) throws -> [Result<MethodRun, Error>] {
    let keys = try snapshot.vectors(head, .keys)
    let values = try snapshot.vectors(head, .values)
    let d = keys.dimension
    var outcomes: [Result<MethodRun, Error>] = []
    var prepared: [PreparedAttention?] = []
    for method in methods {
        do {
            let ready = try cache?.prepare(method, snapshot: snapshot, head: head) ?? method.prepare(snapshot: snapshot, head: head)
            prepared.append(ready)
            outcomes.append(.success(MethodRun(prepared: ready.method, parameters: parameters)))
        } catch {
            prepared.append(nil)
            outcomes.append(.failure(error))
        }
    }
    let groups = queries.count / (d * groupSize)
    queries.withUnsafeBufferPointer { qb in
        for gi in 0..<groups {
            let group = UnsafeBufferPointer(rebasing: qb[(gi * groupSize * d)..<((gi + 1) * groupSize * d)])
            var reference: ExactReference?
            for (m, outcome) in outcomes.enumerated() {
                guard case .success(var run) = outcome, let method = prepared[m] else { continue }
                do {
                    var first: AttentionResult?
                    for _ in 0..<max(1, repetitions) {
                        beforeEach?()  // untimed (e.g. evicting the caches, as a decoder's other layers do)
                        let t0 = monotonicNanos()
                        let result = try method.attend(group, parameters: parameters)
                        run.micros.append(Double(monotonicNanos() - t0) / 1e3)
                        if first == nil { first = result }
                    }
                    let result = first!
                    if reference == nil { reference = ExactReference(queries: group, keys: keys, values: values, parameters: parameters) }
                    let f = Attention.fidelity(of: result, reference: reference!)
                    run.recall += f.recall
                    run.mass += f.attentionMass
                    run.error += f.outputError
                    run.errors.append(f.outputError)
                    run.oracleErrors.append(f.oracleError)
                    run.oracleMass += f.oracleMass
                    run.oracleError += f.oracleError
                    run.scanned += result.stats.keysScannedFraction
                    run.results.append(result)
                    outcomes[m] = .success(run)
                } catch {
                    outcomes[m] = .failure(error)
                }
            }
        }
    }
    let n = Double(max(1, groups))
    return outcomes.map { outcome in
        outcome.map { run in
            var run = run
            run.recall /= n; run.mass /= n; run.error /= n; run.oracleMass /= n; run.oracleError /= n; run.scanned /= n
            return run
        }
    }
}

extension AttentionMethod {
    /// The methods usable on a head whose built indexes are `built` (index names), in
    /// `allCases` order: those needing no index, and those whose index exists.
    public static func available(built: Set<String>) -> [AttentionMethod] {
        allCases.filter { $0.requiredRecord.map { built.contains($0) } ?? true }
    }
}
