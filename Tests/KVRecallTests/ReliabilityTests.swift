import CLMDB
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

// Reliability (issue 7): crash safety under SIGKILL, a concurrency soak, and store faults.
// The short forms run in the suite; `Tools/crash_test.sh` runs the long forms through the same code
// with larger counts (environment variables below). Figures are recorded in docs/RELIABILITY.md.
//
//   KVRECALL_CRASH_KILLS   SIGKILLs of `kvrecall ingest` (default 8)
//   KVRECALL_BUILD_KILLS   SIGKILLs of `kvrecall build` (default 4)
//   KVRECALL_CRASH_SEED    seed of the kill delays (default 7)
//   KVRECALL_SOAK_SECONDS  length of the concurrency soak (default 2.5)
//   KVRECALL_BIN           the kvrecall binary to spawn (default: the one built beside the tests)

// MARK: - Spawning and killing kvrecall

/// How a spawned `kvrecall` ended.
struct ChildOutcome {
    var status: Int32
    /// Ended by a signal (our SIGKILL, or a crash such as SIGSEGV or SIGBUS).
    var signalled: Bool
    /// We sent SIGKILL because `killAfter` passed.
    var killed: Bool
    /// We sent SIGKILL because `timeout` passed: a hang.
    var timedOut: Bool
    var seconds: Double
    var stdout: String
    var stderr: String

    /// Exited by itself with a non-zero status: the way every error must end.
    var failedCleanly: Bool { !signalled && !timedOut && status != 0 }
}

enum ReliabilityEnv {
    static func int(_ name: String, _ fallback: Int) -> Int {
        ProcessInfo.processInfo.environment[name].flatMap { Int($0) } ?? fallback
    }
    static func double(_ name: String, _ fallback: Double) -> Double {
        ProcessInfo.processInfo.environment[name].flatMap { Double($0) } ?? fallback
    }
    static var binary: String { ProcessInfo.processInfo.environment["KVRECALL_BIN"] ?? kvrecallExecutable() }
}

func monotonicSeconds() -> Double { Double(DispatchTime.now().uptimeNanoseconds) / 1e9 }

/// Runs `kvrecall args`. With `killAfter`, sends SIGKILL that many seconds after the start if the
/// process is still running; with `killWhen`, as soon as that returns true (it is polled every
/// half millisecond); in any case sends SIGKILL after `timeout` (and reports a hang).
/// Output goes to files, so a full pipe can never block the child.
func spawnKVRecall(_ args: [String], killAfter: Double? = nil, killWhen: (() -> Bool)? = nil,
                   timeout: Double = 120) throws -> ChildOutcome {
    let scratch = TemporaryDirectory("kvrecall-child")
    let outPath = scratch.path + "/out", errPath = scratch.path + "/err"
    _ = FileManager.default.createFile(atPath: outPath, contents: nil)
    _ = FileManager.default.createFile(atPath: errPath, contents: nil)
    let out = try FileHandle(forWritingTo: URL(fileURLWithPath: outPath))
    let err = try FileHandle(forWritingTo: URL(fileURLWithPath: errPath))
    let process = Process()
    process.executableURL = URL(fileURLWithPath: ReliabilityEnv.binary)
    process.arguments = args
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    let start = monotonicSeconds()
    try process.run()
    var killed = false, timedOut = false
    let limit = min(killAfter ?? timeout, timeout)
    while process.isRunning {
        let elapsed = monotonicSeconds() - start
        if elapsed >= limit || killWhen?() == true {
            kill(process.processIdentifier, SIGKILL)
            if elapsed < timeout { killed = true } else { timedOut = true }
            break
        }
        usleep(500)
    }
    process.waitUntilExit()
    let seconds = monotonicSeconds() - start
    try? out.close()
    try? err.close()
    let signalled = process.terminationReason == .uncaughtSignal
    return ChildOutcome(status: process.terminationStatus, signalled: signalled, killed: killed && signalled,
                        timedOut: timedOut, seconds: seconds,
                        stdout: (try? String(contentsOfFile: outPath, encoding: .utf8)) ?? "",
                        stderr: (try? String(contentsOfFile: errPath, encoding: .utf8)) ?? "")
}

/// A uniform double in `range` from a seeded generator.
func uniform(_ range: ClosedRange<Double>, _ rng: inout SeededRandom) -> Double {
    range.lowerBound + (range.upperBound - range.lowerBound) * Double(rng.next() >> 11) / Double(1 << 53)
}

/// Bytes of a file, or nil.
func fileBytes(_ path: String) -> Data? { FileManager.default.contents(atPath: path) }

// MARK: - Crash safety

/// What a SIGKILL left of one ingest.
enum IngestCrashState: String, CaseIterable {
    case noStore = "no store yet"
    case noHead = "no head yet"
    case emptyHead = "head created, no rows"
    case partialKeys = "part of the keys/values"
    case partialQueries = "all keys/values, part of the queries"
    case complete = "complete"
}

/// Source data of the crash tests: f32 keys, values and prefill queries written as .npy.
struct IngestSource {
    let rows: Int, queryRows: Int, d: Int
    let keys: [Float], values: [Float], queries: [Float]
    let keysPath: String, valuesPath: String, queriesPath: String

    init(dir: String, rows: Int, queryRows: Int, d: Int, seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        self.rows = rows
        self.queryRows = queryRows
        self.d = d
        keys = rng.gaussianMatrix(rows: rows, dim: d)
        values = rng.gaussianMatrix(rows: rows, dim: d)
        queries = rng.gaussianMatrix(rows: queryRows, dim: d)
        keysPath = dir + "/keys.npy"
        valuesPath = dir + "/values.npy"
        queriesPath = dir + "/prefill_queries.npy"
        try NPY.write(Tensor(name: "keys", shape: [rows, d], dtype: .f32, floats: keys), to: keysPath)
        try NPY.write(Tensor(name: "values", shape: [rows, d], dtype: .f32, floats: values), to: valuesPath)
        try NPY.write(Tensor(name: "queries", shape: [queryRows, d], dtype: .f32, floats: queries), to: queriesPath)
    }

    func ingestArguments(store: String, head: UInt16, rowsPerTransaction: Int) -> [String] {
        ["ingest", "--store", store, "--keys", keysPath, "--values", valuesPath, "--queries", queriesPath,
         "--head", "\(head)", "--quiet", "--rows-per-transaction", "\(rowsPerTransaction)"]
    }

    /// Checks that head `id` of `store` holds exactly a prefix of whole transactions of this source,
    /// with keys, values and counts in agreement; returns which prefix.
    func verify(_ store: KVStore, _ id: HeadID, rowsPerTransaction rpt: Int, offset: Int = 0) throws -> IngestCrashState {
        guard let info = try store.heads().first(where: { $0.id == id }) else { return .noHead }
        let count = info.count - offset
        #expect(info.dimension == d && info.dtype == .f32, "head \(id): \(info)")
        #expect(count >= 0 && count <= rows && (count == rows || count % rpt == 0),
                "head \(id): \(count) rows is not a whole number of \(rpt)-row transactions of \(rows)")
        #expect(info.queryCount == queryRows || info.queryCount % rpt == 0,
                "head \(id): \(info.queryCount) queries is not a whole number of transactions")
        if info.queryCount > 0 { #expect(count == rows, "head \(id): queries were committed before all keys") }
        try store.read { s in
            let k = try s.vectors(id, .keys), v = try s.vectors(id, .values), q = try s.vectors(id, .queries)
            #expect(k.count == info.count && v.count == info.count && q.count == info.queryCount)
            let n = max(0, min(count, rows))
            #expect(k.decode(rows: offset..<(offset + n)) == Array(keys[0..<(n * d)]), "head \(id): keys differ from the source")
            #expect(v.decode(rows: offset..<(offset + n)) == Array(values[0..<(n * d)]), "head \(id): values differ from the source")
            let m = min(info.queryCount, queryRows)
            #expect(q.decode(rows: 0..<m) == Array(queries[0..<(m * d)]), "head \(id): queries differ from the source")
        }
        if count == 0 && info.queryCount == 0 { return .emptyHead }
        if count < rows { return .partialKeys }
        return info.queryCount < queryRows ? .partialQueries : .complete
    }
}

