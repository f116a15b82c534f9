import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes

extension AttentionResult {
    /// The first query head whose output or log-sum-exp is not finite, or nil. Finite queries, keys
    /// and values (which every store path enforces) give a finite result unless the arithmetic
    /// overflows f32: a scaled score |scale · q·k| above 3.4e38, or a weighted sum of huge values.
    /// Callers refuse such a result (`AttentionResult.notFinite`) rather than hand back NaN.
    public var firstNonFiniteHead: Int? {
        heads.firstIndex { !$0.lse.isFinite || !$0.output.allSatisfy { $0.isFinite } }
    }

    /// Why a result is not finite, for the error that refuses it: "... is not finite: ...".
    public static let notFinite = "is not finite although the queries, keys and values are: a scaled query-key "
        + "score (or the weighted sum of the values) overflows f32 (3.4e38); scale the queries, keys or values down"
}
