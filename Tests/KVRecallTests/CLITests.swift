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
import KVRecallTestSupport

@Suite struct CLITests {
    let data = repositoryDataDirectory() + "/minilm"

    @Test func ingestInfoQueryEndToEnd() throws {
        let dir = TemporaryDirectory()
        let store = dir.path + "/store"
        let ingest = try runCLI(["ingest", "--store", store, "--keys", "\(data)/keys.npy", "--values", "\(data)/values.npy",
                                 "--queries", "\(data)/prefill_queries.npy", "--layer", "2", "--head", "6", "--dtype", "f16"])
        #expect(ingest.status == 0, "\(ingest.stderr)")
        #expect(ingest.stdout.contains("head 0/2/6: 4096 keys/values, 4096 prefill queries, d=32, f16"))

        let info = try runCLI(["info", "--store", store, "--json"])
        #expect(info.status == 0)
        let infoObject = try JSONSerialization.jsonObject(with: Data(info.stdout.utf8)) as? [String: Any]
        let heads = infoObject?["heads"] as? [[String: Any]]
        #expect(heads?.count == 1)
        #expect(heads?.first?["count"] as? Int == 4096)
        #expect(heads?.first?["dtype"] as? String == "f16")
        #expect(try runCLI(["info", "--store", store]).stdout.contains("0/2/6"))

        let query = try runCLI(["query", "--store", store, "--layer", "2", "--head", "6", "--queries", "\(data)/queries.npy",
                                "-k", "5", "--limit", "3", "--json"])
        #expect(query.status == 0, "\(query.stderr)")
        let object = try JSONSerialization.jsonObject(with: Data(query.stdout.utf8)) as? [String: Any]
        #expect(object?["k"] as? Int == 5)
        let results = object?["results"] as? [[String: Any]]
        #expect(results?.count == 3)
        let stats = object?["stats"] as? [String: Any]
        #expect(stats?["keys_scanned_fraction"] as? Double == 1.0)
        #expect((stats?["median_query_us"] as? Double ?? 0) > 0)

        // The CLI's answer equals the library's exact search on the same stored vectors.
        let ids = results?.first?["ids"] as? [Int]
        let opened = try KVStore(path: store)
        defer { opened.close() }
        let stored = try opened.copyVectors(HeadID(layer: 2, head: 6), .keys)
        let q = try NPY.read(path: "\(data)/queries.npy").floats()
        let expected = naiveTopK(keys: stored, dim: 32, query: q[0..<32], k: 5).map(\.id)
        #expect(ids == expected)
    }