@Suite(.serialized) struct CrashSafetyTests {
    /// SIGKILLs `kvrecall ingest` at random moments. One store takes every ingest (head i for run i), so
    /// it is reopened after every kill and must stay usable; every fourth run starts a new store, so kills
    /// also land while a store is being created. After each kill: the store opens, the killed head holds
    /// a prefix of whole transactions that equals the source, and every earlier head is unchanged.
    @Test func ingestKilledAtRandomMomentsLeavesACommittedPrefix() throws {
        let kills = ReliabilityEnv.int("KVRECALL_CRASH_KILLS", 8)
        let seed = UInt64(ReliabilityEnv.int("KVRECALL_CRASH_SEED", 7))
        let rows = ReliabilityEnv.int("KVRECALL_CRASH_ROWS", 24_000)
        let rpt = 128
        let dir = TemporaryDirectory("kvrecall-crash")
        let source = try IngestSource(dir: dir.path, rows: rows, queryRows: rows / 6, d: 32, seed: seed)
        let shared = dir.path + "/store"
        try KVStore(path: shared, create: true).close()  // so that every kill leaves a store to reopen

        // An uninterrupted run sets the time scale of the kill delays; runs that finish before their
        // kill shorten it (the machine may have been busier during the reference run).
        let reference = try spawnKVRecall(source.ingestArguments(store: dir.path + "/reference", head: 0, rowsPerTransaction: rpt))
        try #require(reference.status == 0, "\(reference.stderr)")
        var full = reference.seconds
        do {
            let store = try KVStore(path: dir.path + "/reference")
            #expect(try source.verify(store, HeadID(), rowsPerTransaction: rpt) == .complete)
            store.close()
        }

        let fullGrowth = Double(fileBytes(dir.path + "/reference/data.mdb")?.count ?? 0)
        func dataFileSize(_ store: String) -> Int {
            ((try? FileManager.default.attributesOfItem(atPath: store + "/data.mdb"))?[.size] as? NSNumber)?.intValue ?? 0
        }

        var rng = SeededRandom(seed: seed)
        var tally: [IngestCrashState: Int] = [:]
        var earlier: [HeadID: HeadInfo] = [:]
        var killedCount = 0
        for run in 0..<kills {
            let fresh = run % 4 == 3
            let path = fresh ? dir.path + "/fresh-\(run)" : shared
            let id = HeadID(head: UInt16(run))
            // Fresh stores are killed early, by time (process start, store creation, loading the
            // files); the shared store when its data file has grown by a random fraction of a whole
            // ingest, so the kill lands among the commits however fast or loaded the machine is.
            let outcome: ChildOutcome
            let arguments = source.ingestArguments(store: path, head: UInt16(run), rowsPerTransaction: rpt)
            if fresh {
                outcome = try spawnKVRecall(arguments, killAfter: uniform(0...(0.3 * full), &rng))
            } else {
                let start = dataFileSize(path)
                let target = start + Int(uniform(0...1.02, &rng) * fullGrowth)
                outcome = try spawnKVRecall(arguments, killWhen: { dataFileSize(path) >= target })
            }
            #expect(!outcome.timedOut)
            #expect(outcome.killed || outcome.status == 0, "ingest failed by itself: \(outcome.stderr)")
            if outcome.killed { killedCount += 1 } else { full = min(full, outcome.seconds) }

            let state: IngestCrashState
            if fresh {
                // The store may not exist yet, or its creation may have been cut short: then opening
                // without create is a clear .notAStore error, and an ingest finishes the creation.
                let opened: KVStore?
                do { opened = try KVStore(path: path) } catch let error as StoreError {
                    #expect(error.kind == .notAStore, "\(error)")
                    opened = nil
                }
                if let store = opened {
                    state = try source.verify(store, id, rowsPerTransaction: rpt)
                    store.close()
                } else {
                    state = .noStore
                }
                // Re-running the ingest continues the head: the result is the old prefix plus one whole copy.
                var before = 0
                if state != .noStore && state != .noHead {
                    let s = try KVStore(path: path)
                    before = try s.info(id).count
                    s.close()
                }
                let again = try spawnKVRecall(source.ingestArguments(store: path, head: UInt16(run), rowsPerTransaction: rpt))
                #expect(again.status == 0, "ingest after a kill failed: \(again.stderr)")
                let store = try KVStore(path: path)
                #expect(try store.info(id).count == before + rows)
                if before < rows {
                    _ = try source.verify(store, id, rowsPerTransaction: rpt, offset: before)
                }
                store.close()
            } else {
                let store = try KVStore(path: path)  // must open after every kill
                state = try source.verify(store, id, rowsPerTransaction: rpt)
                for (old, info) in earlier {
                    #expect(try store.info(old) == info, "head \(old) changed after a later ingest was killed")
                }
                if let info = try store.heads().first(where: { $0.id == id }) { earlier[id] = info }
                store.close()
            }
            tally[state, default: 0] += 1
        }
        // The shared store is still fully usable by the CLI.
        let info = try spawnKVRecall(["info", "--store", shared, "--json"])
        #expect(info.status == 0, "\(info.stderr)")

        let summary = IngestCrashState.allCases.map { "\($0.rawValue): \(tally[$0] ?? 0)" }.joined(separator: ", ")
        print("crash/ingest: \(kills) runs, \(killedCount) SIGKILLed mid-run, uninterrupted run \(String(format: "%.2f", reference.seconds)) s "
              + "(\(rows) rows + \(rows / 6) queries, \(rpt) rows per transaction); left: \(summary)")
        #expect(killedCount >= 1, "no run was killed before finishing")
        #expect((tally[.partialKeys] ?? 0) + (tally[.partialQueries] ?? 0) >= 1 || kills < 8,
                "no kill landed between two commits: \(summary)")
    }

    /// SIGKILLs `kvrecall build --index hnsw` at random moments. After each kill the store opens, the
    /// keys are unchanged, and the index is either absent (search says to build it) or whole: its
    /// sections are byte-identical to an uninterrupted build's (the build is deterministic) and it
    /// loads and searches.
    @Test func buildKilledAtRandomMomentsLeavesNoIndexOrAWholeOne() throws {
        let kills = ReliabilityEnv.int("KVRECALL_BUILD_KILLS", 4)
        let seed = UInt64(ReliabilityEnv.int("KVRECALL_CRASH_SEED", 7)) &+ 1
        let n = ReliabilityEnv.int("KVRECALL_BUILD_ROWS", 3000), d = 32
        let dir = TemporaryDirectory("kvrecall-crash-build")
        let path = dir.path + "/store"
        var rng = SeededRandom(seed: seed)
        let keys = rng.gaussianMatrix(rows: n, dim: d)
        let id = HeadID(layer: 1)
        do {
            let store = try KVStore(path: path, create: true)
            try store.createHead(id, dimension: d, dtype: .f32)
            try keys.withUnsafeBufferPointer { try store.append(id, keys: $0, values: $0) }
            store.close()
        }
        let args = ["build", "--store", path, "--layer", "1", "--index", "hnsw", "--M", "8", "--ef-construction", "48",
                    "--threads", "2", "--quiet"]
        let queries = Array(keys[0..<(5 * d)])
        let queryFile = dir.path + "/q.npy"
        try NPY.write(Tensor(name: "q", shape: [5, d], dtype: .f32, floats: queries), to: queryFile)
        let queryArgs = ["query", "--store", path, "--layer", "1", "--queries", queryFile, "-k", "5", "--index", "hnsw", "--json"]

        let reference = try spawnKVRecall(args)
        try #require(reference.status == 0, "\(reference.stderr)")
        var full = reference.seconds
        let (referenceSections, referenceIDs): ([String: [UInt8]], [Int]) = try {
            let store = try KVStore(path: path)
            defer { store.close() }
            let sections = try #require(try store.loadIndex(id, name: "hnsw")?.arrays)
            let ids = try store.read { s in
                let view = try s.vectors(id, .keys)
                let index = try IndexCatalog.load(.hnsw, snapshot: s, head: id)
                return try queries.withUnsafeBufferPointer { try index.search($0, k: 5, parameters: SearchParameters(), keys: view).ids }
            }
            #expect(try store.dropIndex(id, name: "hnsw"))
            return (sections, ids)
        }()

        var absent = 0, whole = 0, killedCount = 0
        var checkedAbsentByCLI = false, checkedWholeByCLI = false
        func modified(_ file: String) -> Date? {
            (try? FileManager.default.attributesOfItem(atPath: file))?[.modificationDate] as? Date
        }
        var commitKills = 0, interruptedCommits = 0
        for run in 0..<kills {
            let outcome: ChildOutcome
            var commitKill = false
            if run % 2 == 0 {
                // Anywhere in the build (almost always while the graph is computed).
                outcome = try spawnKVRecall(args, killAfter: uniform(0...(1.1 * full), &rng))
            } else {
                // Aimed at the commit: the build writes data.mdb only there, so kill 0-1 ms after
                // its modification time first changes (pages being written, or the meta page).
                let before = modified(path + "/data.mdb")
                let delay = uniform(0...0.001, &rng)
                var seen: Double?
                outcome = try spawnKVRecall(args, killWhen: {
                    if seen == nil, modified(path + "/data.mdb") != before { seen = monotonicSeconds() }
                    return seen.map { monotonicSeconds() - $0 >= delay } ?? false
                })
                commitKill = outcome.killed && seen != nil
                if commitKill { commitKills += 1 }
            }
            #expect(!outcome.timedOut)
            #expect(outcome.killed || outcome.status == 0, "build failed by itself: \(outcome.stderr)")
            if outcome.killed { killedCount += 1 } else { full = min(full, outcome.seconds) }
            let store = try KVStore(path: path)
            #expect(try store.info(id).count == n)
            #expect(try store.copyVectors(id, .keys) == keys, "the keys changed under an interrupted build")
            if let sections = try store.loadIndex(id, name: "hnsw")?.arrays {
                whole += 1
                #expect(sections == referenceSections, "an interrupted build left an index that differs from a whole one")
                let ids = try store.read { s in
                    let view = try s.vectors(id, .keys)
                    let index = try IndexCatalog.load(.hnsw, snapshot: s, head: id)
                    return try queries.withUnsafeBufferPointer { try index.search($0, k: 5, parameters: SearchParameters(), keys: view).ids }
                }
                #expect(ids == referenceIDs)
                if !checkedWholeByCLI {
                    checkedWholeByCLI = true
                    let q = try spawnKVRecall(queryArgs)
                    #expect(q.status == 0, "\(q.stderr)")
                }
                #expect(try store.dropIndex(id, name: "hnsw"))
            } else {
                absent += 1
                if commitKill { interruptedCommits += 1 }  // pages written, meta not: a torn commit, rolled back
                #expect(try store.indexNames()[id] == nil)
                if !checkedAbsentByCLI {
                    checkedAbsentByCLI = true
                    let q = try spawnKVRecall(queryArgs)
                    #expect(q.failedCleanly && q.stderr.contains("build it first"), "\(q.stderr)")
                }
            }
            store.close()
        }
        print("crash/build: \(kills) runs, \(killedCount) SIGKILLed mid-run, uninterrupted build \(String(format: "%.2f", full)) s "
              + "(HNSW over \(n) keys); \(commitKills) of them within 1 ms of the commit's first write (\(interruptedCommits) before it finished); left: no index \(absent), whole index \(whole), anything else 0")
        #expect(absent + whole == kills)
    }

    /// SIGKILLs `kvrecall ingest` appending to a head that keeps codes (the quantized tier). After each
    /// kill the store holds a prefix of whole transactions, and the code stream covers exactly the
    /// complete groups of that prefix with the rows a fresh `buildCodes` of the same vectors gives:
    /// codes are written in the append's transaction, never behind or ahead of the vectors.
    @Test func appendKilledAtRandomMomentsKeepsVectorsAndCodesInAgreement() throws {
        let kills = ReliabilityEnv.int("KVRECALL_CODES_KILLS", 4)
        let seed = UInt64(ReliabilityEnv.int("KVRECALL_CRASH_SEED", 7)) &+ 2
        let rows = 16_000, rpt = 96, d = 32  // 96 rows per transaction: commits end inside code groups of 64
        let dir = TemporaryDirectory("kvrecall-crash-codes")
        let source = try IngestSource(dir: dir.path, rows: rows, queryRows: 64, d: d, seed: seed)
        let format = CodeFormat(group: 64)
        func prepared(_ path: String) throws {
            let store = try KVStore(path: path, create: true)
            try store.createHead(HeadID(), dimension: d, dtype: .f32, codes: format)
            store.close()
        }
        func codeRows(_ store: KVStore) throws -> [[UInt8]] {
            try store.read { s in
                guard let codes = try s.codes(HeadID()) else { return [] }
                return (0..<codes.count).map { Array(UnsafeRawBufferPointer(start: codes.row($0), count: codes.layout.rowBytes)) }
            }
        }
        func dataFileSize(_ path: String) -> Int {
            ((try? FileManager.default.attributesOfItem(atPath: path + "/data.mdb"))?[.size] as? NSNumber)?.intValue ?? 0
        }
        let referencePath = dir.path + "/reference"
        try prepared(referencePath)
        let empty = dataFileSize(referencePath)
        let reference = try spawnKVRecall(source.ingestArguments(store: referencePath, head: 0, rowsPerTransaction: rpt))
        try #require(reference.status == 0, "\(reference.stderr)")
        let growth = dataFileSize(referencePath) - empty
        var rng = SeededRandom(seed: seed)
        var partial = 0, killedCount = 0
        for run in 0..<kills {
            let path = dir.path + "/run-\(run)"
            try prepared(path)
            let start = dataFileSize(path), target = start + Int(uniform(0.05...0.95, &rng) * Double(growth))
            let outcome = try spawnKVRecall(source.ingestArguments(store: path, head: 0, rowsPerTransaction: rpt),
                                            killWhen: { dataFileSize(path) >= target })
            #expect(!outcome.timedOut)
            #expect(outcome.killed || outcome.status == 0, "ingest failed by itself: \(outcome.stderr)")
            if outcome.killed { killedCount += 1 }
            let store = try KVStore(path: path)
            let state = try source.verify(store, HeadID(), rowsPerTransaction: rpt)
            let info = try store.info(HeadID())
            if state == .partialKeys { partial += 1 }
            // The same vectors coded at once, in a store of their own.
            let fresh = try KVStore(path: dir.path + "/fresh-\(run)", create: true)
            try fresh.createHead(HeadID(), dimension: d, dtype: .f32)
            if info.count > 0 {
                try source.keys.withUnsafeBufferPointer { k in
                    try source.values.withUnsafeBufferPointer { v in
                        try fresh.append(HeadID(), keys: UnsafeBufferPointer(rebasing: k[0..<(info.count * d)]),
                                         values: UnsafeBufferPointer(rebasing: v[0..<(info.count * d)]))
                    }
                }
            }
            try fresh.buildCodes(HeadID(), format: format)
            let kept = try codeRows(store)
            #expect(kept.count == info.count / 64, "\(info.count) positions but \(kept.count) code groups")
            #expect(kept == (try codeRows(fresh)), "the codes left by a kill differ from codes built from the same vectors")
            fresh.close()
            store.close()
        }
        print("crash/codes: \(kills) runs, \(killedCount) SIGKILLed mid-append (\(rows) rows, \(rpt) per transaction, codes in groups of 64); partial heads left: \(partial), each with codes equal to a fresh build")
        #expect(killedCount >= 1 && partial >= 1, "no kill landed between two commits")
    }
}

