import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

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
    @Option(help: "IVF, tree: list codes, sq8 (d bytes per key) or f16 (2d bytes), re-ranked exactly.")
    var listCodes: ListCodeKind = .sq8
    @Option(help: "LSH: number of tables (L).")
    var tables: Int = 150
    @Option(help: "LSH: bits per table (K), 1...16.")
    var bits: Int = 10
    @Option(help: "Retrieval graph: degree cap.")
    var graphDegree: Int = IndexBuildParameters().graphDegree
    @Option(help: "Retrieval graph: exact top keys linked per training query (Nq).")
    var queryNeighbours: Int = 100
    @Option(help: "Retrieval graph: most prefill queries given exact top keys for training (up to 45056 more get theirs among the keys those rank).")
    var trainingQueries: Int = IndexBuildParameters().trainingQueries
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
        p.listCodes = listCodes
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

/// `--index` of `kvrecall build`: a stored index kind, or `auto` (profile the head, choose its policy, build what it needs).
enum BuildChoice: ExpressibleByArgument, Equatable {
    case kind(IndexKind)
    case auto

    init?(argument: String) {
        if argument == "auto" {
            self = .auto
        } else if let kind = IndexKind(rawValue: argument), kind.type != nil {
            self = .kind(kind)
        } else {
            return nil
        }
    }

    static var allValueStrings: [String] { IndexKind.stored.map(\.rawValue) + ["auto"] }
}

/// How a build profiles a head for `auto` and calibrates its search knob.
struct CalibrationOptions: ParsableArguments {
    @Option(help: "Recall@k against exact search that the calibrated ef / nprobe / beam must reach on held-out prefill queries (0 < R <= 1).")
    var targetRecall: Double = 0.95
    @Option(help: "Prefill queries held out (the last ones) to calibrate on and to profile the head; never used for training. At most a quarter of them.")
    var heldOut: Int = 128
    @Option(help: "Query heads per KV head in the prefill queries: rows g*t ..< g*t+g are position t's (kvrecall capture writes Gemma 3's 4).")
    var group: Int = 1
    @OptionGroup var budget: BudgetOptions
    @Option(help: "auto: a head whose every query head keeps this much mass on sinks+window is streaming.")
    var streamingMass: Double = 0.95
    @Option(help: "auto: a head with a query head keeping less than this with the exact top-k is diffuse (estimation is tried).")
    var diffuseMass: Double = 0.80
    @Option(help: "auto: the median output error against exact attention (held-out prefill queries) the chosen method stays within; the cheapest candidate that does wins.")
    var targetError: Double = PolicyParameters().targetError

    func validate() throws {
        if group < 1 { throw ValidationError("--group must be at least 1 (got \(group))") }
        try validateSettings {
            try calibration.validate()
            try attention.validate()
            try policy.validate()
        }
    }

    var calibration: CalibrationParameters {
        var p = CalibrationParameters()
        p.targetRecall = targetRecall
        p.heldOutQueries = heldOut
        p.k = budget.k
        return p
    }

    var attention: AttentionParameters { budget.attention }

    var policy: PolicyParameters {
        var p = PolicyParameters()
        p.streamingMass = streamingMass
        p.diffuseMass = diffuseMass
        p.targetError = targetError
        return p
    }
}

