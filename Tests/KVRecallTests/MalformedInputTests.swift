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

// Malformed input (issue 7): a generated corpus of bad .npy and .safetensors files, run through the
// parsers in-process (all of them) and through `kvrecall ingest` (a sample), plus a deterministic
// mutation fuzzer for both parsers. Longer fuzzing: KVRECALL_FUZZ_ITERATIONS / KVRECALL_FUZZ_SECONDS,
// or the libFuzzer targets in Tools/fuzz.
//
//   KVRECALL_FUZZ_ITERATIONS  mutated inputs per parser (default 20000)
//   KVRECALL_FUZZ_SECONDS     time cap per parser (default 8)
//   KVRECALL_FUZZ_SEED        seed (default 1)

// MARK: - Seeds and corpus

/// One generated input: the bytes, what it exercises, and whether ingest must refuse it.
struct CorpusFile {
    let name: String
    let category: String
    let bytes: [UInt8]
    /// Known bad: the parser or ingest validation must refuse it. Otherwise (mutations that may stay
    /// valid) it must either parse to a valid tensor or be refused: never crash or hang.
    let mustFail: Bool
    var isSafetensors: Bool { name.hasSuffix(".safetensors") }
}

enum MalformedCorpus {
    static let d = 4, rows = 6

    static func floats(_ seed: UInt64, _ count: Int) -> [Float] {
        var rng = SeededRandom(seed: seed)
        return (0..<count).map { _ in rng.gaussian() }
    }

    /// Valid seeds: f32 and f16 `.npy` (v1, plus a v2 and v3 header), and a safetensors file with
    /// F32, F16 and BF16 tensors and metadata.
    static func npySeeds() -> [[UInt8]] {
        let f32 = try! NPY.encode(Tensor(name: "k", shape: [rows, d], dtype: .f32, floats: floats(1, rows * d)))
        let f16 = try! NPY.encode(Tensor(name: "k", shape: [2, 3, d], dtype: .f16, floats: floats(2, 6 * d)))
        return [f32, f16, reversion(f32, major: 2), reversion(f32, major: 3)]
    }

    /// The same header and payload with a v2/v3 4-byte length field.
    static func reversion(_ v1: [UInt8], major: UInt8) -> [UInt8] {
        let length = Int(v1[8]) | Int(v1[9]) << 8
        var out = Array(v1[0..<6]) + [major, 0]
        withUnsafeBytes(of: UInt32(length).littleEndian) { out += $0 }
        return out + Array(v1[10...])
    }

    static func safetensorsSeed() -> [UInt8] {
        try! Safetensors.encode(tensors: [
            Tensor(name: "k", shape: [rows, d], dtype: .f32, floats: floats(3, rows * d)),
            Tensor(name: "v", shape: [rows, d], dtype: .f16, floats: floats(4, rows * d)),
            Tensor(name: "q", shape: [2, rows, d], dtype: .bf16, floats: floats(5, 2 * rows * d)),
        ], metadata: ["format": "pt"])
    }

