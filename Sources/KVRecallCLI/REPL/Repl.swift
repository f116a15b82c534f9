import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

/// `kvrecall repl`: the interactive session. The commands and their output come from
/// `REPLInterpreter` (KVRecall library); this front end reads lines (libedit on a terminal,
/// plain standard input otherwise) and prints the replies.
struct Repl: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Interactive session: pick a head and a query, try attention methods on it, compare them.",
        discussion: """
        Open a store, choose a head and a query (a stored prefill query or a row of an .npy file), \
        then see its exact top-k, run one attention method with `attend` or all of them with \
        `compare`, change k, ef, nprobe, window, sinks or the method with `set`, and ask `explain` \
        what the last search touched. Type `help` in the session for every command, and \
        `help COMMAND` for one.

        Commands: open DIR, heads, use C/L/H, info, set k|ef|nprobe|window|sinks|method VALUE, \
        settings, query ROW | random | file Q.npy ROW, attend [METHOD], compare, explain, \
        help [COMMAND], quit.

        On a terminal: line editing, and Tab completion of commands, heads, methods and file \
        names (libedit); history across sessions in $KVRECALL_HISTORY, else ~/.kvrecall_history \
        (KVRECALL_HISTORY set but empty: none). Ctrl-C clears the line; Ctrl-D or `quit` leaves. \
        Colour only on a terminal whose TERM is not dumb, and never when NO_COLOR is set.

        Scripts: when standard input is not a terminal, commands are read one per line with no \
        prompt and no line editing; blank lines and # comments (also after a command) are skipped. A failing command \
        prints "error: line N: ..." on standard error and the script goes on (--stop-on-error \
        stops it there). The exit status is 1 if any command failed, else 0. Interactively, \
        errors are printed and the session goes on (status 0). A --store that cannot be opened \
        is an error (status 1) in both modes.

        Example:
          kvrecall ingest --store /tmp/s --layer 2 --head 6 \\
              --keys Data/minilm/keys.npy --values Data/minilm/values.npy \\
              --queries Data/minilm/prefill_queries.npy
          kvrecall build --store /tmp/s --layer 2 --head 6 --index hnsw
          kvrecall repl --store /tmp/s
          kvrecall 0/2/6> query 17
          kvrecall 0/2/6> attend hnsw
          kvrecall 0/2/6> set k 50
          kvrecall 0/2/6> compare
          kvrecall 0/2/6> explain
          printf 'query 17\\ncompare\\n' | kvrecall repl --store /tmp/s
        """
    )

    @Option(help: ArgumentHelp("Store to open at the start (as `open DIR`).", valueName: "dir"))
    var store: String?
    @Flag(help: "Script mode: stop at the first command that fails.")
    var stopOnError = false

    func run() throws {
        let environment = ProcessInfo.processInfo.environment
        let interactive = isatty(0) != 0
        let interpreter = REPLInterpreter(style: TerminalStyle.forDescriptor(1, environment: environment))
        defer { interpreter.close() }
        let errorStyle = TerminalStyle.forDescriptor(2, environment: environment)
        if let store {
            let reply = interpreter.open(path: store)
            if let error = reply.error { throw RunError(error) }
            print(reply.output)
        }
        let failed = interactive
            ? runInteractive(interpreter, errorStyle: errorStyle, environment: environment)
            : runScript(interpreter, errorStyle: errorStyle)
        fflush(stdout)
        if failed { throw ExitCode(1) }
    }

    private func report(_ message: String, style: TerminalStyle) {
        fflush(stdout)
        FileHandle.standardError.write((style.red("error:") + " " + message + "\n").data(using: .utf8)!)
    }

    /// Line editing, history and completion; errors do not change the exit status.
    private func runInteractive(_ interpreter: REPLInterpreter, errorStyle: TerminalStyle, environment: [String: String]) -> Bool {
        let editor = LineEditor(historyPath: REPLInterpreter.historyPath(environment: environment)) { before, word in
            interpreter.completions(before: before, word: word)
        }
        print("KVRecall REPL: `help` lists the commands; Tab completes; Ctrl-D or `quit` leaves.")
        loop: while true {
            switch editor.read(prompt: interpreter.prompt) {
            case .end:
                print("")
                break loop
            case .interrupted:
                print("")
            case .line(let line):
                editor.remember(line)
                let reply = interpreter.execute(line)
                if !reply.output.isEmpty { print(reply.output) }
                if let error = reply.error { report(error, style: errorStyle) }
                if reply.quit { break loop }
            }
        }
        editor.save()
        return false
    }

    /// Commands from standard input, no prompt; true if any failed.
    private func runScript(_ interpreter: REPLInterpreter, errorStyle: TerminalStyle) -> Bool {
        var failed = false
        var number = 0
        while let line = readLine(strippingNewline: true) {
            number += 1
            let reply = interpreter.execute(line)
            if !reply.output.isEmpty { print(reply.output) }
            fflush(stdout)
            if let error = reply.error {
                report("line \(number): \(error)", style: errorStyle)
                failed = true
                if stopOnError { break }
            }
            if reply.quit { break }
        }
        return failed
    }
}
