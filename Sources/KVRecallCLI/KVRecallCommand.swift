import ArgumentParser
import KVRecall
import KVRecallInterface

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
          kvrecall build  --store /tmp/s --layer 2 --head 6 --index hnsw
          kvrecall query  --store /tmp/s --layer 2 --head 6 --queries decode.npy -k 10 --index hnsw --ef 64
          kvrecall repl   --store /tmp/s        (interactive: query, attend, compare, explain)
        """,
        subcommands: [Ingest.self, Info.self, Build.self, Codes.self, Query.self, Attend.self, Replay.self, Repl.self, Demo.self, Bench.self,
                      Generate.self, Eval.self, Capture.self]
    )
}
