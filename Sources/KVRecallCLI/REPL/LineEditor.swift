import CEditLine
import CLineReader
import Foundation

/// Line editing, history and Tab completion for the interactive REPL, from libedit's
/// readline-compatible API (Debian's libedit 3.1: readline, add_history, read_history,
/// write_history, rl_attempted_completion_function, rl_completion_matches).
///
/// libedit's readline state is process-wide, so there is one editor per process. Keys are read
/// by `kvr_getc` (the CLineReader target), with signal handlers installed here: Ctrl-C records the
/// signal instead of ending the process and ends the read; readline() then returns NULL with
/// the record set, which `read` reports as `.interrupted` (the line is dropped). Ctrl-D on an
/// empty line returns NULL without it: `.end`. A Ctrl-C while a command runs is ignored.
final class LineEditor {
    enum Input: Equatable {
        case line(String)
        case interrupted
        case end
    }

    private let historyPath: String?
    private var lastRemembered: String?

    /// `completer(before, word)` gives the candidates for `word` (the prefix being typed, after
    /// `before`), or nil to let libedit complete a file name.
    init(historyPath: String?, completer: @escaping (String, String) -> [String]?) {
        self.historyPath = historyPath
        editorCompleter = completer
        rl_readline_name = UnsafePointer(strdup("kvrecall"))
        // The terminal's character set (UTF-8 under a UTF-8 locale), read by libedit at initialisation.
        setlocale(LC_CTYPE, "")
        // rl_initialize() reads rl_getc_function and rl_catch_signals, and the first libedit call
        // (using_history included) runs it: set them first, then initialise explicitly.
        _ = kvr_install_line_reader()
        _ = rl_initialize()
        rl_attempted_completion_function = editorComplete
        using_history()
        stifle_history(1000)
        if let historyPath, FileManager.default.fileExists(atPath: historyPath) {
            _ = read_history(historyPath)
        }
    }

    /// Reads one line with `prompt`, editing enabled.
    func read(prompt: String) -> Input {
        fflush(stdout)
        fflush(stderr)
        if kvr_take_sigwinch() != 0 { rl_resize_terminal() }
        _ = kvr_take_sigint()  // a Ctrl-C while the last command ran
        let raw = readline(prompt)
        let interrupted = kvr_take_sigint() != 0
        guard let raw else { return interrupted ? .interrupted : .end }
        defer { free(raw) }
        return .line(String(cString: raw))
    }

    /// Adds a line to the history (not blank ones, nor a repeat of the previous one) and writes
    /// the history file at once, so a session that is killed keeps what it had.
    func remember(_ line: String) {
        let trimmed = line.trimmingCharacters(in: .whitespaces)
        guard !trimmed.isEmpty, trimmed != lastRemembered else { return }
        lastRemembered = trimmed
        _ = add_history(trimmed)
        save()
    }

    /// Writes the history file (readable by its owner only, like a shell's).
    func save() {
        guard let historyPath else { return }
        if write_history(historyPath) == 0 { chmod(historyPath, 0o600) }
    }
}

// libedit calls plain C functions, which cannot capture: the completer and the candidates of the
// completion in progress live here, used only on the thread that runs readline().
nonisolated(unsafe) private var editorCompleter: ((String, String) -> [String]?)?
nonisolated(unsafe) private var editorCandidates: [String] = []
nonisolated(unsafe) private var editorCandidateIndex = 0

private func editorComplete(_ text: UnsafePointer<CChar>?, _ start: Int32, _ end: Int32)
    -> UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? {
    let word = text.map { String(cString: $0) } ?? ""
    let buffer = rl_line_buffer.map { String(cString: $0) } ?? ""
    // `start` counts characters (libedit works in wide characters), not bytes.
    var scalars = String.UnicodeScalarView()
    scalars.append(contentsOf: buffer.unicodeScalars.prefix(max(0, Int(start))))
    let before = String(scalars)
    guard let candidates = editorCompleter?(before, word) else {
        rl_attempted_completion_over = 0  // a file name: libedit's own completion
        return nil
    }
    rl_attempted_completion_over = 1
    guard !candidates.isEmpty else { return nil }
    editorCandidates = candidates
    return rl_completion_matches(text, editorCandidate)
}

private func editorCandidate(_ text: UnsafePointer<CChar>?, _ state: Int32) -> UnsafeMutablePointer<CChar>? {
    if state == 0 { editorCandidateIndex = 0 }
    guard editorCandidateIndex < editorCandidates.count else { return nil }
    defer { editorCandidateIndex += 1 }
    return strdup(editorCandidates[editorCandidateIndex])
}
