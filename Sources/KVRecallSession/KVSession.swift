import Dispatch
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention
import KVRecallPlanning

/// A decoder-facing KV cache: append each step's keys and values per layer, attend each step's
/// queries per layer for all heads. Vectors live in a KVRecall store; each KV head keeps an
/// index of the keys that have left the window (built once after prefill, then extended in
/// small batches), while the sinks, the window and any not-yet-indexed keys are attended exactly.
///
/// Thread-safety: one decoder thread drives a session; heads are spread over the cores inside
/// `attend`. Not for concurrent calls.
public final class KVSession {
    public let configuration: SessionConfiguration
    public let store: KVStore
    private let temporaryDirectory: String?
    /// One state per (layer, KV head): `heads[layer][head]`.
    private var heads: [[HeadState]] = []
    /// True once `buildIndexes` ran (or a resume loaded indexes): appends then extend the indexes.
    private var built = false
    public var parameters: AttentionParameters
    /// Threads `attend` spreads the KV heads over (at least 1).
    public var threads = ProcessInfo.processInfo.activeProcessorCount
    /// The write lease of this session's heads (no other session or ingest writes them meanwhile).
    private var writerLock: HeadWriterLock?
    /// What `init(resuming:)` found and did; nil for a session opened with `init(configuration:directory:)`.
    public private(set) var resumeReport: ResumeReport?
    /// Refreshes (`SessionConfiguration.refreshFraction`) are built on a background thread and
    /// installed at a later step boundary (true), or built and installed within the step that
    /// started them (false: decode steps stall, results do not depend on timing).
    public var refreshInBackground = true
    /// The build parameters of the last `buildIndexes` (refreshes build with them, on one thread).
    private var buildParameters = IndexBuildParameters()
    /// Fewest keys a head must have gained before a refresh, whatever the fraction.
    public static let refreshMinimumKeys = 256

    static let configurationKey = "kvrecall.session"

    /// Opens a session on `directory` (a new or existing store), or on a temporary store removed
    /// at `close()` when `directory` is nil. An existing session's configuration must match.
    public init(configuration: SessionConfiguration, directory: String?) throws {
        try configuration.validate()
        self.configuration = configuration
        var options = Environment.Options()
        options.noSync = true  // decode steps commit without fsync; checkpoint() syncs
        if let directory {
            store = try KVStore(path: directory, create: true, options: options)
            temporaryDirectory = nil
        } else {
            KVSession.removeOrphanedTemporaryStores()
            let path = NSTemporaryDirectory() + "\(KVSession.temporaryPrefix)\(getpid())-\(UUID().uuidString)"
            store = try KVStore(path: path, create: true, options: options)
            temporaryDirectory = path
        }
        parameters = configuration.attentionParameters
        do {
            let ids = (0..<configuration.layers).flatMap { l in (0..<configuration.kvHeads).map { headID(l, $0) } }
            writerLock = try store.lockHeads(ids)
            try checkStoredConfiguration()
            try createHeads()
            heads = try (0..<configuration.layers).map { layer in
                try (0..<configuration.kvHeads).map { head in
                    let info = try store.info(headID(layer, head))
                    return HeadState(id: info.id, tokens: info.count, queryRows: info.queryCount)
                }
            }
        } catch {
            close()
            throw error
        }
    }

    /// A store that already holds a session of this context must hold this very configuration:
    /// the heads' shapes, the method (and so its indexes) and the knobs all come from it.
    private func checkStoredConfiguration() throws {
        guard let raw = try? store.info(headID(0, 0)).metadata[KVSession.configurationKey] else { return }
        guard let stored = try? JSONDecoder().decode(SessionConfiguration.self, from: Data(raw.utf8)) else {
            throw SessionError.invalidArgument("\(store.path) holds a session configuration this build cannot read")
        }
        // The code order only shapes heads created from now on; existing heads keep theirs in their
        // records (a session written before codes in blocks stored none: position order).
        var asked = configuration
        if let order = stored.codes?.order, asked.codes != nil { asked.codes?.order = order }
        guard stored != asked else { return }
        let mine = try JSONSerialization.jsonObject(with: JSONEncoder().encode(configuration)) as? [String: Any] ?? [:]
        let theirs = try JSONSerialization.jsonObject(with: JSONEncoder().encode(stored)) as? [String: Any] ?? [:]
        let differing = Set(mine.keys).union(theirs.keys).sorted().filter { key in
            "\(mine[key] ?? "none")" != "\(theirs[key] ?? "none")"
        }.map { "\($0) \(theirs[$0] ?? "none") (asked \(mine[$0] ?? "none"))" }
        throw SessionError.invalidArgument("\(store.path) holds a session with a different configuration: \(differing.joined(separator: ", ")); resume it (its configuration comes from the store) or use another directory")
    }

