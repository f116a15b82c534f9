import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallSupport
@testable import KVRecallKernels
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallSession
@testable import KVRecallPlanning
import KVRecallTestSupport
@testable import KVRecallInterface

/// `auto`: per-head profiles and policies, and search knobs calibrated at build.
@Suite struct AutoPolicyTests {
    /// The MiniLM sample (real keys, values and prefill queries of one BERT head) in a store.
    /// A session (made by `configuration` for the head dimension) over the MiniLM sample as one
    /// head, its prefill queries appended and its indexes built.
    static func builtMiniLMSession(_ configuration: (Int) -> SessionConfiguration) throws -> KVSession {
        let data = repositoryDataDirectory() + "/minilm"
        let keys = try NPY.read(path: data + "/keys.npy"), values = try NPY.read(path: data + "/values.npy")
        let prefill = try NPY.read(path: data + "/prefill_queries.npy")
        let d = keys.shape[1], n = keys.shape[0]
        let session = try KVSession(configuration: configuration(d), directory: nil)
        do {
            try keys.floats().withUnsafeBufferPointer { k in
                try values.floats().withUnsafeBufferPointer { v in try session.append(layer: 0, keys: k, values: v) }
            }
            let rows = Array(prefill.floats().prefix(min(prefill.shape[0], n) * d))
            try rows.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: 0, queries: $0) }
            try session.buildIndexes()
        } catch {
            session.close()
            throw error
        }
        return session
    }

    static func minilmStore(_ dir: TemporaryDirectory) throws -> KVStore {
        let data = repositoryDataDirectory() + "/minilm"
        let store = try KVStore(path: dir.path, create: true)
        try store.ingest(keys: try NPY.read(path: data + "/keys.npy"), values: try NPY.read(path: data + "/values.npy"),
                         queries: try NPY.read(path: data + "/prefill_queries.npy"), first: HeadID(), dtype: .f32)
        return store
    }

    @Test func calibrationReachesTheTargetOnHeldOutQueriesAndExplicitKnobsWin() throws {
        let dir = TemporaryDirectory("kvrecall-calibration")
        let store = try Self.minilmStore(dir)
        defer { store.close() }
        var calibration = CalibrationParameters()
        calibration.targetRecall = 0.9
        calibration.k = 50
        let (index, found) = try store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            return try HeadPlanner.buildCalibrated(.hnsw, keys: keys, count: keys.count, queries: try s.vectors(HeadID(), .queries),
                                                   build: IndexBuildParameters(), calibration: calibration)
        }
        let c = try #require(found)
        #expect(c.knob == .ef && c.reached && c.recall >= 0.9 && c.queries == 128 && c.k == 50)
        // Chosen with its margin: at least two standard errors above the target (else by the mean alone).
        let se = try #require(c.standardError)
        #expect(se > 0 && se < 0.05)
        // The knob below the chosen one misses the target by the same test (bisection found the smallest).
        let ladder = index.kind.descriptor!.ladder(index, 50)
        let position = try #require(ladder.firstIndex(of: c.value))
        let data = repositoryDataDirectory() + "/minilm"
        let queries = try NPY.read(path: data + "/prefill_queries.npy").floats()
        let held = Array(queries.suffix(128 * 32))
        if position > 0 {
            let lower = try store.read { s in
                try held.withUnsafeBufferPointer { q -> Double in
                    var p = CalibrationParameters(); p.k = 50; p.targetRecall = 1
                    var base = SearchParameters(); base.graph.ef = ladder[position - 1]
                    let keys = try s.vectors(HeadID(), .keys)
                    let truth = try FlatIndex(keys: keys).search(q, k: 50, parameters: base, keys: keys)
                    let found = try index.search(q, k: 50, parameters: base, keys: keys)
                    let recalls = (0..<128).map { r in
                        Double(Set(found.hits(r).map(\.id)).intersection(truth.hits(r).map(\.id)).count) / 50
                    }
                    let mean = recalls.reduce(0, +) / 128
                    let variance = recalls.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / 127
                    let bound = mean - CalibrationParameters().confidence * (variance / 128).squareRoot()
                    return c.recall - CalibrationParameters().confidence * se >= 0.9 ? bound : mean
                }
            }
            #expect(lower < 0.9, "ef \(ladder[position - 1]) already reaches \(lower)")
        }
        // Unset knobs take the calibration, set ones stay.
        #expect(c.resolve(SearchParameters()).graph.ef == c.value)
        var explicit = SearchParameters()
        explicit.graph.ef = 17
        #expect(c.resolve(explicit).graph.ef == 17)
        // Stored with the index and read back.
        try IndexCatalog.save(index, in: store, head: HeadID(), calibration: c)
        let loaded = try store.read { s in try IndexCatalog.loadCalibrated(.hnsw, snapshot: s, head: HeadID()) }
        #expect(loaded.calibration == c)
    }

    @Test func aHeadLookingOnlyAtItsSinksStreams() throws {
        // Keys random; every query is a large multiple of key 0, so the first position takes the mass.
        var rng = SeededRandom(seed: 5)
        let n = 600, d = 16, g = 2
        let keys = rng.gaussianMatrix(rows: n, dim: d), values = rng.gaussianMatrix(rows: n, dim: d)
        var queries: [Float] = []
        for _ in 0..<(n * g) { queries += keys[0..<d].map { $0 * 24 } }
        let dir = TemporaryDirectory("kvrecall-streaming")
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.ingest(keys: Tensor(name: "k", shape: [n, d], dtype: .f32, floats: keys),
                         values: Tensor(name: "v", shape: [n, d], dtype: .f32, floats: values),
                         queries: Tensor(name: "q", shape: [n * g, d], dtype: .f32, floats: queries), first: HeadID(), dtype: .f32)
        let planned = try store.read { s in
            try HeadPlanner.plan(keys: try s.vectors(HeadID(), .keys), values: try s.vectors(HeadID(), .values),
                                 queries: try s.vectors(HeadID(), .queries), group: g, calibration: CalibrationParameters(),
                                 attention: AttentionParameters(), policy: PolicyParameters(), build: IndexBuildParameters())
        }
        #expect(planned.plan.policy == .streaming, "\(planned.plan.summary)")
        #expect(planned.plan.profile?.staticMass.count == g && planned.plan.indexKind == nil && planned.index == nil)
        // Random queries on the same keys are not streaming.
        let random = rng.gaussianMatrix(rows: n * g, dim: d)
        let profile = try store.read { s in
            try random.withUnsafeBufferPointer { q in
                try HeadProfile.measure(keys: try s.vectors(HeadID(), .keys), queries: UnsafeBufferPointer(rebasing: q[(q.count - 64 * g * d)...]),
                                        group: g, positions: Array((n - 64)..<n), k: 100, sinks: 4, window: 64)
            }
        }
        #expect(profile.worstStaticMass < PolicyParameters().streamingMass, "\(profile.summary)")
    }

    /// The session's target error reaches the planner: a target nothing but exact attention meets
    /// plans exact; a generous one takes the cheapest candidate. Stored, and defaulted for
    /// sessions saved before the knob.
    @Test func theSessionsTargetErrorDecidesThePlan() throws {
        func plan(targetError: Double) throws -> HeadPlan {
            let session = try Self.builtMiniLMSession { d in
                SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: d, dtype: .f32,
                                     method: .auto, targetError: targetError)
            }
            defer { session.close() }
            return try #require(try session.plan(layer: 0, head: 0))
        }
        let strict = try plan(targetError: 1e-9)
        #expect(strict.policy == .exact, "\(strict.candidateLines)")
        #expect(strict.reason.contains("1e-09"), "\(strict.reason)")
        let generous = try plan(targetError: 10)
        let cheapest = try #require(generous.candidates.min { $0.cost < $1.cost })
        #expect(generous.policy == cheapest.policy && generous.policy != .exact, "\(generous.candidateLines)")

        var configuration = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: 8, method: .auto, targetError: 0.05)
        #expect(try JSONDecoder().decode(SessionConfiguration.self, from: JSONEncoder().encode(configuration)) == configuration)
        var object = try #require(try JSONSerialization.jsonObject(with: JSONEncoder().encode(configuration)) as? [String: Any])
        object["targetError"] = nil
        let old = try JSONDecoder().decode(SessionConfiguration.self, from: JSONSerialization.data(withJSONObject: object))
        #expect(old.targetError == PolicyParameters().targetError)
        for bad in [0, -0.1, .infinity, .nan] {
            configuration.targetError = bad
            #expect(throws: SessionError.self) { try configuration.validate() }
        }
    }

    /// An index candidate's build counts against it spread over the decode horizon, or over the
    /// plan's lifetime when the head is planned again as it grows (a session's refresh) and that
    /// is longer: at +50% a 128K head's plan serves 65536 steps.
    @Test func aBuildIsSpreadOverThePlansLifetime() throws {
        var policy = PolicyParameters()
        #expect(policy.buildHorizon(keys: 131072) == policy.decodeHorizon)
        policy.replanFraction = 0.5
        #expect(policy.buildHorizon(keys: 131072) == 65536)
        #expect(policy.buildHorizon(keys: 2000) == policy.decodeHorizon, "a short context keeps the decode horizon")
        policy.decodeHorizon = 1
        #expect(policy.buildHorizon(keys: 100) == policy.replanMinimumKeys)
        for bad in [0, -1, .infinity, .nan] {
            policy.replanFraction = bad
            #expect(throws: IndexError.self) { try policy.validate() }
        }

        let dir = TemporaryDirectory("kvrecall-build-horizon")
        let store = try Self.minilmStore(dir)
        defer { store.close() }
        func retrieval(replan: Double?) throws -> PlanCandidate {
            var policy = PolicyParameters()
            policy.minimumIndexedKeys = 0  // the 4096-key sample tries the graph
            policy.budgetMass = 0  // at k 100 (a raised k would select by a scan, and not be built)
            policy.timedGroups = 2
            policy.replanFraction = replan
            let plan = try store.read { s in
                try HeadPlanner.plan(keys: try s.vectors(HeadID(), .keys), values: try s.vectors(HeadID(), .values),
                                     queries: try s.vectors(HeadID(), .queries), group: 1, calibration: CalibrationParameters(),
                                     attention: AttentionParameters(), policy: policy, build: IndexBuildParameters()).plan
            }
            return try #require(plan.candidates.first { $0.policy == .retrieval }, "\(plan.candidateLines)")
        }
        for (replan, horizon) in [(nil, 4096.0), (8.0, 8.0 * 4096)] as [(Double?, Double)] {
            let c = try retrieval(replan: replan)
            #expect(c.buildSeconds > 0)
            #expect(abs(c.cost - (c.micros + c.buildSeconds * 1e6 / horizon)) <= 1e-6 * c.cost, "\(c.summary)")
        }
    }

    /// A session charges an index candidate's build over its plan's lifetime: refresh fraction x
    /// the keys planned over, when longer than the decode horizon.
    @Test func aSessionSpreadsABuildOverItsRefreshInterval() throws {
        let session = try Self.builtMiniLMSession { d in
            SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: d, dtype: .f32,
                                 method: .auto, refreshFraction: 4)
        }
        defer { session.close() }
        let plan = try #require(try session.plan(layer: 0, head: 0))
        // The diffuse MiniLM head tries the estimation zone over an IVF index it builds.
        let built = try #require(plan.candidates.first { $0.buildSeconds > 0 }, "\(plan.candidateLines)")
        let plannedOver = try #require(try session.refreshStatus(layer: 0, head: 0)).plannedOver
        let horizon = Double(plannedOver * 4)
        #expect(horizon > Double(PolicyParameters().decodeHorizon))
        #expect(abs(built.cost - (built.micros + built.buildSeconds * 1e6 / horizon)) <= 1e-6 * built.cost, "\(built.summary)")
    }

    @Test func sessionAutoPlansEveryHeadReportsItAndResumesIt() throws {
        let data = repositoryDataDirectory() + "/minilm"
        let keys = try NPY.read(path: data + "/keys.npy"), values = try NPY.read(path: data + "/values.npy")
        let prefill = try NPY.read(path: data + "/prefill_queries.npy")
        let d = keys.shape[1], n = keys.shape[0]
        let dir = TemporaryDirectory("kvrecall-session-auto")
        var configuration = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: d, dtype: .f32,
                                                 method: .auto)
        configuration.upkeepBatch = 8
        let queries = Array(try NPY.read(path: data + "/queries.npy").floats().prefix(8 * d))
        var before: [[Float]] = []
        var policy = HeadPolicy.exact
        do {
            let session = try KVSession(configuration: configuration, directory: dir.path)
            try keys.floats().withUnsafeBufferPointer { k in
                try values.floats().withUnsafeBufferPointer { v in try session.append(layer: 0, keys: k, values: v) }
            }
            // Prefill queries of every position are what a decoder hands over.
            let rows = Array(prefill.floats().prefix(min(prefill.shape[0], n) * d))
            try rows.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: 0, queries: $0) }
            try session.buildIndexes()
            let plan = try #require(try session.plan(layer: 0, head: 0))
            // The plan measured exact among its candidates and chose one within the target, no slower.
            let exact = try #require(plan.candidates.first { $0.policy == .exact })
            let chosen = try #require(plan.chosenCandidate)
            #expect(chosen.error <= PolicyParameters().targetError && chosen.cost <= exact.cost, "\(plan.candidateLines)")
            #expect(plan.candidates.contains { $0.policy == .quantized }, "a session with auto keeps codes")
            #expect(session.report().count == 1 && session.report()[0].contains(plan.policy.rawValue))
            #expect(session.report()[0].contains("candidates: exact: error 0.0000"), "report() lists the candidates: \(session.report())")
            policy = plan.policy
            // Its output is what the attention layer gives for the plan's method over the same index.
            for q in 0..<8 {
                let one = Array(queries[(q * d)..<((q + 1) * d)])
                let out = try one.withUnsafeBufferPointer { try session.attend(layer: 0, queries: $0) }
                let detailed = try one.withUnsafeBufferPointer { try session.attendDetailed(layer: 0, head: 0, queries: $0) }
                #expect(out == detailed.heads[0].output)
                before.append(out)
            }
            try session.checkpoint()
            session.close()
        }
        let resumed = try KVSession(resuming: dir.path)
        defer { resumed.close() }
        #expect(try resumed.plan(layer: 0, head: 0)?.policy == policy)
        for q in 0..<8 {
            let one = Array(queries[(q * d)..<((q + 1) * d)])
            #expect(try one.withUnsafeBufferPointer { try resumed.attend(layer: 0, queries: $0) } == before[q])
        }
    }

    @Test func cliBuildsAutoShowsThePlanAndAttendsWithIt() throws {
        let data = repositoryDataDirectory() + "/minilm"
        let dir = TemporaryDirectory("kvrecall-cli-auto")
        let store = dir.path + "/s"
        #expect(try runCLI(["ingest", "--store", store, "--keys", "\(data)/keys.npy", "--values", "\(data)/values.npy",
                            "--queries", "\(data)/prefill_queries.npy", "--dtype", "f32"]).status == 0)
        let build = try runCLI(["build", "--store", store, "--index", "auto", "--quiet"])
        #expect(build.status == 0, "\(build.stderr)")
        #expect(build.stdout.contains("auto chose ") && build.stdout.contains("candidate exact: error 0.0000"), "\(build.stdout)")
        #expect(build.stdout.contains("candidate quantized 64"), "a build of auto gives the head its codes first: \(build.stdout)")
        let chosen = try #require(build.stdout.split(separator: "\n").first { $0.contains("auto chose ") }?
            .split(separator: " ").dropFirst(4).first.map { String($0.dropLast()) })
        let info = try runCLI(["info", "--store", store])
        #expect(info.stdout.contains("0/0/0 auto: \(chosen)"), "\(info.stdout)")
        #expect(info.stdout.contains("  candidate exact: error 0.0000"), "info lists every measured candidate: \(info.stdout)")
        let json = try runCLI(["info", "--store", store, "--json"])
        #expect(json.stdout.contains("\"micros_per_step\""), "\(json.stdout)")
        let attend = try runCLI(["attend", "--store", store, "--queries", "\(data)/queries.npy", "--limit", "8", "--method", "auto"])
        #expect(attend.status == 0, "\(attend.stderr)")
        #expect(attend.stdout.contains("auto: \(HeadPolicy(rawValue: chosen)?.method.rawValue ?? chosen) ("), "\(attend.stdout)")
        // Prefill queries that are not whole groups, and bad values, get errors that say so.
        let groups = try runCLI(["build", "--store", store, "--index", "auto", "--group", "3", "--quiet"])
        #expect(groups.status != 0 && groups.stderr.contains("not whole groups of 3 query heads"), "\(groups.stderr)")
        #expect(try runCLI(["build", "--store", store, "--index", "hnsw", "--target-recall", "1.5"]).stderr.contains("target recall must be in (0, 1]"))
    }

    /// A candidate timed beside a memory load (as beside a session's other KV heads): the load
    /// stops when the timed call returns, the call's error comes back, and the time is the call's.
    @Test func aCandidateIsTimedBesideALoad() throws {
        struct Refused: Error {}
        let load = CacheEvictor(bytes: 4 << 20)
        let nothing = AttentionResult(heads: [], retrieved: [], attended: [], stats: SearchStats())
        // The call runs while the load streams: it sees the load's count grow.
        var streamedMeanwhile = 0
        let micros = try HeadPlanner.microseconds({
            let before = load.streamed.load(ordering: .relaxed)
            let deadline = monotonicNanos() + 5_000_000_000
            while load.streamed.load(ordering: .relaxed) < before + 2, monotonicNanos() < deadline { usleep(1000) }
            streamedMeanwhile = load.streamed.load(ordering: .relaxed) - before
            usleep(20_000)
            return nothing
        }, concurrent: 2, load: load)
        #expect(streamedMeanwhile >= 2, "the load streams while the call runs")
        #expect(micros >= 20_000 && micros < 10_000_000)
        #expect(throws: Refused.self) {
            _ = try HeadPlanner.microseconds({ throw Refused() }, concurrent: 3, load: load)
        }
        // Without a load (a head timed warm) it is the call alone.
        #expect(try HeadPlanner.microseconds({ usleep(5_000); return nothing }, concurrent: 2, load: nil) >= 5_000)
    }
}

