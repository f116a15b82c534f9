import Foundation
import KVRecall

/// The interactive session behind `kvrecall repl`, without any terminal: it parses a command
/// line, runs it against its state (open store, current head, current query, settings, last
/// search) and returns the text to print. The CLI's front end adds line editing, history and
/// completion; tests drive this type directly.
///
/// A mistyped command, a bad argument or a failed search is returned as `Reply.error` and leaves
/// the state as it was, so the session goes on.
public final class REPLInterpreter {
    /// What one command line produced.
    public struct Reply: Equatable, Sendable {
        /// Text for standard output (no trailing newline; empty for none).
        public var output: String
        /// The error message, when the command failed (without an "error:" prefix).
        public var error: String?
        /// The command asked to end the session.
        public var quit: Bool

        public init(output: String = "", error: String? = nil, quit: Bool = false) {
            self.output = output
            self.error = error
            self.quit = quit
        }

        public var succeeded: Bool { error == nil }
    }

    /// The knobs `set` changes.
    public struct Settings: Equatable, Sendable {
        public var k = 100
        /// nil: the index's calibrated value (or the library default when it has none).
        public var ef: Int? = nil
        public var nprobe: Int? = nil
        public var window = 64
        public var sinks = 4
        public var method = AttentionMethod.exact
        public init() {}

        /// The attention parameters these settings give (other knobs at their defaults).
        public var attention: AttentionParameters {
            AttentionParameters(k: k, sinks: sinks, window: window, ef: ef, nprobe: nprobe)
        }
    }

    /// The query vector searches run with.
    public struct CurrentQuery: Sendable {
        /// Where it came from, e.g. "prefill row 17" or "row 3 of queries.npy".
        public var label: String
        public var vector: [Float]
        public var head: HeadID
    }

    /// What one search touched, for `explain`.
    public struct SearchRecord: Sendable {
        /// "exact top-k" for `query`, else the attention method's name.
        public var method: String
        public var head: HeadID
        public var query: String
        public var keyCount: Int
        public var parameters: AttentionParameters
        public var stats: SearchStats
        /// Positions attended, of which static (sinks and window) and retrieved; nil for `query`.
        public var attended: Int?
        public var staticCount: Int?
        public var retrieved: Int?
        public var estimatedClusters = 0
        public var estimatedPositions = 0
        public var medianMicros: Double
        public var timings: Int
        /// What ran (`auto`'s choice), the plan behind it and the calibrated knob it used.
        public var effective: AttentionMethod? = nil
        public var plan: HeadPlan? = nil
        public var calibration: SearchCalibration? = nil
    }

    public private(set) var store: KVStore?
    /// Methods prepared by earlier commands (index loaded, cluster summary computed), reused while the store is unchanged.
    private let preparedMethods = PreparedMethodCache()
    public private(set) var headID: HeadID?
    public private(set) var query: CurrentQuery?
    public private(set) var settings = Settings()
    /// The last `query` (one record), `attend` (one) or `compare` (one per method).
    public private(set) var lastSearch: [SearchRecord] = []
    public var style: TerminalStyle
    /// Times each attention call is repeated by `attend` and `compare` for the median latency.
    public var repetitions: Int
    private var random: SeededGenerator

    /// `seed` fixes what `query random` picks (by default a seed from the system's generator).
    public init(style: TerminalStyle = .plain, seed: UInt64? = nil, repetitions: Int = 5) {
        self.style = style
        self.repetitions = max(1, repetitions)
        random = SeededGenerator(seed: seed ?? UInt64.random(in: 0...UInt64.max))
    }

    deinit { store?.close() }

    /// Closes the open store.
    public func close() {
        store?.close()
        store = nil
        preparedMethods.removeAll()
        headID = nil
        query = nil
        lastSearch = []
    }

    /// Where the interactive session keeps its history: `$KVRECALL_HISTORY` when set (set and
    /// empty: no history file), else `~/.kvrecall_history`; nil without either.
    public static func historyPath(environment: [String: String]) -> String? {
        if let path = environment["KVRECALL_HISTORY"] { return path.isEmpty ? nil : path }
        guard let home = environment["HOME"], !home.isEmpty else { return nil }
        return home + "/.kvrecall_history"
    }

    /// Opens the store at `path` (as `open DIR` does, without tokenizing the path).
    public func open(path: String) -> Reply {
        do { return Reply(output: try open([path])) } catch { return Reply(error: String(describing: error)) }
    }

    /// "kvrecall 0/2/6> " with a current head, "kvrecall> " without.
    public var prompt: String { headID.map { "kvrecall \($0)> " } ?? "kvrecall> " }

    // MARK: Running a line