    static func npy(header: String, major: UInt8 = 1, payload: [UInt8]) -> [UInt8] {
        var text = Array(header.utf8)
        let prelude = major == 1 ? 10 : 12
        text += [UInt8](repeating: 0x20, count: (64 - (prelude + text.count + 1) % 64) % 64) + [0x0A]
        var out: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, major, 0]
        if major == 1 { withUnsafeBytes(of: UInt16(text.count).littleEndian) { out += $0 } }
        else { withUnsafeBytes(of: UInt32(text.count).littleEndian) { out += $0 } }
        return out + text + payload
    }

    static func dict(_ descr: String = "<f4", fortran: String = "False", shape: String = "(6, 4)") -> String {
        "{'descr': '\(descr)', 'fortran_order': \(fortran), 'shape': \(shape), }"
    }

    static func safetensors(_ json: String, data: [UInt8]) -> [UInt8] {
        var header = Array(json.utf8)
        header += [UInt8](repeating: 0x20, count: (8 - header.count % 8) % 8)
        var out: [UInt8] = []
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { out += $0 }
        return out + header + data
    }

    static func entry(_ dtype: String = "F32", _ shape: String = "[6,4]", _ offsets: String = "[0,96]") -> String {
        "{\"dtype\":\"\(dtype)\",\"shape\":\(shape),\"data_offsets\":\(offsets)}"
    }

    /// Puts a NaN or an Inf into row `row` of an f32/f16/bf16 payload.
    static func poison(_ payload: [UInt8], width: Int, row: Int, bits: UInt32) -> [UInt8] {
        var out = payload
        let at = (row * d + 1) * width
        if width == 4 { withUnsafeBytes(of: bits.littleEndian) { for i in 0..<4 { out[at + i] = $0[i] } } }
        else { out[at] = UInt8(bits & 0xFF); out[at + 1] = UInt8(bits >> 8) }
        return out
    }

    static func generate() -> [CorpusFile] {
        var files: [CorpusFile] = []
        func add(_ category: String, _ ext: String, _ bytes: [UInt8], mustFail: Bool = true) {
            files.append(CorpusFile(name: "\(files.count)-\(category).\(ext)", category: category, bytes: bytes, mustFail: mustFail))
        }
        let npySeed = npySeeds()[0]
        let npyHeaderEnd = 10 + (Int(npySeed[8]) | Int(npySeed[9]) << 8)
        let payload = Array(npySeed[npyHeaderEnd...])
        let st = safetensorsSeed()
        let stHeaderEnd = 8 + st[0..<8].enumerated().reduce(0) { $0 | Int($1.1) << (8 * $1.0) }
        let stData = Array(st[stHeaderEnd...])

        // Truncated at every header offset and at a spread of payload offsets.
        for seed in npySeeds() {
            let end = seed[6] == 1 ? 10 + (Int(seed[8]) | Int(seed[9]) << 8) : 12 + (Int(seed[8]) | Int(seed[9]) << 8)
            for cut in Array(0..<end) + [end, end + 1, end + 7, (end + seed.count) / 2, seed.count - 1] {
                add("npy-truncated", "npy", Array(seed.prefix(cut)))
            }
        }
        for cut in Array(0..<stHeaderEnd) + [stHeaderEnd, stHeaderEnd + 1, stHeaderEnd + 95, (stHeaderEnd + st.count) / 2, st.count - 1] {
            add("st-truncated", "safetensors", Array(st.prefix(cut)))
        }
        // Every header byte replaced by a set of significant values (may stay valid).
        let replacements: [UInt8] = [0x00, 0xFF, 0x80, 0x0A] + Array(" (]},:'\"9-x".utf8)
        for (seed, headerEnd) in [(npySeed, npyHeaderEnd)] {
            for at in 0..<headerEnd { for b in replacements where b != seed[at] {
                var m = seed; m[at] = b; add("npy-mutated", "npy", m, mustFail: false)
            } }
        }
        for at in 0..<stHeaderEnd { for b in replacements where b != st[at] {
            var m = st; m[at] = b; add("st-mutated", "safetensors", m, mustFail: false)
        } }

        // .npy: huge shapes, wrong dtypes, wrong order, bad versions and lengths, NaN/Inf rows.
        for shape in ["(1099511627777, 4)", "(4611686018427387904, 2)", "(99999999999999999999999, 4)", "(1048576, 1048576)",
                      "(1099511627776, 1099511627776)", "(-6, 4)", "(0, 4)", "(6, 0)", "(24,)", "()", "(1, 2, 3, 4)",
                      "(1, 1, 1, 1, 1, 1, 1, 1, 1, 24)", "[6, 4]", "('6', 4)", "(6.0, 4)", "(6, 4, 1, 1, 1, 1, 1, 1, 1)"] {
            add("npy-bad-shape", "npy", npy(header: dict(shape: shape), payload: payload))
        }
        for descr in ["<f8", "<i4", ">f4", ">f2", "|O", "O", "<c8", "<U4", "|b1", "<i8", "|u1", "<m8", "f", "<f3", ""] {
            add("npy-bad-dtype", "npy", npy(header: dict(descr), payload: payload))
        }
        add("npy-bad-dtype", "npy", npy(header: "{'descr': [('a', '<f4'), ('b', '<f4')], 'fortran_order': False, 'shape': (6, 2), }", payload: payload))
        add("npy-fortran", "npy", npy(header: dict(fortran: "True"), payload: payload))
        add("npy-fortran", "npy", npy(header: dict(fortran: "1"), payload: payload))
        for (major, minor) in [(0, 0), (4, 0), (1, 1), (2, 5), (255, 255)] {
            var m = npySeed; m[6] = UInt8(major); m[7] = UInt8(minor); add("npy-bad-version", "npy", m)
        }
        for length: UInt16 in [0, 1, 0xFFFF, UInt16(npyHeaderEnd - 9), UInt16(npyHeaderEnd)] {
            var m = npySeed; m[8] = UInt8(length & 0xFF); m[9] = UInt8(length >> 8); add("npy-bad-length", "npy", m)
        }
        add("npy-bad-length", "npy", npy(header: String(repeating: " ", count: 70_000), major: 2, payload: payload))
        add("npy-bad-header", "npy", npy(header: String(repeating: "(", count: 60_000), payload: payload))
        add("npy-bad-header", "npy", npy(header: "{'descr': '<f4', 'fortran_order': False, 'shape': (6, 4), 'shape': (6, 4)}", payload: payload))
        add("npy-bad-header", "npy", npy(header: "{'descr': '<f4', 'fortran_order': False}", payload: payload))
        add("npy-bad-header", "npy", npy(header: "{'descr': '<f4\0', 'fortran_order': False, 'shape': (6, 4)}", payload: payload))
        add("npy-bad-header", "npy", npy(header: "__import__('os').system('true')", payload: payload))
        add("npy-payload", "npy", npySeed + [0])
        add("npy-payload", "npy", npySeed + [UInt8](repeating: 0, count: 96))
        add("npy-bad-magic", "npy", [0x93] + Array("NUMPZ".utf8) + Array(npySeed[6...]))
        add("npy-bad-magic", "npy", Array("PK\u{3}\u{4}".utf8) + npySeed)
        for (row, bits) in [(0, UInt32(0x7FC0_0000)), (3, 0x7F80_0000), (5, 0xFF80_0000), (2, 0x7F80_0001)] {
            add("npy-non-finite", "npy", npy(header: dict(), payload: poison(payload, width: 4, row: row, bits: bits)))
        }
        let halfPayload = Array(npySeeds()[1][(10 + (Int(npySeeds()[1][8]) | Int(npySeeds()[1][9]) << 8))...])
        add("npy-non-finite", "npy", npy(header: dict("<f2", shape: "(2, 3, 4)"), payload: poison(halfPayload, width: 2, row: 4, bits: 0x7E00)))
        add("npy-non-finite", "npy", npy(header: dict("<f2", shape: "(2, 3, 4)"), payload: poison(halfPayload, width: 2, row: 1, bits: 0xFC00)))

        // .safetensors: the same families. The ingest check reads tensor "k".
        let k96 = Array(stData[0..<96])
        for (dtype, shape, offsets) in [("F64", "[6,2]", "[0,96]"), ("I32", "[6,4]", "[0,96]"), ("BOOL", "[96,1]", "[0,96]"),
                                        ("U8", "[6,16]", "[0,96]"), ("F8_E4M3", "[24,4]", "[0,96]"), ("Q8", "[6,4]", "[0,96]"),
                                        ("f32", "[6,4]", "[0,96]"), ("F32", "[24]", "[0,96]"), ("F32", "[1,2,3,4]", "[0,96]"),
                                        ("F32", "[0,4]", "[0,0]"), ("F32", "[6,4]", "[0,92]"), ("F32", "[6,4]", "[96,0]"),
                                        ("F32", "[9223372036854775807,2]", "[0,96]"), ("F32", "[1099511627777,1]", "[0,96]"),
                                        ("F32", "[-6,4]", "[0,96]"), ("F32", "[6.0,4]", "[0,96]"), ("F32", "[6,4]", "[0,96.0]"),
                                        ("F32", "[6,4]", "[0,-96]"), ("F32", "[6,4]", "[0,18446744073709551616]"),
                                        ("F32", "[6,4]", "[0]"), ("F32", "[\"6\",4]", "[0,96]")] {
            let data = dtype == "F32" && shape == "[0,4]" ? [] : k96
            add("st-bad-entry", "safetensors", safetensors("{\"k\":\(entry(dtype, shape, offsets))}", data: data))
        }
        add("st-bad-layout", "safetensors", safetensors("{\"k\":\(entry()),\"v\":\(entry("F32", "[6,4]", "[48,144]"))}", data: k96 + k96))
        add("st-bad-layout", "safetensors", safetensors("{\"k\":\(entry())}", data: k96 + [0]))
        add("st-bad-layout", "safetensors", safetensors("{\"k\":\(entry("F32", "[6,4]", "[8,104]"))}", data: [UInt8](repeating: 0, count: 8) + k96))
        for json in ["", "{", "[]", "null", "{\"k\":\(entry())", "{\"k\":\(entry()),}", "{\"k\":\(entry()),\"k\":\(entry())}",
                     "{\"k\":{\"dtype\":\"F32\",\"shape\":[6,4]}}", "{\"k\":{\"dtype\":\"F32\",\"shape\":[6,4],\"data_offsets\":[0,96],\"x\":0}}",
                     "{\"__metadata__\":{\"a\":1},\"k\":\(entry())}", "{\"k\\ud800\":\(entry())}",
                     String(repeating: "[", count: 200_000), String(repeating: "{\"a\":", count: 5000)] {
            add("st-bad-header", "safetensors", safetensors(json, data: k96))
        }
        add("st-bad-header", "safetensors", safetensors("{\"k\":\(entry())}", data: k96).enumerated().map { $0.0 == 10 ? 0xFF : $0.1 })
        for length: UInt64 in [0, 1, 7, UInt64(stHeaderEnd - 7), UInt64(st.count), 100_000_001, 1 << 63, UInt64.max] {
            var m = st
            withUnsafeBytes(of: length.littleEndian) { for i in 0..<8 { m[i] = $0[i] } }
            add("st-bad-length", "safetensors", m)
        }
        for (row, bits) in [(0, UInt32(0x7FC0_0000)), (5, 0xFF80_0000)] {
            add("st-non-finite", "safetensors", safetensors("{\"k\":\(entry())}", data: poison(k96, width: 4, row: row, bits: bits)))
        }
        add("st-non-finite", "safetensors",
            safetensors("{\"k\":\(entry("BF16", "[6,4]", "[0,48]"))}", data: poison(Array(k96[0..<48]), width: 2, row: 2, bits: 0x7FC0)))
        add("st-non-finite", "safetensors",
            safetensors("{\"k\":\(entry("F16", "[6,4]", "[0,48]"))}", data: poison(Array(k96[0..<48]), width: 2, row: 3, bits: 0x7C00)))
        return files
    }
}

