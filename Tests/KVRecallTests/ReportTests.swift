import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallSession
@testable import KVRecallInterface
import KVRecallTestSupport

/// Reports that said something other than what ran (issue 23, item 5).
@Suite struct ReportTests {
    /// A store with one small head (`n` keys, d 16) and out-of-distribution prefill queries.
    func smallStore(_ dir: TemporaryDirectory, n: Int) throws -> KVStore {
        var rng = SeededRandom(seed: 5)
        let store = try KVStore(path: dir.path, create: true)
        let keys = rng.gaussianMatrix(rows: n, dim: 16)
        let queries = rng.gaussianMatrix(rows: 200, dim: 16).map { $0 * 3 + 1 }
        try store.ingest(keys: Tensor(name: "k", shape: [n, 16], dtype: .f32, floats: keys),
                         values: Tensor(name: "v", shape: [n, 16], dtype: .f32, floats: keys),
                         queries: Tensor(name: "q", shape: [200, 16], dtype: .f32, floats: queries), first: HeadID(), dtype: .f32)
        return store
    }

    /// HNSW counted its upper-layer descent as keys scanned and HiP re-scored kept keys every round,
    /// so small heads reported more than 100% of their keys scanned ("111.0%").
    @Test func keysScannedNeverExceedsTheKeys() throws {
        let dir = TemporaryDirectory()
        let store = try smallStore(dir, n: 600)
        defer { store.close() }
        try store.read { s in
            let keys = try s.vectors(HeadID(), .keys)
            let queries = try s.vectors(HeadID(), .queries).decode(rows: 0..<50)
            var build = IndexBuildParameters()
            build.M = 4  // several layers on 600 keys
            let hnsw = try IndexCatalog.build(.hnsw, keys: keys, parameters: build)
            var p = SearchParameters()
            p.graph.efSetting = 4096
            let found = try queries.withUnsafeBufferPointer { try hnsw.search($0, k: 10, parameters: p, keys: keys) }
            #expect(found.stats.keysScannedFraction <= 1, "hnsw scanned \(found.stats.keysScannedFraction)")
            #expect(found.stats.keysScannedFraction > 0.9, "ef above N walks (nearly) every key")
            #expect(found.stats.auxiliaryComputations > 0, "the upper layers' routing is reported as auxiliary work")
            let hip = HiPSelector(keys: keys)
            let chosen = try queries.withUnsafeBufferPointer { try hip.search($0, k: 100, parameters: SearchParameters(), keys: keys) }
            #expect(chosen.stats.keysScannedFraction <= 1, "hip scanned \(chosen.stats.keysScannedFraction)")
            // HiP's choice is its own (not exact top-k), and the same as before: scores are reused, not changed.
            for q in 0..<50 {
                for hit in chosen.hits(q) {
                    #expect(hit.score == keys.score(query: queries.withUnsafeBufferPointer { $0.baseAddress! + q * 16 }, row: hit.id))
                }
            }
        }
        // Build's calibration line, and every method of `attend --method all` on a small head.
        store.close()
        for kind in ["hnsw", "retrieval"] {
            let built = try runCLI(["build", "--store", dir.path, "--index", kind, "--M", "4"])
            #expect(built.status == 0 && built.stdout.contains("calibrated"), "\(built.stdout)\(built.stderr)")
            let percent = built.stdout.components(separatedBy: "% of keys scanned")[0].components(separatedBy: " ").last.flatMap(Double.init)
            #expect(try #require(percent) <= 100, "\(built.stdout)")
        }
        let queries = dir.path + "/q.npy"
        var rng = SeededRandom(seed: 8)
        try NPY.write(Tensor(name: "q", shape: [20, 16], dtype: .f32, floats: rng.gaussianMatrix(rows: 20, dim: 16)), to: queries)
        let r = try runCLI(["attend", "--store", dir.path, "--queries", queries, "--method", "all", "-k", "100", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let runs = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        #expect(runs.count >= 4)
        for run in runs {
            let scanned = try #require((run["metrics"] as? [String: Any])?["keys_scanned_fraction"] as? Double)
            #expect(scanned <= 1, "\(run["method"] ?? "") scanned \(scanned)")
        }
    }

    /// The REPL's `compare` header printed "ef 64, nprobe 8" (the library defaults) while each index
    /// ran its calibrated value; each method's knob is now named with where it came from.
    @Test func compareNamesTheKnobsThatRan() throws {
        let dir = TemporaryDirectory("kvrecall-repl-knobs")
        let nprobe: Int
        do {
            let store = try AutoPolicyTests.minilmStore(dir)
            defer { store.close() }
            let built = try store.read { s in
                try HeadPlanner.buildCalibrated(.ivf, keys: try s.vectors(HeadID(), .keys), count: 4096,
                                                queries: try s.vectors(HeadID(), .queries), build: IndexBuildParameters(),
                                                calibration: CalibrationParameters())
            }
            nprobe = try #require(built.calibration).value
            try IndexCatalog.save(built.index, in: store, head: HeadID(), calibration: built.calibration)
        }
        #expect(nprobe != IVFSearchParameters.defaultNprobe, "a calibration that differs from the default shows the bug")
        let repl = REPLInterpreter(seed: 1, repetitions: 1)
        #expect(repl.open(path: dir.path).succeeded)
        _ = repl.ok("query 5")
        let compared = repl.ok("compare")
        let header = compared.components(separatedBy: "\n").prefix(2).joined(separator: "\n")
        #expect(header.contains("ivf nprobe \(nprobe) (calibrated)") && header.contains("estimate nprobe \(nprobe) (calibrated)"), "\(header)")
        #expect(!header.contains("nprobe 8") && !header.contains("ef 64"), "\(header)")
        let attended = repl.ok("attend ivf")
        #expect(attended.contains("nprobe \(nprobe) (calibrated)"), "\(attended)")
        _ = repl.ok("set nprobe 3")
        #expect(repl.ok("compare").contains("ivf nprobe 3 (set)"))
    }

    /// `report(layerName:)` names layers as the caller knows them (a decoder: the model's blocks),
    /// and a head with nothing to index says why.
    @Test func sessionReportNamesLayersAndSaysWhyNothingWasBuilt() throws {
        let config = SessionConfiguration(layers: 2, kvHeads: 1, queryHeadsPerKV: 1, headDimension: 8, dtype: .f32,
                                          method: .auto, k: 4, sinks: 2, window: 8)
        let session = try KVSession(configuration: config, directory: nil)
        defer { session.close() }
        var rng = SeededRandom(seed: 2)
        let rows = rng.gaussianMatrix(rows: 6, dim: 8)
        for layer in 0..<2 {
            try rows.withUnsafeBufferPointer { try session.append(layer: layer, keys: $0, values: $0) }
        }
        try session.buildIndexes()
        let lines = session.report { ["layer 5", "layer 11"][$0] }
        #expect(lines.count == 2 && lines[0].hasPrefix("layer 5 head 0: auto") && lines[1].hasPrefix("layer 11 head 0"), "\(lines)")
        #expect(lines[0].contains("all 6 keys are sinks or in the window"), "\(lines[0])")
        #expect(session.report()[1].hasPrefix("layer 1 head 0"))
    }
}
