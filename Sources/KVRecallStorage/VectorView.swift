import CKernels
#if canImport(Glibc)
import Glibc
#endif
import CLMDB
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

/// A zero-copy view of one stream (keys, values or prefill queries) of one head, valid only
/// inside the read transaction that made it. A block table maps block number to a pointer into
/// LMDB's memory map; row `i` lives in block `i / blockSize` at row `i % blockSize`.
///
/// Rows may be unaligned in the map (LMDB guarantees little alignment), so readers use the C
/// kernels' unaligned loads or `decode`; `alignedF32Block` says when BLAS may read a block in place.
public struct VectorView {
    public let info: HeadInfo
    public let kind: VectorKind
    /// The snapshot these rows are read from (kept by `limited(to:)`; nil for a `materialized()`
    /// copy, which may outlive it), so an index whose sections are views of a snapshot can check
    /// it searches keys read in that snapshot, while it is open.
    public private(set) var snapshot: MapIdentity?
    public private(set) var count: Int
    @inlinable public var dimension: Int { info.dimension }
    @inlinable public var dtype: DType { info.dtype }
    @inlinable public var blockSize: Int { info.blockSize }
    /// Base pointer of each block, in order.
    public private(set) var blocks: [UnsafeRawPointer]
    /// The same table as a raw pointer for hot loops, kept alive by `tableOwner`. (The hot
    /// accessors below are inlinable, so indexes and attention in the layers above inline them.)
    @usableFromInline var table: UnsafePointer<UnsafeRawPointer>
    private var tableOwner: BlockTable
    /// Owner of the rows when the view was `materialized()`.
    private var heapRows: HeapRows?
    /// log2(blockSize) when it is a power of two (the default), else -1.
    @usableFromInline let blockShift: Int
    @usableFromInline let rowBytes: Int

    init(txn: ReadTransaction, db: MDB_dbi, info: HeadInfo, kind: VectorKind, path: String) throws {
        try self.init(txn: txn, db: db, info: info, kind: kind, path: path, keeping: [][...])
    }

    /// A view whose first blocks are `kept` (pointers known to be valid in `txn`'s map) and whose
    /// other blocks, up to `info`'s row count, are read from `txn`.
    private init(txn: ReadTransaction, db: MDB_dbi, info: HeadInfo, kind: VectorKind, path: String,
                 keeping kept: ArraySlice<UnsafeRawPointer>) throws {
        self.info = info
        self.kind = kind
        self.snapshot = txn.mapIdentity
        let count = info.rows(kind)
        self.count = count
        let bs = info.blockSize
        let width = info.bytesPerVector
        let expectedBlocks = (count + bs - 1) / bs
        let kind = kind
        let table = try txn.blockTable(db, prefix: StoreKey.vectorPrefix(info.id, kind), key: { StoreKey.block(info.id, kind, $0) },
                                   keeping: kept, expected: expectedBlocks, bytes: { min(bs, count - $0 * bs) * width },
                                   what: "\(kind)", advice: "", path: path, head: info.id)
        blocks = table
        tableOwner = BlockTable(table)
        self.table = UnsafePointer(tableOwner.pointer)
        blockShift = bs & (bs - 1) == 0 ? bs.trailingZeroBitCount : -1
        rowBytes = width
    }

    /// `previous` brought up to `count` rows in `txn` without decoding the head's record or walking
    /// its whole block table: `previous`'s full blocks are kept (an append writes only the last,
    /// partial block and new ones, and never moves the pages of a full one) and the rest are read.
    /// For the head's only writer, which knows that only appends happened since `previous` was read;
    /// nil when the map moved or `previous` is not from a snapshot of this environment (read it whole).
    init?(continuing previous: VectorView, count: Int, txn: ReadTransaction, db: MDB_dbi, path: String) throws {
        let identity = txn.mapIdentity
        guard let old = previous.snapshot, old.sameMap(as: identity),
              count >= previous.count, previous.heapRows == nil else { return nil }
        var info = previous.info
        if previous.kind == .queries { info.queryCount = count } else { info.count = count }
        let full = previous.count / previous.blockSize
        try self.init(txn: txn, db: db, info: info, kind: previous.kind, path: path, keeping: previous.blocks.prefix(full))
    }

