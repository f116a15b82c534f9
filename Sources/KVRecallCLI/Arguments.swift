import ArgumentParser
import KVRecall
import KVRecallInterface
import KVRecallDecoder

// The library's enums as command-line values: parsed, listed in `--help` and completed by
// ArgumentParser from their raw values, so the CLI holds no second list of names.
extension IndexKind: ExpressibleByArgument {
    /// Only the kinds `build` stores and `query --index` reads (flat and hip are not stored).
    public static var allValueStrings: [String] { IndexKind.stored.map(\.rawValue) }
}
extension AttentionMethod: ExpressibleByArgument {}
extension ClusterMetric: ExpressibleByArgument {}
extension ListCodeKind: ExpressibleByArgument {}
extension GroupSelection: ExpressibleByArgument {}
extension DType: ExpressibleByArgument {}
extension PrefillQueryRule: ExpressibleByArgument {}

/// Runs a library settings type's `validate()` as an argument check: the library owns the rules
/// (the same for the CLI, the REPL, the session and the C ABI), its message becomes the usage error.
func validateSettings(_ check: () throws -> Void) throws {
    do { try check() } catch let error as IndexError { throw ValidationError(error.description) }
}

/// A `--method` value (`attend`, `generate`, `eval`): one method, a comma-separated list, or
/// `all` (nil: the caller's "every method"). Unknown names, empty ones (`exact,,hnsw`) and
/// repeats are refused: they used to pass silently.
func parseMethodList(_ text: String, allowed: [AttentionMethod]) throws -> [AttentionMethod]? {
    if text.trimmingCharacters(in: .whitespaces) == "all" { return nil }
    var methods: [AttentionMethod] = []
    for part in text.split(separator: ",", omittingEmptySubsequences: false) {
        let name = part.trimmingCharacters(in: .whitespaces)
        guard !name.isEmpty else {
            throw ValidationError("--method '\(text)' has an empty name (two commas in a row, or a comma at an end)")
        }
        guard let method = AttentionMethod(rawValue: name), allowed.contains(method) else {
            throw ValidationError("--method must be one of \(allowed.map(\.rawValue).joined(separator: ", ")) or all, or a comma-separated list (got '\(name)')")
        }
        guard !methods.contains(method) else { throw ValidationError("--method lists \(name) twice") }
        methods.append(method)
    }
    return methods
}
