import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallFormats
@testable import KVRecallStorage
import KVRecallTestSupport

/// Rough edges a new user hit in the store commands (issue 23, item 6).
@Suite struct RoughEdgeTests {
    static let data = repositoryDataDirectory() + "/minilm"

    func minilmStore() throws -> TemporaryDirectory {
        let dir = TemporaryDirectory("kvrecall-rough")
        let r = try runCLI(["ingest", "--store", dir.path + "/s", "--keys", Self.data + "/keys.npy", "--values", Self.data + "/values.npy",
                            "--layer", "2", "--head", "6", "--quiet"])
        #expect(r.status == 0, "\(r.stderr)")
        return dir
    }

    /// `attend --method` takes the comma lists `generate` and `eval` take; empty names and repeats
    /// are refused everywhere.
    @Test func attendTakesMethodLists() throws {
        let dir = try minilmStore()
        let base = ["attend", "--store", dir.path + "/s", "--layer", "2", "--head", "6", "--queries", Self.data + "/queries.npy",
                    "--limit", "8", "-k", "20"]
        let r = try runCLI(base + ["--method", "exact,hip,streaming", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let runs = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        #expect(runs.map { $0["method"] as? String } == ["exact", "hip", "streaming"])
        let table = try runCLI(base + ["--method", "hip, exact"])
        #expect(table.status == 0 && table.stdout.contains("hip ") && table.stdout.contains("exact "), "\(table.stderr)")
        let one = try runCLI(base + ["--method", "hip", "--json"])
        #expect((try JSONSerialization.jsonObject(with: Data(one.stdout.utf8))) is [String: Any], "one method: one object, as before")
        for (method, message) in [("exact,,hip", "has an empty name"), (",exact", "has an empty name"), ("hip,hip", "lists hip twice"),
                                  ("exact,bogus", "--method must be one of")] {
            let bad = try runCLI(base + ["--method", method])
            #expect(bad.status != 0 && bad.stderr.contains(message), "\(method): \(bad.stderr)")
        }
    }

    /// A negative number after an option reaches the option's own check instead of ArgumentParser's
    /// "Missing value" (it read "-1" as an option).
    @Test func negativeNumbersGetTheOptionsOwnMessage() throws {
        let dir = try minilmStore()
        let store = dir.path + "/s"
        for (arguments, message) in [
            (["query", "--store", store, "--queries", Self.data + "/queries.npy", "-k", "-1"], "-k must be at least 1"),
            (["query", "--store", store, "--queries", Self.data + "/queries.npy", "--limit", "-2"], "--limit must be at least 1"),
            (["attend", "--store", store, "--queries", Self.data + "/queries.npy", "--group", "-4"], "--group must be at least 1"),
            (["build", "--store", store, "--index", "ivf", "--nlist", "-8"], "nlist"),
            (["query", "--store", store, "--queries", Self.data + "/queries.npy", "--json", "-1"], "does not take any value"),
        ] {
            let r = try runCLI(arguments)
            #expect(r.status != 0 && r.stderr.contains(message) && !r.stderr.contains("Missing value"), "\(arguments): \(r.stderr)")
        }
    }

    /// A new store goes into a new or empty directory: given an unrelated non-empty one (a home or
    /// project folder), ingest and sessions (Swift, C, Python) used to write data.mdb among its files.
    @Test func aStoreIsNotCreatedAmongUnrelatedFiles() throws {
        let dir = TemporaryDirectory("kvrecall-unrelated")
        try Data("my notes".utf8).write(to: URL(fileURLWithPath: dir.path + "/notes.txt"))
        #expect { try KVStore(path: dir.path, create: true) } throws: { error in
            let e = error as? StoreError
            return e?.kind == .notAStore && e?.message.contains("not empty and holds no KVRecall store ('notes.txt')") == true
        }
        let config = SessionConfiguration(layers: 1, kvHeads: 1, queryHeadsPerKV: 1, headDimension: 8)
        #expect(throws: StoreError.self) { try KVSession(configuration: config, directory: dir.path) }
        let r = try runCLI(["ingest", "--store", dir.path, "--keys", Self.data + "/keys.npy", "--values", Self.data + "/values.npy"])
        #expect(r.status != 0 && r.stderr.contains("not empty and holds no KVRecall store"), "\(r.stderr)")
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["notes.txt"], "nothing was written")
        // An empty directory, or one holding only what an interrupted creation leaves, is fine.
        let empty = TemporaryDirectory("kvrecall-empty")
        try KVStore(path: empty.path, create: true).close()
        let leftover = TemporaryDirectory("kvrecall-leftover")
        try Data().write(to: URL(fileURLWithPath: leftover.path + "/writers.lock"))
        try KVStore(path: leftover.path, create: true).close()
    }
}