// MARK: - Concurrency soak

/// Row `i` of the soak head encodes `i`, so a reader can check anything it sees against its snapshot.
enum SoakRows {
    static let d = 16
    /// Component 0 grows with the position (so the top hits of e0 are the newest rows); the others
    /// are a hash of (i, j) on a 1/1024 grid. All exactly representable.
    static func key(_ i: Int, _ j: Int) -> Float {
        if j == 0 { return Float(i) / 1024 }
        var h = UInt64(i) &* 0x9E37_79B9_7F4A_7C15 ^ UInt64(j) &* 0xC2B2_AE3D_27D4_EB4F
        h ^= h >> 29
        h = h &* 0xBF58_476D_1CE4_E5B9
        h ^= h >> 32
        return Float(Int(h % 2049) - 1024) / 1024
    }
    static func value(_ i: Int, _ j: Int) -> Float { Float(i) * 2 + Float(j) }
    static func rows(_ range: Range<Int>) -> (keys: [Float], values: [Float]) {
        var k = [Float](), v = [Float]()
        k.reserveCapacity(range.count * d)
        v.reserveCapacity(range.count * d)
        for i in range { for j in 0..<d { k.append(key(i, j)); v.append(value(i, j)) } }
        return (k, v)
    }
    static func dot(_ q: [Float], _ i: Int) -> (score: Double, magnitude: Double) {
        var s = 0.0, m = 0.0
        for j in 0..<d { let t = Double(q[j]) * Double(key(i, j)); s += t; m += abs(t) }
        return (s, m)
    }
    /// Checks search hits against the row contents: ids inside `limit`, distinct, scores equal to the
    /// inner products and in descending order.
    static func validate(_ hits: [(id: Int, score: Float)], query: [Float], limit: Int, what: String, _ c: inout SoakCounters) {
        var previous = Float.infinity
        var seen = Set<Int>()
        for hit in hits {
            guard hit.id >= 0, hit.id < limit else { c.fail("\(what): id \(hit.id) outside 0..<\(limit)"); return }
            guard seen.insert(hit.id).inserted else { c.fail("\(what): id \(hit.id) twice"); return }
            let (expected, magnitude) = dot(query, hit.id)
            if abs(Double(hit.score) - expected) > 1e-4 * (1 + magnitude) {
                c.fail("\(what): score \(hit.score) of id \(hit.id), expected \(expected)")
            }
            if hit.score > previous { c.fail("\(what): scores not in descending order") }
            previous = hit.score
        }
    }
}

