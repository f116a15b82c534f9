import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// The search knob an index kind exposes for the recall/cost trade-off.
public enum SearchKnob: String, Codable, Sendable {
    /// HNSW and the retrieval graph: beam width.
    case ef
    /// IVF: lists probed.
    case nprobe
    /// Centroid tree: clusters kept per level.
    case beam
    /// LSH: tables a key must collide in (fewer finds more: its ladder descends).
    case minCollisions = "min-collisions"

    /// The knob of `kind` (its descriptor's), or nil for kinds calibration leaves alone (LSH, landmark, flat, hip).
    public init?(kind: IndexKind) {
        guard let knob = kind.descriptor?.knob else { return nil }
        self = knob
    }

    /// `parameters` with this knob set to `value`.
    public func applied(_ value: Int, to parameters: SearchParameters) -> SearchParameters {
        var p = parameters
        switch self {
        case .ef: p.graph.ef = value
        case .nprobe: p.ivf.nprobe = value
        case .beam: p.tree.beam = value
        case .minCollisions: p.lsh.minCollisions = value
        }
        return p
    }

    /// Whether the caller set this knob explicitly in `parameters` (explicit values win over a calibration).
    public func isSet(in parameters: SearchParameters) -> Bool {
        switch self {
        case .ef: return parameters.graph.efSetting != nil
        case .nprobe: return parameters.ivf.nprobeSetting != nil
        case .beam: return parameters.tree.beamSetting != nil
        case .minCollisions: return parameters.lsh.minCollisionsSetting != nil
        }
    }
}

/// A search knob chosen at build time on held-out prefill queries: the smallest value whose
/// recall@k against exact search reaches the target. Stored with the index (its `calibration`
/// section) and used whenever the caller leaves that knob unset.
public struct SearchCalibration: Codable, Equatable, Sendable {
    public var knob: SearchKnob
    public var value: Int
    /// Recall@k the target asked for, and what `value` measured on the held-out queries.
    public var targetRecall: Double
    public var recall: Double
    /// Standard error of `recall` (per-query recalls over the held-out queries); nil in calibrations
    /// stored before it was kept.
    public var standardError: Double?
    /// Mean fraction of the indexed keys scored per held-out query at `value`.
    public var keysScanned: Double
    public var k: Int
    /// Held-out queries measured (never used to train the index).
    public var queries: Int
    /// False when even the widest value tried (the ladder's last) stays below the target (`value` is
    /// then that value). The index then cannot find this head's keys: attention selects by an
    /// exact scan instead (`PreparedMethod`), unless the caller set the knob.
    public var reached: Bool

    /// One line for `build`, `info` and the REPL.
    public var summary: String {
        let recallText = String(format: "%.3f", recall) + (standardError.map { String(format: " ± %.3f", $0) } ?? "")
        let scanned = String(format: "%.1f%%", keysScanned * 100)
        let verdict = reached ? "target \(targetRecall)" : "below target \(targetRecall) at the widest \(knob.rawValue) tried: selects by an exact scan"
        return "\(knob.rawValue) \(value): recall@\(k) \(recallText), \(scanned) of keys scanned on \(queries) held-out queries (\(verdict))"
    }

    /// Fills the knob into `parameters` unless the caller set it.
    public func resolve(_ parameters: SearchParameters) -> SearchParameters {
        knob.isSet(in: parameters) ? parameters : knob.applied(value, to: parameters)
    }
}

/// How a build holds out and measures calibration queries.
public struct CalibrationParameters: Sendable, Equatable {
    /// Recall@k the chosen knob must reach on the held-out queries.
    public var targetRecall = 0.95
    /// Standard errors of the held-out mean recall kept above the target (`recall - confidence x
    /// standardError >= targetRecall`). The held-out sample is small (128 queries: ±0.003 on the
    /// synthetic heads) and a knob whose sample mean just reaches the target misses it on other
    /// queries half the time; 3 keeps a sample of 200 other queries (±0.0025) above the target
    /// about 99 times in 100. When no value reaches that, the mean alone decides. 0: the mean alone.
    public var confidence = 3.0
    /// k of the recall measured.
    public var k = 100
    /// Most prefill queries held out (the last ones: closest to decode).
    public var heldOutQueries = 128
    /// Threads of the exact top-k and the searches measured (a session's background refresh: 1).
    public var threads = 2
    /// Fewer queries than this in the head: no calibration (the defaults apply).
    public static let minimumQueries = 16
    public init() {}

