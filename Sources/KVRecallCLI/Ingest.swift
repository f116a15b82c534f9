import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

struct Ingest: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Ingest key/value (and prefill query) vectors from .npy or .safetensors into a store.",
        discussion: """
        Keys and values are [N, d] (one head) or [heads, N, d] (heads --head, --head+1, ...), \
        f32, f16 or bf16. Prefill queries (--queries) are kept for query-aware indexes \
        (RetrievalAttention). Appending to an existing head continues it; its dimension and \
        dtype must match. One ingest writes a head at a time: a second one into the same head \
        is refused while the first runs.

        NaN or Inf is rejected, naming the file, the row and the column, unless \
        --allow-non-finite. A finite value the storage dtype cannot hold is always rejected \
        the same way (f16: |x| > 65504; bf16: beyond 3.39e38): stored, it would become Inf \
        and attention over it NaN. Store such data as f32 (or bf16), or scale it.

        Examples:
          kvrecall ingest --store s --keys Data/minilm/keys.npy \\
              --values Data/minilm/values.npy \\
              --queries Data/minilm/prefill_queries.npy --layer 2 --head 6
          kvrecall ingest --store s --dtype f16 \\
              --keys kv.safetensors --keys-tensor layer2.head6.keys \\
              --values kv.safetensors --values-tensor layer2.head6.values
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions

    @Option(help: ArgumentHelp("Key vectors: .npy or .safetensors.", valueName: "file"))
    var keys: String
    @Option(help: ArgumentHelp("Value vectors, shaped like the keys.", valueName: "file"))
    var values: String
    @Option(help: ArgumentHelp("Prefill query vectors [M, d] or [heads, M, d] (optional).", valueName: "file"))
    var queries: String?
    @Option(help: ArgumentHelp("Tensor name of the keys in a .safetensors file.", valueName: "name"))
    var keysTensor: String?
    @Option(help: ArgumentHelp("Tensor name of the values in a .safetensors file.", valueName: "name"))
    var valuesTensor: String?
    @Option(help: ArgumentHelp("Tensor name of the queries in a .safetensors file.", valueName: "name"))
    var queriesTensor: String?
    @Option(help: "Storage dtype: f32, f16 or bf16 (default: the keys' dtype).")
    var dtype: DType?
    @Option(help: "Vectors per LMDB value (new heads only).")
    var blockSize: Int = KVStore.defaultBlockSize
    @Flag(help: "Store NaN/Inf instead of rejecting them (values beyond the dtype's range are still rejected).")
    var allowNonFinite = false
    @Flag(help: "No progress bar.")
    var quiet = false
    @Option(help: ArgumentHelp("Rows committed per write transaction (crash tests use small values).", visibility: .hidden))
    var rowsPerTransaction: Int = 16384

    func validate() throws {
        if blockSize < 1 || blockSize > 65536 { throw ValidationError("--block-size must be in 1...65536") }
        if rowsPerTransaction < 1 { throw ValidationError("--rows-per-transaction must be at least 1") }
    }

    func run() throws {
        let k = try loadTensor(path: keys, tensorName: keysTensor, role: "keys")
        let v = try loadTensor(path: values, tensorName: valuesTensor, role: "values")
        let q = try queries.map { try loadTensor(path: $0, tensorName: queriesTensor, role: "queries") }
        let storage = dtype ?? DType(k.dtype)
        try KVStore.validateIngest(keys: k, keysPath: keys, values: v, valuesPath: values,
                                   queries: q, queriesPath: queries, allowNonFinite: allowNonFinite, storage: storage)
        let store = try storeOptions.open(create: true)
        defer { store.close() }
        // One writer per head for the whole ingest: a concurrent ingest (or session) of the same
        // heads is refused instead of interleaving its chunks with ours.
        let headCount = k.shape.count == 3 ? k.shape[0] : 1
        guard Int(headOptions.id.head) + headCount - 1 <= Int(UInt16.max) else {
            throw RunError("--head \(headOptions.head) + \(headCount) heads exceeds head 65535")
        }
        let lease = try store.lockHeads((0..<headCount).map { h in
            var id = headOptions.id
            id.head += UInt16(h)
            return id
        })
        defer { lease.release() }
        let bar = ProgressBar("ingest", enabled: !quiet && isatty(2) != 0)
        let start = monotonicNanos()
        let infos = try store.ingest(keys: k, values: v, queries: q, first: headOptions.id, dtype: storage,
                                     blockSize: blockSize, allowNonFinite: allowNonFinite,
                                     metadata: ["source_keys": keys], rowsPerTransaction: rowsPerTransaction,
                                     progress: bar.update)
        let seconds = Double(monotonicNanos() - start) / 1e9
        for info in infos {
            print("head \(info.id): \(info.count) keys/values, \(info.queryCount) prefill queries, d=\(info.dimension), \(info.dtype.rawValue)")
        }
        print("ingested in \(fmt(seconds, 2)) s; store \(store.path) is \(store.environment.fileSize()) bytes on disk")
    }
}
