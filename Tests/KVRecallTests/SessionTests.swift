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

@Suite struct SessionTests {
    static let d = 16, heads = 2, group = 2

    /// [heads, tokens, d] gaussian rows.
    static func rows(_ tokens: Int, _ rng: inout SeededRandom) -> [Float] { rng.gaussianMatrix(rows: heads * tokens, dim: d) }

    func configuration(_ method: AttentionMethod) -> SessionConfiguration {
        var c = SessionConfiguration(layers: 2, kvHeads: Self.heads, queryHeadsPerKV: Self.group, headDimension: Self.d,
                                     dtype: .f32, method: method, k: 50, sinks: 4, window: 16, ef: 64)
        c.upkeepBatch = 8
        return c
    }

    @Test func outputsEqualTheAttentionLayerOnTheSameData() throws {
        var rng = SeededRandom(seed: 1)
        let session = try KVSession(configuration: configuration(.hnsw), directory: nil)
        defer { session.close() }
        let (k, v) = (Self.rows(600, &rng), Self.rows(600, &rng))
        try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try session.append(layer: 1, keys: kb, values: vb) } }
        try session.buildIndexes()
        let q = rng.gaussianMatrix(rows: Self.heads * Self.group, dim: Self.d)
        let out = try q.withUnsafeBufferPointer { try session.attend(layer: 1, queries: $0) }
        // The same computation by hand: an HNSW index over the keys outside the window, then attention.
        for head in 0..<Self.heads {
            let expected = try session.store.read { s -> [Float] in
                let keys = try s.vectors(HeadID(layer: 1, head: UInt16(head)), .keys)
                let values = try s.vectors(HeadID(layer: 1, head: UInt16(head)), .values)
                let index = try IndexCatalog.make(.hnsw, dimension: Self.d, count: 584, parameters: IndexBuildParameters())
                try index.add(keys: keys, range: 0..<584, progress: nil)
                var p = session.parameters
                p.window = 16
                let group = Array(q[(head * Self.group * Self.d)..<((head + 1) * Self.group * Self.d)])
                let r = try group.withUnsafeBufferPointer { try Attention.attend(queries: $0, selector: index, keys: keys, values: values, parameters: p) }
                return r.heads.flatMap(\.output)
            }
            #expect(Array(out[(head * Self.group * Self.d)..<((head + 1) * Self.group * Self.d)]) == expected)
        }
    }

    /// By default each key is indexed as it leaves the window (no step pays for a batch of inserts).
    @Test(arguments: [AttentionMethod.retrieval, .hnsw, .ivf, .lsh])
    func defaultUpkeepIndexesEachKeyAsItLeavesTheWindow(_ method: AttentionMethod) throws {
        var rng = SeededRandom(seed: 9)
        var c = configuration(method)
        c.upkeepBatch = SessionConfiguration.defaultUpkeepBatch
        c.refreshFraction = nil
        let session = try KVSession(configuration: c, directory: nil)
        defer { session.close() }
        let (k, v) = (Self.rows(400, &rng), Self.rows(400, &rng))
        try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try session.append(layer: 0, keys: kb, values: vb) } }
        let prefill = Self.rows(400, &rng)
        try prefill.withUnsafeBufferPointer { try session.appendPrefillQueries(layer: 0, queries: $0) }
        try session.buildIndexes()
        let built = try session.indexedCount(layer: 0, head: 0)
        #expect(built == 400 - c.window)
        for step in 1...70 {
            let (k1, v1) = (Self.rows(1, &rng), Self.rows(1, &rng))
            try k1.withUnsafeBufferPointer { kb in try v1.withUnsafeBufferPointer { vb in try session.append(layer: 0, keys: kb, values: vb) } }
            let indexed = try session.indexedCount(layer: 0, head: 0)
            #expect(indexed == built + step, "step \(step): \(method) took \(indexed - built) of \(step) keys")
        }
    }

    @Test func interleavedAppendAndAttendKeepTheIndexUpToDate() throws {
        var rng = SeededRandom(seed: 2)
        let session = try KVSession(configuration: configuration(.hnsw), directory: nil)
        let exact = try KVSession(configuration: configuration(.exact), directory: nil)
        defer { session.close(); exact.close() }
        let (k, v) = (Self.rows(400, &rng), Self.rows(400, &rng))
        for s in [session, exact] {
            try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try s.append(layer: 0, keys: kb, values: vb) } }
        }
        try session.buildIndexes()
        var worst = 0.0
        for step in 0..<40 {
            let (k1, v1) = (Self.rows(1, &rng), Self.rows(1, &rng))
            for s in [session, exact] {
                try k1.withUnsafeBufferPointer { kb in try v1.withUnsafeBufferPointer { vb in try s.append(layer: 0, keys: kb, values: vb) } }
            }
            // Sharp queries aimed at an old key (outside the window: only the index can find it).
            var q = [Float]()
            for h in 0..<Self.heads {
                for _ in 0..<Self.group { q += k[((h * 400) + 5 * step) * Self.d..<((h * 400) + 5 * step + 1) * Self.d].map { $0 * 8 } }
            }
            let a = try q.withUnsafeBufferPointer { try session.attend(layer: 0, queries: $0) }
            let b = try q.withUnsafeBufferPointer { try exact.attend(layer: 0, queries: $0) }
            worst = max(worst, relativeError(a, b))
        }
        #expect(worst < 0.02, "worst output error \(worst)")
        #expect(try session.length(layer: 0) == 440)
        // 440 tokens, window 16, batches of 8: the index holds all but the window and one partial batch.
        for head in 0..<Self.heads {
            let indexed = try session.indexedCount(layer: 0, head: head)
            #expect(indexed > 440 - 16 - 8 && indexed <= 440 - 16, "indexed \(indexed)")
        }
    }

    @Test func checkpointAndResumeGiveIdenticalOutputs() throws {
        var rng = SeededRandom(seed: 3)
        let dir = TemporaryDirectory("kvrecall-session")
        let q = rng.gaussianMatrix(rows: Self.heads * Self.group, dim: Self.d)
        let before: [Float]
        do {
            let session = try KVSession(configuration: configuration(.ivf), directory: dir.path)
            for layer in 0..<2 {
                let (k, v) = (Self.rows(300, &rng), Self.rows(300, &rng))
                try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try session.append(layer: layer, keys: kb, values: vb) } }
            }
            try session.buildIndexes()
            let (k1, v1) = (Self.rows(20, &rng), Self.rows(20, &rng))
            // Both layers: resume keeps only the steps every layer completed.
            for layer in 0..<2 {
                try k1.withUnsafeBufferPointer { kb in try v1.withUnsafeBufferPointer { vb in try session.append(layer: layer, keys: kb, values: vb) } }
            }
            try session.checkpoint()
            before = try q.withUnsafeBufferPointer { try session.attend(layer: 1, queries: $0) }
            session.close()
        }
        let resumed = try KVSession(resuming: dir.path)
        defer { resumed.close() }
        #expect(resumed.configuration == configuration(.ivf))
        #expect(try resumed.length(layer: 1) == 320)
        let after = try q.withUnsafeBufferPointer { try resumed.attend(layer: 1, queries: $0) }
        #expect(after == before)
    }

    @Test func badCallsAreErrors() throws {
        #expect(throws: SessionError.self) { try KVSession(configuration: SessionConfiguration(layers: 0, kvHeads: 1, queryHeadsPerKV: 1, headDimension: 4), directory: nil) }
        let session = try KVSession(configuration: configuration(.hnsw), directory: nil)
        defer { session.close() }
        let q = [Float](repeating: 1, count: Self.heads * Self.group * Self.d)
        #expect(throws: SessionError.unknownLayer(5, layers: 2)) { try q.withUnsafeBufferPointer { try session.attend(layer: 5, queries: $0) } }
        #expect(throws: SessionError.self) { try q.withUnsafeBufferPointer { try session.attend(layer: 0, queries: $0) } }
        #expect(throws: SessionError.self) { try q.withUnsafeBufferPointer { try session.attend(layer: 0, queries: UnsafeBufferPointer(rebasing: $0[0..<3])) } }
        #expect(throws: SessionError.self) { try q.withUnsafeBufferPointer { try session.append(layer: 0, keys: $0, values: UnsafeBufferPointer(rebasing: $0[0..<16])) } }
        let empty = TemporaryDirectory()
        #expect(throws: StoreError.self) { try KVSession(resuming: empty.path) }
    }

    /// The C programs compiled against include/kvrecall.h and the shared library, then run:
    /// Examples/c/session_example.c drives a decode loop and every error path of the C ABI;
    /// Examples/c/contracts.c checks ABI 2's contracts (handles, atomic appends, concurrency,
    /// kill -9 and resume, truncate, log-sum-exp, 16-bit input, build progress and abort).
    @Test(arguments: ["session_example", "contracts"])
    func cProgramBuildsAndPasses(_ name: String) throws {
        let root = URL(fileURLWithPath: repositoryDataDirectory()).deletingLastPathComponent().path
        let library = URL(fileURLWithPath: kvrecallExecutable()).deletingLastPathComponent().path
        #expect(FileManager.default.fileExists(atPath: library + "/libKVRecallC.so"),
                "libKVRecallC.so missing in \(library): build all products with `swift build` first")
        let dir = TemporaryDirectory("kvrecall-c")
        let binary = dir.path + "/" + name
        let compile = try run("/usr/bin/env", ["cc", "-Wall", "-Werror", root + "/Examples/c/\(name).c", "-I" + root + "/include",
                                                "-L" + library, "-lKVRecallC", "-lm", "-pthread", "-o", binary])
        #expect(compile.status == 0, "\(compile.output)")
        let result = try run(binary, [], environment: ["LD_LIBRARY_PATH": library])
        #expect(result.status == 0, "\(result.output)")
        #expect(result.output.contains("ok: 0 failures"))
    }

    func run(_ executable: String, _ arguments: [String], environment: [String: String] = [:]) throws -> (status: Int32, output: String) {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: executable)
        p.arguments = arguments
        p.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        let pipe = Pipe()
        p.standardOutput = pipe
        p.standardError = pipe
        try p.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    /// A NaN in one KV head's key refuses the whole append (no head grows) and a NaN query is refused.
    @Test func nonFiniteInputLeavesTheLayerWhole() throws {
        var rng = SeededRandom(seed: 41)
        let session = try KVSession(configuration: configuration(.exact), directory: nil)
        defer { session.close() }
        let (k, v) = (Self.rows(8, &rng), Self.rows(8, &rng))
        try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try session.append(layer: 0, keys: kb, values: vb) } }
        var bad = Self.rows(1, &rng)
        bad[Self.d + 3] = .nan  // KV head 1's key
        let good = Self.rows(1, &rng)
        #expect(throws: SessionError.self) {
            try bad.withUnsafeBufferPointer { kb in try good.withUnsafeBufferPointer { vb in try session.append(layer: 0, keys: kb, values: vb) } }
        }
        for head in 0..<Self.heads { #expect(try session.store.info(session.headID(0, head)).count == 8) }
        var q = rng.gaussianMatrix(rows: Self.heads * Self.group, dim: Self.d)
        q[5] = .infinity
        #expect(throws: SessionError.self) { _ = try q.withUnsafeBufferPointer { try session.attend(layer: 0, queries: $0) } }
    }

    /// A temporary store whose process died (killed before close) is removed by the next temporary session.
    @Test func orphanedTemporaryStoresAreRemoved() throws {
        let finished = Process()
        finished.executableURL = URL(fileURLWithPath: "/bin/true")
        try finished.run()
        finished.waitUntilExit()
        let orphan = NSTemporaryDirectory() + "kvrecall-session-\(finished.processIdentifier)-orphan-test"
        let mine = NSTemporaryDirectory() + "kvrecall-session-\(getpid())-live-test"
        for path in [orphan, mine] { try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true) }
        defer { try? FileManager.default.removeItem(atPath: mine) }
        let session = try KVSession(configuration: configuration(.exact), directory: nil)
        session.close()
        #expect(!FileManager.default.fileExists(atPath: orphan))
        #expect(FileManager.default.fileExists(atPath: mine))
    }
}