    /// The rows copied into one heap allocation (same dtype and block layout), for index builds:
    /// a build touches keys at random many times, and heap memory is backed by transparent huge
    /// pages where the file mapping uses 4 KB pages, so the copy saves most TLB misses. Searches
    /// keep reading the map. The copy lives as long as the returned view.
    public func materialized() -> VectorView {
        var view = self
        let bytes = Swift.max(1, count * rowBytes)
        let owner = HeapRows(bytes: bytes)
        var table: [UnsafeRawPointer] = []
        for b in 0..<blockCount {
            let rows = rowsInBlock(b)
            let dst = owner.pointer + b * blockSize * rowBytes
            dst.copyMemory(from: blocks[b], byteCount: rows * rowBytes)
            table.append(UnsafeRawPointer(dst))
        }
        view.blocks = table
        view.tableOwner = BlockTable(table)
        view.table = UnsafePointer(view.tableOwner.pointer)
        view.heapRows = owner
        view.snapshot = nil
        return view
    }

    /// The same view limited to its first `n` rows (an index built over a prefix sees only it).
    public func limited(to n: Int) -> VectorView {
        var view = self
        view.count = Swift.max(0, Swift.min(n, count))
        return view
    }

    /// Blocks holding the view's rows (the table may hold more after `limited(to:)`).
    @inlinable @inline(__always)
    public var blockCount: Int { (count + blockSize - 1) / blockSize }

    /// Number of rows in block `b`.
    @inlinable @inline(__always)
    public func rowsInBlock(_ b: Int) -> Int { Swift.min(blockSize, count - b * blockSize) }

    /// Pointer to row `i` in the map.
    @inlinable @inline(__always)
    public func row(_ i: Int) -> UnsafeRawPointer {
        if blockShift >= 0 {
            return table[i &>> blockShift] + (i & (blockSize &- 1)) &* rowBytes
        }
        return table[i / blockSize] + (i % blockSize) * rowBytes
    }

    /// Bytes of one stored row.
    @inlinable @inline(__always)
    public var bytesPerRow: Int { rowBytes }

    /// Row `i` converted to f32 into `out` (`dimension` floats).
    @inlinable @inline(__always)
    public func decodeRow(_ i: Int, into out: UnsafeMutablePointer<Float>) {
        decodeRows(row(i), count: 1, into: out)
    }

    /// `count` contiguous rows starting at `src` converted to f32.
    @inlinable @inline(__always)
    public func decodeRows(_ src: UnsafeRawPointer, count: Int, into out: UnsafeMutablePointer<Float>) {
        let n = count * dimension
        switch dtype {
        case .f32: UnsafeMutableRawPointer(out).copyMemory(from: src, byteCount: n * 4)
        case .f16: kvr_f16_to_f32(src.assumingMemoryBound(to: UInt16.self), out, n)
        case .bf16: kvr_bf16_to_f32(src.assumingMemoryBound(to: UInt16.self), out, n)
        }
    }

    /// Rows `range` as a row-major f32 array.
    public func decode(rows range: Range<Int>) -> [Float] {
        var out = [Float](repeating: 0, count: range.count * dimension)
        out.withUnsafeMutableBufferPointer { buf in
            var i = range.lowerBound
            while i < range.upperBound {
                let inBlock = i % blockSize
                let take = Swift.min(blockSize - inBlock, range.upperBound - i)
                decodeRows(row(i), count: take, into: buf.baseAddress! + (i - range.lowerBound) * dimension)
                i += take
            }
        }
        return out
    }

    /// Inner products of `query` (f32, `dimension`) with rows `start..<start+n` of one block.
    @inlinable @inline(__always)
    public func scores(query: UnsafePointer<Float>, block b: Int, into out: UnsafeMutablePointer<Float>) {
        let n = rowsInBlock(b)
        let base = blocks[b]
        switch dtype {
        case .f32: kvr_scores_f32(query, base.assumingMemoryBound(to: Float.self), n, dimension, out)
        case .f16: kvr_scores_f16(query, base.assumingMemoryBound(to: UInt16.self), n, dimension, out)
        case .bf16: kvr_scores_bf16(query, base.assumingMemoryBound(to: UInt16.self), n, dimension, out)
        }
    }

