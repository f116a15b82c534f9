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
    let errThread = Thread { errBox.data = err.fileHandleForReading.readDataToEndOfFile() }
    errThread.start()
    let outData = out.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    while !errThread.isFinished { usleep(1000) }
    let errData = errBox.data
    return CLIResult(status: process.terminationStatus,
                     stdout: String(decoding: outData, as: UTF8.self),
                     stderr: String(decoding: errData, as: UTF8.self))
}

/// Holds bytes read on another thread; read only after that thread has finished.
private final class DataBox: @unchecked Sendable { var data = Data() }