    /// Runs one command line. Blank lines and `#` comments do nothing.
    public func execute(_ line: String) -> Reply {
        do {
            let words = try REPLCommand.tokenize(line)
            guard let first = words.first else { return Reply() }
            let args = Array(words.dropFirst())
            guard let command = REPLCommand.named(first.lowercased()) else {
                let near = REPLCommand.suggestions(for: first, among: REPLCommand.all.map(\.name))
                let hint = near.isEmpty ? "" : " (did you mean \(near.map { "'\($0)'" }.joined(separator: " or "))?)"
                throw REPLError("unknown command '\(first)'\(hint); type `help` for the commands")
            }
            switch command.name {
            case "open": return Reply(output: try open(args))
            case "heads": try arity(command, args, 0); return Reply(output: try heads())
            case "use": return Reply(output: try use(args))
            case "info": try arity(command, args, 0); return Reply(output: try info())
            case "set": return Reply(output: try set(args))
            case "settings": try arity(command, args, 0); return Reply(output: showSettings())
            case "query": return Reply(output: try selectQuery(args))
            case "attend": return Reply(output: try attend(args))
            case "compare": try arity(command, args, 0); return Reply(output: try compare())
            case "explain": try arity(command, args, 0); return Reply(output: try explain())
            case "help": return Reply(output: try help(args))
            case "quit": try arity(command, args, 0); return Reply(quit: true)
            default: throw REPLError("unknown command '\(first)'")
            }
        } catch let error as REPLError {
            return Reply(error: error.description)
        } catch {
            return Reply(error: String(describing: error))
        }
    }

    private func arity(_ command: REPLCommand, _ args: [String], _ count: Int) throws {
        guard args.count == count else {
            throw REPLError("`\(command.name)` takes \(count == 0 ? "no arguments" : "\(count)"); usage: \(command.usage)")
        }
    }

    private func usageError(_ name: String, _ problem: String) -> REPLError {
        REPLError("\(problem); usage: \(REPLCommand.named(name)!.usage)")
    }

    // MARK: Store and heads

    private func requireStore() throws -> KVStore {
        guard let store else { throw REPLError("no store open; use `open DIR`") }
        return store
    }

    private func requireHead() throws -> (KVStore, HeadInfo) {
        let store = try requireStore()
        guard let headID else { throw REPLError("no head selected; use `use C/L/H` (see `heads`)") }
        return (store, try store.info(headID))
    }

    private func requireQuery() throws -> (KVStore, HeadInfo, CurrentQuery) {
        let (store, info) = try requireHead()
        guard let query, query.head == info.id else {
            throw REPLError("no query selected; use `query ROW`, `query random` or `query file Q.npy ROW`")
        }
        guard query.vector.count == info.dimension else {
            throw REPLError("the current query has dimension \(query.vector.count) but head \(info.id) has \(info.dimension)")
        }
        return (store, info, query)
    }

    private func describe(_ info: HeadInfo, indexes: Set<String>) -> String {
        let built = indexes.isEmpty ? "no indexes" : "indexes: " + indexes.sorted().joined(separator: ", ")
        return "\(info.count) keys, d=\(info.dimension), \(info.dtype.rawValue), \(info.queryCount) prefill queries; \(built)"
    }

    private func open(_ args: [String]) throws -> String {
        guard args.count == 1 else { throw usageError("open", "`open` takes one directory") }
        let path = NSString(string: args[0]).expandingTildeInPath
        var options = Environment.Options()
        options.readOnly = true
        // LMDB forbids opening one environment twice in a process: reopening the open store closes it first.
        func canonical(_ p: String) -> String { URL(fileURLWithPath: p).resolvingSymlinksInPath().standardizedFileURL.path }
        if let store, canonical(store.path) == canonical(path) { close() }
        let opened = try KVStore(path: path, options: options)
        let heads: [HeadInfo]
        let indexes: [HeadID: Set<String>]
        do {
            heads = try opened.heads()
            indexes = try opened.indexNames()
        } catch {
            opened.close()
            throw error
        }
        close()
        preparedMethods.removeAll()
        store = opened
        guard let first = heads.first else {
            return "opened \(path): no heads yet (add some with `kvrecall ingest`)"
        }
        headID = first.id
        return "opened \(path): \(heads.count) head\(heads.count == 1 ? "" : "s")\n"
            + "using head \(style.bold(first.id.description)): \(describe(first, indexes: indexes[first.id] ?? []))"
    }

