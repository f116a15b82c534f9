import CKernels
import Dispatch
import Foundation
import Synchronization

/// A fork-join for the few independent tasks of one decode step (a layer's KV heads, a head's
/// parts). Every thread, the caller included, claims tasks until none is left, so a helper that
/// starts late costs only parallelism; the caller then spins, without giving up its core, until the
/// tasks other threads claimed are done. Why not `concurrentPerform`: its caller sleeps on a futex
/// while a helper finishes, a background builder (the idle class) takes the core, and the caller's
/// wake-up waited out a scheduler tick (4 ms at HZ 250) on 2-vCPU VMs whose scheduler packs
/// threads (docs/BENCHMARKS.md, "Long generations").
///
/// The helpers are the threads of `HelperPool`, which spin a short while after each join before
/// they sleep: a decode step's joins come tens of microseconds apart, and a helper woken through
/// GCD for each one started 20-50 us late (median 33 us on a 2-vCPU VM), a quarter of what the
/// parallel part of a quantized step gains (docs/BENCHMARKS.md, "A spinning helper pool"). A join
/// started while the pool serves another one, from a background thread or one of its tasks, or in a
/// forked child takes GCD helpers.
public enum SpinJoin {
    /// Tells the helpers a join is coming: a sleeping helper takes tens of microseconds to wake
    /// (a futex wake-up), which a caller about to join after other work (a decode step's store
    /// commit, its setup) overlaps with that work by calling this first. A decoder's global layer
    /// found the helpers asleep at nearly every attend: between its last projection and the
    /// attend, the append's commit outlasts their spin (docs/BENCHMARKS.md, "Helpers woken before
    /// the step").
    public static func wakeHelpers() { HelperPool.shared.wake() }

    /// Runs `body(i)` for every `i` in `0..<tasks` on the calling thread and up to `threads - 1`
    /// helpers; returns when every call returned. A wait longer than 2 ms (a build's long chunk,
    /// not a decode step) sleeps 50 us between checks instead of holding the core.
    public static func run(tasks: Int, threads: Int, _ body: (Int) -> Void) {
        guard tasks > 1, threads > 1 else {
            for i in 0..<max(0, tasks) { body(i) }
            return
        }
        withoutActuallyEscaping(body) { escapable in
            let state = State(tasks: tasks, body: escapable)
            let helpers = min(threads, tasks) - 1
            // A background caller's tasks never run on the pool's helpers (their priority is normal),
            // and stay background work on GCD's threads too: a join nested in them must not hold the
            // pool for a build's long chunks.
            let background = kvr_thread_is_background() != 0
            let pooled = background ? 0 : HelperPool.shared.start(state, helpers: helpers)
            for _ in pooled..<helpers {
                DispatchQueue.global(qos: .userInitiated).async {
                    guard background else { state.work(); return }
                    let was = kvr_thread_set_background(1)
                    state.work()
                    _ = kvr_thread_set_background(was)
                }
            }
            state.work()
            let start = DispatchTime.now().uptimeNanoseconds
            var spins = 0
            while state.done.load(ordering: .acquiring) < tasks {
                spins += 1
                if spins >= 1024 && DispatchTime.now().uptimeNanoseconds - start > 2_000_000 { usleep(50) }
            }
            state.body = nil  // a helper starting now claims nothing and never reads it
            if pooled > 0 { HelperPool.shared.finish() }
        }
    }

    final class State: @unchecked Sendable {
        let tasks: Int
        let next = Atomic<Int>(0)
        let done = Atomic<Int>(0)
        /// Set before any helper starts; read only by a thread holding an unfinished task.
        var body: ((Int) -> Void)?

        init(tasks: Int, body: @escaping (Int) -> Void) {
            self.tasks = tasks
            self.body = body
        }

        func work() {
            while true {
                let i = next.wrappingAdd(1, ordering: .relaxed).oldValue
                guard i < tasks else { return }
                do {
                    let call = body!
                    call(i)
                }
                done.wrappingAdd(1, ordering: .releasing)
            }
        }
    }
}

/// Threads that serve one `SpinJoin` at a time (one fewer than the cores): after a join, or after
/// the last `wake()`, a helper spins for `spinNanoseconds` on the join counter, so the next join of
/// the same step finds it running, then sleeps on a condition until a join or `wake()` wakes it.
final class HelperPool: @unchecked Sendable {
    static let shared = HelperPool(size: max(0, ProcessInfo.processInfo.activeProcessorCount - 1))

    /// How long an idle helper spins (after a join or a `wake()`) before it sleeps: longer than the
    /// gaps between a decode step's joins, short enough that an idle process gives its cores back
    /// at once.
    static let spinNanoseconds: UInt64 = 200_000

