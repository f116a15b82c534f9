import ArgumentParser
import KVRecall

// The library's enums as command-line values: parsed, listed in `--help` and completed by
// ArgumentParser from their raw values, so the CLI holds no second list of names.
extension IndexKind: ExpressibleByArgument {}
extension AttentionMethod: ExpressibleByArgument {}
extension ClusterMetric: ExpressibleByArgument {}
extension GroupSelection: ExpressibleByArgument {}

/// Runs a library settings type's `validate()` as an argument check: the library owns the rules
/// (the same for the CLI, the REPL, the session and the C ABI), its message becomes the usage error.
func validateSettings(_ check: () throws -> Void) throws {
    do { try check() } catch let error as IndexError { throw ValidationError(error.description) }
}