/// A value shared between threads behind a lock.
final class Locked<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func get() -> T { lock.lock(); defer { lock.unlock() }; return value }
    func update(_ body: (inout T) -> Void) { lock.lock(); body(&value); lock.unlock() }
}

struct SoakCounters {
    var snapshots = 0, rowChecks = 0, flatSearches = 0, hnswSearches = 0, sharedSearches = 0, refusedStale = 0
    var failures: [String] = []
    mutating func fail(_ message: String) { if failures.count < 20 { failures.append(message) } else { failures[19] = "..." } }
    static func + (a: SoakCounters, b: SoakCounters) -> SoakCounters {
        SoakCounters(snapshots: a.snapshots + b.snapshots, rowChecks: a.rowChecks + b.rowChecks,
                     flatSearches: a.flatSearches + b.flatSearches, hnswSearches: a.hnswSearches + b.hnswSearches,
                     sharedSearches: a.sharedSearches + b.sharedSearches, refusedStale: a.refusedStale + b.refusedStale,
                     failures: a.failures + b.failures)
    }
}

@Suite struct ConcurrencySoakTests {
    /// Three reader threads search (Flat, the stored HNSW index, and one HNSW instance shared by all
    /// readers) while a writer appends, grows the map from 256 KiB, extends the HNSW index and
    /// rebuilds it. Every snapshot is checked: counts of keys, values and the head agree and are a
    /// whole number of appends, sampled and newest rows decode to their position's contents, the
    /// top hits of e0 are exactly the newest rows, every hit's id lies inside what the searched
    /// structure covers and its score is the inner product with that row.
    @Test func readersSearchWhileAWriterAppendsAndBuilds() throws {
        let seconds = ReliabilityEnv.double("KVRECALL_SOAK_SECONDS", 2.5)
        let d = SoakRows.d, batch = 48
        let id = HeadID(context: 9, layer: 2, head: 1)
        let dir = TemporaryDirectory("kvrecall-soak")
        var options = Environment.Options()
        options.mapSize = 256 * 1024
        options.noSync = true
        let store = try KVStore(path: dir.path, create: true, options: options)
        defer { store.close() }
        try store.createHead(id, dimension: d, dtype: .f32, blockSize: 64)

        let stop = Locked(false)
        let shared = Locked<HNSWIndex?>(nil)
        let results = Locked(SoakCounters())

        let readers = (0..<3).map { r in
            Thread {
                var c = SoakCounters()
                var rng = SeededRandom(seed: UInt64(100 + r))
                var params = SearchParameters()
                params.graph.ef = 32
                while !stop.get() {
                    do {
                        try store.read { s in
                            c.snapshots += 1
                            let info = try s.info(id)
                            let keys = try s.vectors(id, .keys), values = try s.vectors(id, .values)
                            let n = info.count
                            guard keys.count == n, values.count == n, n % batch == 0 else {
                                c.fail("torn snapshot: head \(n), keys \(keys.count), values \(values.count)"); return
                            }
                            guard n > 0 else { return }
                            var row = [Float](repeating: 0, count: d)
                            for i in [n - 1, Int.random(in: 0..<n, using: &rng)] {
                                keys.decodeRow(i, into: &row)
                                if row != (0..<d).map({ SoakRows.key(i, $0) }) { c.fail("key row \(i) of \(n) is wrong") }
                                values.decodeRow(i, into: &row)
                                if row != (0..<d).map({ SoakRows.value(i, $0) }) { c.fail("value row \(i) of \(n) is wrong") }
                                c.rowChecks += 1
                            }
                            // Flat, one query: the newest rows win on e0.
                            let k = min(5, n)
                            var e0 = [Float](repeating: 0, count: d)
                            e0[0] = 1
                            let top = try e0.withUnsafeBufferPointer { try FlatIndex(keys: keys).search($0, k: k, parameters: params, keys: keys) }
                            if top.hits(0).map(\.id) != Array(((n - k)..<n).reversed()) {
                                c.fail("flat e0 top-\(k) \(top.hits(0).map(\.id)) at count \(n)")
                            }
                            // Flat, a batch of four random queries (the sgemm path).
                            let batchQueries = (0..<(4 * d)).map { _ in Float(Int.random(in: -8...8, using: &rng)) / 8 }
                            let flat = try batchQueries.withUnsafeBufferPointer {
                                try FlatIndex(keys: keys).search($0, k: k, parameters: params, keys: keys)
                            }
                            for q in 0..<4 {
                                SoakRows.validate(flat.hits(q), query: Array(batchQueries[(q * d)..<((q + 1) * d)]), limit: n, what: "flat", &c)
                            }
                            c.flatSearches += 5
                            let query = Array(batchQueries[0..<d])
                            // The HNSW index committed in this snapshot, if any.
                            if try s.index(id, name: "hnsw") != nil {
                                let index = try IndexCatalog.load(.hnsw, snapshot: s, head: id)
                                if index.count > n || index.count % batch != 0 {
                                    c.fail("stored index covers \(index.count) keys in a snapshot of \(n)")
                                } else {
                                    let r = try query.withUnsafeBufferPointer { try index.search($0, k: min(k, index.count), parameters: params, keys: keys) }
                                    SoakRows.validate(r.hits(0), query: query, limit: index.count, what: "hnsw", &c)
                                    c.hnswSearches += 1
                                }
                            }
                            // One HNSW instance searched by every reader at once.
                            if let index = shared.get() {
                                var p = params
                                p.threads = 2
                                let two = Array(batchQueries[0..<(2 * d)])
                                if index.count <= n {
                                    let r = try two.withUnsafeBufferPointer { try index.search($0, k: min(k, index.count), parameters: p, keys: keys) }
                                    SoakRows.validate(r.hits(0), query: query, limit: index.count, what: "shared hnsw", &c)
                                    c.sharedSearches += 1
                                } else {
                                    // Published after this snapshot began: the index must refuse the older keys.
                                    do {
                                        _ = try two.withUnsafeBufferPointer { try index.search($0, k: 1, parameters: p, keys: keys) }
                                        c.fail("an index over \(index.count) keys searched a snapshot of \(n)")
                                    } catch IndexError.corrupt(_) {
                                        c.refusedStale += 1
                                    }
                                }
                            }
                        }
                    } catch {
                        c.fail("reader error: \(error)")
                    }
                }
                results.update { $0 = $0 + c }
            }
        }
        readers.forEach { $0.start() }

        // The builder: extends its HNSW index to the newest snapshot, saves it (a second writer,
        // contending with the appender for LMDB's single write transaction), and publishes a copy.
        let building = Locked((extensions: 0, rebuilds: 0, seconds: 0.0, error: String?.none))
        let builder = Thread {
            var index: HNSWIndex?
            var rounds = 0
            do {
                while !stop.get() {
                    let t0 = monotonicSeconds()
                    let grew: Bool = try store.read { s in
                        let keys = try s.vectors(id, .keys)
                        rounds += 1
                        if rounds % 4 == 2 && keys.count <= 8000 && keys.count > 0 {
                            // Now and then a full rebuild from the snapshot instead.
                            var p = IndexBuildParameters()
                            p.M = 8
                            p.efConstruction = 32
                            p.threads = 2
                            index = try IndexCatalog.build(.hnsw, keys: keys, parameters: p) as? HNSWIndex
                            building.update { $0.rebuilds += 1 }
                            return true
                        }
                        if index == nil { index = try HNSWIndex(dimension: d, M: 8, efConstruction: 32, seed: 5, threads: 2) }
                        guard keys.count > index!.count else { return false }
                        try index!.add(keys: keys, range: index!.count..<min(keys.count, index!.count + 40 * batch))
                        building.update { $0.extensions += 1 }
                        return true
                    }
                    if grew {
                        try IndexCatalog.save(index!, in: store, head: id)
                        let copy = try store.read { s in try IndexCatalog.load(.hnsw, snapshot: s, head: id, copy: true) }
                        shared.update { $0 = copy as? HNSWIndex }
                    } else {
                        usleep(2000)
                    }
                    let spent = monotonicSeconds() - t0
                    building.update { $0.seconds += spent }
                }
            } catch {
                building.update { $0.error = "\(error)" }
            }
        }
        builder.start()

        // The appender: whole batches, one transaction each, paced so the head stays a size that
        // debug-build searches scan quickly.
        let deadline = monotonicSeconds() + seconds
        let maxRows = max(24_000, Int(seconds * 10_000))
        var appended = 0, appends = 0
        var writerError: Error?
        do {
            while monotonicSeconds() < deadline {
                if appended < maxRows {
                    let (k, v) = SoakRows.rows(appended..<(appended + batch))
                    try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try store.append(id, keys: kb, values: vb) } }
                    appended += batch
                    appends += 1
                }
                usleep(1000)
            }
        } catch {
            writerError = error
        }
        stop.update { $0 = true }
        while !builder.isFinished || readers.contains(where: { !$0.isFinished }) { usleep(1000) }
        #expect(writerError == nil, "appender: \(String(describing: writerError))")
        let b = building.get()
        #expect(b.error == nil, "builder: \(b.error ?? "")")

        // Reopened, the store holds exactly what was appended.
        let growths = store.environment.growthCount
        store.close()
        let reopened = try KVStore(path: dir.path)
        defer { reopened.close() }
        #expect(try reopened.info(id).count == appended)
        let (k, v) = SoakRows.rows(0..<appended)
        #expect(try reopened.copyVectors(id, .keys) == k)
        #expect(try reopened.copyVectors(id, .values) == v)

        let c = results.get()
        print("soak: \(String(format: "%.1f", seconds)) s; appender: \(appends) appends (\(appended) rows), \(growths) map growths, "
              + "builder: \(b.extensions) HNSW extensions and \(b.rebuilds) rebuilds saved; 3 readers: \(c.snapshots) snapshots, \(c.rowChecks) row checks, "
              + "\(c.flatSearches) flat, \(c.hnswSearches) stored-HNSW and \(c.sharedSearches) shared-HNSW searches, "
              + "\(c.refusedStale) stale-index refusals; failures: \(c.failures.count)")
        #expect(c.failures.isEmpty, "\(c.failures.joined(separator: "\n"))")
        #expect(c.snapshots >= 10 && appends >= 10 && b.extensions + b.rebuilds >= 1)
    }
}