    let size: Int
    /// The process the helpers belong to: a forked child has none of them (and may have inherited
    /// `condition` locked), so its joins take GCD helpers.
    private let owner = getpid()
    /// Whether a join holds the pool.
    private let busy = Atomic<Bool>(false)
    /// Bumped when a join starts; helpers wait for it to change.
    private let generation = Atomic<Int>(0)
    private let sleepers = Atomic<Int>(0)
    /// Bumped by `wake()` (under `condition`): sleeping helpers spin again.
    private let alarms = Atomic<Int>(0)
    /// Times a helper left its sleep for an alarm (tests).
    let alarmed = Atomic<Int>(0)
    /// When `wake()` was last called (uptime nanoseconds): a spinning helper spins on for
    /// `spinNanoseconds` from it.
    private let wokenAt = Atomic<UInt64>(0)
    private let condition = NSCondition()
    // Guarded by `condition`.
    private var job: SpinJoin.State?
    private var seats = 0
    private var started = 0

    init(size: Int) { self.size = size }

    /// Hands `state` to up to `helpers` pool threads; returns how many it promised (0: the pool
    /// serves another join, or this is a forked child).
    func start(_ state: SpinJoin.State, helpers: Int) -> Int {
        let wanted = min(helpers, size)
        guard wanted > 0, getpid() == owner,
              busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else { return 0 }
        condition.lock()
        while started < wanted {
            let first = generation.load(ordering: .relaxed)
            let thread = Thread { [self] in serve(after: first) }
            thread.qualityOfService = .userInitiated
            thread.name = "kvrecall-helper"
            thread.start()
            started += 1
        }
        job = state
        seats = wanted
        generation.wrappingAdd(1, ordering: .releasing)
        if sleepers.load(ordering: .relaxed) > 0 { condition.broadcast() }
        condition.unlock()
        return wanted
    }

    /// Sets sleeping helpers spinning, and spinning ones spinning on, for another `spinNanoseconds`,
    /// so a join that follows soon finds them running; costs a clock read and two atomics when none
    /// sleeps.
    func wake() {
        guard size > 0 else { return }
        // Spinning helpers spin on from now: a decode step's append calls this before its commit
        // (a few hundred microseconds), and helpers that went to sleep meanwhile cost its attend a
        // futex wake (14 us on the caller in a 2-vCPU VM) and their own wake-up.
        wokenAt.store(DispatchTime.now().uptimeNanoseconds, ordering: .sequentiallyConsistent)
        guard sleepers.load(ordering: .sequentiallyConsistent) > 0, getpid() == owner else { return }
        condition.lock()
        alarms.wrappingAdd(1, ordering: .relaxed)
        condition.broadcast()
        condition.unlock()
    }

    /// Helpers asleep now (tests).
    var sleeping: Int { sleepers.load(ordering: .relaxed) }

    /// Releases the pool after the join's tasks are done (helpers may still be leaving `work`).
    func finish() {
        condition.lock()
        job = nil
        seats = 0
        condition.unlock()
        busy.store(false, ordering: .releasing)
    }

    private func serve(after first: Int) {
        var seen = first
        while true {
            let start = DispatchTime.now().uptimeNanoseconds
            var spins = 0
            var spinningSince = start
            while generation.load(ordering: .acquiring) == seen {
                kvr_cpu_relax()
                spins += 1
                guard spins & 255 == 0 else { continue }
                let now = DispatchTime.now().uptimeNanoseconds, woken = wokenAt.load(ordering: .sequentiallyConsistent)
                guard now - max(spinningSince, min(now, woken)) > Self.spinNanoseconds else { continue }
                condition.lock()
                let alarm = alarms.load(ordering: .relaxed)
                sleepers.wrappingAdd(1, ordering: .sequentiallyConsistent)
                // A `wake()` between the check and here saw no sleeper and sent no alarm: spin on.
                guard wokenAt.load(ordering: .sequentiallyConsistent) == woken else {
                    sleepers.wrappingSubtract(1, ordering: .relaxed)
                    condition.unlock()
                    continue
                }
                while generation.load(ordering: .acquiring) == seen, alarms.load(ordering: .relaxed) == alarm { condition.wait() }
                if generation.load(ordering: .acquiring) == seen { alarmed.wrappingAdd(1, ordering: .relaxed) }
                sleepers.wrappingSubtract(1, ordering: .relaxed)
                condition.unlock()
                spinningSince = DispatchTime.now().uptimeNanoseconds  // woken by a join or by `wake()`
            }
            condition.lock()
            seen = generation.load(ordering: .acquiring)
            let state = seats > 0 ? job : nil
            if state != nil { seats -= 1 }
            condition.unlock()
            state?.work()
        }
    }
}
