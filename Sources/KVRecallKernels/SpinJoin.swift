import Dispatch
import Foundation
import Synchronization

/// A fork-join for the few independent tasks of one decode step (a layer's KV heads). Every thread,
/// the caller included, claims tasks until none is left, so a helper that starts late costs only
/// parallelism; the caller then spins, without giving up its core, until the tasks other threads
/// claimed are done. Why not `concurrentPerform`: its caller sleeps on a futex while a helper
/// finishes, a background builder (the idle class) takes the core, and the caller's wake-up
/// waited out a scheduler tick (4 ms at HZ 250) on 2-vCPU VMs whose scheduler packs threads
/// (docs/BENCHMARKS.md, "Long generations").
public enum SpinJoin {
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
            for _ in 1..<min(threads, tasks) {
                DispatchQueue.global(qos: .userInitiated).async { state.work() }
            }
            state.work()
            let start = DispatchTime.now().uptimeNanoseconds
            var spins = 0
            while state.done.load(ordering: .acquiring) < tasks {
                spins += 1
                if spins >= 1024 && DispatchTime.now().uptimeNanoseconds - start > 2_000_000 { usleep(50) }
            }
            state.body = nil  // a helper starting now claims nothing and never reads it
        }
    }

    private final class State: @unchecked Sendable {
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