/// The logit soft-cap (cap * tanh(s / cap) on the scaled score) in every attention path.
@Suite struct SoftCapTests {
    @Test func cappedAttentionEqualsANaiveSoftmaxOfCappedScores() throws {
        var rng = SeededRandom(seed: 9)
        let n = 300, d = 16
        let keys = rng.gaussianMatrix(rows: n, dim: d).map { $0 * 3 }, values = rng.gaussianMatrix(rows: n, dim: d)
        let query = rng.gaussianMatrix(rows: 2, dim: d).map { $0 * 3 }
        let dir = TemporaryDirectory("kvrecall-softcap")
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.ingest(keys: Tensor(name: "k", shape: [n, d], dtype: .f32, floats: keys),
                         values: Tensor(name: "v", shape: [n, d], dtype: .f32, floats: values), queries: nil,
                         first: HeadID(), dtype: .f32)
        var p = AttentionParameters()
        p.softCap = 2
        p.k = 20
        try store.read { s in
            let kv = try s.vectors(HeadID(), .keys), vv = try s.vectors(HeadID(), .values)
            let exact = try query.withUnsafeBufferPointer { try Attention.attend(queries: $0, selector: nil, keys: kv, values: vv, parameters: p) }
            let selected = try query.withUnsafeBufferPointer {
                try Attention.attend(queries: $0, selector: FlatIndex(keys: kv), keys: kv, values: vv, parameters: p)
            }
            for h in 0..<2 {
                var scores = (0..<n).map { i in (0..<d).reduce(Float(0)) { $0 + query[h * d + $1] * keys[i * d + $1] } / 4 }
                scores = scores.map { 2 * tanhf($0 / 2) }
                let top = scores.max()!
                let w = scores.map { exp(Double($0 - top)) }
                let total = w.reduce(0, +)
                let naive = (0..<d).map { c in Float((0..<n).reduce(0.0) { $0 + w[$1] * Double(values[$1 * d + c]) } / total) }
                #expect(relativeError(exact.heads[h].output, naive) < 1e-5)
                #expect(abs(Double(exact.heads[h].lse) - (Double(top) + log(total))) < 1e-4)
                // Without the cap the result differs: the cap is applied, not ignored.
                var uncapped = p
                uncapped.softCap = nil
                let plain = try query.withUnsafeBufferPointer { try Attention.attend(queries: $0, selector: nil, keys: kv, values: vv, parameters: uncapped) }
                #expect(relativeError(plain.heads[h].output, naive) > 1e-3)
                // The top-k path attends its positions through the same capped scores.
                let attended = selected.attended
                let top2 = attended.map { scores[$0] }.max()!
                let w2 = attended.map { exp(Double(scores[$0] - top2)) }
                let total2 = w2.reduce(0, +)
                let restricted = (0..<d).map { c in Float(zip(attended, w2).reduce(0.0) { $0 + $1.1 * Double(values[$1.0 * d + c]) } / total2) }
                #expect(relativeError(selected.heads[h].output, restricted) < 1e-5)
            }
            p.softCap = -1
            #expect(throws: IndexError.self) { try p.validate() }
        }
    }
}

