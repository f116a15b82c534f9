import Foundation

/// Runs the built `kvrecall` executable (found beside the test bundle) and captures its output.
public struct CLIResult {
    public let status: Int32
    public let stdout: String
    public let stderr: String
}

public func kvrecallExecutable() -> String {
    let candidates = [Bundle.main.bundleURL, Bundle.main.bundleURL.deletingLastPathComponent()]
        + Bundle.allBundles.map { $0.bundleURL.deletingLastPathComponent() }
    for dir in candidates {
        let path = dir.appendingPathComponent("kvrecall").path
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    // Fall back to the package's debug build folder, found from this source file.
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    return root.appendingPathComponent(".build/debug/kvrecall").path
}

@discardableResult
public func runCLI(_ arguments: [String], stdin: String? = nil, environment: [String: String]? = nil) throws -> CLIResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: kvrecallExecutable())
    process.arguments = arguments
    if let environment { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
    let out = Pipe(), err = Pipe(), input = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = input
    try process.run()
    if let stdin { input.fileHandleForWriting.write(stdin.data(using: .utf8)!) }
    try? input.fileHandleForWriting.close()
    // Read both pipes concurrently so a full pipe never blocks the child.
    let errBox = DataBox()
    let errThread = Thread { errBox.put(err.fileHandleForReading.readDataToEndOfFile()) }
    errThread.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    let errData = errBox.take()
    return CLIResult(status: process.terminationStatus,
                     stdout: String(decoding: outData, as: UTF8.self),
                     stderr: String(decoding: errData, as: UTF8.self))
}

/// Hands bytes read on another thread to the waiting one (a condition variable, so the hand-over
/// is synchronised: polling `Thread.isFinished` is not, and ThreadSanitizer reports it).
private final class DataBox: @unchecked Sendable {
    private let condition = NSCondition()
    private var data: Data?
    func put(_ value: Data) {
        condition.lock()
        data = value
        condition.signal()
        condition.unlock()
    }
    func take() -> Data {
        condition.lock()
        defer { condition.unlock() }
        while data == nil { condition.wait() }
        return data!
    }
}

/// The release build of `kvrecall` when it exists (`swift build -c release --product kvrecall`,
/// which Tools/test.sh runs): the real-model tests need its speed. Else the debug build.
public func kvrecallReleaseExecutable() -> String {
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let release = root.appendingPathComponent(".build/release/kvrecall").path
    return FileManager.default.isExecutableFile(atPath: release) ? release : kvrecallExecutable()
}

/// Runs `executable` with `arguments` and captures its output (see `runCLI`).
@discardableResult
public func runExecutable(_ executable: String, _ arguments: [String]) throws -> CLIResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let out = Pipe(), err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let errBox = DataBox()
    let errThread = Thread { errBox.put(err.fileHandleForReading.readDataToEndOfFile()) }
    errThread.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return CLIResult(status: process.terminationStatus, stdout: String(decoding: outData, as: UTF8.self),
                     stderr: String(decoding: errBox.take(), as: UTF8.self))
}