    /// Inner product of `query` with row `i` (graph walks, re-ranking).
    @inlinable @inline(__always)
    public func score(query: UnsafePointer<Float>, row i: Int) -> Float {
        let p = row(i)
        switch info.dtype {
        case .f32: return kvr_dot_f32(query, p.assumingMemoryBound(to: Float.self), info.dimension)
        case .f16:
            var s: Float = 0
            kvr_scores_f16(query, p.assumingMemoryBound(to: UInt16.self), 1, info.dimension, &s)
            return s
        case .bf16:
            var s: Float = 0
            kvr_scores_bf16(query, p.assumingMemoryBound(to: UInt16.self), 1, info.dimension, &s)
            return s
        }
    }

    /// Starts fetching row `i` into the cache (graph walks score it soon after).
    @inlinable @inline(__always)
    public func prefetch(row i: Int) {
        kvr_prefetch(row(i), rowBytes)
    }

    /// Block `b` as f32 rows BLAS can read in place, when stored as aligned f32.
    public func alignedF32Block(_ b: Int) -> UnsafePointer<Float>? {
        guard dtype == .f32, Int(bitPattern: blocks[b]) % MemoryLayout<Float>.alignment == 0 else { return nil }
        return blocks[b].assumingMemoryBound(to: Float.self)
    }
}

/// Owns rows copied out of the map (a 2 MB-aligned allocation, advised for huge pages).
final class HeapRows {
    let pointer: UnsafeMutableRawPointer
    init(bytes: Int) {
        var p: UnsafeMutableRawPointer?
        posix_memalign(&p, 1 << 21, bytes)
        pointer = p!
        madvise(pointer, bytes, 14)  // MADV_HUGEPAGE
    }
    deinit { free(pointer) }
}

/// Owns a copy of a block table as raw memory, so hot loops index it without array checks.
final class BlockTable {
    let pointer: UnsafeMutablePointer<UnsafeRawPointer>
    init(_ blocks: [UnsafeRawPointer]) {
        pointer = .allocate(capacity: max(1, blocks.count))
        blocks.withUnsafeBufferPointer { if let base = $0.baseAddress { pointer.initialize(from: base, count: $0.count) } }
    }
    deinit { pointer.deallocate() }
}

extension ReadTransaction {
    /// The map addresses of a stream's blocks: `kept` (already known) followed by blocks
    /// `kept.count..<expected` read from `db` (keys `key(b)`, all under `prefix`), each present in
    /// order and holding at least `bytes(b)`. Errors name the stream (`what`) and add `advice`.
    /// (A session continues its views at every decode step: the kept blocks go into a table sized
    /// for all of them in one copy.)
    func blockTable(_ db: MDB_dbi, prefix: [UInt8], key: (UInt32) -> [UInt8], keeping kept: ArraySlice<UnsafeRawPointer>,
                    expected: Int, bytes: (Int) -> Int, what: String, advice: String, path: String,
                    head: HeadID) throws -> [UnsafeRawPointer] {
        var table: [UnsafeRawPointer] = []
        table.reserveCapacity(Swift.max(expected, kept.count))
        table.append(contentsOf: kept)
        if table.count < expected {
            try scan(db, prefix: prefix, from: key(UInt32(table.count))) { key, value in
                let number = Int(StoreKey.decodeBlockNumber(key))
                guard number == table.count else {
                    throw StoreError(.corrupt, "\(what) block \(table.count) is missing (found \(number))\(advice)", path: path, head: head)
                }
                if number >= expected { return false }
                guard value.count >= bytes(number), let base = value.baseAddress else {
                    throw StoreError(.corrupt, "\(what) block \(number) holds \(value.count) bytes, expected \(bytes(number))\(advice)",
                                     path: path, head: head)
                }
                table.append(base)
                return table.count < expected
            }
        }
        guard table.count == expected else {
            throw StoreError(.corrupt, "\(what) has \(table.count) blocks, expected \(expected)\(advice)", path: path, head: head)
        }
        return table
    }
}
