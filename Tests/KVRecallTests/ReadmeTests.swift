import Foundation
import Testing
import KVRecallTestSupport

/// The README's code blocks, run as a reader would paste them (issue 23, item 3: its Python snippet
/// failed as written). Every fenced block either runs or says why not, in an HTML comment on the
/// line before its fence (invisible on GitHub):
///   `<!-- readme-test: skip: REASON -->`   not run, for the reason given (printed by the test);
///   `<!-- readme-test: needs-model -->`    needs Gemma 3 270M: run only with KVRECALL_README_MODEL=1
///                                          and the model in the cache (minutes of decoding);
///   a ```text block                        not code (a listing, a figure).
/// ```sh blocks run here, in order, in one bash process (so `K=...` carries over), from a scratch
/// directory that links the repository's top-level entries (files the blocks write stay out of the
/// checkout); `/tmp/` in a block means a fresh scratch directory; `swift build ...` only checks that
/// the product it names is built (Tools/test.sh builds them before the tests); lines typed at a REPL
/// prompt (`kvrecall 0/2/6> CMD`) after a `kvrecall repl` line are fed to that REPL as its script.
/// ```python blocks run in Python/tests/test_readme.py, with the installed package.
@Suite struct ReadmeTests {
    enum Mark: Equatable {
        case run
        case skip(String)
        case needsModel
    }

    struct Block {
        let line: Int        // the fence's line number (1-based)
        let language: String
        let body: String
        let mark: Mark
    }

    static let root = URL(fileURLWithPath: repositoryDataDirectory()).deletingLastPathComponent().path

    /// Fenced blocks of `path` with their marks; a block that neither runs nor says why is an error.
    static func blocks(_ path: String) throws -> (blocks: [Block], problems: [String]) {
        let lines = try String(contentsOfFile: path, encoding: .utf8).components(separatedBy: "\n")
        var blocks: [Block] = [], problems: [String] = []
        var i = 0
        while i < lines.count {
            guard lines[i].hasPrefix("```") else { i += 1; continue }
            let language = lines[i].dropFirst(3).trimmingCharacters(in: .whitespaces)
            let start = i
            var body: [String] = []
            i += 1
            while i < lines.count && !lines[i].hasPrefix("```") { body.append(lines[i]); i += 1 }
            i += 1
            let previous = start > 0 ? lines[start - 1].trimmingCharacters(in: .whitespaces) : ""
            var mark = Mark.run
            if previous.hasPrefix("<!-- readme-test:"), previous.hasSuffix("-->") {
                let spec = previous.dropFirst("<!-- readme-test:".count).dropLast(3).trimmingCharacters(in: .whitespaces)
                if spec == "needs-model" {
                    mark = .needsModel
                } else if spec.hasPrefix("skip:"), spec.count > 6 {
                    mark = .skip(spec.dropFirst(5).trimmingCharacters(in: .whitespaces))
                } else {
                    problems.append("line \(start + 1): unknown mark '\(spec)' (skip: REASON, or needs-model)")
                }
            }
            if language == "text" { continue }
            if mark == .run && !["sh", "bash", "python"].contains(language) {
                problems.append("line \(start + 1): a ```\(language) block neither runs nor says why: mark it "
                                + "<!-- readme-test: skip: REASON --> or make it ```text")
            }
            blocks.append(Block(line: start + 1, language: language, body: body.joined(separator: "\n"), mark: mark))
        }
        return (blocks, problems)
    }

    /// A block as bash runs it: `/tmp/` mapped to `scratch`, REPL transcripts turned into scripts.
    static func shell(_ block: Block, scratch: String) -> String {
        var out: [String] = []
        let lines = block.body.replacingOccurrences(of: "/tmp/", with: scratch + "/").components(separatedBy: "\n")
        var i = 0
        while i < lines.count {
            let line = lines[i]
            i += 1
            guard line.range(of: #"\brepl\b"#, options: .regularExpression) != nil, !line.hasPrefix("kvrecall ") else {
                out.append(line)
                continue
            }
            var typed: [String] = []
            while i < lines.count, let prompt = lines[i].range(of: #"^kvrecall [^ >]*> "#, options: .regularExpression) {
                typed.append(String(lines[i][prompt.upperBound...]))
                i += 1
            }
            if typed.isEmpty {
                out.append(line)
            } else {
                out.append(line.components(separatedBy: "#")[0] + " <<'README_REPL_SCRIPT'")
                out += typed + ["README_REPL_SCRIPT"]
            }
        }
        return out.joined(separator: "\n")
    }

    static var modelRequested: Bool {
        ProcessInfo.processInfo.environment["KVRECALL_README_MODEL"] == "1"
    }

