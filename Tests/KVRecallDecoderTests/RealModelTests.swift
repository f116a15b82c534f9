import Foundation
import KVRecall
import KVRecallTestSupport
import Testing
@testable import KVRecallDecoder

/// Path of Gemma 3 270M in the model cache (Tools/fetch_model.sh; Tools/test.sh fetches it).
let realModelPath: String = Gemma3Model.defaultPath
let realModelAvailable = FileManager.default.fileExists(atPath: realModelPath)

/// Gemma 3 270M end to end through the release CLI (Tools/test.sh builds it).
@Suite(.enabled(if: realModelAvailable, "Gemma 3 270M is not in the model cache (bash Tools/fetch_model.sh)"))
struct RealModelTests {
    static let shortText = repositoryDataDirectory() + "/text/short.txt"

    /// Perplexity of Data/text/short.txt, BOS + tokens, prefill 1024, tokens 1024..<1280 scored
    /// (each from every token before it), by the independent numpy float32 reference:
    /// `Tools/.venv/bin/python Tools/reference/gemma3_reference.py ppl --text Data/text/short.txt --tokens 1280 --score-from 1023`
    /// (logits at 1023..1278 predicting ids 1024..1279).
    static let referencePerplexity = 26.3774  // mean NLL 3.272508 over 256 predictions