    /// What resuming a session found and did (the crash contract, docs/ARCHITECTURE.md "Contracts").
    public struct ResumeReport: Sendable, Equatable {
        /// Tokens every layer and head holds after resuming.
        public var tokens: Int
        /// The longest layer before resuming (more than `tokens` when a step was cut short).
        public var longest: Int
        /// Heads whose saved index was loaded.
        public var indexesLoaded: Int
        /// Heads whose index was rebuilt from their keys (missing, or covering dropped keys).
        public var indexesRebuilt: Int
        /// Heads left without an index although their method needs one (no index was saved since
        /// `buildIndexes`): they attend exactly until `buildIndexes` runs again.
        public var indexesMissing: Int

        public var description: String {
            var text = "resumed at \(tokens) tokens per layer"
            if longest > tokens { text += " (layers that had reached \(longest) were cut back to the last step every layer completed)" }
            text += "; \(indexesLoaded) indexes loaded"
            if indexesRebuilt > 0 { text += ", \(indexesRebuilt) rebuilt" }
            if indexesMissing > 0 { text += "; \(indexesMissing) heads have no saved index: call buildIndexes (they attend exactly until then)" }
            return text
        }
    }

    /// Reopens a session from its store, with its saved configuration, in a consistent state:
    /// every layer and head is cut back to the last step every layer completed (the shortest
    /// layer; appends are atomic per layer, so a layer's heads always agree); prefill queries are
    /// cut to the count every head has (none when no token survived); indexes saved by the last
    /// checkpoint are loaded, and a head whose index is missing
    /// (not checkpointed since `buildIndexes`) is rebuilt when any head of the session has one.
    /// `resumeReport` says what was done.
    public convenience init(resuming directory: String) throws {
        let probe = try KVStore(path: directory)
        let stored = try probe.heads()
        probe.close()
        guard let raw = stored.first(where: { $0.metadata[KVSession.configurationKey] != nil })?.metadata[KVSession.configurationKey],
              let configuration = try? JSONDecoder().decode(SessionConfiguration.self, from: Data(raw.utf8)) else {
            throw SessionError.invalidArgument("\(directory) holds no KVRecall session")
        }
        try self.init(configuration: configuration, directory: directory)
        let mine = stored.filter { $0.id.context == configuration.context }
        let tokens = mine.map(\.count).min() ?? 0
        let longest = mine.map(\.count).max() ?? 0
        // Prefill queries are training data, not positions (a group may store several per
        // position): equal across heads (a crash between layers' calls), none if no token survived.
        let queryTokens = tokens == 0 ? 0 : (mine.map(\.queryCount).min() ?? 0)
        try store.truncate(mine.map(\.id), to: tokens, queryTokens: queryTokens)
        allHeads.forEach { $0.truncated(to: tokens); $0.queriesCut(to: queryTokens) }
        var loaded = 0
        var missing: [HeadState] = []
        let method = configuration.method
        if method.needsBuild {
            try store.read { snapshot in
                for state in allHeads {
                    // Refreshes go on from where the checkpoint left them (a refresh being built at a
                    // crash was never saved: the checkpoint's plan and index are the ones in use).
                    if let record = try RefreshStatus.load(snapshot: snapshot, head: state.id) {
                        state.plannedOver = min(record.plannedOver, max(0, tokens - configuration.window))
                        state.refreshes = record.refreshes
                    }
                    let plan = try storedPlan(snapshot: snapshot, head: state.id)
                    if method == .auto && plan == nil { missing.append(state); continue }
                    guard let kind = method == .auto ? plan?.indexKind : method.indexKind else {
                        state.install(plan: plan, index: nil, calibration: nil)
                        loaded += 1  // a streaming head: its plan is all it needs
                        continue
                    }
                    if try snapshot.index(state.id, name: kind.rawValue) != nil {
                        // A copy: the session keeps it across its own appends, and a view would
                        // pin nothing (the pages could be reused once the snapshot ends).
                        let index = try IndexCatalog.loadCalibrated(kind, snapshot: snapshot, head: state.id, copy: true)
                        if index.index.count <= tokens {
                            state.install(plan: plan, index: index.index, calibration: index.calibration)
                            // A checkpoint made before refreshes existed: planned over what its index holds.
                            if state.plannedOver == 0 { state.plannedOver = index.index.count }
                            // Room for the decode to come, now rather than at the first step's add
                            // (which would unpack or copy the loaded links on the decode path).
                            index.index.reserveCapacity(keys: reservation(over: max(state.plannedOver, index.index.count)))
                            loaded += 1
                            continue
                        }
                    }
                    missing.append(state)
                }
            }
        }
        var rebuilt = 0, unindexed = 0
        if loaded > 0 {
            built = true
            for state in missing where try rebuild(state) { rebuilt += 1 }
        } else if tokens > configuration.sinks + configuration.window {
            unindexed = missing.count
        }
        resumeReport = ResumeReport(tokens: tokens, longest: longest, indexesLoaded: loaded, indexesRebuilt: rebuilt,
                                    indexesMissing: unindexed)
    }

