import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

@main
struct KVRecallCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvrecall",
        abstract: "Top-k attention over an LMDB-backed KV cache, answered by vector retrieval.",
        discussion: """
        A store is a directory holding one LMDB environment with the key, value and prefill-query \
        vectors of any number of heads, addressed by (context, layer, kv-head). `generate`, `eval` \
        and `capture` run Gemma 3 270M with its global layers on a store (bash Tools/fetch_model.sh \
        fetches the model).

        Typical session:
          kvrecall ingest --store /tmp/s --keys K.npy --values V.npy \\
              --queries Q.npy --layer 2 --head 6
          kvrecall info --store /tmp/s
          kvrecall build --store /tmp/s --layer 2 --head 6 --index hnsw
          kvrecall query --store /tmp/s --layer 2 --head 6 \\
              --queries decode.npy -k 10 --index hnsw --ef 64
          kvrecall repl --store /tmp/s      (query, attend, compare, explain)
        """,
        version: "kvrecall \(KVRecallVersion.string) (C ABI \(KVRecallVersion.abi))",
        subcommands: [Ingest.self, Info.self, Build.self, Codes.self, Query.self, Attend.self, Replay.self, Repl.self, Demo.self, Bench.self,
                      Generate.self, Eval.self, Capture.self]
    )

    /// `kvrecall help TOPIC` for a topic that is not a command fails (ArgumentParser prints the
    /// top help with status 0, which tells a script nothing); everything else is parsed as usual.
    static func main() {
        // Swift replaces bytes that are not UTF-8 in arguments with U+FFFD without a word (a prompt
        // would be changed silently, a path would name another file): refuse them, saying where.
        for i in 1..<Int(CommandLine.argc) {
            guard let raw = CommandLine.unsafeArgv[i] else { continue }
            let bytes = Array(UnsafeBufferPointer(start: UnsafeRawPointer(raw).assumingMemoryBound(to: UInt8.self), count: strlen(raw)))
            if let bad = firstInvalidUTF8(bytes) {
                let option = i > 1 && CommandLine.arguments[i - 1].hasPrefix("-") ? " (the value of \(CommandLine.arguments[i - 1]))" : ""
                FileHandle.standardError.write(Data("Error: argument \(i)\(option) is not UTF-8: \(describeInvalidUTF8(bytes, at: bad))\n".utf8))
                Foundation.exit(ExitCode.validationFailure.rawValue)
            }
        }
        let arguments = attachingNegativeNumbers(Array(CommandLine.arguments.dropFirst()))
        if arguments.first == "help", let unknown = unknownHelpTopic(Array(arguments.dropFirst())) {
            FileHandle.standardError.write(Data("Error: \(unknown)\nUsage: kvrecall help [<subcommand>]\n  See 'kvrecall --help' for the commands.\n".utf8))
            Foundation.exit(ExitCode.validationFailure.rawValue)
        }
        main(arguments)
    }

    /// `--max-tokens -1` becomes `--max-tokens=-1`: ArgumentParser reads a word that starts with `-`
    /// as an option, so a negative number after an option was "Missing value for '--max-tokens'"
    /// instead of the option's own range check. Every option at once, including ones added later;
    /// words after `--` are left alone. (A flag given a number says it takes no value.)
    static func attachingNegativeNumbers(_ arguments: [String]) -> [String] {
        var out: [String] = []
        var i = 0
        while i < arguments.count {
            let word = arguments[i]
            if word == "--" { return out + arguments[i...] }
            if i + 1 < arguments.count, word.hasPrefix("-"), !word.contains("="), !isNegativeNumber(word),
               isNegativeNumber(arguments[i + 1]) {
                out.append(word + "=" + arguments[i + 1])
                i += 2
            } else {
                out.append(word)
                i += 1
            }
        }
        return out
    }

    static func isNegativeNumber(_ word: String) -> Bool {
        word.count > 1 && word.hasPrefix("-") && Double(word) != nil
    }

    /// Why `path` (the words after `help`) names no command, or nil when it does.
    static func unknownHelpTopic(_ path: [String]) -> String? {
        var command: ParsableCommand.Type = KVRecallCommand.self
        var walked = ["kvrecall"]
        for word in path where !word.hasPrefix("-") {
            let subcommands = command.configuration.subcommands
            guard let next = subcommands.first(where: { $0._commandName == word || $0.configuration.aliases.contains(word) }) else {
                let names = subcommands.map { $0._commandName }
                return names.isEmpty
                    ? "'\(walked.joined(separator: " "))' has no subcommand '\(word)'"
                    : "unknown command '\(word)' (\(walked.joined(separator: " ")) commands: \(names.joined(separator: ", ")))"
            }
            command = next
            walked.append(word)
        }
        return nil
    }
}