extension ConcurrencySoakTests {
    /// Two processes on one store. This process holds it open with a 1 MiB map while `kvrecall ingest`
    /// (4 GiB map) writes past that size; LMDB then answers this process's next transaction with
    /// MDB_MAP_RESIZED. A write as the first transaction used to fail with that error (only reads
    /// adopted the new size). Then, while a second ingest runs, this process reads snapshots every
    /// half millisecond and checks each: whole transactions, keys and values agreeing, rows equal to
    /// the source.
    @Test func anotherProcessWritesAndGrowsTheMapUnderAnOpenStore() throws {
        let dir = TemporaryDirectory("kvrecall-two-processes")
        let rows = 12_000, rpt = 256
        let source = try IngestSource(dir: dir.path, rows: rows, queryRows: 512, d: 32, seed: 31)
        let path = dir.path + "/store"
        var options = Environment.Options()
        options.mapSize = 1 << 20
        let store = try KVStore(path: path, create: true, options: options)
        defer { store.close() }

        let first = try spawnKVRecall(source.ingestArguments(store: path, head: 0, rowsPerTransaction: rpt))
        try #require(first.status == 0, "\(first.stderr)")
        // The first transaction here after the other process grew the store is a write.
        try store.createHead(HeadID(head: 7), dimension: 32, dtype: .f16)
        let one = [Float](repeating: 0.5, count: 32)
        try one.withUnsafeBufferPointer { try store.append(HeadID(head: 0), keys: $0, values: $0) }
        #expect(try store.info(HeadID(head: 0)).count == rows + 1)

        var snapshots = 0, partial = 0
        var problems: [String] = []
        let second = try spawnKVRecall(source.ingestArguments(store: path, head: 1, rowsPerTransaction: rpt), killWhen: {
            do {
                try store.read { s in
                    guard let info = try s.heads().first(where: { $0.id == HeadID(head: 1) }) else { return }
                    snapshots += 1
                    let keys = try s.vectors(info.id, .keys), values = try s.vectors(info.id, .values)
                    guard keys.count == info.count, values.count == info.count, info.count % rpt == 0 || info.count == rows else {
                        problems.append("torn: \(info.count) \(keys.count) \(values.count)"); return
                    }
                    guard info.count > 0 else { return }
                    if info.count < rows { partial += 1 }
                    let last = info.count - 1
                    if keys.decode(rows: last..<info.count) != Array(source.keys[(last * 32)..<(info.count * 32)])
                        || values.decode(rows: last..<info.count) != Array(source.values[(last * 32)..<(info.count * 32)]) {
                        problems.append("row \(last) differs from the source")
                    }
                }
            } catch {
                problems.append("\(error)")
            }
            return false
        })
        #expect(second.status == 0, "\(second.stderr)")
        #expect(problems.isEmpty, "\(problems.prefix(5))")
        #expect(try source.verify(store, HeadID(head: 1), rowsPerTransaction: rpt) == .complete)
        print("two processes: \(snapshots) snapshots read here while another process ingested (\(partial) mid-ingest), map \(store.environment.mapSize >> 20) MiB after adopting")
    }
}

