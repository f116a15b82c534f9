import CKernels
import Foundation
import Synchronization

/// Evicts the last-level cache by reading a buffer twice or more its size, touching every line:
/// what a decoder's other layers do to a head's keys, values and codes between two of its steps.
/// Timing a method right after an eviction measures it as a decode step meets it (a method whose
/// bytes fit in the cache would otherwise look cheaper than it is when timed over and over).
public final class CacheEvictor: @unchecked Sendable {
    /// Bytes read per eviction (96 MB: three times this machine's 32 MB L3).
    public let bytes: Int
    private let buffer: UnsafeMutableRawPointer
    /// Chunks `stream` has read (tests).
    let streamed = Atomic<Int>(0)

    public init(bytes: Int = 96 << 20) {
        self.bytes = bytes
        buffer = .allocate(byteCount: bytes, alignment: 64)
        buffer.initializeMemory(as: UInt8.self, repeating: 1, count: bytes)
    }

    deinit { buffer.deallocate() }

    /// Reads the buffer over `threads` cores (by default all of them, as a decoder's other layers run):
    /// through `SpinJoin`, so the pool's helpers are as awake when a timed call starts as after a
    /// decoder's layer. Read on one thread, the eviction's few milliseconds parked them, and each timed
    /// call's first join waited 86-102 us for a helper to wake (docs/BENCHMARKS.md, "Codes in blocks").
    /// A background thread (a refresh's planner, idle class) reads alone: its work never takes the
    /// cores a decode step uses.
    public func evict(threads: Int = ProcessInfo.processInfo.activeProcessorCount) {
        let parts = 16, chunk = bytes / parts
        let cores = kvr_thread_is_background() != 0 ? 1 : max(1, threads)
        SpinJoin.run(tasks: parts, threads: cores) { i in
            _ = kvr_read_bytes(buffer + i * chunk, i == parts - 1 ? bytes - i * chunk : chunk)
        }
    }

    /// Reads the buffer round and round, 256 KB at a time starting at chunk `lane`, until `done()`:
    /// the memory traffic of a KV head attended on another core at the same time.
    public func stream(lane: Int, until done: () -> Bool) {
        let chunk = 256 << 10, chunks = bytes / chunk
        guard chunks > 0 else { return }
        var c = lane % chunks
        while !done() {
            _ = kvr_read_bytes(buffer + c * chunk, chunk)
            c = (c + 1) % chunks
            streamed.wrappingAdd(1, ordering: .relaxed)
        }
    }
}