/// Real Gemma 3 global-layer traces (Data/gemma3: 1024 tokens, 4 query heads per KV head): the GQA
/// targets at default parameters, held as floors.
@Suite struct RealTraceFloors {
    @Test(arguments: ["05", "11", "17"])
    func wholeGroupsAtDefaultParameters(layer: String) throws {
        let data = repositoryDataDirectory() + "/gemma3/layer\(layer)"
        let dir = TemporaryDirectory("kvrecall-gemma-trace")
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.ingest(keys: try NPY.read(path: data + "_keys.npy"), values: try NPY.read(path: data + "_values.npy"),
                         queries: try NPY.read(path: data + "_prefill_queries.npy"), first: HeadID(), dtype: .f16)
        let queries = try NPY.read(path: data + "_queries.npy").floats()
        var p = AttentionParameters()
        p.scale = 0.0625  // Gemma 3's query_pre_attn_scalar^-1/2 (manifest.json)
        let (plan, built) = try store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            let plan = try HeadPlanner.plan(keys: keys, values: try s.vectors(HeadID(), .values), queries: try s.vectors(HeadID(), .queries),
                                            group: 4, calibration: CalibrationParameters(), attention: p, policy: PolicyParameters(),
                                            build: IndexBuildParameters()).plan
            let built = try HeadPlanner.buildCalibrated(.retrieval, keys: keys, count: keys.count, queries: try s.vectors(HeadID(), .queries),
                                                        build: IndexBuildParameters(), calibration: CalibrationParameters())
            return (plan, built)
        }
        // The plan chose a candidate within the target error, measured no slower than exact.
        let exact = try #require(plan.candidates.first { $0.policy == .exact })
        let chosen = try #require(plan.chosenCandidate)
        #expect(chosen.error <= PolicyParameters().targetError && chosen.cost <= exact.cost, "\(plan.candidateLines)")
        #expect(built.calibration?.reached == true, "\(built.calibration?.summary ?? "not calibrated")")
        try IndexCatalog.save(built.index, in: store, head: HeadID(), calibration: built.calibration)
        try plan.save(in: store, head: HeadID())
        let runs = try store.read { s in
            try runMethods([.retrieval, .auto], snapshot: s, head: HeadID(), queries: queries, groupSize: 4, parameters: p).map { try $0.get() }
        }
        for run in runs {
            // Recall of every query head's own top-100, and the median output error against the oracle's.
            #expect(run.recall >= 0.95, "\(run.method) recall \(run.recall)")
            #expect(median(run.errors) <= median(run.oracleErrors) + 0.02,
                    "\(run.method) median error \(median(run.errors)) vs oracle \(median(run.oracleErrors))")
        }
    }
}