// MARK: - Store faults

/// Whether this process may mount file systems (root in a VM or a privileged container).
enum Mounts {
    static let available: Bool = {
        let dir = TemporaryDirectory("kvrecall-mount-probe")
        guard run("/bin/mount", ["-t", "tmpfs", "-o", "size=1m", "tmpfs", dir.path]) == 0 else { return false }
        _ = run("/bin/umount", [dir.path])
        return true
    }()

    @discardableResult
    static func run(_ tool: String, _ args: [String]) -> Int32 {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: FileManager.default.isExecutableFile(atPath: tool) ? tool : "/usr" + tool)
        p.arguments = args
        p.standardOutput = FileHandle.nullDevice
        p.standardError = FileHandle.nullDevice
        guard (try? p.run()) != nil else { return -1 }
        p.waitUntilExit()
        return p.terminationStatus
    }
}

/// A small store with two heads and an HNSW index, for fault tests.
func makeFaultStore(_ path: String) throws -> (keys: [Float], ids: [HeadID]) {
    var rng = SeededRandom(seed: 11)
    let keys = rng.gaussianMatrix(rows: 1500, dim: 16)
    let ids = [HeadID(layer: 0), HeadID(layer: 1, head: 2)]
    let store = try KVStore(path: path, create: true)
    defer { store.close() }
    for id in ids {
        try store.createHead(id, dimension: 16, dtype: .f32)
        try keys.withUnsafeBufferPointer { try store.append(id, keys: $0, values: $0, rowsPerTransaction: 500) }
    }
    let built = try store.read { s in
        var p = IndexBuildParameters()
        p.M = 8
        p.efConstruction = 32
        return try IndexCatalog.build(.hnsw, keys: try s.vectors(ids[0], .keys), parameters: p)
    }
    try IndexCatalog.save(built, in: store, head: ids[0])
    return (keys, ids)
}

@Suite struct StoreFaultTests {
    let sample = repositoryDataDirectory() + "/minilm"

    @Test func readOnlyOpenServesReadsAndRefusesEveryWrite() throws {
        let dir = TemporaryDirectory()
        let (keys, ids) = try makeFaultStore(dir.path)
        let before = fileBytes(dir.path + "/data.mdb")
        var options = Environment.Options()
        options.readOnly = true
        let store = try KVStore(path: dir.path, options: options)
        #expect(try store.copyVectors(ids[0], .keys) == keys)
        #expect(try store.loadIndex(ids[0], name: "hnsw") != nil)
        let one = [Float](repeating: 1, count: 16)
        let refusals: [(String, () throws -> Void)] = [
            ("createHead", { try store.createHead(HeadID(layer: 7), dimension: 16, dtype: .f32) }),
            ("append", { try one.withUnsafeBufferPointer { try store.append(ids[0], keys: $0, values: $0) } }),
            ("appendQueries", { try one.withUnsafeBufferPointer { try store.appendQueries(ids[0], queries: $0) } }),
            ("saveIndex", { try store.saveIndex(ids[0], name: "x", sections: ["a": [1]]) }),
            ("dropIndex", { try store.dropIndex(ids[0], name: "hnsw") }),
            ("dropHead", { try store.dropHead(ids[1]) }),
        ]
        for (name, body) in refusals {
            #expect(throws: StoreError.self, "\(name) on a read-only store") { try body() }
            do { try body() } catch let e as StoreError { #expect(e.kind == .readOnly, "\(name): \(e)") }
        }
        store.close()
        #expect(fileBytes(dir.path + "/data.mdb") == before)
        #expect { try KVStore(path: dir.path + "/new", create: true, options: options) } throws: {
            ($0 as? StoreError)?.kind == .readOnly
        }
    }