    @Test func greedyContinuationMatchesTheModel() throws {
        let r = try runExecutable(kvrecallReleaseExecutable(),
                                  ["generate", "--prompt", "The capital of France is", "--max-tokens", "16", "--method", "exact"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("The capital of France is the capital of the country of France. It is the largest city in France"),
                "\(r.stdout)")
        #expect(r.stderr.contains("ms/token"))
    }

    @Test func perplexityMatchesTheReferenceAndRetrievalStaysClose() throws {
        let r = try runExecutable(kvrecallReleaseExecutable(),
                                  ["eval", "--text", Self.shortText, "--prefill", "1024", "--tokens", "256",
                                   "--method", "exact,retrieval", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let reports = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        let exact = try #require(reports.first { $0["method"] as? String == "exact" })
        let retrieval = try #require(reports.first { $0["method"] as? String == "retrieval" })
        let exactPPL = try #require(exact["perplexity"] as? Double)
        let retrievalPPL = try #require(retrieval["perplexity"] as? Double)
        #expect(exact["scored_tokens"] as? Int == 256 && exact["prefill_tokens"] as? Int == 1024)
        #expect(abs(exactPPL / Self.referencePerplexity - 1) < 0.01, "exact \(exactPPL), reference \(Self.referencePerplexity)")
        #expect(abs(retrievalPPL / exactPPL - 1) < 0.02, "retrieval \(retrievalPPL), exact \(exactPPL)")
        let top1 = try #require(exact["top1_accuracy"] as? Double)
        #expect(top1 > 0.3 && top1 < 0.8)
    }

    /// `generate --method auto` says each head's plan; `eval --json` names the global layers by the
    /// model's blocks (5, 11, 17) and never reports more than all the keys scanned.
    @Test func autoSaysItsPlanAndReportsNameTheModelsLayers() throws {
        let prompt = String(try String(contentsOfFile: Self.shortText, encoding: .utf8).prefix(1500))
        let generated = try runExecutable(kvrecallReleaseExecutable(),
                                          ["generate", "--prompt", prompt, "--max-tokens", "2", "--method", "auto"])
        #expect(generated.status == 0, "\(generated.stderr)")
        for block in [5, 11, 17] {
            #expect(generated.stderr.contains("[auto] layer \(block) head 0: "), "\(generated.stderr)")
        }
        let r = try runExecutable(kvrecallReleaseExecutable(),
                                  ["eval", "--text", Self.shortText, "--prefill", "400", "--tokens", "4",
                                   "--method", "auto,hnsw", "--fidelity", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let reports = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        for report in reports {
            let heads = try #require(report["heads"] as? [String])
            #expect(heads.map { $0.components(separatedBy: ":")[0] } == ["layer 5 head 0", "layer 11 head 0", "layer 17 head 0"], "\(heads)")
            let percents = heads.flatMap { line in
                line.components(separatedBy: "% of keys scanned").dropLast().compactMap { Double($0.components(separatedBy: " ").last ?? "") }
            }
            #expect(percents.allSatisfy { $0 <= 100 }, "\(heads)")
            let scanned = try #require((report["attention"] as? [String: Any])?["keys_scanned_fraction"] as? Double)
            #expect(scanned <= 1)
        }
        // Methods scored in turn, token by token, score what each scores alone.
        let alone = try runExecutable(kvrecallReleaseExecutable(),
                                      ["eval", "--text", Self.shortText, "--prefill", "400", "--tokens", "4", "--method", "quantized", "--json"])
        #expect(alone.status == 0, "\(alone.stderr)")
        let together = try runExecutable(kvrecallReleaseExecutable(),
                                         ["eval", "--text", Self.shortText, "--prefill", "400", "--tokens", "4", "--method", "exact,quantized", "--json"])
        #expect(together.status == 0, "\(together.stderr)")
        let one = try #require(try JSONSerialization.jsonObject(with: Data(alone.stdout.utf8)) as? [String: Any])
        let pair = try #require(try JSONSerialization.jsonObject(with: Data(together.stdout.utf8)) as? [[String: Any]])
        #expect(pair.map { $0["method"] as? String } == ["exact", "quantized"])
        let nll = try #require(one["mean_nll"] as? Double), pairNLL = try #require(pair.last?["mean_nll"] as? Double)
        let exactNLL = try #require(pair.first?["mean_nll"] as? Double)
        #expect(nll == pairNLL && nll != exactNLL, "alone \(nll), in turn \(pairNLL), exact \(exactNLL)")
    }

    @Test func passkeyIsFoundInAThousandTokens() throws {
        let r = try runExecutable(kvrecallReleaseExecutable(),
                                  ["eval", "--passkey", "--context", "1024", "--trials", "2", "--method", "exact,retrieval", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let results = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        for method in results {
            let rows = try #require(method["results"] as? [[String: Any]])
            #expect(rows.count == 1 && rows[0]["context"] as? Int == 1024 && rows[0]["trials"] as? Int == 2)
            #expect(rows[0]["correct"] as? Int == 2, "\(method)")
        }
    }

    @Test func captureWritesTracesTheEngineReads() throws {
        let dir = TemporaryDirectory("capture")
        let r = try runExecutable(kvrecallReleaseExecutable(),
                                  ["capture", "--text", Self.shortText, "--tokens", "300", "--layers", "5,17",
                                   "--decode-queries", "20", "--out", dir.path])
        #expect(r.status == 0, "\(r.stderr)")
        let keys = try NPY.read(path: dir.path + "/layer05_keys.npy")
        let prefill = try NPY.read(path: dir.path + "/layer05_prefill_queries.npy")
        let queries = try NPY.read(path: dir.path + "/layer17_queries.npy")
        #expect(keys.shape == [300, 256])
        #expect(prefill.shape == [280 * 4, 256])
        #expect(queries.shape == [20 * 4, 256])
        #expect(try keys.floats().allSatisfy(\.isFinite))
        #expect(FileManager.default.fileExists(atPath: dir.path + "/manifest.json"))
        // The engine takes them as they are: ingest, then exact attention for a GQA group.
        let store = dir.path + "/store"
        let ingest = try runCLI(["ingest", "--store", store, "--keys", dir.path + "/layer05_keys.npy",
                                 "--values", dir.path + "/layer05_values.npy", "--queries", dir.path + "/layer05_prefill_queries.npy",
                                 "--layer", "5"])
        #expect(ingest.status == 0, "\(ingest.stderr)")
    }
}

/// The decoder commands' argument checks (no model needed).
@Suite struct DecoderCommandTests {
    @Test(arguments: [
        (["generate", "--max-tokens", "4"], "exactly one of --prompt and --prompt-file"),
        (["generate", "--prompt", "x", "--max-tokens", "0"], "--max-tokens must be at least 1"),
        (["generate", "--prompt", "x", "--method", "exact,bogus"], "--method must be one of"),
        (["generate", "--prompt", "x", "--method", "nope"], "--method must be one of"),
        (["generate", "--prompt", "x", "-k", "0"], "-k must be at least 1"),
        (["eval", "--prefill", "10", "--tokens", "5"], "give --text FILE"),
        (["eval", "--text", "a.txt", "--prefill", "10"], "needs --prefill P and --tokens T"),
        (["eval", "--passkey", "--context", "10"], "--context must list token counts"),
        (["capture", "--text", "a.txt", "--tokens", "100", "--decode-queries", "100", "--out", "/tmp/x"], "--decode-queries"),
        (["generate", "--prompt", "x", "--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such model file"),
    ])
    func badArgumentsAreRefused(arguments: [String], message: String) throws {
        let r = try runCLI(arguments)
        #expect(r.status != 0)
        #expect(r.stderr.contains(message), "\(r.stderr)")
    }

    @Test func aDamagedModelFileIsNamed() throws {
        let dir = TemporaryDirectory("bad-model")
        let path = dir.path + "/bad.gguf"
        try Data("GGUF this is not a model".utf8).write(to: URL(fileURLWithPath: path))
        let r = try runCLI(["generate", "--prompt", "x", "--model", path])
        #expect(r.status != 0)
        #expect(r.stderr.contains(path), "\(r.stderr)")
    }
}
