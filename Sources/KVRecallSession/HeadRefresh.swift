import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
import KVRecallIndexes
import KVRecallAttention
import KVRecallPlanning

/// Where a head stands with its refresh (issue 25): how many keys its plan and index were last
/// made over, how many times the session made them again while decoding, and whether a refresh
/// is being built now. `report()`, `kvrecall info` and the REPL show it.
public struct RefreshStatus: Codable, Sendable, Equatable {
    /// Keys (outside the window) the head's current plan, budget and calibration were made over.
    public var plannedOver: Int
    /// Refreshes installed since the session's build (kept across checkpoints and resumes).
    public var refreshes: Int
    /// The keys a refresh being built now covers; nil when none is running.
    public var building: Int?
    /// The indexed keys at which the next refresh starts; nil when the session never refreshes.
    public var nextAt: Int?
    /// Why the last refresh failed (the previous plan and index stayed in use); nil when none did.
    public var lastFailure: String?

    public init(plannedOver: Int, refreshes: Int, building: Int? = nil, nextAt: Int? = nil, lastFailure: String? = nil) {
        self.plannedOver = plannedOver
        self.refreshes = refreshes
        self.building = building
        self.nextAt = nextAt
        self.lastFailure = lastFailure
    }

    /// One phrase: "refreshed 3 times, planned over 3375 keys, next at 5062" (and a refresh in progress).
    public var summary: String {
        var text = refreshes == 0 ? "planned over \(plannedOver) keys" : "refreshed \(refreshes) time\(refreshes == 1 ? "" : "s"), planned over \(plannedOver) keys"
        if let building { text += ", refreshing over \(building) keys" } else if let nextAt { text += ", next refresh at \(nextAt)" }
        if let lastFailure { text += " (last refresh failed: \(lastFailure))" }
        return text
    }

    /// The record name beside the head's indexes (one JSON section).
    static let record = "refresh"
    static let section = "state"

    /// Saves the persistent part (keys planned over, refreshes) for head `id`.
    func save(in store: KVStore, head id: HeadID) throws {
        let kept = RefreshStatus(plannedOver: plannedOver, refreshes: refreshes)
        try store.saveIndex(id, name: Self.record, sections: [Self.section: Array(try JSONEncoder().encode(kept))])
    }

    /// Head `id`'s saved refresh record, or nil when none was saved (a session checkpointed before
    /// refreshes existed, or never checkpointed).
    public static func load(snapshot: StoreSnapshot, head id: HeadID) throws -> RefreshStatus? {
        guard let sections = try snapshot.index(id, name: record), let bytes = sections[section] else { return nil }
        do {
            return try JSONDecoder().decode(RefreshStatus.self, from: Data(bytes.array))
        } catch {
            throw IndexError.corrupt("the refresh record of head \(id) is unreadable (\(error)); checkpoint the session again")
        }
    }
}

/// One head's refresh being built on a background thread: the plan, budget, index and
/// calibration made afresh over the keys `0..<upTo` (all the head's prefill and recorded decode
/// queries as training and held-out queries), then extended towards the keys the session has
/// appended meanwhile. The session hands the result to the head at a step boundary; until then
/// (and if the build fails, or the process dies) the head keeps what it had.
///
/// The builder runs in the idle scheduling class with one thread everywhere, so decode steps keep
/// both cores: it uses only the time the decoder leaves. Jobs run one at a time on the process's
/// `RefreshWorker`.
final class RefreshJob: @unchecked Sendable {
    typealias Made = (plan: HeadPlan?, index: (any BuildableIndex)?, calibration: SearchCalibration?)
    /// Keys the refresh plans and indexes from the start.
    let upTo: Int
    private let lock = NSLock()
    private let done = DispatchSemaphore(value: 0)
    /// Keys the session wants indexed now (it grows with appends); the builder catches up to it.
    private var target: Int
    private var cancelled = false
    private var outcome: Result<Made, Error>?
    private var finished = false
    private var started = false
    /// The builder thread's kernel id (0 until it started), and whether it left the idle class.
    private var threadID = 0
    private var escalated = false

    /// Puts the calling thread in Linux's idle scheduling class: it runs only on a core no other
    /// thread wants, and a waking decode thread takes the core at once. With plain niceness (nice 5
    /// before) a waking step waited for the builder's time slice: on 2 cores the attention p99 was
    /// 8.6x its median while refreshing. Where the class is refused, nice 19.
    static func yieldToDecoding() {
        if !BackgroundThread.enterIdleClass() { BackgroundThread.renice(19) }
    }