    @Test func everyBlockRunsOrSaysWhyNot() throws {
        let (blocks, problems) = try Self.blocks(Self.root + "/README.md")
        #expect(problems.isEmpty, "README.md: \(problems.joined(separator: "; "))")
        #expect(blocks.contains { $0.language == "python" && $0.mark == .run }, "the Python snippet runs (Python/tests/test_readme.py)")
        #expect(blocks.filter { $0.language == "sh" && $0.mark == .run }.count >= 3)
        // The transcript rewrite: prompts become the REPL's script, in order.
        let repl = Block(line: 1, language: "sh", body: "$K repl --store /tmp/s\nkvrecall 0/2/6> query 17   # row 17\nkvrecall 0/2/6> compare",
                         mark: .run)
        #expect(Self.shell(repl, scratch: "/x") == "$K repl --store /x/s <<'README_REPL_SCRIPT'\nquery 17   # row 17\ncompare\nREADME_REPL_SCRIPT")
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: root + "/.build/release/kvrecall"),
                   "the README's commands use the release build (swift build -c release --product kvrecall)"))
    func shellBlocksRunAsWritten() throws {
        let (blocks, _) = try Self.blocks(Self.root + "/README.md")
        let scratch = TemporaryDirectory("kvrecall-readme")
        let work = scratch.path + "/checkout", tmp = scratch.path + "/tmp"
        for dir in [work, tmp] { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
        for entry in try FileManager.default.contentsOfDirectory(atPath: Self.root) where entry != ".git" {
            try FileManager.default.createSymbolicLink(atPath: work + "/" + entry, withDestinationPath: Self.root + "/" + entry)
        }
        var script = """
            set -euo pipefail
            # `swift build [-c CONFIG] [--product P]`: the product must be built already (Tools/test.sh builds it).
            swift() {
              local config=debug product=kvrecall
              while [ $# -gt 0 ]; do
                case "$1" in -c) config=$2; shift ;; --product) product=$2; shift ;; esac
                shift
              done
              local file=".build/$config/$product"
              [ "$product" = KVRecallC ] && file=".build/$config/libKVRecallC.so"
              [ -e "$file" ] || { echo "README test: $file is not built" >&2; return 1; }
            }

            """
        var ran: [Int] = []
        for block in blocks where block.language == "sh" || block.language == "bash" {
            switch block.mark {
            case .skip(let reason):
                print("README.md line \(block.line): not run: \(reason)")
                continue
            case .needsModel where !Self.modelRequested:
                print("README.md line \(block.line): not run: needs Gemma 3 270M (KVRECALL_README_MODEL=1 runs it)")
                continue
            default:
                break
            }
            script += "echo '@@ README.md line \(block.line)' >&2\n" + Self.shell(block, scratch: tmp) + "\n"
            ran.append(block.line)
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        process.arguments = ["timeout", "900", "bash", "-c", script]
        process.currentDirectoryURL = URL(fileURLWithPath: work)
        var environment = ProcessInfo.processInfo.environment
        environment["KVRECALL_HISTORY"] = ""
        environment["NO_COLOR"] = "1"
        process.environment = environment
        let out = Pipe(), err = Pipe()
        process.standardOutput = out
        process.standardError = err
        process.standardInput = FileHandle.nullDevice
        try process.run()
        let errData = ReadAll(err.fileHandleForReading)
        let output = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        let errors = String(decoding: errData.wait(), as: UTF8.self)
        let block = errors.components(separatedBy: "\n").last { $0.hasPrefix("@@ README.md line") } ?? "?"
        #expect(process.terminationStatus == 0,
                "\(block.dropFirst(3)) failed (status \(process.terminationStatus)):\n\(errors.suffix(3000))\n--- stdout:\n\(output.suffix(3000))")
        #expect(ran.count >= 3, "blocks run: \(ran)")
        // What the blocks claim, seen in their output.
        #expect(output.contains("head 0/2/6: 4096 keys/values"), "ingest")
        #expect(output.contains("query prefill row 17") && output.contains("attend hnsw"), "the REPL transcript ran")
        #expect(output.contains("ok: 0 failures"), "the C example ran")
    }
}

/// Reads a pipe to its end on another thread (so neither pipe of a child fills up and blocks it).
private final class ReadAll: @unchecked Sendable {
    private let condition = NSCondition()
    private var data: Data?
    init(_ handle: FileHandle) {
        Thread { [self] in
            let all = handle.readDataToEndOfFile()
            condition.lock(); data = all; condition.signal(); condition.unlock()
        }.start()
    }
    func wait() -> Data {
        condition.lock(); defer { condition.unlock() }
        while data == nil { condition.wait() }
        return data!
    }
}