    public func validate() throws {
        guard targetRecall > 0 && targetRecall <= 1 else {
            throw IndexError.invalidParameter("target recall must be in (0, 1] (got \(targetRecall))")
        }
        guard k >= 1 else { throw IndexError.invalidParameter("calibration k must be at least 1 (got \(k))") }
        guard confidence >= 0 && confidence.isFinite else {
            throw IndexError.invalidParameter("calibration confidence must be a non-negative number (got \(confidence))")
        }
        guard heldOutQueries >= Self.minimumQueries else {
            throw IndexError.invalidParameter("held-out queries must be at least \(Self.minimumQueries) (got \(heldOutQueries))")
        }
    }

    /// Rows of a head's `queryCount` prefill queries held out: at most a quarter of them, so the
    /// retrieval graph still trains on most; 0 when there are too few to measure anything.
    public func heldOut(of queryCount: Int) -> Int {
        let rows = min(heldOutQueries, queryCount / 4)
        return rows >= Self.minimumQueries ? rows : 0
    }
}

public enum Calibrator {
    /// The first value of the index's ladder (ascending recall) whose mean recall@k on `queries` (`m x d`, row-major;
    /// never seen by the index's training) stays at least `confidence` standard errors above the
    /// target (else the smallest whose mean reaches it), found by bisection over a ladder (recall
    /// grows with each knob). Exact top-k comes from a flat scan of the indexed keys.
    /// Nil for kinds without a knob, or when there are no queries.
    public static func calibrate(_ index: any VectorIndex, keys: VectorView, queries: UnsafeBufferPointer<Float>,
                                 parameters: CalibrationParameters, base: SearchParameters = SearchParameters()) throws -> SearchCalibration? {
        try parameters.validate()
        guard let knob = SearchKnob(kind: index.kind), index.count > 0 else { return nil }
        let d = keys.dimension
        let m = queries.count / d
        guard m > 0 else { return nil }
        let indexed = keys.limited(to: index.count)
        let k = min(parameters.k, index.count)
        var p = base
        p.threads = max(1, parameters.threads)
        let truth = try FlatIndex(keys: indexed).search(queries, k: k, parameters: p, keys: indexed)
        let exact = (0..<m).map { Set(truth.hits($0).map(\.id)) }

        typealias Measured = (recall: Double, standardError: Double, scanned: Double)
        func measure(_ value: Int) throws -> Measured {
            let found = try index.search(queries, k: k, parameters: knob.applied(value, to: p), keys: indexed)
            var hit = 0, squares = 0.0
            for q in 0..<m {
                let h = found.hits(q).reduce(0) { $0 + (exact[q].contains($1.id) ? 1 : 0) }
                hit += h
                squares += Double(h * h) / Double(k * k)
            }
            let mean = Double(hit) / Double(m * k)
            let variance = m > 1 ? max(0, squares / Double(m) - mean * mean) * Double(m) / Double(m - 1) : 0
            return (mean, (variance / Double(m)).squareRoot(), found.stats.keysScannedFraction)
        }

        let values = index.kind.descriptor?.ladder(index, k) ?? []
        guard !values.isEmpty else { return nil }
        var measured: [Int: Measured] = [:]
        func at(_ i: Int) throws -> Measured {
            if let known = measured[i] { return known }
            let result = try measure(values[i])
            measured[i] = result
            return result
        }
        func result(_ i: Int, reached: Bool) throws -> SearchCalibration {
            let r = try at(i)
            return SearchCalibration(knob: knob, value: values[i], targetRecall: parameters.targetRecall, recall: r.recall,
                                     standardError: r.standardError, keysScanned: r.scanned, k: k, queries: m, reached: reached)
        }
        let confident = { (r: Measured) in r.recall - parameters.confidence * r.standardError >= parameters.targetRecall }
        let reaches = { (r: Measured) in r.recall >= parameters.targetRecall }
        let hi = values.count - 1
        let top = try at(hi)
        guard reaches(top) else { return try result(hi, reached: false) }
        // Smallest index passing the test (the largest passes it).
        let test = confident(top) ? confident : reaches
        var lo = 0, upper = hi
        while lo < upper {
            let mid = (lo + upper) / 2
            if test(try at(mid)) { upper = mid } else { lo = mid + 1 }
        }
        return try result(lo, reached: true)
    }
}