    /// The plan record this session's method keeps per head: `auto`'s plan, or an index method's
    /// adaptive budget (sessions checkpointed before the budget had its own record kept it as `auto`).
    private var planRecord: PlanRecord? {
        if configuration.method == .auto { return .auto }
        return configuration.budgetMass != nil && configuration.method.indexKind != nil ? .budget : nil
    }

    private func storedPlan(snapshot: StoreSnapshot, head id: HeadID) throws -> HeadPlan? {
        guard let record = planRecord else { return nil }
        if let plan = try HeadPlan.load(snapshot: snapshot, head: id, record: record) { return plan }
        return record == .budget ? try HeadPlan.load(snapshot: snapshot, head: id, record: .auto) : nil
    }

    /// Cuts every layer and head back to `tokens` (rollback of speculative tokens, repair after a
    /// failed step) in one transaction. Prefill queries are training data, not positions: they stay,
    /// unless `tokens` is 0 (a reset). An index holding
    /// dropped keys is rebuilt from the remaining ones (its stored copy is deleted with the keys),
    /// so later attention never sees a position that no longer exists. Longer than the session:
    /// an error.
    public func truncate(to tokens: Int) throws {
        let longest = allHeads.map(\.tokens).max() ?? 0
        guard tokens >= 0, tokens <= longest else {
            throw SessionError.invalidArgument("cannot truncate to \(tokens) tokens: the session holds \(longest)")
        }
        cancelRefreshes()
        // Decode queries recorded for positions that go are cut with them (prefill queries stay).
        var queryTokens: Int? = tokens == 0 ? 0 : nil
        if tokens > 0 {
            let cuts = allHeads.compactMap { state in state.recording.map { max($0.from, tokens * $0.rowsPerPosition) } }
            if let cut = cuts.max(), allHeads.contains(where: { $0.queryRows > cut }) { queryTokens = cut }
        }
        try store.truncate(allHeads.map(\.id), to: tokens, queryTokens: queryTokens)
        for state in allHeads {
            state.truncated(to: tokens)
            state.queriesCut(to: queryTokens ?? state.queryRows)
            if let index = state.index, index.count > tokens {
                state.install(plan: state.plan, index: nil, calibration: nil)
                try rebuild(state)
            }
        }
    }

    /// Builds one head's index afresh over its keys outside the window (as `buildIndexes` does):
    /// the head's plan (auto's policy, or an index method's budget) and a calibrated index, from
    /// `SessionPlanner`. False when the head has too few keys for an index or its plan needs none.
    @discardableResult
    private func rebuild(_ state: HeadState, parameters build: IndexBuildParameters = IndexBuildParameters()) throws -> Bool {
        guard configuration.method.needsBuild else { return false }
        if let job = state.refresh { job.cancelAndWait(); state.refresh = nil }
        let made = try store.read { snapshot in
            try HeadPlanner.prepareHead(method: configuration.method, keys: try snapshot.vectors(state.id, .keys),
                                        values: try snapshot.vectors(state.id, .values), codes: try snapshot.codes(state.id),
                                        queries: try snapshot.vectors(state.id, .queries),
                                        group: configuration.queryHeadsPerKV, indexUpTo: state.tokens - configuration.window,
                                        setup: planning, build: build, rowsPerPosition: state.recording?.rowsPerPosition)
        }
        state.install(plan: made.plan, index: made.index, calibration: made.calibration)
        state.plannedOver = max(0, state.tokens - configuration.window)
        made.index?.reserveCapacity(keys: reservation(over: state.plannedOver))
        return made.index != nil
    }

    /// Keys an index built or refreshed over `keys` makes room for at once (off the decode path):
    /// as many as the head holds when its next refresh is due; none without refreshes.
    private func reservation(over keys: Int) -> Int {
        guard let fraction = configuration.refreshFraction else { return 0 }
        return keys + max(Self.refreshMinimumKeys, Int((Double(keys) * fraction).rounded(.up))) + configuration.window
    }

