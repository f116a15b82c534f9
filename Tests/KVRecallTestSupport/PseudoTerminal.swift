import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// A program running on a pseudo-terminal, for testing what a person at a terminal sees: the
/// child gets a new session whose controlling terminal is the pty's slave side (so Ctrl-C is a
/// real SIGINT from the line discipline), and the test writes keystrokes to the master side and
/// reads the screen output back. Every read has a deadline; the child is killed if it outlives
/// the session.
public final class PseudoTerminal {
    public struct Timeout: Error, CustomStringConvertible {
        public let waitingFor: String
        public let transcript: String
        public var description: String { "timed out waiting for \(waitingFor); output so far:\n\(transcript.debugDescription)" }
    }

    public let pid: pid_t
    private let master: Int32
    private var pending = ""
    /// Everything the program wrote, as read so far.
    public private(set) var transcript = ""
    private var exitStatus: Int32?

    /// Spawns `executable` with `arguments` and exactly `environment` on a new `columns` x `rows` pty.
    public init(executable: String, arguments: [String], environment: [String: String],
                columns: UInt16 = 160, rows: UInt16 = 50) throws {
        var fd: Int32 = -1, slave: Int32 = -1
        var size = winsize(ws_row: rows, ws_col: columns, ws_xpixel: 0, ws_ypixel: 0)
        guard openpty(&fd, &slave, nil, nil, &size) == 0 else {
            throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
        }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        _ = fcntl(slave, F_SETFD, FD_CLOEXEC)
        defer { close(slave) }
        var nameBuffer = [CChar](repeating: 0, count: 256)
        guard ttyname_r(slave, &nameBuffer, nameBuffer.count) == 0 else {
            close(fd)
            throw POSIXError(.EIO)
        }
        let slavePath = String(cString: nameBuffer)

        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        // After setsid (done by posix_spawn before the file actions), opening the slave makes it
        // the child's controlling terminal; it becomes standard input, output and error.
        posix_spawn_file_actions_addopen(&actions, 0, slavePath, O_RDWR, 0)
        posix_spawn_file_actions_adddup2(&actions, 0, 1)
        posix_spawn_file_actions_adddup2(&actions, 0, 2)
        // No other descriptor of the test process (pipes of concurrent tests) leaks into the child:
        // glibc ignores a close action on a descriptor that is not open.
        let highest = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []).compactMap { Int32($0) }.max() ?? 255
        for other in 3...max(3, highest + 8) { posix_spawn_file_actions_addclose(&actions, other) }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var empty = sigset_t()
        sigemptyset(&empty)
        var defaults = sigset_t()
        sigemptyset(&defaults)
        for s in [SIGINT, SIGQUIT, SIGTSTP, SIGPIPE, SIGWINCH] { sigaddset(&defaults, s) }
        posix_spawnattr_setsigmask(&attributes, &empty)
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        let setsid: Int32 = 0x80  // POSIX_SPAWN_SETSID (glibc, under _GNU_SOURCE)
        posix_spawnattr_setflags(&attributes, Int16(setsid | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var child: pid_t = 0
        let rc = posix_spawn(&child, executable, &actions, &attributes, argv, envp)
        guard rc == 0 else {
            close(fd)
            throw POSIXError(POSIXErrorCode(rawValue: rc) ?? .EIO)
        }
        pid = child
        master = fd
    }

    deinit {
        if exitStatus == nil {
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
        }
        close(master)
    }

    /// Types `text` (control characters included: "\t" Tab, "\u{3}" Ctrl-C, "\u{4}" Ctrl-D, "\r" Enter).
    public func send(_ text: String) {
        let bytes = Array(text.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { write(master, $0.baseAddress, $0.count) }
            if n <= 0 { if errno == EINTR { continue } else { return } }
            offset += n
        }
    }

    /// Reads what is available within `milliseconds`; false at end of output (the child closed the pty).
    @discardableResult
    private func pump(milliseconds: Int32) -> Bool {
        var p = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
        let ready = poll(&p, 1, milliseconds)
        guard ready > 0 else { return true }
        var buffer = [UInt8](repeating: 0, count: 65536)
        let n = read(master, &buffer, buffer.count)
        guard n > 0 else { return n < 0 && errno == EINTR }  // EIO once the slave side is closed
        let text = String(decoding: buffer[0..<n], as: UTF8.self)
        transcript += text
        pending += text
        return true
    }

    /// Waits until the output not yet consumed contains `needle`, and returns it up to and
    /// including `needle` (consumed). Throws `Timeout` after `timeout` seconds or at end of output.
    @discardableResult
    public func expect(_ needle: String, timeout: TimeInterval = 10) throws -> String {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            if let range = pending.range(of: needle) {
                let consumed = String(pending[..<range.upperBound])
                pending = String(pending[range.upperBound...])
                return consumed
            }
            let left = deadline.timeIntervalSinceNow
            guard left > 0, pump(milliseconds: Int32(min(left, 0.2) * 1000) + 1) else {
                throw Timeout(waitingFor: needle.debugDescription, transcript: transcript)
            }
        }
    }

    /// Waits until the program reads the terminal character by character (ICANON off, as a line
    /// editor sets it while it reads a line). Keys sent before that are echoed and buffered by
    /// the kernel's line discipline, and a Ctrl-C then flushes them; so after a prompt, tests
    /// wait for this before typing.
    public func waitForRawMode(timeout: TimeInterval = 10) throws {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            var settings = termios()
            if tcgetattr(master, &settings) == 0 && settings.c_lflag & tcflag_t(ICANON) == 0 { return }
            guard deadline.timeIntervalSinceNow > 0 else { throw Timeout(waitingFor: "raw mode", transcript: transcript) }
            pump(milliseconds: 10)
        }
    }

    /// `expect(prompt)` then `waitForRawMode()`: the program is ready for keys.
    @discardableResult
    public func expectPrompt(_ prompt: String, timeout: TimeInterval = 10) throws -> String {
        let text = try expect(prompt, timeout: timeout)
        try waitForRawMode(timeout: timeout)
        return text
    }

    /// Waits for the child to exit (reading its last output) and returns its exit status, or
    /// kills it and throws `Timeout` after `timeout` seconds.
    public func waitForExit(timeout: TimeInterval = 10) throws -> Int32 {
        let deadline = Date().addingTimeInterval(timeout)
        while true {
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid {
                while pollReadable(), pump(milliseconds: 0) {}
                let code: Int32 = (status & 0x7f) == 0 ? (status >> 8) & 0xff : 128 + (status & 0x7f)
                exitStatus = code
                return code
            }
            guard deadline.timeIntervalSinceNow > 0 else {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
                exitStatus = -1
                throw Timeout(waitingFor: "exit", transcript: transcript)
            }
            pump(milliseconds: 50)
        }
    }

    private func pollReadable() -> Bool {
        var p = pollfd(fd: master, events: Int16(POLLIN), revents: 0)
        return poll(&p, 1, 0) > 0 && (p.revents & Int16(POLLIN)) != 0
    }

    /// The transcript with terminal escape sequences (CSI) and carriage returns removed.
    public var plainTranscript: String { PseudoTerminal.plain(transcript) }

    public static func plain(_ text: String) -> String {
        var out = ""
        var it = text.unicodeScalars.makeIterator()
        while let c = it.next() {
            if c == "\u{1B}" {
                guard let next = it.next() else { break }
                if next == "[" {
                    while let x = it.next(), !(0x40...0x7E).contains(x.value) {}
                }
            } else if c != "\r" && c != "\u{7}" {
                out.unicodeScalars.append(c)
            }
        }
        return out
    }
}
