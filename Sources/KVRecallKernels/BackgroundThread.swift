import CKernels

/// Scheduling of the calling background thread against the decode threads (Linux): the idle class
/// runs a thread only on a core nobody else wants, so a waking decode step never waits for it.
public enum BackgroundThread {
    /// The calling thread's kernel id (for `leaveIdleClass`).
    public static var currentID: Int { kvr_thread_id() }

    /// Moves the calling thread to the idle scheduling class; false where the kernel refuses.
    @discardableResult
    public static func enterIdleClass() -> Bool { kvr_thread_enter_idle() == 0 }

    /// Moves thread `id` back to the normal class, `niceness` nicer than the process.
    @discardableResult
    public static func leaveIdleClass(id: Int, niceness: Int32) -> Bool { kvr_thread_leave_idle(id, niceness) == 0 }

    /// Makes the calling thread `niceness` nicer than the process (a fallback where the idle class is refused).
    public static func renice(_ niceness: Int32) { _ = kvr_thread_leave_idle(kvr_thread_id(), niceness) }
}