    /// The planning knobs of this session's configuration.
    private var planning: HeadPlanner.Setup {
        var setup = HeadPlanner.Setup(attention: parameters)
        setup.attention.threads = max(1, threads / configuration.kvHeads)  // as a decode step runs each head
        setup.concurrentHeads = max(1, min(threads, configuration.kvHeads, ProcessInfo.processInfo.activeProcessorCount))  // and as many at once
        setup.calibration.targetRecall = configuration.targetRecall
        setup.calibration.k = configuration.k
        setup.policy.budgetMass = configuration.budgetMass ?? 0  // 0: no budget ever raises k
        setup.policy.targetError = configuration.targetError
        setup.policy.replanFraction = configuration.refreshFraction  // a plan serves until its head's refresh
        setup.policy.replanMinimumKeys = Self.refreshMinimumKeys
        return setup
    }

    /// `auto`'s plan for (`layer`, `head`), or an index method's adaptive budget (its `k`); nil
    /// before `buildIndexes`, without prefill queries, or for a method with neither.
    public func plan(layer: Int, head: Int) throws -> HeadPlan? { try state(layer, head).plan }

    /// The search knob calibrated for (`layer`, `head`)'s index at build (nil without one).
    public func calibration(layer: Int, head: Int) throws -> SearchCalibration? { try state(layer, head).calibration }

    /// One line per head: what runs (`auto`'s policy and why), its index and calibration.
    /// `layerName` names a session layer as the caller knows it (a decoder: the model's block).
    public func report(layerName: (Int) -> String = { "layer \($0)" }) -> [String] {
        allHeads.map { state in
            var line = "\(layerName(Int(state.id.layer))) head \(state.id.head): "
            if let plan = state.plan {
                line += configuration.method == .auto ? "\(plan.policy.rawValue) (\(plan.reason))"
                    : "\(configuration.method.rawValue) (\(plan.reason))"
            } else {
                line += configuration.method.rawValue
                // Built, but nothing to plan or index: say why rather than just the method's name.
                if built, state.index == nil, configuration.method.needsBuild, state.tokens - configuration.window <= configuration.sinks {
                    line += " (all \(state.tokens) keys are sinks or in the window: attended exactly, nothing to index)"
                }
            }
            if let index = state.index { line += "; \(index.kind.rawValue) over \(index.count) keys" }
            if let c = state.calibration { line += "; calibrated \(c.summary)" }
            if let profile = state.plan?.profile { line += "; \(profile.summary)" }
            if built, configuration.method.needsBuild {
                line += "; \(state.refreshStatus(fraction: configuration.refreshFraction, minimum: Self.refreshMinimumKeys).summary)"
            }
            if let plan = state.plan, !plan.candidates.isEmpty { line += "; candidates: " + plan.candidateLines.joined(separator: "; ") }
            return line
        }
    }

    deinit { close() }

    static let temporaryPrefix = "kvrecall-session-"

