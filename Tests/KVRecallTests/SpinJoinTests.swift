import CKernels
import Foundation
import Testing
@testable import KVRecallKernels

/// The decode step's fork-join: every task runs exactly once, the caller returns only after the last
/// one (including tasks a helper claimed and is still running), and joins nest.
@Suite struct SpinJoinTests {
    @Test(arguments: [0, 1, 2, 3, 17, 64])
    func everyTaskRunsOnceWhateverTheThreads(tasks: Int) {
        for threads in [1, 2, 3, 8] {
            let runs = UnsafeMutableBufferPointer<Int>.allocate(capacity: max(1, tasks))
            defer { runs.deallocate() }
            runs.initialize(repeating: 0)
            SpinJoin.run(tasks: tasks, threads: threads) { i in runs[i] += 1 }
            #expect(runs.prefix(tasks).allSatisfy { $0 == 1 }, "tasks \(tasks), threads \(threads)")
        }
    }

    /// Tasks that take a while (a helper holds one when the caller runs out of work): each writes
    /// its slot last, so a caller returning early would see an unwritten slot.
    @Test func theCallerWaitsForTasksHelpersClaimed() {
        for _ in 0..<20 {
            let done = UnsafeMutableBufferPointer<Int>.allocate(capacity: 6)
            defer { done.deallocate() }
            done.initialize(repeating: 0)
            SpinJoin.run(tasks: 6, threads: 3) { i in
                usleep(UInt32(200 * (i % 3 + 1)))
                done[i] = i + 1
            }
            #expect(Array(done) == [1, 2, 3, 4, 5, 6])
        }
    }

    @Test func joinsNest() {
        let outer = 4, inner = 8
        let cells = UnsafeMutableBufferPointer<Int>.allocate(capacity: outer * inner)
        defer { cells.deallocate() }
        cells.initialize(repeating: 0)
        SpinJoin.run(tasks: outer, threads: 2) { o in
            SpinJoin.run(tasks: inner, threads: 2) { i in cells[o * inner + i] += o * inner + i + 1 }
        }
        #expect(Array(cells) == Array(1...(outer * inner)))
    }

    /// Joins from several threads at once: one holds the helper pool, the others take GCD helpers;
    /// every task of every join runs once and no join hangs.
    @Test func joinsFromSeveralThreadsAtOnce() {
        let callers = 4, joins = 200, tasks = 5
        let runs = UnsafeMutableBufferPointer<Int>.allocate(capacity: callers * joins * tasks)
        defer { runs.deallocate() }
        runs.initialize(repeating: 0)
        DispatchQueue.concurrentPerform(iterations: callers) { c in
            for j in 0..<joins {
                SpinJoin.run(tasks: tasks, threads: 2) { i in runs[(c * joins + j) * tasks + i] += 1 }
            }
        }
        #expect(runs.allSatisfy { $0 == 1 })
    }

    /// A background thread's join (a refresh's build) never runs its tasks on the pool's helpers,
    /// which run at the normal priority: every task runs on a thread marked background.
    @Test func aBackgroundThreadsTasksStayBackground() {
        let tasks = 8
        nonisolated(unsafe) let marks = UnsafeMutableBufferPointer<Int32>.allocate(capacity: tasks)
        defer { marks.deallocate() }
        marks.initialize(repeating: -1)
        let finished = DispatchSemaphore(value: 0)
        Thread {
            _ = kvr_thread_set_background(1)
            SpinJoin.run(tasks: tasks, threads: 2) { i in
                usleep(1000)  // long enough that a helper claims some
                marks[i] = kvr_thread_is_background()
            }
            finished.signal()
        }.start()
        #expect(finished.wait(timeout: .now() + 30) == .success)
        #expect(Array(marks) == Array(repeating: 1, count: tasks))
    }

    /// `wake()` sets a sleeping helper spinning again (it leaves its sleep without a join), after
    /// which it sleeps again (a pool of its own: other tests' joins wake the shared one).
    @Test func wakeSetsASleepingHelperSpinning() {
        let pool = HelperPool(size: 1)
        let state = SpinJoin.State(tasks: 1, body: { _ in })
        #expect(pool.start(state, helpers: 1) == 1)
        state.work()
        pool.finish()
        func eventually(_ condition: () -> Bool) -> Bool {
            let deadline = DispatchTime.now().uptimeNanoseconds + 10_000_000_000
            while DispatchTime.now().uptimeNanoseconds < deadline { if condition() { return true }; usleep(100) }
            return false
        }
        #expect(eventually { pool.sleeping == 1 }, "the helper sleeps after its spin")
        #expect(pool.alarmed.load(ordering: .relaxed) == 0)
        pool.wake()
        #expect(eventually { pool.alarmed.load(ordering: .relaxed) == 1 }, "woken without a join")
        #expect(eventually { pool.sleeping == 1 }, "and asleep again after its spin")
        pool.wake()
        #expect(eventually { pool.alarmed.load(ordering: .relaxed) == 2 }, "a second wake-up works too")
    }

    /// `wake()` keeps a spinning helper spinning: called more often than the spin lasts, for 25
    /// times that long, the helper never sleeps (a decode step's append wakes the helpers before
    /// its commit, which may outlast their spin). A trial starts once the helper is awake (the
    /// calls wake it); one in which this thread itself paused for half a spin or more between two
    /// calls (a loaded machine) proves nothing and is run again, up to 20 times.
    @Test func wakeKeepsASpinningHelperSpinning() {
        let pool = HelperPool(size: 1)
        let spin = HelperPool.spinNanoseconds
        let state = SpinJoin.State(tasks: 1, body: { _ in })
        #expect(pool.start(state, helpers: 1) == 1)  // the helper thread exists from here
        state.work()
        pool.finish()
        func clock() -> UInt64 { DispatchTime.now().uptimeNanoseconds }
        func pause(from t: UInt64) -> UInt64 {  // 20 us, not usleep: its timer slack is 50 us
            var now = clock()
            while now - t < 20_000 { kvr_cpu_relax(); now = clock() }
            return now
        }
        var conclusive = false
        for _ in 0..<20 where !conclusive {
            let deadline = clock() + 1_000_000_000
            var t = clock()
            while pool.sleeping > 0 && t < deadline { pool.wake(); t = pause(from: t) }
            guard pool.sleeping == 0 else { continue }
            let start = clock()
            var last = start, longestGap: UInt64 = 0, slept = false
            while last - start < 25 * spin {
                pool.wake()
                if pool.sleeping > 0 { slept = true }
                let now = pause(from: last)
                longestGap = max(longestGap, now - last)
                last = now
            }
            guard longestGap < spin / 2 else { continue }
            conclusive = true
            #expect(!slept, "the helper slept although woken every \(longestGap / 1000) us at most")
        }
        // Every trial interrupted (a machine loaded past its cores): nothing was measured, which is
        // not a failure of the pool.
        if !conclusive { print("wakeKeepsASpinningHelperSpinning: every trial was interrupted; nothing measured") }
    }
}