struct Build: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Build an ANN index over a head's keys and store it in the store.",
        discussion: """
        Kinds: hnsw (graph), ivf (k-means lists), lsh (SimHash tables), tree
        (hierarchical centroids), retrieval (RetrievalAttention's graph,
        trained on the head's prefill queries: ingest --queries), landmark
        (block representatives for Landmark/Quest attention), and auto.

        auto profiles the head on its last prefill queries (per query head
        with --group: mass on sinks and window, mass with the exact top-k,
        effective support), measures on them the output error of each
        candidate and chooses: streaming (sinks and window hold the mass; no
        index), retrieval (the retrieval graph; k raised for a diffuse head
        until it keeps 0.9 of its mass, at most 10% of the keys), or
        estimation (IVF and the estimation zone, when its error is lower).
        `attend --method auto` then runs what each head needs; `info` and
        the REPL's `explain` show the choice and its figures.

        With prefill queries, the last of them (--held-out) stay out of
        training and the search knob (ef, nprobe or beam) is calibrated on
        them: the smallest value reaching --target-recall, stored with the
        index and used whenever --ef / --nprobe / --beam is not given.
        The index is written in one transaction: after a crash it is either
        whole or absent.

        Examples:
          kvrecall build --store s --layer 2 --head 6 --index hnsw --M 16
          kvrecall build --store s --all-heads --index ivf --nlist 256
          kvrecall build --store s --all-heads --index auto --group 4
        """
    )

    @OptionGroup var storeOptions: StoreOptions
    @OptionGroup var headOptions: HeadOptions
    @Flag(help: "Build for every head of the store.")
    var allHeads = false
    @Option(help: ArgumentHelp("Index kind, or auto.", valueName: "kind"))
    var index: BuildChoice
    @OptionGroup var build: BuildParameterOptions
    @OptionGroup var calibration: CalibrationOptions
    @Flag(help: "No progress bar.")
    var quiet = false

    func run() throws {
        let store = try storeOptions.open()
        defer { store.close() }
        let heads = allHeads ? try store.heads().map(\.id) : [headOptions.id]
        for id in heads {
            let info = try store.info(id)
            if let nlist = build.nlist, nlist > info.count {
                throw RunError("--nlist \(nlist) exceeds the \(info.count) keys of head \(id)")
            }
            let start = monotonicNanos()
            var plan: HeadPlan? = nil
            var kind: IndexKind? = nil
            var planned: (index: any BuildableIndex, calibration: SearchCalibration?)? = nil
            switch index {
            case .kind(let k): kind = k
            case .auto:
                // The quantized method is a candidate: a head stored before the tier gets its codes first.
                if info.codes == nil { try store.buildCodes(id, format: CodeFormat()) }
                let made = try store.read { snapshot in
                    try HeadPlanner.plan(keys: try snapshot.vectors(id, .keys), values: try snapshot.vectors(id, .values),
                                         codes: try snapshot.codes(id), queries: try snapshot.vectors(id, .queries),
                                         group: calibration.group, calibration: calibration.calibration,
                                         attention: calibration.attention, policy: calibration.policy, build: build.parameters)
                }
                plan = made.plan
                if let index = made.index { planned = (index, made.calibration) }
                print("head \(id): auto chose \(made.plan.policy.rawValue): \(made.plan.reason)")
                for line in made.plan.candidateLines { print("  candidate \(line)") }
                if let profile = made.plan.profile { print("  profile: \(profile.summary)") }
            }
            if let planned {
                // The index auto measured its plan with, kept as it was built and calibrated.
                try IndexCatalog.save(planned.index, in: store, head: id, calibration: planned.calibration)
                print("  \(planned.index.kind.rawValue) over \(planned.index.count) keys kept from the measurement")
                if let c = planned.calibration { print("  calibrated \(c.summary)") }
            } else if let kind {
                let bar = ProgressBar("build \(kind.rawValue) \(id)", enabled: !quiet && isatty(2) != 0)
                let built = try store.read { snapshot in
                    let keys = try snapshot.vectors(id, .keys)
                    return try HeadPlanner.buildCalibrated(kind, keys: keys, count: keys.count, queries: try snapshot.vectors(id, .queries),
                                                           build: build.parameters, calibration: calibration.calibration,
                                                           progress: bar.update)
                }
                try IndexCatalog.save(built.index, in: store, head: id, calibration: built.calibration)
                let seconds = Double(monotonicNanos() - start) / 1e9
                let bytes = IndexCatalog.byteSize(built.index)
                print("\(plan == nil ? "head \(id): " : "  ")\(kind.rawValue) over \(built.index.count) keys built in \(fmt(seconds, 2)) s, \(bytes) bytes (\(fmt(Double(bytes) / Double(max(1, built.index.count)), 1)) bytes per key)")
                if let c = built.calibration {
                    print("  calibrated \(c.summary)")
                } else if SearchKnob(kind: kind) != nil {
                    print("  not calibrated (fewer than \(CalibrationParameters.minimumQueries * 4) prefill queries; ingest --queries): search uses the defaults")
                }
            }
            try plan?.save(in: store, head: id)
        }
    }
}