    private func heads() throws -> String {
        let store = try requireStore()
        let heads = try store.heads()
        guard !heads.isEmpty else { return "no heads in \(store.path)" }
        let indexes = try store.indexNames()
        var table = TextTable(["", "head", "d", "dtype", "keys", "prefill_q", "indexes"])
        for h in heads {
            table.add([h.id == headID ? "*" : "", h.id.description, "\(h.dimension)", h.dtype.rawValue, "\(h.count)",
                       "\(h.queryCount)", (indexes[h.id] ?? []).sorted().joined(separator: ",")])
        }
        return style.render(table)
    }

    private func use(_ args: [String]) throws -> String {
        guard args.count == 1 else { throw usageError("use", "`use` takes one head") }
        let store = try requireStore()
        let text = args[0]
        guard let id = HeadID(text) ?? HeadID("0/" + text) else {
            throw usageError("use", "'\(text)' is not a head: write context/layer/head, e.g. 0/2/6")
        }
        let heads = try store.heads()
        guard let info = heads.first(where: { $0.id == id }) else {
            let known = heads.prefix(12).map(\.id.description).joined(separator: ", ")
            throw REPLError("no head \(id) in this store" + (heads.isEmpty ? " (it has no heads)" : "; heads: \(known)\(heads.count > 12 ? ", ..." : "")"))
        }
        if id == headID { return "already using head \(id)" }
        headID = id
        let cleared = query != nil
        query = nil
        lastSearch = []
        let indexes = try store.indexNames()[id] ?? []
        return "using head \(style.bold(id.description)): \(describe(info, indexes: indexes))" + (cleared ? "\n(query cleared)" : "")
    }

    private func availableMethods(_ store: KVStore, _ id: HeadID) throws -> (available: [AttentionMethod], missing: [AttentionMethod]) {
        let available = AttentionMethod.available(built: try store.records(of: id))
        return (available, AttentionMethod.allCases.filter { !available.contains($0) })
    }

    /// "retrieval, lsh, estimate (index ivf)": methods not built, with the index they need when it is named otherwise.
    private func missingList(_ missing: [AttentionMethod]) -> String {
        missing.map { m in
            if m == .quantized { return "quantized (kvrecall codes)" }
            return m.indexKind.map { $0.rawValue == m.rawValue ? m.rawValue : "\(m.rawValue) (index \($0.rawValue))" } ?? m.rawValue
        }.joined(separator: ", ")
    }

    private func info() throws -> String {
        let store = try requireStore()
        let heads = try store.heads()
        var lines = ["store    \(store.path) (read-only): \(heads.count) head\(heads.count == 1 ? "" : "s"), \(store.environment.fileSize()) bytes on disk"]
        if let headID, let info = heads.first(where: { $0.id == headID }) {
            lines.append("head     \(headID): \(describe(info, indexes: try store.indexNames()[headID] ?? []))")
            if let refresh = try store.read({ try RefreshStatus.load(snapshot: $0, head: headID) }) {
                lines.append("refresh  \(refresh.summary) (a session's long decode: plan and index made again)")
            }
            lines.append("query    " + (query?.label ?? "none (use `query ROW`, `query random` or `query file Q.npy ROW`)"))
            let (available, missing) = try availableMethods(store, headID)
            lines.append("methods  " + available.map(\.rawValue).joined(separator: ", ")
                         + (missing.isEmpty ? "" : " (not built: \(missingList(missing)))"))
        } else {
            lines.append("head     none (use `use C/L/H`)")
        }
        let s = settings
        lines.append("settings k=\(s.k) sinks=\(s.sinks) window=\(s.window) ef=\(s.ef.map(String.init) ?? "calibrated") nprobe=\(s.nprobe.map(String.init) ?? "calibrated") method=\(s.method.rawValue)")
        return lines.joined(separator: "\n")
    }

    // MARK: Settings