    /// The store directory on a read-only bind mount: reads work (LMDB opens without its lock file's
    /// write access), every write is a clear "Read-only file system" error, nothing changes.
    @Test(.enabled(if: Mounts.available, "needs mount (root)"))
    func readOnlyMountGivesClearErrors() throws {
        let dir = TemporaryDirectory()
        let src = dir.path + "/src", mnt = dir.path + "/ro"
        let (keys, ids) = try makeFaultStore(src)
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        try #require(Mounts.run("/bin/mount", ["--bind", src, mnt]) == 0)
        defer { Mounts.run("/bin/umount", ["-l", mnt]) }
        try #require(Mounts.run("/bin/mount", ["-o", "remount,bind,ro", mnt]) == 0)
        let before = fileBytes(src + "/data.mdb")

        let info = try spawnKVRecall(["info", "--store", mnt, "--json"])
        #expect(info.status == 0, "\(info.stderr)")
        let queryFile = dir.path + "/q.npy"
        try NPY.write(Tensor(name: "q", shape: [2, 16], dtype: .f32, floats: Array(keys[0..<32])), to: queryFile)
        for index in ["flat", "hnsw"] {
            let query = try spawnKVRecall(["query", "--store", mnt, "--queries", queryFile, "-k", "3", "--index", index, "--json"])
            #expect(query.status == 0, "\(query.stderr)")
        }
        for args in [["ingest", "--store", mnt, "--keys", sample + "/keys.npy", "--values", sample + "/values.npy", "--quiet"],
                     ["build", "--store", mnt, "--index", "hnsw", "--quiet"],
                     ["ingest", "--store", mnt + "/sub", "--keys", sample + "/keys.npy", "--values", sample + "/values.npy"]] {
            let r = try spawnKVRecall(args)
            #expect(r.failedCleanly, "\(args[0]): \(r.status) \(r.stderr)")
            #expect(r.stderr.lowercased().contains("read-only") || r.stderr.lowercased().contains("read only"), "\(r.stderr)")
        }
        #expect { try KVStore(path: mnt) } throws: { ($0 as? StoreError)?.kind == .readOnly }
        var options = Environment.Options()
        options.readOnly = true
        let store = try KVStore(path: mnt, options: options)
        #expect(try store.copyVectors(ids[1], .values) == keys)
        store.close()
        #expect(fileBytes(src + "/data.mdb") == before)
    }