    @Test func safetensorsIngestByTensorName() throws {
        let dir = TemporaryDirectory()
        let file = "\(data)/minilm_l2.safetensors"
        let r = try runCLI(["ingest", "--store", dir.path, "--keys", file, "--keys-tensor", "layer2.head6.keys",
                            "--values", file, "--values-tensor", "layer2.head6.values",
                            "--queries", file, "--queries-tensor", "layer2.head6.prefill_queries"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("4096 keys/values, 4096 prefill queries, d=32, f32"))
        let missing = try runCLI(["ingest", "--store", dir.path, "--keys", file, "--values", file,
                                  "--keys-tensor", "nope", "--values-tensor", "layer2.head6.values"])
        #expect(missing.status != 0)
        #expect(missing.stderr.contains("nope") && missing.stderr.contains("layer2.head6.keys"))
    }

    @Test func threeDimensionalInputIngestsSeveralHeads() throws {
        let dir = TemporaryDirectory()
        let stacked = "\(data)/stacked_keys.npy"
        let r = try runCLI(["ingest", "--store", dir.path, "--keys", stacked, "--values", stacked, "--head", "4", "--dtype", "bf16"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("head 0/0/4: 1024") && r.stdout.contains("head 0/0/5: 1024"))
    }

    @Test func errorsAreClearAndNonZero() throws {
        let dir = TemporaryDirectory()
        // A store directory that does not exist.
        let r1 = try runCLI(["info", "--store", dir.path + "/none"])
        #expect(r1.status != 0 && r1.stderr.contains("no such store directory"))
        // Values whose shape differs from the keys.
        let r2 = try runCLI(["ingest", "--store", dir.path + "/s", "--keys", "\(data)/keys.npy", "--values", "\(data)/queries.npy"])
        #expect(r2.status != 0 && r2.stderr.contains("queries.npy") && r2.stderr.contains("differs"))
        // A NaN row names the file and the row.
        var keys = try NPY.read(path: "\(data)/keys.npy").floats()
        keys[7 * 32 + 3] = .nan
        let bad = dir.path + "/nan.npy"
        try NPY.write(Tensor(name: "k", shape: [4096, 32], dtype: .f32, floats: keys), to: bad)
        let r3 = try runCLI(["ingest", "--store", dir.path + "/s", "--keys", bad, "--values", "\(data)/values.npy"])
        #expect(r3.status != 0 && r3.stderr.contains("nan.npy") && r3.stderr.contains("row 7"))
        // A pickled .npy.
        let pickled = dir.path + "/pickle.npy"
        var header = "{'descr': '|O', 'fortran_order': False, 'shape': (2, 2), }"
        while (10 + header.count + 1) % 64 != 0 { header += " " }
        var bytes: [UInt8] = [0x93] + Array("NUMPY".utf8) + [1, 0, UInt8(header.count + 1), 0] + Array(header.utf8) + [0x0A]
        bytes += [UInt8](repeating: 0, count: 32)
        try Data(bytes).write(to: URL(fileURLWithPath: pickled))
        let r4 = try runCLI(["ingest", "--store", dir.path + "/s", "--keys", pickled, "--values", pickled])
        #expect(r4.status != 0 && r4.stderr.contains("pickle.npy") && r4.stderr.lowercased().contains("pickle"))
        // k larger than the head (clamped, with a note: the CLI's one rule for k), and a dimension mismatch.
        _ = try runCLI(["ingest", "--store", dir.path + "/t", "--keys", "\(data)/stacked_keys.npy", "--values", "\(data)/stacked_keys.npy"])
        let r5 = try runCLI(["query", "--store", dir.path + "/t", "--queries", "\(data)/queries.npy", "-k", "5000"])
        #expect(r5.status == 0 && r5.stderr.contains("exceeds"))
        let r6 = try runCLI(["query", "--store", dir.path + "/t", "--queries", "\(data)/query_token_ids.npy"])
        #expect(r6.status != 0 && r6.stderr.contains("query_token_ids.npy"))
        let r7 = try runCLI(["ingest", "--store", dir.path + "/s", "--keys", "\(data)/keys.npy", "--values", "\(data)/values.npy", "--dtype", "f64"])
        #expect(r7.status != 0 && r7.stderr.contains("--dtype"))
    }

    @Test func helpTeachesWithExamples() throws {
        for command in ["ingest", "info", "query", "demo"] {
            let r = try runCLI([command, "--help"])
            #expect(r.status == 0)
            #expect(r.stdout.contains("--"), "\(command) help lists options")
        }
        #expect(try runCLI(["ingest", "--help"]).stdout.contains("Examples"))
    }

    @Test func replayFeedsTheRealTraceThroughASession() throws {
        let exact = try runCLI(["replay", "--data", data, "--method", "exact"])
        #expect(exact.status == 0, "\(exact.stderr)")
        // steps, final tokens, mean, median and max error: exact attention through the session is exact.
        #expect(exact.stdout.contains("  256          4352      0.0000        0.0000     0.0000"), "\(exact.stdout)")
        let retrieval = try runCLI(["replay", "--data", data, "--method", "retrieval", "-k", "100", "--ef", "64"])
        #expect(retrieval.status == 0, "\(retrieval.stderr)")
        let row = retrieval.stdout.split(separator: "\n").last.map { $0.split(separator: " ").compactMap { Double($0) } } ?? []
        // Mean error near the oracle top-100's 0.65 on this diffuse head; never wildly off.
        #expect(row.count == 6 && row[2] < 0.72 && row[4] < 1.2, "\(retrieval.stdout)")
    }

    @Test func demoRunsOnTheBundledSample() throws {
        let r = try runCLI(["demo", "--data", data, "-k", "10"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("recall@10_vs_f32") && r.stdout.contains("bf16"))
    }

    /// Negative and out-of-range numbers reach validation and get their range, not "Missing value".
    @Test(arguments: [
        (["attend", "--store", "/nonexistent", "--queries", "q.npy", "-k", "-5"], "k must be at least 1 (got -5)"),
        (["attend", "--store", "/nonexistent", "--queries", "q.npy", "--sinks", "-1"], "sinks and window must be non-negative"),
        (["attend", "--store", "/nonexistent", "--queries", "q.npy", "--layer", "-1"], "--layer must be in 0...65535 (got -1)"),
        (["query", "--store", "/nonexistent", "--queries", "q.npy", "--layer", "70000"], "--layer must be in 0...65535 (got 70000)"),
        (["ingest", "--store", "/nonexistent", "--keys", "k.npy", "--values", "v.npy", "--head", "-2"], "--head must be in 0...65535 (got -2)"),
        (["generate", "--prompt", "x", "-k", "-3"], "-k must be at least 1 (got -3)"),
    ])
    func numbersOutOfRangeNameTheRange(arguments: [String], message: String) throws {
        let r = try runCLI(arguments)
        #expect(r.status != 0)
        #expect(r.stderr.contains(message), "\(r.stderr)")
        #expect(!r.stderr.contains("Missing value"))
    }
}