    private func set(_ args: [String]) throws -> String {
        guard args.count == 2 else {
            throw usageError("set", args.isEmpty ? "`set` needs a setting and a value" : "`set` takes a setting and one value")
        }
        let name = args[0].lowercased(), value = args[1]
        guard REPLCommand.settingNames.contains(name) else {
            let near = REPLCommand.suggestions(for: name, among: REPLCommand.settingNames)
            throw REPLError("no setting '\(args[0])'\(near.isEmpty ? "" : " (did you mean '\(near[0])'?)"); settings: \(REPLCommand.settingNames.joined(separator: ", "))")
        }
        if name == "method" {
            guard let method = AttentionMethod(rawValue: value.lowercased()) else {
                throw REPLError("no method '\(value)'; methods: \(AttentionMethod.allCases.map(\.rawValue).joined(separator: ", "))")
            }
            settings.method = method
            var note = ""
            if let store, let headID, let record = method.requiredRecord, !(try store.records(of: headID)).contains(record) {
                note = method == .quantized
                    ? "\nnote: head \(headID) keeps no codes yet; make them with `kvrecall codes`"
                    : "\nnote: head \(headID) has no '\(record)' \(method == .auto ? "plan" : "index") yet; build it with `kvrecall build --index \(record)`"
            }
            return "method = \(method.rawValue)" + note
        }
        let minimum = (name == "window" || name == "sinks") ? 0 : 1
        guard let number = Int(value), number >= minimum else {
            throw REPLError("\(name) must be \(minimum == 0 ? "a non-negative" : "a positive") integer (got '\(value)')")
        }
        if name == "k", let store, let headID, let info = try? store.info(headID), number > info.count {
            throw REPLError("k \(number) exceeds the \(info.count) keys of head \(headID)")
        }
        var changed = settings
        switch name {
        case "k": changed.k = number
        case "ef": changed.ef = number
        case "nprobe": changed.nprobe = number
        case "window": changed.window = number
        default: changed.sinks = number
        }
        do { try changed.attention.validate() } catch let error as IndexError { throw REPLError("\(error)") }
        settings = changed
        return "\(name) = \(number)"
    }

    private func showSettings() -> String {
        let s = settings
        var table = TextTable(["setting", "value", "meaning"])
        table.add(["k", "\(s.k)", "positions retrieved beyond the static part; k of exact top-k"])
        table.add(["ef", s.ef.map(String.init) ?? "calibrated", "hnsw, retrieval: candidate list size at search (calibrated: chosen at build for --target-recall)"])
        table.add(["nprobe", s.nprobe.map(String.init) ?? "calibrated", "ivf: lists probed (calibrated: chosen at build for --target-recall)"])
        table.add(["window", "\(s.window)", "last positions always attended"])
        table.add(["sinks", "\(s.sinks)", "first positions always attended"])
        table.add(["method", s.method.rawValue, "what `attend` runs"])
        return style.render(table)
    }

    // MARK: Queries

    private func parseRow(_ text: String, count: Int, of what: String) throws -> Int {
        guard let row = Int(text) else { throw usageError("query", "'\(text)' is not a row number") }
        guard count > 0 else { throw REPLError("\(what) has no rows") }
        guard row >= 0 && row < count else { throw REPLError("row \(row) is outside 0..<\(count) of \(what)") }
        return row
    }

    private func selectQuery(_ args: [String]) throws -> String {
        let (store, info) = try requireHead()
        let d = info.dimension
        let prefill = "the \(info.queryCount) prefill queries of head \(info.id)"
        var selected: CurrentQuery
        switch args.first {
        case nil:
            _ = try requireQuery()
            selected = query!
        case "random":
            guard args.count == 1 else { throw usageError("query", "`query random` takes no more arguments") }
            guard info.queryCount > 0 else {
                throw REPLError("head \(info.id) has no stored prefill queries (ingest with --queries); use `query file Q.npy ROW`")
            }
            let row = Int.random(in: 0..<info.queryCount, using: &random)
            selected = CurrentQuery(label: "prefill row \(row) (random)",
                                    vector: try store.copyVectors(info.id, .queries, range: row..<(row + 1)), head: info.id)
        case "file":
            guard args.count == 3 else { throw usageError("query", "`query file` takes a file and a row") }
            let path = NSString(string: args[1]).expandingTildeInPath
            let tensor = try NPY.read(path: path)
            guard tensor.shape.count == 2 else { throw REPLError("\(path): queries must be [M, d], got \(tensor.shape)") }
            guard tensor.shape[1] == d else {
                throw REPLError("\(path): queries have dimension \(tensor.shape[1]) but head \(info.id) has \(d)")
            }
            let row = try parseRow(args[2], count: tensor.shape[0], of: path)
            let vector = Array(tensor.floats()[(row * d)..<((row + 1) * d)])
            if vector.contains(where: { !$0.isFinite }) { throw REPLError("\(path): row \(row) holds NaN or Inf") }
            selected = CurrentQuery(label: "row \(row) of \((path as NSString).lastPathComponent)", vector: vector, head: info.id)
        default:
            guard args.count == 1 else { throw usageError("query", "too many arguments") }
            guard Int(args[0]) != nil else {
                throw usageError("query", "'\(args[0])' is not a row number, `random` or `file`")
            }
            guard info.queryCount > 0 else {
                throw REPLError("head \(info.id) has no stored prefill queries (ingest with --queries); use `query file Q.npy ROW`")
            }
            let row = try parseRow(args[0], count: info.queryCount, of: prefill)
            selected = CurrentQuery(label: "prefill row \(row)",
                                    vector: try store.copyVectors(info.id, .queries, range: row..<(row + 1)), head: info.id)
        }
        let report = try exactTopK(store, info, selected)
        query = selected
        lastSearch = [report.record]
        return report.text
    }

