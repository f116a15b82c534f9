import Dispatch

/// The one chunked parallel-for of the engine: items `0..<count` in chunks of `chunk` items (the
/// last one shorter), dealt round robin to `workers = min(threads, chunks)` workers (at least one):
/// worker `w` runs chunks `w`, `w + workers`, ... Which items a chunk holds does not depend on the
/// thread count, so results written per chunk (or per item) are the same whatever the threads.
/// A single worker runs on the calling thread, without dispatch.
///
/// ```swift
/// let plan = ChunkPlan(count: n, chunk: 4096, threads: threads)
/// plan.run { worker, chunks in
///     let buffer = UnsafeMutablePointer<Float>.allocate(capacity: 4096 * d)  // once per worker
///     defer { buffer.deallocate() }
///     for (c, rows) in chunks { ... }
/// }
/// ```
public struct ChunkPlan: Sendable {
    public let count: Int
    public let chunk: Int
    /// Chunks in all.
    public let chunks: Int
    /// Workers `run` starts.
    public let workers: Int

    @inlinable
    public init(count: Int, chunk: Int, threads: Int) {
        self.count = max(0, count)
        self.chunk = max(1, chunk)
        chunks = (self.count + self.chunk - 1) / self.chunk
        workers = max(1, min(threads, chunks))
    }

    /// One contiguous chunk per thread (at most `threads` workers, none idle).
    @inlinable
    public static func contiguous(count: Int, threads: Int) -> ChunkPlan {
        let t = max(1, min(threads, count))
        return ChunkPlan(count: count, chunk: (count + t - 1) / t, threads: t)
    }

    /// The chunks worker `w` runs.
    @inlinable
    public func chunks(of w: Int) -> WorkerChunks { WorkerChunks(plan: self, next: w) }

    /// Runs `work` once per worker, concurrently, with its number and its chunks.
    @inlinable
    public func run(_ work: (_ worker: Int, _ chunks: WorkerChunks) -> Void) {
        guard chunks > 0 else { return }
        if workers == 1 {
            work(0, chunks(of: 0))
        } else {
            SpinJoin.run(tasks: workers, threads: workers) { w in work(w, chunks(of: w)) }
        }
    }

    /// `run`, each worker with `scratch` floats of its own (a chunk's decoded rows or scores),
    /// allocated once per worker.
    @inlinable
    public func run(scratch: Int, _ work: (_ worker: Int, _ chunks: WorkerChunks, _ buffer: UnsafeMutablePointer<Float>) -> Void) {
        run { w, chunks in
            let buffer = UnsafeMutablePointer<Float>.allocate(capacity: Swift.max(1, scratch))
            defer { buffer.deallocate() }
            work(w, chunks, buffer)
        }
    }
}

/// The chunks one worker of a `ChunkPlan` runs: (chunk number, its items), in order.
public struct WorkerChunks: Sequence, IteratorProtocol {
    @usableFromInline let plan: ChunkPlan
    @usableFromInline var cursor: Int

    @inlinable
    init(plan: ChunkPlan, next: Int) {
        self.plan = plan
        cursor = next
    }

    @inlinable
    public mutating func next() -> (index: Int, range: Range<Int>)? {
        guard cursor < plan.chunks else { return nil }
        let c = cursor
        cursor += plan.workers
        let lo = c * plan.chunk
        return (c, lo..<Swift.min(plan.count, lo + plan.chunk))
    }
}