    /// Moves a builder that the decoder starved (its head grew by two refresh fractions while it
    /// waited for idle time: another process keeps the cores busy) out of the idle class, to nice
    /// 19: a small share of the cores, which a waking decode thread still preempts, so the refresh
    /// finishes. Once per job; false when nothing changed or the kernel refused (an unprivileged
    /// process whose RLIMIT_NICE forbids leaving the idle class: the builder stays there).
    @discardableResult
    func escalate() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        guard threadID != 0, !escalated, !finished else { return false }
        escalated = true
        return BackgroundThread.leaveIdleClass(id: threadID, niceness: 19)
    }

    /// Whether the builder left the idle class (`escalate`).
    var wasEscalated: Bool { lock.lock(); defer { lock.unlock() }; return escalated }

    /// The builder thread's kernel id; 0 before it started.
    var builderThreadID: Int { lock.lock(); defer { lock.unlock() }; return threadID }

    init(upTo: Int) {
        self.upTo = upTo
        target = upTo
    }

    /// The session indexed up to `keys` now (the builder extends its index to that before it hands it over).
    func setTarget(_ keys: Int) { lock.lock(); target = max(target, keys); lock.unlock() }

    var currentTarget: Int { lock.lock(); defer { lock.unlock() }; return target }
    var isCancelled: Bool { lock.lock(); defer { lock.unlock() }; return cancelled }

    /// The result once the build finished (nil while it runs); the job is spent afterwards.
    func takeOutcome() -> Result<Made, Error>? {
        lock.lock(); defer { lock.unlock() }
        guard finished else { return nil }
        return outcome
    }

    /// Asks the builder to stop early (its result is dropped) and waits for it to leave the store.
    func cancelAndWait() {
        lock.lock()
        cancelled = true
        let queued = !started && !finished
        if queued {  // never reached the worker: it is skipped there
            finished = true
            outcome = .failure(RefreshCancelled())
        }
        lock.unlock()
        if queued { done.signal() }
        waitUntilFinished()
    }

    /// Blocks until the builder finished (the result is then ready for `takeOutcome`).
    func waitUntilFinished() {
        done.wait()
        done.signal()  // later waits return at once
    }

    /// Queues `build` (it makes the head's plan and index, then catches up to `currentTarget`) on
    /// the process's refresh worker.
    func start(_ build: @escaping (RefreshJob) throws -> Made) {
        RefreshWorker.shared.submit(self, build)
    }

    /// Runs `build` on the calling thread at its own priority (a refresh built within the step);
    /// it is never escalated.
    func runHere(_ build: (RefreshJob) throws -> Made) { run(build, onWorker: false) }

    /// Runs the job on the worker's thread (in the idle class again, whatever the last job left),
    /// or on the caller's.
    fileprivate func run(_ build: (RefreshJob) throws -> Made, onWorker: Bool = true) {
        // Back to the idle class before the job can be escalated (an escalation in between would be undone).
        if onWorker { RefreshJob.yieldToDecoding() }
        lock.lock()
        if finished { lock.unlock(); return }  // cancelled while queued
        started = true
        if onWorker { threadID = BackgroundThread.currentID }
        lock.unlock()
        let result = Result { try build(self) }
        lock.lock()
        outcome = result
        finished = true
        lock.unlock()
        done.signal()
    }
}

/// A refresh cancelled before it started (the session closed or rebuilt the head).
struct RefreshCancelled: Error, CustomStringConvertible {
    var description: String { "cancelled before it started" }
}

/// The one thread that builds refreshes for every session of the process, one job at a time,
/// in the order they became due. One builder rather than one per head: a builder in the idle
/// class that holds a lock a decode thread needs (the allocator's, the kernel's memory-map lock)
/// runs again only once a core is free and, among 16 idle builders, only after the others'
/// slices: decode steps stalled up to 60-135 ms (`bench session --layers 4 --kv-heads 4`,
/// step p99 2.4-2.6x its neighbours' median, the exact session's in the same process 1.6-2.9x).
final class RefreshWorker: @unchecked Sendable {
    static let shared = RefreshWorker()
    private let lock = NSLock()
    private let ready = DispatchSemaphore(value: 0)
    private var queue: [(job: RefreshJob, build: (RefreshJob) throws -> RefreshJob.Made)] = []
    private var thread: Thread?
    /// The process the thread runs in: a child of `fork()` inherits this object but not the
    /// thread, and starts its own (the parent's queue means nothing there).
    private var owner: pid_t = 0

    func submit(_ job: RefreshJob, _ build: @escaping (RefreshJob) throws -> RefreshJob.Made) {
        lock.lock()
        if owner != getpid() {
            owner = getpid()
            thread = nil
            queue.removeAll()
            while ready.wait(timeout: .now()) == .success {}
        }
        queue.append((job, build))
        if thread == nil {
            let thread = Thread { [self] in work() }
            thread.name = "kvrecall-refresh"
            thread.stackSize = 16 << 20
            self.thread = thread
            thread.start()
        }
        lock.unlock()
        ready.signal()
    }

    private func work() {
        while true {
            ready.wait()
            lock.lock()
            let next = queue.removeFirst()
            lock.unlock()
            next.job.run(next.build)
        }
    }
}
