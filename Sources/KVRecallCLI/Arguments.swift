import ArgumentParser
import KVRecall

// The library's enums as command-line values: parsed, listed in `--help` and completed by
// ArgumentParser from their raw values, so the CLI holds no second list of names.
extension IndexKind: ExpressibleByArgument {}
extension AttentionMethod: ExpressibleByArgument {}
extension ClusterMetric: ExpressibleByArgument {}
