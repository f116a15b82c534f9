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

/// The CLI's side of the contracts: one writer per head, indexes that say what they cover and
/// searches that cover the rest, one rule for k.
@Suite struct CLIContractTests {
    /// `rows x d` gaussian keys written as .npy.
    func writeKeys(_ path: String, rows: Int, d: Int = 16, seed: UInt64) throws -> [Float] {
        var rng = SeededRandom(seed: seed)
        let keys = rng.gaussianMatrix(rows: rows, dim: d)
        try NPY.write(Tensor(name: "k", shape: [rows, d], dtype: .f32, floats: keys), to: path)
        return keys
    }

    func start(_ arguments: [String], _ dir: String, _ label: String) throws -> Process {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: kvrecallExecutable())
        p.arguments = arguments
        FileManager.default.createFile(atPath: "\(dir)/\(label).err", contents: nil)
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle(forWritingAtPath: "\(dir)/\(label).err")
        try p.run()
        return p
    }

    /// Two ingests into one head at once: the second is refused while the first runs, or runs
    /// after it; never are their chunks interleaved.
    @Test func concurrentIngestsOfOneHeadNeverInterleave() throws {
        let dir = TemporaryDirectory()
        let rows = 20_000, d = 16
        let a = try writeKeys(dir.path + "/a.npy", rows: rows, seed: 1)
        let b = try writeKeys(dir.path + "/b.npy", rows: rows, seed: 2)
        let store = dir.path + "/store"
        #expect(try runCLI(["ingest", "--store", store, "--keys", dir.path + "/a.npy", "--values", dir.path + "/a.npy", "--head", "9", "--quiet"]).status == 0)
        func ingest(_ file: String) -> [String] {
            ["ingest", "--store", store, "--keys", file, "--values", file, "--quiet", "--rows-per-transaction", "256"]
        }
        let first = try start(ingest(dir.path + "/a.npy"), dir.path, "first")
        let second = try start(ingest(dir.path + "/b.npy"), dir.path, "second")
        first.waitUntilExit()
        second.waitUntilExit()
        let errors = [first, second].enumerated().filter { $0.element.terminationStatus != 0 }
        for (i, _) in errors {
            let text = (try? String(contentsOfFile: dir.path + (i == 0 ? "/first.err" : "/second.err"), encoding: .utf8)) ?? ""
            #expect(text.contains("being written by another ingest"), "\(text)")
        }
        #expect(errors.count <= 1)
        let opened = try KVStore(path: store)
        defer { opened.close() }
        let stored = try opened.copyVectors(HeadID(), .keys)
        // Whole copies one after the other: a, b, a+b or b+a.
        let n = stored.count / d
        #expect(n == rows * (2 - errors.count))
        let copies = stride(from: 0, to: n, by: rows).map { Array(stored[($0 * d)..<(($0 + rows) * d)]) }
        for copy in copies { #expect(copy == a || copy == b, "a copy is a mix of both inputs") }
        #expect(try opened.info(HeadID(head: 9)).count == rows)  // another head was never touched

        // Deterministically: while this process holds head 0/0/0, an ingest into it is refused.
        let lease = try opened.lockHeads([HeadID()])
        let refused = try runCLI(ingest(dir.path + "/a.npy"))
        #expect(refused.status != 0 && refused.stderr.contains("head 0/0/0: the head is being written by another ingest"), "\(refused.stderr)")
        let other = try runCLI(ingest(dir.path + "/a.npy") + ["--head", "1"])
        #expect(other.status == 0, "\(other.stderr)")
        lease.release()
    }

    /// An index built before later ingests: `info` shows its coverage, `query --index` searches
    /// the keys it lacks exactly, so the true top-1 comes back.
    @Test func aStaleIndexSaysWhatItCoversAndQueriesCoverTheRest() throws {
        let dir = TemporaryDirectory()
        let d = 64
        let keys = try writeKeys(dir.path + "/all.npy", rows: 1000, d: d, seed: 3)
        try NPY.write(Tensor(name: "k", shape: [500, d], dtype: .f32, floats: Array(keys[0..<(500 * d)])), to: dir.path + "/first.npy")
        try NPY.write(Tensor(name: "k", shape: [500, d], dtype: .f32, floats: Array(keys[(500 * d)...])), to: dir.path + "/second.npy")
        // Queries: scaled copies of keys 500..<505, whose true top-1 is themselves.
        try NPY.write(Tensor(name: "q", shape: [5, d], dtype: .f32, floats: keys[(500 * d)..<(505 * d)].map { $0 * 6 }), to: dir.path + "/q.npy")
        let store = dir.path + "/store"
        for file in ["first", "second"] {
            if file == "second" { #expect(try runCLI(["build", "--store", store, "--index", "hnsw", "--quiet"]).status == 0) }
            #expect(try runCLI(["ingest", "--store", store, "--keys", "\(dir.path)/\(file).npy", "--values", "\(dir.path)/\(file).npy", "--quiet"]).status == 0)
        }
        let info = try runCLI(["info", "--store", store])
        #expect(info.stdout.contains("hnsw 500/1000 keys"), "\(info.stdout)")
        let json = try JSONSerialization.jsonObject(with: Data(try runCLI(["info", "--store", store, "--json"]).stdout.utf8)) as? [String: Any]
        let coverage = ((json?["heads"] as? [[String: Any]])?.first?["index_coverage"]) as? [String: Int]
        #expect(coverage == ["hnsw": 500])
        let query = try runCLI(["query", "--store", store, "--queries", dir.path + "/q.npy", "--index", "hnsw", "-k", "3", "--json"])
        #expect(query.status == 0, "\(query.stderr)")
        #expect(query.stderr.contains("covers keys 0..<500 of 1000"))
        let results = (try JSONSerialization.jsonObject(with: Data(query.stdout.utf8)) as? [String: Any])?["results"] as? [[String: Any]]
        #expect(results?.map { ($0["ids"] as? [Int])?.first } == [500, 501, 502, 503, 504])
        // Attention over the stale index attends the keys it lacks exactly: the targets are found.
        let attend = try runCLI(["attend", "--store", store, "--queries", dir.path + "/q.npy", "--method", "hnsw", "-k", "10", "--json"])
        #expect(attend.status == 0, "\(attend.stderr)")
        let metrics = (try JSONSerialization.jsonObject(with: Data(attend.stdout.utf8)) as? [String: Any])?["metrics"] as? [String: Any]
        #expect((metrics?["recall"] as? Double ?? 0) >= 0.9, "\(attend.stdout)")
        // Rebuilt, the index covers every key and info says just its name.
        #expect(try runCLI(["build", "--store", store, "--index", "hnsw", "--quiet"]).status == 0)
        #expect(try runCLI(["info", "--store", store]).stdout.contains("  hnsw"))
    }

    /// One rule for k in query and attend: above the head's keys it is clamped, with a note.
    @Test func kAboveTheKeysIsClampedAndSaid() throws {
        let dir = TemporaryDirectory()
        _ = try writeKeys(dir.path + "/one.npy", rows: 1, seed: 4)
        let store = dir.path + "/store"
        #expect(try runCLI(["ingest", "--store", store, "--keys", dir.path + "/one.npy", "--values", dir.path + "/one.npy", "--quiet"]).status == 0)
        let query = try runCLI(["query", "--store", store, "--queries", dir.path + "/one.npy", "--json"])
        #expect(query.status == 0, "\(query.stderr)")
        #expect(query.stderr.contains("-k 10 exceeds the 1 keys"))
        #expect((try JSONSerialization.jsonObject(with: Data(query.stdout.utf8)) as? [String: Any])?["k"] as? Int == 1)
        let attend = try runCLI(["attend", "--store", store, "--queries", dir.path + "/one.npy", "-k", "1000000000000"])
        #expect(attend.status == 0, "\(attend.stderr)")
        #expect(attend.stderr.contains("-k 1000000000000 exceeds the 1 keys"))
    }

    /// A store path under a file: the error names the directory and the reason, not Foundation's codes.
    @Test func storeDirectoryErrorsNameThePath() throws {
        let dir = TemporaryDirectory()
        FileManager.default.createFile(atPath: dir.path + "/file", contents: Data())
        _ = try writeKeys(dir.path + "/k.npy", rows: 4, seed: 5)
        let r = try runCLI(["ingest", "--store", dir.path + "/file/sub", "--keys", dir.path + "/k.npy", "--values", dir.path + "/k.npy"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("cannot create directory \(dir.path)/file: a file of that name exists") && !r.stderr.contains("NSCocoaErrorDomain"),
                "\(r.stderr)")
    }

    /// A 20 MB line given to the REPL is not echoed whole into its error.
    @Test func aHugeREPLLineIsNotEchoedWhole() throws {
        let line = "bogus" + String(repeating: "x", count: 20 << 20)
        let r = try runCLI(["repl"], stdin: line + "\n" + "'unterminated" + String(repeating: "y", count: 1 << 20) + "\n")
        #expect(r.status != 0)
        #expect(r.stderr.contains("characters omitted") && r.stderr.utf8.count < 4000, "\(r.stderr.utf8.count) bytes of errors")
    }

    /// Without write access to the store directory (LMDB writes lock.mdb even to read), the error
    /// says so. Run as root, the check drops to the `nobody` user with setpriv.
    @Test func permissionErrorsMentionTheLockFile() throws {
        guard getuid() == 0, FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") else { return }
        let dir = TemporaryDirectory()
        _ = try writeKeys(dir.path + "/k.npy", rows: 4, seed: 6)
        let store = dir.path + "/store"
        #expect(try runCLI(["ingest", "--store", store, "--keys", dir.path + "/k.npy", "--values", dir.path + "/k.npy", "--quiet"]).status == 0)
        try FileManager.default.removeItem(atPath: store + "/lock.mdb")
        let binary = dir.path + "/kvrecall"
        try FileManager.default.copyItem(atPath: kvrecallExecutable(), toPath: binary)
        for path in [dir.path, store] { chmod(path, 0o755) }
        chmod(store + "/data.mdb", 0o644)
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
        p.arguments = ["--reuid=65534", "--regid=65534", "--clear-groups", binary, "info", "--store", store]
        let err = Pipe()
        p.standardError = err
        p.standardOutput = FileHandle.nullDevice
        try p.run()
        let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        p.waitUntilExit()
        #expect(p.terminationStatus != 0)
        #expect(text.contains("lock.mdb") && text.contains("permission denied"), "\(text)")
    }
}
