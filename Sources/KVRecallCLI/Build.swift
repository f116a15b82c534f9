import ArgumentParser
import Foundation
import KVRecall

/// Index build parameters, named as faiss and hnswlib users know them.
struct BuildParameterOptions: ParsableArguments {
    @Option(name: .customLong("M"), help: "HNSW: neighbours per node (2M on layer 0).")
    var M: Int = 16
    @Option(help: "HNSW: candidate list size while inserting.")
    var efConstruction: Int = 200
    @Option(help: "IVF: number of clusters (default 4 sqrt(N)).")
    var nlist: Int?
    @Option(help: "k-means iterations (IVF, tree).")
    var iterations: Int = 20
    @Option(help: "k-means metric (IVF, tree).")
    var clusterMetric: ClusterMetric = .l2
    @Option(help: "LSH: number of tables (L).")
    var tables: Int = 150
    @Option(help: "LSH: bits per table (K), 1...16.")
    var bits: Int = 10
    @Option(help: "Retrieval graph: degree cap.")
    var graphDegree: Int = 48
    @Option(help: "Retrieval graph: exact top keys linked per training query (Nq).")
    var queryNeighbours: Int = 100
    @Option(help: "Retrieval graph: most prefill queries used for training.")
    var trainingQueries: Int = 8192
    @Option(help: "Retrieval graph: L2 nearest hot keys linked per hot key.")
    var localNeighbours: Int = 8
    @Option(help: "Retrieval graph: slots per key for connectivity edges.")
    var connectivitySlots: Int = 2
    @Option(help: "Landmark: positions per block.")
    var landmarkBlockSize: Int = 64
    @Option(help: "Tree: levels of centroids (2 or more).")
    var levels: Int = 2
    @Option(help: "Tree: fine centroids as a fraction of the keys.")
    var fineFraction: Double = 0.05
    @Option(help: "Random seed: the same seed gives the same index.")
    var seed: UInt64 = 42
    @Option(help: "Build threads.")
    var threads: Int = 2

    func validate() throws {
        try validateSettings { try parameters.validate() }
    }

    var parameters: IndexBuildParameters {
        var p = IndexBuildParameters()
        p.M = M
        p.efConstruction = efConstruction
        p.nlist = nlist
        p.iterations = iterations
        p.clusterMetric = clusterMetric
        p.tables = tables
        p.bits = bits
        p.levels = levels
        p.graphDegree = graphDegree
        p.queryNeighbours = queryNeighbours
        p.trainingQueries = trainingQueries
        p.localNeighbours = localNeighbours
        p.landmarkBlockSize = landmarkBlockSize
        p.connectivitySlots = connectivitySlots
        p.fineFraction = fineFraction
        p.seed = seed
        p.threads = threads
        return p
    }
}

struct Build: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Build an ANN index over a head's keys and store it in the store.",
        discussion: """
        Kinds: hnsw (graph), ivf (k-means lists), lsh (SimHash tables), tree (hierarchical centroids),
        retrieval (RetrievalAttention's graph, trained on the head's prefill queries: ingest --queries),
        landmark (block representatives for Landmark/Quest attention).
        The index is written in one transaction: after a crash it is either whole or absent.

        Examples:
          kvrecall build --store s --layer 2 --head 6 --index hnsw --M 16 --ef-construction 200
          kvrecall build --store s --all-heads --index ivf --nlist 256 --cluster-metric ip
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions
    @Flag(help: "Build for every head of the store.")
    var allHeads = false
    @Option(help: ArgumentHelp("Index kind.", valueName: "kind"))
    var index: IndexKind
    @OptionGroup var build: BuildParameterOptions
    @Flag(help: "No progress bar.")
    var quiet = false

    func validate() throws {
        guard index.type != nil else {
            throw ValidationError("--index must be one of \(IndexKind.stored.map(\.rawValue).joined(separator: ", ")) (got '\(index.rawValue)')")
        }
    }

    func run() throws {
        let kind = index
        let store = try storeOptions.open()
        defer { store.close() }
        let heads = allHeads ? try store.heads().map(\.id) : [headOptions.id]
        for id in heads {
            let info = try store.info(id)
            if let nlist = build.nlist, nlist > info.count {
                throw RunError("--nlist \(nlist) exceeds the \(info.count) keys of head \(id)")
            }
            let bar = ProgressBar("build \(kind.rawValue) \(id)", enabled: !quiet && isatty(2) != 0)
            let start = monotonicNanos()
            let built = try store.read { snapshot in
                try IndexCatalog.build(kind, keys: try snapshot.vectors(id, .keys), queries: try snapshot.vectors(id, .queries),
                                       parameters: build.parameters, progress: bar.update)
            }
            let seconds = Double(monotonicNanos() - start) / 1e9
            try IndexCatalog.save(built, in: store, head: id)
            let bytes = IndexCatalog.byteSize(built)
            print("head \(id): \(kind.rawValue) over \(built.count) keys built in \(fmt(seconds, 2)) s, \(bytes) bytes (\(fmt(Double(bytes) / Double(max(1, built.count)), 1)) bytes per key)")
        }
    }
}
