import Foundation
import KVRecall
import KVRecallTestSupport
import Testing
@testable import KVRecallDecoder

/// The decoder commands' rough edges a new user hit (issue 23, item 6), on a tiny model written by
/// the test (no download needed).
@Suite struct DecoderRoughEdgeTests {
    static let text = repositoryDataDirectory() + "/text/short.txt"

    /// A tiny model (global block 1) in a fresh directory.
    func tinyModel() throws -> (TemporaryDirectory, String) {
        let dir = TemporaryDirectory("tiny-gemma-cli")
        let tiny = try TinyGemma(directory: dir.path, seed: 31)
        return (dir, tiny.path)
    }

    @Test func captureWorksWithItsDefaultDecodeQueries() throws {
        let (dir, model) = try tinyModel()
        // --decode-queries defaults to 256 but at most a quarter of --tokens: --tokens 256 used to
        // fail on the default itself.
        let r = try runCLI(["capture", "--model", model, "--text", Self.text, "--tokens", "256", "--layers", "1", "--out", dir.path + "/trace"])
        #expect(r.status == 0, "\(r.stderr)")
        let queries = try NPY.read(path: dir.path + "/trace/layer01_queries.npy")
        #expect(queries.shape[0] == 64 * TinyGemma.heads, "\(queries.shape)")
        let bad = try runCLI(["capture", "--model", model, "--text", Self.text, "--tokens", "256", "--decode-queries", "256", "--out", dir.path + "/t2"])
        #expect(bad.status != 0 && bad.stderr.contains("--decode-queries must be in 1..<256"), "\(bad.stderr)")
    }

    @Test func anEmptyPromptSaysSoAndInvalidUTF8IsRefusedWithItsOffset() throws {
        let (dir, model) = try tinyModel()
        let empty = try runCLI(["generate", "--model", model, "--prompt", "", "--max-tokens", "2"])
        #expect(empty.status == 0, "\(empty.stderr)")
        #expect(empty.stderr.contains("the prompt is empty (--prompt ''): generating from BOS alone"), "\(empty.stderr)")
        let emptyFile = dir.path + "/empty.txt"
        try Data().write(to: URL(fileURLWithPath: emptyFile))
        let fromFile = try runCLI(["generate", "--model", model, "--prompt-file", emptyFile, "--max-tokens", "2"])
        #expect(fromFile.stderr.contains("the prompt is empty (file \(emptyFile))"), "\(fromFile.stderr)")

        let badFile = dir.path + "/latin1.txt"
        try Data("Hello\nAnne haggard".utf8 + [0xE9] + Data(" more\n".utf8)).write(to: URL(fileURLWithPath: badFile))
        let refused = try runCLI(["generate", "--model", model, "--prompt-file", badFile])
        #expect(refused.status != 0)
        #expect(refused.stderr.contains("\(badFile): not UTF-8 text: byte 0xE9 at offset 18 (line 2, after 'Anne haggard')"), "\(refused.stderr)")
        // An argument that is not UTF-8 (Swift would replace the byte silently), through a shell.
        let shell = try runExecutable("/bin/sh", ["-c", "\"$0\" generate --model \"$1\" --prompt \"$(printf 'abc\\376')\"", kvrecallExecutable(), model])
        #expect(shell.status != 0 && shell.stderr.contains("(the value of --prompt) is not UTF-8: byte 0xFE at offset 3"), "\(shell.stderr)")
    }

    @Test func methodListsNegativeNumbersAndTheContextLimit() throws {
        let (dir, model) = try tinyModel()
        defer { withExtendedLifetime(dir) {} }
        for (arguments, message) in [
            (["--max-tokens", "-1"], "--max-tokens must be at least 1 (got -1)"),  // was "Missing value"
            (["-k", "-3"], "-k must be at least 1 (got -3)"),
            (["--method", "exact,,hnsw"], "has an empty name"),                   // was accepted silently
            (["--method", "exact,"], "has an empty name"),
            (["--method", "hnsw,exact,hnsw"], "lists hnsw twice"),
        ] {
            let r = try runCLI(["generate", "--model", model, "--prompt", "x"] + arguments)
            #expect(r.status != 0 && r.stderr.contains(message) && !r.stderr.contains("Missing value"), "\(arguments): \(r.stderr)")
        }
        let long = try runCLI(["generate", "--model", model, "--prompt", "x", "--max-tokens", "5000"])
        #expect(long.status != 0 && long.stderr.contains("exceeds the context length 4096"), "\(long.stderr)")
        for command in ["generate", "eval"] {
            #expect(try runCLI([command, "--help"]).stdout.replacingOccurrences(of: "\n", with: " ").contains("context is 32768 tokens"))
        }
    }
}