/// The REPL runs `auto` and explains the head's policy and the calibrated knob it used.
@Suite struct REPLAutoTests {
    @Test func attendAutoAndExplainShowThePlan() throws {
        let dir = TemporaryDirectory("kvrecall-repl-auto")
        do {
            let store = try AutoPolicyTests.minilmStore(dir)
            defer { store.close() }
            let planned = try store.read { s in
                try HeadPlanner.plan(keys: try s.vectors(HeadID(), .keys), values: try s.vectors(HeadID(), .values),
                                     queries: try s.vectors(HeadID(), .queries), group: 1, calibration: CalibrationParameters(),
                                     attention: AttentionParameters(), policy: PolicyParameters(), build: IndexBuildParameters())
            }
            let built = try store.read { s in
                try HeadPlanner.buildCalibrated(.ivf, keys: try s.vectors(HeadID(), .keys), count: 4096,
                                                queries: try s.vectors(HeadID(), .queries), build: IndexBuildParameters(),
                                                calibration: CalibrationParameters())
            }
            try IndexCatalog.save(built.index, in: store, head: HeadID(), calibration: built.calibration)
            // A plan naming the estimation zone (what the REPL shows does not depend on why it was chosen).
            var plan = planned.plan
            plan.policy = .estimation
            try plan.save(in: store, head: HeadID())
        }
        let repl = REPLInterpreter(seed: 1, repetitions: 1)
        #expect(repl.open(path: dir.path).succeeded)
        _ = repl.ok("use 0/0/0")
        _ = repl.ok("query 5")
        let attend = repl.ok("attend auto")
        #expect(attend.contains("auto chose estimate for this head"), "\(attend)")
        let explain = repl.ok("explain")
        #expect(explain.contains("auto -> estimate") && explain.contains("policy") && explain.contains("calibration"), "\(explain)")
        #expect(explain.contains("nprobe") && explain.contains("held-out queries"), "\(explain)")
        #expect(explain.contains("candidate") && explain.contains("exact: error 0.0000"), "explain lists the measured candidates: \(explain)")
    }
}
