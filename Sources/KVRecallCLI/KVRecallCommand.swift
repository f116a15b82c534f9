import ArgumentParser
import KVRecall

@main
struct KVRecallCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "kvrecall",
        abstract: "Top-k attention over an LMDB-backed KV cache, answered by vector retrieval.",
        discussion: """
        A store is a directory holding one LMDB environment with the key, value and prefill-query
        vectors of any number of heads, addressed by (context, layer, kv-head).

        Typical session:
          kvrecall ingest --store /tmp/s --keys K.npy --values V.npy --queries Q.npy --layer 2 --head 6
          kvrecall info   --store /tmp/s
          kvrecall query  --store /tmp/s --layer 2 --head 6 --queries decode.npy -k 10
        """,
        subcommands: [Ingest.self, Info.self, Query.self, Demo.self, Bench.self]
    )
}
