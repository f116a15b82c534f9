import Foundation
import Testing
import KVRecall
import KVRecallTestSupport

/// `--help` of every command as a person reads it (issue 23, item 4): at 80 columns (a pipe, many
/// terminals) and at 120, with no example line split and no paragraph broken mid-sentence.
@Suite struct HelpTests {
    /// `help` of `path` rendered for a terminal `columns` wide (ArgumentParser reads COLUMNS).
    func help(_ path: [String], columns: Int) throws -> String {
        let r = try runCLI(path + ["--help"], environment: ["COLUMNS": "\(columns)"])
        #expect(r.status == 0, "\(path) --help: \(r.stderr)")
        return r.stdout
    }

    /// Every command path, found from the SUBCOMMANDS sections (so a new command is checked too).
    func commandPaths() throws -> [[String]] {
        var paths: [[String]] = [[]]
        var queue: [[String]] = [[]]
        while let path = queue.first {
            queue.removeFirst()
            let text = try help(path, columns: 1000)
            guard let section = text.range(of: "SUBCOMMANDS:\n") else { continue }
            for line in text[section.upperBound...].split(separator: "\n", omittingEmptySubsequences: false) {
                guard line.hasPrefix("  "), !line.hasPrefix("   ") else { if line.isEmpty { break } else { continue } }
                let name = line.trimmingCharacters(in: .whitespaces).split(separator: " ").first.map(String.init) ?? ""
                guard !name.isEmpty, name != "See" else { continue }
                paths.append(path + [name])
                queue.append(path + [name])
            }
        }
        return paths
    }

    /// The discussion: the lines between the overview paragraph and USAGE.
    func discussion(_ text: String) -> [Substring] {
        let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
        guard let usage = lines.firstIndex(where: { $0.hasPrefix("USAGE:") }),
              let afterOverview = lines.firstIndex(where: { $0.isEmpty }), afterOverview < usage else { return [] }
        return Array(lines[(afterOverview + 1)..<usage])
    }

    @Test func everyCommandReadsWellAt80And120Columns() throws {
        let paths = try commandPaths()
        #expect(paths.count >= 16, "kvrecall, its 12 commands and bench's 3: \(paths)")
        for path in paths {
            let name = (["kvrecall"] + path).joined(separator: " ")
            let wide = discussion(try help(path, columns: 1000))  // as written: nothing wrapped
            for (i, line) in wide.enumerated() {
                if line.hasPrefix(" ") {
                    // An example (or any indented line) must fit 80 columns, so it is never split.
                    #expect(line.count <= 80, "\(name): example line of \(line.count) columns: \(line)")
                } else if line.count > 80, i + 1 < wide.count {
                    // A prose line wider than the terminal must be a whole paragraph (written with `\`
                    // continuations) that ArgumentParser wraps; a hard line break inside a paragraph
                    // leaves a fragment such as "f32, f16" / "or bf16" at 80 columns.
                    let next = wide[i + 1]
                    #expect(next.isEmpty || next.hasPrefix(" "),
                            "\(name): a paragraph broken by a hard newline after: \(line.prefix(60))...")
                }
            }
            for columns in [80, 120] {
                let text = try help(path, columns: columns)
                let lines = text.split(separator: "\n", omittingEmptySubsequences: false)
                for line in lines {
                    #expect(line.count <= columns, "\(name) at \(columns) columns: a line of \(line.count): \(line)")
                }
                let rendered = Set(lines)
                for line in wide where line.hasPrefix(" ") {
                    #expect(rendered.contains(line), "\(name) at \(columns) columns splits the example line: \(line)")
                }
            }
        }
    }

    @Test func versionAndUnknownHelpTopics() throws {
        let version = try runCLI(["--version"])
        #expect(version.status == 0 && version.stdout.contains(KVRecallVersion.string), "\(version.stdout)\(version.stderr)")
        let nonsense = try runCLI(["help", "nonsense"])
        #expect(nonsense.status != 0 && nonsense.stderr.contains("unknown command 'nonsense'") && nonsense.stdout.isEmpty)
        let nested = try runCLI(["help", "bench", "nonsense"])
        #expect(nested.status != 0 && nested.stderr.contains("bench commands: exact, ann, session"))
        for good in [["help"], ["help", "ingest"], ["help", "bench", "exact"]] {
            let r = try runCLI(good)
            #expect(r.status == 0 && r.stdout.contains("USAGE:"), "\(good): \(r.stderr)")
        }
    }
}
