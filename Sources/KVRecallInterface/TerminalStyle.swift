import Foundation
import KVRecall

/// ANSI colours and weights for terminal output, or plain text when disabled.
///
/// Colour is used only on a terminal that supports it: the stream is a TTY and `TERM` is set and
/// not `dumb`; and never when `NO_COLOR` is set (https://no-color.org), whatever its value.
public struct TerminalStyle: Sendable, Equatable {
    public var enabled: Bool

    public init(enabled: Bool) { self.enabled = enabled }

    /// No escape sequences at all.
    public static let plain = TerminalStyle(enabled: false)

    /// Whether output to a stream may be coloured, from whether it is a terminal and the environment.
    public static func supportsColor(isTerminal: Bool, environment: [String: String]) -> Bool {
        guard isTerminal, environment["NO_COLOR"] == nil else { return false }
        guard let term = environment["TERM"], !term.isEmpty, term != "dumb" else { return false }
        return true
    }

    /// The style for file descriptor `fd` (1 for standard output, 2 for standard error) in this process.
    public static func forDescriptor(_ fd: Int32, environment: [String: String] = ProcessInfo.processInfo.environment) -> TerminalStyle {
        TerminalStyle(enabled: supportsColor(isTerminal: isatty(fd) != 0, environment: environment))
    }

    private func sgr(_ code: String, _ text: String) -> String {
        enabled && !text.isEmpty ? "\u{1B}[\(code)m\(text)\u{1B}[0m" : text
    }

    public func bold(_ text: String) -> String { sgr("1", text) }
    public func dim(_ text: String) -> String { sgr("2", text) }
    public func red(_ text: String) -> String { sgr("31", text) }
    public func green(_ text: String) -> String { sgr("32", text) }
    public func yellow(_ text: String) -> String { sgr("33", text) }
    public func cyan(_ text: String) -> String { sgr("36", text) }

    /// A rendered table with a bold header and a dim rule. Cells are left unstyled so the columns
    /// stay aligned (escape sequences have no width but count as characters).
    public func render(_ table: TextTable) -> String {
        // Trailing blanks of the last column are dropped.
        let lines = table.render().split(separator: "\n", omittingEmptySubsequences: false).map {
            String($0.reversed().drop(while: { $0 == " " }).reversed())
        }
        guard enabled, lines.count >= 2 else { return lines.joined(separator: "\n") }
        return ([bold(lines[0]), dim(lines[1])] + lines.dropFirst(2)).joined(separator: "\n")
    }

    /// Removes ANSI SGR sequences (for measuring or comparing styled text).
    public static func strip(_ text: String) -> String {
        var out = ""
        var i = text.startIndex
        while i < text.endIndex {
            if text[i] == "\u{1B}", let m = text[i...].firstIndex(of: "m") {
                i = text.index(after: m)
            } else {
                out.append(text[i])
                i = text.index(after: i)
            }
        }
        return out
    }
}