/// What ingest does with one input file, in-process: parse, take tensor "k" of a safetensors file,
/// validate as keys and values. Returns the error, or nil when the file is accepted.
func ingestCheck(_ file: CorpusFile, path: String) throws -> FormatError? {
    do {
        let tensor: Tensor
        if file.isSafetensors {
            tensor = try Safetensors.read(path: path).tensor(named: "k")
        } else {
            tensor = try NPY.read(path: path)
        }
        try KVStore.validateIngest(keys: tensor, keysPath: path, values: tensor, valuesPath: path,
                                   queries: nil, queriesPath: nil, allowNonFinite: false)
        return nil
    } catch let error as FormatError {
        return error
    }
}

@Suite struct MalformedInputTests {
    /// Every generated input through ingest's parse-and-validate, in memory; the known-bad ones and a
    /// quarter of the mutations also as files through the file readers. Known-bad inputs are all refused
    /// with a one-line FormatError that starts with the path, the file and memory paths reach the same
    /// verdict with the same message, and nothing crashes or hangs.
    @Test func everyGeneratedFileIsRefusedOrParsedNeverCrashes() throws {
        let corpus = MalformedCorpus.generate()
        // Thousands of small files: on a memory file system when there is one.
        let base = FileManager.default.isWritableFile(atPath: "/dev/shm") ? "/dev/shm/" : NSTemporaryDirectory()
        let dir = base + "kvrecall-corpus-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var refused: [String: Int] = [:], accepted: [String: Int] = [:], onDisk = 0
        for (i, file) in corpus.enumerated() {
            let path = dir + "/" + file.name
            var fromFile: FormatError? = nil
            let viaFile = file.mustFail || i % 4 == 0
            if viaFile {
                try Data(file.bytes).write(to: URL(fileURLWithPath: path))
                fromFile = try ingestCheck(file, path: path)
                onDisk += 1
            }
            // The in-memory parser (ingest's checks on a parsed image).
            let memory: FormatError?
            do {
                if file.isSafetensors {
                    let t = try Safetensors.parse(file.bytes, path: path).tensor(named: "k")
                    try KVStore.validateIngest(keys: t, keysPath: path, values: t, valuesPath: path, queries: nil, queriesPath: nil, allowNonFinite: false)
                } else {
                    let t = try NPY.parse(file.bytes, path: path)
                    try KVStore.validateIngest(keys: t, keysPath: path, values: t, valuesPath: path, queries: nil, queriesPath: nil, allowNonFinite: false)
                }
                memory = nil
            } catch let e as FormatError {
                memory = e
            }
            if viaFile {
                #expect(memory?.description == fromFile?.description,
                        "\(file.name): file \(String(describing: fromFile)) vs memory \(String(describing: memory))")
            }
            if let error = viaFile ? fromFile : memory {
                refused[file.category, default: 0] += 1
                #expect(error.description.hasPrefix(path + ": "), "\(error)")
                #expect(!error.description.contains("\n"), "\(file.name): \(error)")
            } else {
                accepted[file.category, default: 0] += 1
                #expect(!file.mustFail, "\(file.name) was accepted")
            }
        }
        let categories = Set(corpus.map(\.category)).sorted()
        print("malformed corpus: \(corpus.count) inputs (\(corpus.filter(\.mustFail).count) known bad; \(onDisk) also as files); "
              + categories.map { "\($0) \(refused[$0] ?? 0) refused/\(accepted[$0] ?? 0) accepted" }.joined(separator: ", "))
    }

    /// A sample of the corpus (two of each known-bad category) through `kvrecall ingest`: a non-zero
    /// exit, an error line naming the file, no signal, no hang, and no store written.
    @Test func ingestRefusesASampleWithAClearErrorAndANonZeroExit() throws {
        let corpus = MalformedCorpus.generate().filter(\.mustFail)
        var sample: [CorpusFile] = []
        for category in Set(corpus.map(\.category)).sorted() {
            let members = corpus.filter { $0.category == category }
            sample += [members[members.count / 3], members[(2 * members.count) / 3]]
        }
        let dir = TemporaryDirectory("kvrecall-corpus-cli")
        var slowest = 0.0
        for file in sample {
            let path = dir.path + "/" + file.name
            try Data(file.bytes).write(to: URL(fileURLWithPath: path))
            let store = dir.path + "/store-" + file.name
            var args = ["ingest", "--store", store, "--keys", path, "--values", path, "--quiet"]
            if file.isSafetensors { args += ["--keys-tensor", "k", "--values-tensor", "k"] }
            let r = try spawnKVRecall(args, timeout: 60)
            slowest = max(slowest, r.seconds)
            #expect(r.failedCleanly, "\(file.name): status \(r.status), signalled \(r.signalled), timed out \(r.timedOut): \(r.stderr)")
            #expect(r.stderr.hasPrefix("Error: ") && r.stderr.contains(path), "\(file.name): \(r.stderr)")
            #expect(!FileManager.default.fileExists(atPath: store), "\(file.name): a store was created")
        }
        print("malformed corpus via CLI: \(sample.count) files refused, slowest \(String(format: "%.2f", slowest)) s")
    }

    // MARK: Fuzzing

    /// Seeded mutations of valid `.npy` images (bit flips, interesting bytes, dictionary tokens in
    /// the header, inserted/deleted/duplicated ranges, truncation, rewritten length fields, stacked
    /// 1-4 deep). Every input must be refused with a FormatError naming the path, or parse to a tensor
    /// that re-encodes and re-parses to itself.
    @Test func fuzzNPYParser() throws {
        let stats = try fuzz(seeds: MalformedCorpus.npySeeds(), salt: 1) { bytes in
            let t = try NPY.parse(bytes, path: "fuzz.npy")
            _ = t.floats()
            _ = t.firstNonFinite()
            if t.dtype != .bf16 {
                let again = try NPY.parse(try NPY.encode(t), path: "fuzz.npy")
                #expect(again.shape == t.shape && again.dtype == t.dtype && again.data == t.data)
            }
        }
        print("fuzz npy: \(stats)")
    }

    @Test func fuzzSafetensorsParser() throws {
        let stats = try fuzz(seeds: [MalformedCorpus.safetensorsSeed()], salt: 2) { bytes in
            let file = try Safetensors.parse(bytes, path: "fuzz.safetensors")
            var tensors: [Tensor] = []
            var firstError: Error?
            for name in file.names() {
                do {
                    let t = try file.tensor(named: name)
                    _ = t.floats()
                    _ = t.firstNonFinite()
                    tensors.append(t)
                } catch {
                    firstError = firstError ?? error
                }
            }
            if tensors.count == file.entries.count, !tensors.isEmpty {
                let again = try Safetensors.parse(try Safetensors.encode(tensors: tensors, metadata: file.metadata), path: "fuzz.safetensors")
                #expect(again.names() == file.names() && again.metadata == file.metadata)
                for t in tensors { #expect(try again.tensor(named: t.name) == t) }
            }
            if let firstError { throw firstError }
        }
        print("fuzz safetensors: \(stats)")
    }
}