    /// Exact top-k of a query by a flat scan, with softmax weights and the mass summary.
    private func exactTopK(_ store: KVStore, _ info: HeadInfo, _ q: CurrentQuery) throws -> (text: String, record: SearchRecord) {
        let parameters = settings.attention
        let n = info.count
        guard n > 0 else { throw REPLError("head \(info.id) has no keys") }
        let k = min(settings.k, n)
        let d = info.dimension
        let scale = 1 / Float(d).squareRoot()
        let norm = q.vector.reduce(0) { $0 + Double($1) * Double($1) }.squareRoot()
        return try store.read { snapshot in
            let keys = try snapshot.vectors(info.id, .keys)
            let t0 = monotonicNanos()
            let found = try q.vector.withUnsafeBufferPointer {
                try FlatIndex(keys: keys).search($0, k: k, parameters: parameters.search, keys: keys)
            }
            let micros = Double(monotonicNanos() - t0) / 1e3
            let scores = q.vector.withUnsafeBufferPointer { AttentionKernel.allScores(query: $0.baseAddress!, keys: keys, score: ScoreTransform(scale: scale)) }
            let lse = logSumExp(scores)
            func weight(_ i: Int) -> Double { exp(Double(scores[i] - lse)) }
            let hits = found.hits(0)
            let fixed = Attention.staticPositions(count: n, sinks: parameters.sinks, window: parameters.window)
            let fixedSet = Set(fixed)
            let topMass = hits.reduce(0.0) { $0 + weight($1.id) }
            let staticMass = fixed.reduce(0.0) { $0 + weight($1) }
            let oracleMass = Set(hits.map(\.id)).union(fixed).reduce(0.0) { $0 + weight($1) }
            var table = TextTable(["rank", "position", "score", "weight", "part"])
            for (rank, hit) in hits.prefix(10).enumerated() {
                table.add(["\(rank + 1)", "\(hit.id)", fmt(Double(hit.score), 3), fmt(weight(hit.id), 4),
                           part(hit.id, n: n, parameters: parameters, isStatic: fixedSet.contains(hit.id))])
            }
            var lines = ["query \(style.bold(q.label)) on head \(info.id) (|q| = \(fmt(norm, 3)))",
                         "exact top-\(k) of \(n) keys by q·k" + (k > 10 ? " (first 10 shown)" : "") + ":",
                         style.render(table)]
            lines.append("top-\(k) holds \(percent(topMass)) of the attention mass; the static part (\(parameters.sinks) sinks + \(parameters.window) window) \(percent(staticMass)); together \(percent(oracleMass)) (the oracle's attended set)")
            var stats = found.stats
            stats.queries = 1
            let record = SearchRecord(method: "exact top-k", head: info.id, query: q.label, keyCount: n, parameters: parameters,
                                      stats: stats, attended: nil, staticCount: nil, retrieved: nil,
                                      medianMicros: micros, timings: 1)
            return (lines.joined(separator: "\n"), record)
        }
    }

    private func part(_ i: Int, n: Int, parameters: AttentionParameters, isStatic: Bool) -> String {
        guard isStatic else { return "" }
        return i < parameters.sinks ? "sink" : "window"
    }

    private func percent(_ x: Double) -> String { fmt(x * 100, 1) + "%" }

    // MARK: Attention