    /// Removes the temporary stores of sessions whose process is gone (killed before `close()`):
    /// their names carry the owner's process id.
    static func removeOrphanedTemporaryStores() {
        let folder = NSTemporaryDirectory()
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: folder) else { return }
        for name in names where name.hasPrefix(temporaryPrefix) {
            let rest = name.dropFirst(temporaryPrefix.count)
            guard let dash = rest.firstIndex(of: "-"), let pid = pid_t(rest[..<dash]), pid > 0 else { continue }
            if kill(pid, 0) != 0 && errno == ESRCH {
                try? FileManager.default.removeItem(atPath: folder + name)
            }
        }
    }

    /// Closes the store (and removes a temporary one).
    public func close() {
        guard store.environment.isOpen else { return }
        cancelRefreshes()  // a refresh reads the store: it leaves before the store closes
        writerLock?.release()
        writerLock = nil
        store.close()
        if let temporaryDirectory { try? FileManager.default.removeItem(atPath: temporaryDirectory) }
    }

    func headID(_ layer: Int, _ head: Int) -> HeadID {
        HeadID(context: configuration.context, layer: UInt16(layer), head: UInt16(head))
    }

    private func createHeads() throws {
        let encoded = String(decoding: try JSONEncoder().encode(configuration), as: UTF8.self)
        for layer in 0..<configuration.layers {
            for head in 0..<configuration.kvHeads {
                var metadata: [String: String] = [:]
                if layer == 0 && head == 0 { metadata[KVSession.configurationKey] = encoded }
                try store.createHead(headID(layer, head), dimension: configuration.headDimension, dtype: configuration.dtype,
                                     metadata: metadata, codes: configuration.codes)
            }
        }
    }

    /// Every head's state, layer by layer.
    private var allHeads: [HeadState] { heads.flatMap { $0 } }

    private func checkLayer(_ layer: Int) throws {
        guard layer >= 0 && layer < configuration.layers else { throw SessionError.unknownLayer(layer, layers: configuration.layers) }
    }

    private func state(_ layer: Int, _ head: Int) throws -> HeadState {
        try checkLayer(layer)
        guard head >= 0 && head < configuration.kvHeads else {
            throw SessionError.invalidArgument("KV head \(head) does not exist (the session has \(configuration.kvHeads))")
        }
        return heads[layer][head]
    }

    /// Keys of (`layer`, `head`) held by its index (0 before `buildIndexes` or for exact/HiP).
    public func indexedCount(layer: Int, head: Int) throws -> Int { try state(layer, head).index?.count ?? 0 }

    /// Tokens cached for `layer`.
    public func length(layer: Int) throws -> Int { try state(layer, 0).tokens }

    /// Keys and values cached for KV head `head` of `layer`.
    public func length(layer: Int, head: Int) throws -> Int { try state(layer, head).tokens }

    /// Appends `tokens` new tokens to every KV head of `layer`: `keys` and `values` are
    /// `[kvHeads, tokens, headDimension]`, row-major. Keys that leave the window are indexed as
    /// they leave it (in batches of `upkeepBatch`).
    public func append(layer: Int, keys: UnsafeBufferPointer<Float>, values: UnsafeBufferPointer<Float>) throws {
        try checkLayer(layer)
        if threads > 1 { SpinJoin.wakeHelpers() }  // an attend usually follows the commit
        let d = configuration.headDimension, h = configuration.kvHeads
        guard keys.count == values.count, keys.count > 0, keys.count % (h * d) == 0 else {
            throw SessionError.invalidArgument("keys and values must both hold [\(h) heads, tokens, \(d)] floats (got \(keys.count) and \(values.count))")
        }
        let tokens = keys.count / (h * d)
        // Every head's rows are checked before any is written, so bad input never leaves the layer
        // with some heads one token longer than others.
        // A finite value beyond the storage type (f16: |x| > 65504) is refused like NaN: stored, it
        // would be Inf and attention would answer NaN.
        for (label, data) in [("keys", keys), ("values", values)] {
            if let bad = firstUnstorableValue(data, dtype: configuration.dtype) {
                let row = bad.index / d
                throw SessionError.invalidArgument("append to layer \(layer): \(label) of KV head \(row / tokens), token \(row % tokens), "
                                                   + "column \(bad.index % d) \(bad.problem); nothing was appended")
            }
        }
        // One write transaction for every head of the layer: a failure or a crash leaves all or none.
        // The last step's recorded decode queries go with it (they were checked when recorded).
        let states = heads[layer]
        let pending = states.flatMap(\.pendingQueries)
        try pending.withUnsafeBufferPointer { queued in
            var batch: [KVStore.HeadRows] = (0..<h).map { head in
                let span = (head * tokens * d)..<((head + 1) * tokens * d)
                return .keysAndValues(headID(layer, head), keys: UnsafeBufferPointer(rebasing: keys[span]),
                                      values: UnsafeBufferPointer(rebasing: values[span]))
            }
            var at = 0
            for state in states where !state.pendingQueries.isEmpty {
                batch.append(.queries(state.id, UnsafeBufferPointer(rebasing: queued[at..<(at + state.pendingQueries.count)])))
                at += state.pendingQueries.count
            }
            try store.appendAtomically(batch, allowNonFinite: true)  // checked above
        }
        for state in states {
            state.queriesStored(state.pendingQueries.count / d)
            state.appended(tokens)
        }
        if built { try upkeep(layer: layer, force: false) }
    }

    /// Stores a prompt's prefill queries for `layer`: `[kvHeads, tokens, headDimension]` (one
    /// representative query head per KV head, or the group's sum); the retrieval graph learns from them.
    public func appendPrefillQueries(layer: Int, queries: UnsafeBufferPointer<Float>) throws {
        try checkLayer(layer)
        let d = configuration.headDimension, h = configuration.kvHeads
        guard queries.count > 0, queries.count % (h * d) == 0 else {
            throw SessionError.invalidArgument("queries must hold [\(h) heads, tokens, \(d)] floats (got \(queries.count))")
        }
        let tokens = queries.count / (h * d)
        if let bad = firstUnstorableValue(queries, dtype: configuration.dtype) {
            let row = bad.index / d
            throw SessionError.invalidArgument("prefill queries of layer \(layer): KV head \(row / tokens), token \(row % tokens), "
                                               + "column \(bad.index % d) \(bad.problem); nothing was appended")
        }
        try store.appendAtomically((0..<h).map { head in
            .queries(headID(layer, head), UnsafeBufferPointer(rebasing: queries[(head * tokens * d)..<((head + 1) * tokens * d)]))
        })
    }

    /// Builds every head's index once, over the keys outside the window (after prefill).
    /// With `auto` each head is profiled on its prefill queries and gets the index its plan names;
    /// every index is calibrated on the held-out tail of the head's prefill queries.
    public func buildIndexes(parameters build: IndexBuildParameters = IndexBuildParameters(),
                             progress: ((Int, Int) throws -> Void)? = nil) throws {
        guard configuration.method.needsBuild else { built = true; return }
        buildParameters = build
        let all = allHeads
        for (done, state) in all.enumerated() {
            try rebuild(state, parameters: build)
            try progress?(done + 1, all.count)  // a throw aborts the build between heads
        }
        built = true
    }

    /// At a step boundary of `layer`: installs each head's finished refresh, indexes keys that
    /// have left the window in whole batches (all of them with `force`), and starts the refreshes
    /// that are due (unless `startRefreshes` is false).
    private func upkeep(layer: Int, force: Bool, startRefreshes: Bool = true) throws {
        for state in heads[layer] {
            installFinishedRefresh(state)
            if let index = state.index {
                let upTo = max(index.count, state.tokens - configuration.window)
                let pending = upTo - index.count
                if pending >= configuration.upkeepBatch || (force && pending > 0) {
                    try store.read { snapshot in
                        let views = try state.views(in: snapshot)
                        try state.extendIndex(upTo: upTo, keys: views.keys, values: views.values)
                    }
                }
            }
            state.followLength(policy: planning.policy)
            state.refresh?.setTarget(state.tokens - configuration.window)
            if let job = state.refresh, let fraction = configuration.refreshFraction {
                // Starved in the idle class: the head outgrew two whole fractions while the builder waited.
                if Double(state.tokens - configuration.window - job.upTo) >= 2 * fraction * Double(job.upTo) { job.escalate() }
            }
            if startRefreshes { try startRefreshIfDue(state) }
        }
    }

    /// Starts (layer, head)'s refresh once the keys outside its window pass the refresh fraction of
    /// those its plan was made over: plan, budget, index and calibration made again over all of
    /// them by `HeadPlanner.prepareHead` (trained on the prefill and recorded decode queries, the
    /// latest held out), off the decode path. Within the step when `refreshInBackground` is false.
    private func startRefreshIfDue(_ state: HeadState) throws {
        guard built, let fraction = configuration.refreshFraction, configuration.method.needsBuild, state.refresh == nil else { return }
        let upTo = state.tokens - configuration.window
        guard upTo > configuration.sinks, upTo >= state.refreshDue(fraction: fraction, minimum: Self.refreshMinimumKeys) else { return }
        let job = RefreshJob(upTo: upTo)
        state.refresh = job
        let store = self.store, id = state.id, method = configuration.method, group = configuration.queryHeadsPerKV
        let batch = configuration.upkeepBatch, rowsPerPosition = state.recording?.rowsPerPosition
        let reserve = reservation(over: upTo)
        // One thread everywhere: the builder must not take the cores decode steps run on.
        var setup = planning
        setup.attention.threads = 1
        setup.concurrentHeads = 1
        setup.calibration.threads = 1
        var build = buildParameters
        build.threads = 1
        let work: (RefreshJob) throws -> RefreshJob.Made = { job in
            let made = try store.read { snapshot in
                try HeadPlanner.prepareHead(method: method, keys: try snapshot.vectors(id, .keys), values: try snapshot.vectors(id, .values),
                                            codes: try snapshot.codes(id), queries: try snapshot.vectors(id, .queries), group: group,
                                            indexUpTo: upTo, setup: setup, build: build, rowsPerPosition: rowsPerPosition)
            }
            // Catch up with the keys appended meanwhile, so the step that installs it adds at most a batch.
            while let index = made.index, !job.isCancelled {
                let want = job.currentTarget
                guard want - index.count >= batch else { break }
                try store.read { snapshot in
                    try index.add(keys: try snapshot.vectors(id, .keys).limited(to: want), range: index.count..<want, progress: nil)
                }
            }
            if !job.isCancelled { made.index?.reserveCapacity(keys: reserve) }
            return made
        }
        // Inline: on this thread at its own priority (an idle-class worker could starve while the
        // caller waits, e.g. beside other busy threads); in the background: the process's worker.
        if refreshInBackground {
            job.start(work)
        } else {
            job.runHere(work)
            installFinishedRefresh(state)
            if let index = state.index, state.tokens - configuration.window > index.count {
                try store.read { snapshot in
                    let views = try state.views(in: snapshot)
                    try state.extendIndex(upTo: state.tokens - configuration.window, keys: views.keys, values: views.values)
                }
            }
        }
    }

    /// Hands a finished refresh to its head (a failed one leaves the head as it was, and the next
    /// refresh waits for the head to grow by the fraction again).
    private func installFinishedRefresh(_ state: HeadState) {
        guard let job = state.refresh, let outcome = job.takeOutcome() else { return }
        state.refresh = nil
        state.plannedOver = job.upTo
        switch outcome {
        case .success(let made):
            state.install(plan: made.plan, index: made.index, calibration: made.calibration)
            state.refreshes += 1
            state.lastRefreshFailure = nil
        case .failure(let error):
            state.lastRefreshFailure = "\(error)"
        }
    }

    /// Stops every refresh being built (their results are dropped) and waits for them to leave the store.
    private func cancelRefreshes() {
        for state in heads.flatMap({ $0 }) {
            state.refresh?.cancelAndWait()
            state.refresh = nil
        }
    }

    /// Waits for every refresh being built and installs it (no new one starts): a decoder that
    /// wants results independent of timing, a test, or a caller about to measure.
    public func waitForRefreshes() throws {
        for layer in 0..<configuration.layers {
            heads[layer].forEach { $0.refresh?.waitUntilFinished() }
            try upkeep(layer: layer, force: false, startRefreshes: false)
        }
    }

    /// Where (`layer`, `head`) stands with refreshes: keys its plan was made over, refreshes
    /// installed, one being built, the next one's start; nil for a method that builds nothing.
    public func refreshStatus(layer: Int, head: Int) throws -> RefreshStatus? {
        let state = try state(layer, head)
        guard configuration.method.needsBuild else { return nil }
        return state.refreshStatus(fraction: configuration.refreshFraction, minimum: Self.refreshMinimumKeys)
    }

    /// Attention for one decode step of `layer`: `queries` is `[kvHeads, queryHeadsPerKV, headDimension]`;
    /// returns the outputs in the same layout. KV heads run in parallel.
    public func attend(layer: Int, queries: UnsafeBufferPointer<Float>) throws -> [Float] {
        try attendWithLSE(layer: layer, queries: queries).outputs
    }

    /// `attend`, with each query head's log-sum-exp of its scaled scores (`[kvHeads, queryHeadsPerKV]`)
    /// beside the outputs, so the result merges exactly with attention over other positions.
    public func attendWithLSE(layer: Int, queries: UnsafeBufferPointer<Float>) throws -> (outputs: [Float], lse: [Float]) {
        let c = configuration
        var outputs = [Float](repeating: 0, count: c.kvHeads * c.queryHeadsPerKV * c.headDimension)
        var lse = [Float](repeating: 0, count: c.kvHeads * c.queryHeadsPerKV)
        try outputs.withUnsafeMutableBufferPointer { out in
            try lse.withUnsafeMutableBufferPointer { try attend(layer: layer, queries: queries, into: out, lse: $0) }
        }
        return (outputs, lse)
    }

    /// `attendWithLSE` writing straight into the caller's buffers: `outputs` holds
    /// `[kvHeads, queryHeadsPerKV, headDimension]` floats, `lse` (optional) `[kvHeads, queryHeadsPerKV]`.
    public func attend(layer: Int, queries: UnsafeBufferPointer<Float>, into outputs: UnsafeMutableBufferPointer<Float>,
                       lse: UnsafeMutableBufferPointer<Float>?) throws {
        try checkLayer(layer)
        if threads > 1 { SpinJoin.wakeHelpers() }
        let d = configuration.headDimension, h = configuration.kvHeads, g = configuration.queryHeadsPerKV
        guard queries.count == h * g * d else {
            throw SessionError.invalidArgument("queries must hold [\(h) KV heads, \(g) query heads, \(d)] = \(h * g * d) floats (got \(queries.count))")
        }
        guard outputs.count == h * g * d else {
            throw SessionError.invalidArgument("the output holds \(outputs.count) floats; this session needs kv_heads * query_heads_per_kv * head_dim = \(h * g * d)")
        }
        if let lse, lse.count != h * g {
            throw SessionError.invalidArgument("lse holds \(lse.count) floats; this session needs kv_heads * query_heads_per_kv = \(h * g)")
        }
        if let row = firstNonFiniteRow(queries, dimension: d) {
            throw SessionError.invalidArgument("query of KV head \(row / g), query head \(row % g) holds NaN or Inf")
        }
        guard heads[layer][0].tokens > 0 else {
            throw SessionError.wrongOrder("attend before any key was appended to layer \(layer): append keys and values first")
        }
        let failures = FirstError()
        let workers = max(1, min(threads, h))
        let states = heads[layer]
        var parameters = self.parameters
        parameters.threads = max(1, threads / h)  // a head's exact passes take the cores its KV heads leave
        try store.read { snapshot in
            let ready = try states.map { state -> (method: PreparedMethod, views: HeadState.Views) in
                let views = try state.views(in: snapshot)
                return (try state.method(configuration.method, keys: views.keys, values: views.values), views)
            }
            SpinJoin.run(tasks: h, threads: workers) { head in
                do {
                    let group = UnsafeBufferPointer(rebasing: queries[(head * g * d)..<((head + 1) * g * d)])
                    let views = ready[head].views
                    let result = try ready[head].method.attend(group, keys: views.keys, values: views.values, codes: views.codes,
                                                               parameters: parameters)
                    if let j = result.firstNonFiniteHead {  // never NaN for finite input: an error
                        throw SessionError.invalidArgument("attention of layer \(layer), KV head \(head), query head \(j) \(AttentionResult.notFinite)")
                    }
                    for (j, partial) in result.heads.enumerated() {
                        let at = (head * g + j) * d
                        partial.output.withUnsafeBufferPointer {
                            (outputs.baseAddress! + at).update(from: $0.baseAddress!, count: d)
                        }
                        lse?[head * g + j] = partial.lse
                    }
                } catch {
                    failures.record(error)
                }
            }
        }
        if let error = failures.first { throw error }
        // The step's queries become training and held-out queries of the head's next refresh.
        if built, configuration.refreshFraction != nil, configuration.method.needsBuild {
            for (head, state) in states.enumerated() {
                state.recordDecodeQueries(UnsafeBufferPointer(rebasing: queries[(head * g * d)..<((head + 1) * g * d)]),
                                          groupSize: g, dimension: d, dtype: configuration.dtype)
            }
        }
    }

    /// The full attention result (attended positions, statistics) of one KV head's query group.
    public func attendDetailed(layer: Int, head: Int, queries: UnsafeBufferPointer<Float>) throws -> AttentionResult {
        let state = try state(layer, head)
        guard state.tokens > 0 else { throw SessionError.wrongOrder("attend before any key was appended to layer \(layer): append keys and values first") }
        return try store.read { snapshot in
            let views = try state.views(in: snapshot)
            var parameters = self.parameters
            parameters.threads = threads
            return try state.method(configuration.method, keys: views.keys, values: views.values)
                .attend(queries, keys: views.keys, values: views.values, codes: views.codes, parameters: parameters)
        }
    }

    /// Indexes every pending key and writes the indexes and vectors durably, so the session can
    /// be resumed with `init(resuming:)`.
    public func checkpoint() throws {
        for layer in 0..<configuration.layers {
            try upkeep(layer: layer, force: true)
            // Decode queries recorded since the last append (the last step's) are kept too.
            let states = heads[layer]
            let pending = states.flatMap(\.pendingQueries)
            if !pending.isEmpty {
                try pending.withUnsafeBufferPointer { queued in
                    var at = 0
                    var batch: [KVStore.HeadRows] = []
                    for state in states where !state.pendingQueries.isEmpty {
                        batch.append(.queries(state.id, UnsafeBufferPointer(rebasing: queued[at..<(at + state.pendingQueries.count)])))
                        at += state.pendingQueries.count
                    }
                    try store.appendAtomically(batch, allowNonFinite: true)
                }
                states.forEach { $0.queriesStored($0.pendingQueries.count / configuration.headDimension) }
            }
            for state in states {
                // The index in use is saved; a refresh still being built is not (resume starts it again).
                if let index = state.index {
                    try IndexCatalog.save(index, in: store, head: state.id, calibration: state.calibration)
                }
                if let record = planRecord { try state.plan?.save(in: store, head: state.id, as: record) }
                if built, configuration.method.needsBuild {
                    try state.refreshStatus(fraction: nil, minimum: 0).save(in: store, head: state.id)
                }
            }
        }
        try store.environment.sync()
    }
}

/// Keeps the first error thrown by parallel work.
final class FirstError: @unchecked Sendable {
    private let lock = NSLock()
    private(set) var first: Error?
    func record(_ error: Error) {
        lock.lock()
        if first == nil { first = error }
        lock.unlock()
    }
}