    /// A data.mdb cut short used to crash every command with SIGBUS (LMDB reads pages through the
    /// map); now opening is a clear error. Checked in a child process first, so a regression fails
    /// the test instead of killing the test runner.
    @Test func truncatedDataFileIsAClearErrorNotACrash() throws {
        let dir = TemporaryDirectory()
        let good = dir.path + "/good"
        let (keys, ids) = try makeFaultStore(good)
        let size = fileBytes(good + "/data.mdb")!.count
        var sizes = [0, 1, 100, 4095, 4096, 8191, 8192, 12288, 16384, size / 3, size / 2, size - 4096, size - 1]
        sizes = sizes.filter { $0 < size }
        for cut in sizes {
            let path = dir.path + "/cut-\(cut)"
            try FileManager.default.copyItem(atPath: good, toPath: path)
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path + "/data.mdb"))
            try handle.truncate(atOffset: UInt64(cut))
            try handle.close()
            var crashed = false
            for args in [["info", "--store", path], ["query", "--store", path, "--layer", "1", "--head", "2", "--queries", path + "/none.npy"]] {
                let r = try spawnKVRecall(args, timeout: 60)
                #expect(r.failedCleanly, "\(args[0]) on data.mdb cut to \(cut) bytes: status \(r.status), signalled \(r.signalled): \(r.stderr)")
                #expect(r.stderr.contains(path), "\(r.stderr)")
                crashed = crashed || r.signalled
            }
            if crashed { continue }  // opening it here would take the test runner down too
            #expect(throws: StoreError.self, "opening data.mdb cut to \(cut) bytes") { try KVStore(path: path) }
            // An ingest must not write into a truncated store (a 0-byte file is a creation that never
            // wrote anything: ingest creates the store there).
            let ingest = try spawnKVRecall(["ingest", "--store", path, "--keys", sample + "/keys.npy", "--values", sample + "/values.npy", "--quiet"])
            if cut == 0 {
                #expect(ingest.status == 0, "\(ingest.stderr)")
            } else {
                #expect(ingest.failedCleanly, "ingest into data.mdb cut to \(cut) bytes: \(ingest.stderr)")
                #expect(fileBytes(path + "/data.mdb")?.count == cut)
            }
        }
        // Extra bytes past the last page are harmless.
        let grown = dir.path + "/grown"
        try FileManager.default.copyItem(atPath: good, toPath: grown)
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: grown + "/data.mdb"))
        try handle.truncate(atOffset: UInt64(size + 1 << 20))
        try handle.close()
        let store = try KVStore(path: grown)
        #expect(try store.copyVectors(ids[0], .keys) == keys)
        store.close()
    }

    /// What a process killed while creating a store leaves: a 0-byte data.mdb (killed before LMDB
    /// wrote its meta pages) or an LMDB environment without databases (killed before the first
    /// commit). Opening without create is a clear .notAStore error (it used to be "Bad file
    /// descriptor" and "not a KVRecall store"); creating finishes the store.
    @Test func aStoreWhoseCreationWasInterruptedIsFinishedByTheNextCreate() throws {
        let dir = TemporaryDirectory()
        let zero = dir.path + "/zero", empty = dir.path + "/empty"
        try FileManager.default.createDirectory(atPath: zero, withIntermediateDirectories: true)
        _ = FileManager.default.createFile(atPath: zero + "/data.mdb", contents: nil)
        try FileManager.default.createDirectory(atPath: empty, withIntermediateDirectories: true)
        try Environment(path: empty).close()
        var readOnly = Environment.Options()
        readOnly.readOnly = true
        for path in [zero, empty] {
            #expect { try KVStore(path: path) } throws: { error in
                let e = error as? StoreError
                return e?.kind == .notAStore && e?.message.contains("creation was interrupted") == true
            }
            #expect { try KVStore(path: path, options: readOnly) } throws: { ($0 as? StoreError)?.kind == .notAStore }
            let info = try spawnKVRecall(["info", "--store", path])
            #expect(info.failedCleanly && info.stderr.contains("creation was interrupted"), "\(info.stderr)")
            let store = try KVStore(path: path, create: true)
            try store.createHead(HeadID(), dimension: 4, dtype: .f32)
            store.close()
            #expect(try KVStore(path: path, options: readOnly).heads().count == 1)
        }
    }

    @Test func appendRefusesZeroRowsPerTransaction() throws {
        let dir = TemporaryDirectory()
        let store = try KVStore(path: dir.path, create: true)
        defer { store.close() }
        try store.createHead(HeadID(), dimension: 2, dtype: .f32)
        let two = [Float](repeating: 1, count: 2)
        // It used to loop for ever.
        #expect { try two.withUnsafeBufferPointer { try store.append(HeadID(), keys: $0, values: $0, rowsPerTransaction: 0) } } throws: {
            ($0 as? StoreError)?.kind == .invalidArgument
        }
        let cli = try spawnKVRecall(["ingest", "--store", dir.path, "--keys", sample + "/keys.npy", "--values", sample + "/values.npy",
                                     "--rows-per-transaction", "0"])
        #expect(cli.failedCleanly && cli.stderr.contains("--rows-per-transaction"), "\(cli.stderr)")
    }

    /// Foreign LMDB files, non-LMDB files, a plain file as the store and a store from a future format:
    /// every command fails with a clear message naming the path and writes nothing.
    @Test func foreignGarbageAndFutureStoresAreRefusedAndLeftUntouched() throws {
        let dir = TemporaryDirectory()
        let foreign = dir.path + "/foreign"
        try FileManager.default.createDirectory(atPath: foreign, withIntermediateDirectories: true)
        let env = try Environment(path: foreign)
        try env.write { txn in
            let dbi = try env.database("other", txn: txn.txn, create: true)
            try txn.put(dbi, Array("k".utf8), Array("v".utf8))
        }
        env.close()
        let garbage = dir.path + "/garbage"
        try FileManager.default.createDirectory(atPath: garbage, withIntermediateDirectories: true)
        var rng = SeededRandom(seed: 3)
        try Data((0..<40_000).map { _ in UInt8(truncatingIfNeeded: rng.next()) }).write(to: URL(fileURLWithPath: garbage + "/data.mdb"))
        let future = dir.path + "/future"
        _ = try makeFaultStore(future)
        do {
            let store = try KVStore(path: future)
            try store.environment.write { txn in
                try txn.put(store.metaDB, Array("version".utf8), [0, 0, 0, UInt8(KVStore.formatVersion + 1)])
            }
            store.close()
        }
        let plainFile = dir.path + "/plain"
        try Data("hello".utf8).write(to: URL(fileURLWithPath: plainFile))

        let cases: [(String, String)] = [(foreign, "not a KVRecall store"), (garbage, "not an LMDB file"),
                                         (future, "upgrade kvrecall"), (plainFile, "not a directory")]
        for (path, message) in cases {
            let before = fileBytes(path + "/data.mdb") ?? fileBytes(path)
            for args in [["info", "--store", path],
                         ["ingest", "--store", path, "--keys", sample + "/keys.npy", "--values", sample + "/values.npy", "--quiet"],
                         ["build", "--store", path, "--index", "hnsw", "--quiet"],
                         ["query", "--store", path, "--queries", sample + "/queries.npy"]] {
                let r = try spawnKVRecall(args)
                #expect(r.failedCleanly, "\(args[0]) on \(path): \(r.stderr)")
                #expect(r.stderr.contains(message) && r.stderr.contains(path), "\(args[0]): \(r.stderr)")
            }
            #expect((fileBytes(path + "/data.mdb") ?? fileBytes(path)) == before, "\(path) was modified")
        }
    }

    /// A full map (growth disabled, or growth at its cap) fails the append with a clear error and
    /// leaves the committed prefix; the store reopens with growth and the ingest can go on.
    @Test func fullMapLeavesTheCommittedPrefix() throws {
        let dir = TemporaryDirectory()
        let d = 8, rows = 40_000, rpt = 1000
        var rng = SeededRandom(seed: 5)
        let keys = rng.gaussianMatrix(rows: rows, dim: d)
        for capped in [false, true] {
            let path = dir.path + "/\(capped)"
            var options = Environment.Options()
            options.mapSize = 512 * 1024
            if capped { options.maxMapSize = 1 << 20 } else { options.growth = false }
            let store = try KVStore(path: path, create: true, options: options)
            try store.createHead(HeadID(), dimension: d, dtype: .f32)
            #expect {
                try keys.withUnsafeBufferPointer { try store.append(HeadID(), keys: $0, values: $0, rowsPerTransaction: rpt) }
            } throws: { error in
                let e = error as? StoreError
                return e?.kind == .mapFull && e?.code == MDB_MAP_FULL && e?.description.contains(path) == true
            }
            let committed = try store.info(HeadID()).count
            #expect(committed > 0 && committed < rows && committed % rpt == 0)
            // Still usable for reads and for writes that fit.
            #expect(try store.copyVectors(HeadID(), .keys) == Array(keys[0..<(committed * d)]))
            try store.saveIndex(HeadID(), name: "tiny", sections: ["a": [1, 2, 3]])
            store.close()

            let reopened = try KVStore(path: path)
            #expect(try reopened.info(HeadID()).count == committed)
            try keys.withUnsafeBufferPointer { kb in
                let rest = UnsafeBufferPointer(rebasing: kb[(committed * d)...])
                try reopened.append(HeadID(), keys: rest, values: rest, rowsPerTransaction: rpt)
            }
            #expect(try reopened.copyVectors(HeadID(), .values) == keys)
            #expect(try reopened.loadIndex(HeadID(), name: "tiny")?["a"]?.array == [1, 2, 3])
            reopened.close()
        }
    }

    /// A real full disk: a 4 MiB tmpfs and an 8 MiB ext4 image (when mount works). The ingest fails
    /// with "No space left on device", and the store still opens with the committed prefix.
    @Test(.enabled(if: Mounts.available, "needs mount (root)"), arguments: ["tmpfs", "ext4"])
    func fullDiskLeavesTheCommittedPrefix(fileSystem: String) throws {
        let dir = TemporaryDirectory()
        let mnt = dir.path + "/mnt"
        try FileManager.default.createDirectory(atPath: mnt, withIntermediateDirectories: true)
        if fileSystem == "tmpfs" {
            try #require(Mounts.run("/bin/mount", ["-t", "tmpfs", "-o", "size=4m", "tmpfs", mnt]) == 0)
        } else {
            let image = dir.path + "/fs.img"
            _ = FileManager.default.createFile(atPath: image, contents: nil)
            let h = try FileHandle(forWritingTo: URL(fileURLWithPath: image))
            try h.truncate(atOffset: 8 << 20)
            try h.close()
            guard Mounts.run("/sbin/mkfs.ext4", ["-q", "-F", image]) == 0 else {
                print("full disk: mkfs.ext4 unavailable, ext4 case skipped")
                return
            }
            guard Mounts.run("/bin/mount", ["-o", "loop", image, mnt]) == 0 else {
                print("full disk: no loop device here, ext4 case skipped")
                return
            }
        }
        defer { Mounts.run("/bin/umount", ["-l", mnt]) }

        let rows = 40_000, d = 32, rpt = 1000
        let source = try IngestSource(dir: dir.path, rows: rows, queryRows: 1000, d: d, seed: 21)  // 2 x 5 MB
        let path = mnt + "/store"
        let r = try spawnKVRecall(source.ingestArguments(store: path, head: 0, rowsPerTransaction: rpt))
        #expect(r.failedCleanly, "\(r.stderr)")
        // LMDB reports the short write of a full file system as EIO; the error adds the free space.
        #expect(r.stderr.contains("bytes free: the disk is probably full") && r.stderr.contains(path), "\(r.stderr)")

        let info = try spawnKVRecall(["info", "--store", path, "--json"])
        #expect(info.status == 0, "\(info.stderr)")
        let store = try KVStore(path: path)
        let state = try source.verify(store, HeadID(), rowsPerTransaction: rpt)
        #expect(state == .partialKeys || state == .emptyHead, "\(state)")
        // Creating another store on the full file system fails cleanly too (a failed first commit
        // used to be aborted after LMDB had already freed it).
        for attempt in 0..<3 {
            let other = try spawnKVRecall(source.ingestArguments(store: mnt + "/other-\(attempt)", head: 0, rowsPerTransaction: rpt))
            #expect(other.failedCleanly, "\(other.stderr)")
        }
        print("full disk (\(fileSystem)): ingest stopped at \(try store.info(HeadID()).count) of \(rows) rows: \(r.stderr.trimmingCharacters(in: .whitespacesAndNewlines))")
        store.close()
    }
}
