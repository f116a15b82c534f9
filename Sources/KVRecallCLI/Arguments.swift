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

/// `--method` of `kvrecall attend`: one attention method, or `all` of them side by side.
enum MethodChoice: ExpressibleByArgument, Equatable {
    case one(AttentionMethod)
    case all

    init?(argument: String) {
        if argument == "all" {
            self = .all
        } else if let method = AttentionMethod(rawValue: argument) {
            self = .one(method)
        } else {
            return nil
        }
    }

    static var allValueStrings: [String] { AttentionMethod.allCases.map(\.rawValue) + ["all"] }
    var defaultValueDescription: String {
        switch self {
        case .all: return "all"
        case .one(let m): return m.rawValue
        }
    }
}