struct FuzzStats: CustomStringConvertible {
    var inputs = 0, accepted = 0, rejected = 0, seconds = 0.0
    var byProblem: [String: Int] = [:]
    var description: String {
        let top = byProblem.sorted { $0.value > $1.value }.prefix(8).map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        return "\(inputs) inputs in \(String(format: "%.1f", seconds)) s (\(accepted) accepted, \(rejected) refused: \(top))"
    }
}

private let fuzzTokens: [[UInt8]] = [
    "'descr'", "'shape'", "'fortran_order'", "True", "False", "None", "'<f4'", "'<f2'", "'>f4'", "'|O'", "'<f8'",
    "99999999999999999999", "1099511627776", "-1", "0", "(", ")", ",", "{", "}", ":", "'", "\\",
    "\"dtype\"", "\"F32\"", "\"F16\"", "\"BF16\"", "\"F64\"", "\"shape\"", "\"data_offsets\"", "\"__metadata__\"",
    "[", "]", "null", "true", "1e5", "-0", "\\u0000", "\\ud800", "\\udc00", "18446744073709551615",
    "9223372036854775807", "4611686018427387904", "[0,96]", "[6,4]", "\"",
].map { Array($0.utf8) }

/// A deterministic mutation loop: `body` parses one input. Anything other than a FormatError that
/// starts with the input's path is a failure; a crash takes the test down (that is the point).
private func fuzz(seeds: [[UInt8]], salt: UInt64, _ body: ([UInt8]) throws -> Void) throws -> FuzzStats {
    let iterations = ReliabilityEnv.int("KVRECALL_FUZZ_ITERATIONS", 20_000)
    let cap = ReliabilityEnv.double("KVRECALL_FUZZ_SECONDS", 8)
    var rng = SeededRandom(seed: UInt64(ReliabilityEnv.int("KVRECALL_FUZZ_SEED", 1)) &* 1000 &+ salt)
    var stats = FuzzStats()
    let start = monotonicSeconds()
    let interesting: [UInt8] = [0, 1, 0x7F, 0x80, 0xFF, 0x20, 0x0A] + Array("()[]{},:'\"-09.eL\\".utf8)
    while stats.inputs < iterations && monotonicSeconds() - start < cap {
        var bytes = seeds[Int(rng.next() % UInt64(seeds.count))]
        let isNPY = bytes.first == 0x93
        // Where the header ends, so most mutations land in it.
        let headerEnd: Int = isNPY
            ? (bytes[6] == 1 ? 10 + (Int(bytes[8]) | Int(bytes[9]) << 8) : 12 + (Int(bytes[8]) | Int(bytes[9]) << 8))
            : 8 + bytes[0..<8].enumerated().reduce(0) { $0 | Int($1.1) << (8 * $1.0) }
        for _ in 0..<(1 + Int(rng.next() % 4)) where !bytes.isEmpty {
            let inHeader = rng.next() % 5 != 0
            let at = Int(rng.next() % UInt64(inHeader ? min(headerEnd, bytes.count) : bytes.count))
            switch rng.next() % 8 {
            case 0: bytes[at] ^= UInt8(1) << UInt8(rng.next() % 8)
            case 1: bytes[at] = interesting[Int(rng.next() % UInt64(interesting.count))]
            case 2: bytes.insert(contentsOf: fuzzTokens[Int(rng.next() % UInt64(fuzzTokens.count))], at: at)
            case 3: bytes.removeSubrange(at..<min(bytes.count, at + 1 + Int(rng.next() % 16)))
            case 4:
                let chunk = Array(bytes[at..<min(bytes.count, at + 1 + Int(rng.next() % 32))])
                let to = Int(rng.next() % UInt64(bytes.count))
                bytes.insert(contentsOf: chunk, at: to)
            case 5: bytes = Array(bytes.prefix(at))
            case 6:
                // Rewrite the length field with something interesting.
                let values: [UInt64] = [0, 1, UInt64(headerEnd), UInt64(bytes.count), 0xFFFF, 0xFFFF_FFFF, 1 << 63, rng.next() % 4096]
                let v = values[Int(rng.next() % UInt64(values.count))]
                if isNPY, bytes.count >= 12 {
                    let width = bytes[6] == 1 ? 2 : 4
                    for i in 0..<width { bytes[8 + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
                } else if !isNPY, bytes.count >= 8 {
                    for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
                }
            default: bytes.insert(UInt8(truncatingIfNeeded: rng.next()), at: at)
            }
        }
        // Half the time, make the length field agree with the mutated header so the parser gets past it.
        if rng.next() % 2 == 0 {
            if isNPY, bytes.count >= 12, let end = bytes[10...].firstIndex(of: 0x0A) {
                let width = bytes[6] == 1 ? 2 : 4
                let length = end + 1 - (8 + width)
                for i in 0..<width { bytes[8 + i] = UInt8(truncatingIfNeeded: length >> (8 * i)) }
            } else if !isNPY, bytes.count > 8, let close = bytes[8...].lastIndex(of: UInt8(ascii: "}")) {
                let length = close + 1 - 8
                for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: length >> (8 * i)) }
            }
        }
        stats.inputs += 1
        do {
            try body(bytes)
            stats.accepted += 1
        } catch let error as FormatError {
            stats.rejected += 1
            let kind = "\(error.problem)".prefix { $0 != "(" }
            stats.byProblem[String(kind), default: 0] += 1
            #expect(error.path.hasPrefix("fuzz."), "\(error)")
        } catch {
            Issue.record("not a FormatError: \(error) for input \(bytes.prefix(64).map { String($0, radix: 16) })")
        }
    }
    stats.seconds = monotonicSeconds() - start
    return stats
}