    private func parseMethod(_ text: String) throws -> AttentionMethod {
        guard let method = AttentionMethod(rawValue: text.lowercased()) else {
            throw REPLError("no method '\(text)'; methods: \(AttentionMethod.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return method
    }

    private func record(_ run: MethodRun, info: HeadInfo, query: CurrentQuery, parameters: AttentionParameters) -> SearchRecord {
        let result = run.results[0]
        let staticCount = run.method == .exact ? nil : Attention.staticPositions(count: info.count, sinks: parameters.sinks,
                                                                                 window: parameters.window).count
        var stats = result.stats
        stats.keyCount = info.count
        var used = parameters
        used.search = run.search
        return SearchRecord(method: run.method.rawValue, head: info.id, query: query.label, keyCount: info.count,
                            parameters: used, stats: stats, attended: result.attended.count,
                            staticCount: staticCount, retrieved: run.method == .exact ? nil : result.retrieved.count,
                            estimatedClusters: result.estimatedClusters,
                            estimatedPositions: result.estimated.reduce(0) { $0 + $1.count },
                            medianMicros: run.medianMicros, timings: run.micros.count,
                            effective: run.effective, plan: run.plan, calibration: run.calibration)
    }

    private func attend(_ args: [String]) throws -> String {
        guard args.count <= 1 else { throw usageError("attend", "`attend` takes at most one method") }
        let method = try args.first.map(parseMethod) ?? settings.method
        let (store, info, q) = try requireQuery()
        let parameters = settings.attention
        guard parameters.k <= info.count else { throw REPLError("k \(parameters.k) exceeds the \(info.count) keys of head \(info.id)") }
        let n = info.count
        let d = info.dimension
        let scale = 1 / Float(d).squareRoot()
        let (run, scores) = try store.read { snapshot -> (MethodRun, [Float]) in
            let run = try runMethod(method, snapshot: snapshot, head: info.id, queries: q.vector, groupSize: 1,
                                    parameters: parameters, repetitions: repetitions, cache: preparedMethods)
            let keys = try snapshot.vectors(info.id, .keys)
            let scores = q.vector.withUnsafeBufferPointer { AttentionKernel.allScores(query: $0.baseAddress!, keys: keys, score: ScoreTransform(scale: scale)) }
            return (run, scores)
        }
        let result = run.results[0]
        if result.firstNonFiniteHead != nil { throw REPLError("the attention of \(method.rawValue) \(AttentionResult.notFinite)") }
        let rec = record(run, info: info, query: q, parameters: parameters)
        let exactLSE = logSumExp(scores)
        let methodLSE = result.heads[0].lse
        var top = TopK<Int>(k: min(parameters.k, n))
        top.push(scores: scores, count: n, firstID: 0)
        let exactTop = Set(top.sorted().map(\.id))
        let fixedSet = Set(Attention.staticPositions(count: n, sinks: parameters.sinks, window: parameters.window))

        var header = "attend \(style.bold(method.rawValue)) on head \(info.id), query \(q.label): k=\(parameters.k), sinks \(parameters.sinks), window \(parameters.window)"
        if let knob = knobUsed(run, parameters) { header += ", " + knob }
        var lines = [header]
        if let plan = run.plan { lines.append("auto chose \(style.bold(run.effective.rawValue)) for this head: \(plan.reason)") }
        if method == .exact {
            lines.append("attended all \(n) positions (exact attention); \(fmt(run.medianMicros, 1)) us (median of \(run.micros.count))")
        } else {
            var line = "attended \(result.attended.count) of \(n) positions (\(rec.staticCount ?? 0) static + \(result.retrieved.count) retrieved)"
            if result.estimatedClusters > 0 {
                line += ", \(result.estimatedClusters) clusters (\(rec.estimatedPositions) positions) estimated"
            }
            line += "; keys scanned \(percent(run.scanned)); \(fmt(run.medianMicros, 1)) us (median of \(run.micros.count))"
            lines.append(line)
        }
        var metrics = TextTable(["metric", "value", "oracle"])
        metrics.add(["recall@\(parameters.k)", fmt(run.recall, 3), "1.000"])
        metrics.add(["attention mass", fmt(run.mass, 3), fmt(run.oracleMass, 3)])
        metrics.add(["output error", fmt(run.error, 4), fmt(run.oracleError, 4)])
        lines.append(style.render(metrics))
        lines.append("oracle: exact top-\(parameters.k) plus the static part, attended exactly")

        let ranked = result.attended.sorted { scores[$0] != scores[$1] ? scores[$0] > scores[$1] : $0 < $1 }.prefix(10)
        var table = TextTable(["position", "score", "weight", "exact_weight", "part", "exact_top_k"])
        for i in ranked {
            let s = Double(scores[i])
            let kind = fixedSet.contains(i) ? (i < parameters.sinks ? "sink" : "window") : (method == .exact ? "" : "retrieved")
            table.add(["\(i)", fmt(s / Double(scale), 3), fmt(exp(s - Double(methodLSE)), 4), fmt(exp(s - Double(exactLSE)), 4),
                       kind, exactTop.contains(i) ? "yes" : "no"])
        }
        lines.append("top attended positions (weight: this method's softmax; exact_weight: full attention's):")
        lines.append(style.render(table))
        lastSearch = [rec]
        return lines.joined(separator: "\n")
    }

    /// The search knob `run` really used, and where its value came from: "ef 384 (calibrated)",
    /// "ef 64 (set)", "nprobe 8 (default: no calibration)". (The settings hold nil for "calibrated",
    /// which is not one value: each head's index has its own.)
    private func knobUsed(_ run: MethodRun, _ settings: AttentionParameters) -> String? {
        var used = settings
        used.search = run.search
        guard let knob = searchKnob(run.effective, used) else { return nil }
        let setting: Int?
        switch run.effective {
        case .hnsw, .retrieval: setting = settings.search.graph.efSetting
        case .ivf, .estimate: setting = settings.search.ivf.nprobeSetting
        case .tree: setting = settings.search.tree.beamSetting
        default: return knob
        }
        if setting != nil { return knob + " (set)" }
        return knob + (run.calibration != nil ? " (calibrated)" : " (default: no calibration)")
    }

    /// The search parameter that steers `method`, as "ef 64" (its index kind's words).
    private func searchKnob(_ method: AttentionMethod, _ p: AttentionParameters) -> String? {
        method.indexKind?.descriptor?.describe(p.search)
    }

    private func compare() throws -> String {
        let (store, info, q) = try requireQuery()
        let parameters = settings.attention
        guard parameters.k <= info.count else { throw REPLError("k \(parameters.k) exceeds the \(info.count) keys of head \(info.id)") }
        let (available, missing) = try availableMethods(store, info.id)
        var failed: [String] = []
        let runs = try store.read { snapshot in
            try runMethods(available, snapshot: snapshot, head: info.id, queries: q.vector, groupSize: 1,
                           parameters: parameters, repetitions: repetitions, cache: preparedMethods).enumerated().compactMap { m, outcome -> MethodRun? in
                switch outcome {
                case .success(let run) where run.results.contains(where: { $0.firstNonFiniteHead != nil }):
                    failed.append("\(available[m].rawValue): the attention \(AttentionResult.notFinite)")
                    return nil
                case .success(let run): return run
                case .failure(let error):
                    failed.append("\(available[m].rawValue): \(error)")
                    return nil
                }
            }
        }
        guard !runs.isEmpty else { throw REPLError("every method failed: " + failed.joined(separator: "; ")) }
        // Each method's own knob: a calibrated ef or nprobe differs per index, so the header cannot
        // name one (it used to print the library defaults, ef 64 and nprobe 8, whatever ran).
        let knobs = runs.compactMap { run in knobUsed(run, parameters).map { "\(run.method.rawValue) \($0)" } }
        var lines = ["compare on head \(info.id), query \(q.label): k=\(parameters.k), sinks \(parameters.sinks), window \(parameters.window); median of \(repetitions) runs"]
        if !knobs.isEmpty { lines.append("search knobs: " + knobs.joined(separator: ", ")) }
        lines.append(style.render(methodTable(runs, k: parameters.k)))
        if !missing.isEmpty {
            lines.append("not built (kvrecall build --index NAME): \(missingList(missing))")
        }
        for f in failed { lines.append(style.red("failed") + " " + f) }
        lastSearch = runs.map { record($0, info: info, query: q, parameters: parameters) }
        return lines.joined(separator: "\n")
    }

    private func explain() throws -> String {
        guard let first = lastSearch.first else {
            throw REPLError("nothing searched yet; run `query`, `attend` or `compare` first")
        }
        if lastSearch.count > 1 {
            var table = TextTable(["method", "keys_scanned", "distance_comps", "aux_comps", "attended", "static", "retrieved", "est_clusters", "median_us"])
            for r in lastSearch {
                table.add([r.method, percent(r.stats.keysScannedFraction), "\(r.stats.distanceComputations)", "\(r.stats.auxiliaryComputations)",
                           r.attended.map(String.init) ?? "", r.staticCount.map(String.init) ?? "", r.retrieved.map(String.init) ?? "",
                           "\(r.estimatedClusters)", fmt(r.medianMicros, 1)])
            }
            return ["last search: compare on head \(first.head), query \(first.query) (\(first.keyCount) keys)",
                    style.render(table),
                    "keys_scanned: query-key inner products / keys; aux_comps: centroid or hash scores; static: sinks + window"]
                .joined(separator: "\n")
        }
        let r = first
        let p = r.parameters
        var rows: [(String, String)] = []
        if r.attended == nil {
            rows.append(("method", "exact top-\(min(p.k, r.keyCount)) by a flat scan of every key"))
        } else if let method = AttentionMethod(rawValue: r.method) {
            let ran = r.effective ?? method
            let index = ran.indexKind.map { "index '\($0.rawValue)'" }
                ?? (ran == .hip ? "no index (hierarchical pruning)" : ran == .streaming ? "no index (sinks and window only)" : "no index")
            let name = ran == method ? r.method : "\(r.method) -> \(ran.rawValue)"
            rows.append(("method", "\(name): \(index)" + (searchKnob(ran, p).map { ", \($0)" } ?? "")))
        }
        if let plan = r.plan {
            rows.append(("policy", "\(plan.policy.rawValue): \(plan.reason)"))
            if let profile = plan.profile { rows.append(("profile", profile.summary)) }
            for line in plan.candidateLines { rows.append(("candidate", line)) }
        }
        if let calibration = r.calibration {
            let own = calibration.knob.isSet(in: p.search) && calibration.knob.applied(calibration.value, to: p.search) != p.search
            rows.append(("calibration", calibration.summary + (own ? "; overridden by the setting" : "")))
        }
        rows.append(("keys scanned", "\(percent(r.stats.keysScannedFraction)) (\(r.stats.distanceComputations) of \(r.keyCount) keys scored)"))
        rows.append(("distance computations", "\(r.stats.distanceComputations) query-key inner products"))
        rows.append(("auxiliary computations", "\(r.stats.auxiliaryComputations) centroid or hash scores"))
        if let attended = r.attended {
            if let staticCount = r.staticCount, let retrieved = r.retrieved {
                rows.append(("attended", "\(attended) positions = \(staticCount) static (\(p.sinks) sinks + \(p.window) window) + \(retrieved) retrieved"))
            } else {
                rows.append(("attended", "\(attended) positions: every one (exact attention)"))
            }
            rows.append(("estimated clusters", r.estimatedClusters > 0
                         ? "\(r.estimatedClusters) (\(r.estimatedPositions) positions, from their mean key and value sum)" : "0"))
        }
        rows.append(("latency", "\(fmt(r.medianMicros, 1)) us" + (r.timings > 1 ? " (median of \(r.timings))" : "")))
        let width = rows.map(\.0.count).max() ?? 0
        let body = rows.map { style.bold($0.0) + String(repeating: " ", count: width - $0.0.count) + "  " + $0.1 }
        let what = r.attended == nil ? "query" : "attend \(r.method)"
        return (["last search: \(what) on head \(r.head), query \(r.query)"] + body).joined(separator: "\n")
    }

    // MARK: Help

    private func help(_ args: [String]) throws -> String {
        if let name = args.first {
            guard args.count == 1 else { throw usageError("help", "`help` takes at most one command") }
            guard let command = REPLCommand.named(name.lowercased()) else {
                let near = REPLCommand.suggestions(for: name, among: REPLCommand.all.map(\.name))
                throw REPLError("no command '\(name)'\(near.isEmpty ? "" : " (did you mean '\(near[0])'?)"); type `help` for the commands")
            }
            return style.bold(command.usage) + "\n  " + command.summary + "\n\n"
                + command.detail.split(separator: "\n", omittingEmptySubsequences: false).map { "  " + $0 }.joined(separator: "\n")
        }
        let width = REPLCommand.all.map(\.usage.count).max() ?? 0
        var lines = ["Commands (`help COMMAND` for details and examples):"]
        for c in REPLCommand.all {
            lines.append("  " + style.bold(c.usage) + String(repeating: " ", count: width - c.usage.count) + "  " + c.summary)
        }
        lines.append("A typical session: open DIR, heads, use 0/2/6, query 17, attend hnsw, compare, explain.")
        return lines.joined(separator: "\n")
    }

    // MARK: Completion

    /// Completion candidates for the word being typed, given the line before it (`before`, up to
    /// the word's start) and the typed prefix (`word`): command names, setting names, heads of the
    /// open store, methods (those the current head can run, or all without one), `random`/`file`.
    /// Returns nil where a file name is expected (the front end completes paths itself).
    public func completions(before: String, word: String) -> [String]? {
        let words = (try? REPLCommand.tokenize(before)) ?? before.split(separator: " ").map(String.init)
        func matching(_ names: [String]) -> [String] { names.filter { $0.hasPrefix(word) } }
        guard let first = words.first else { return matching(REPLCommand.all.map(\.name)) }
        guard let command = REPLCommand.named(first.lowercased()) else { return [] }
        let position = words.count  // index of the word being typed
        switch (command.name, position) {
        case ("help", 1):
            return matching(REPLCommand.all.map(\.name))
        case ("open", 1):
            return nil
        case ("use", 1):
            let heads = (try? store?.heads()) ?? []
            return matching(heads.map(\.id.description))
        case ("set", 1):
            return matching(REPLCommand.settingNames)
        case ("set", 2) where words[1].lowercased() == "method":
            return matching(methodNames())
        case ("attend", 1):
            return matching(methodNames())
        case ("query", 1):
            return matching(["random", "file"])
        case ("query", 2) where words[1] == "file":
            return nil
        default:
            return []
        }
    }

    private func methodNames() -> [String] {
        if let store, let headID, let built = try? store.records(of: headID) {
            return AttentionMethod.available(built: built).map(\.rawValue)
        }
        return AttentionMethod.allCases.map(\.rawValue)
    }
}
