#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import KVRecallSupport

/// A growable Int32 buffer with a stable raw pointer between growths (graph links). It can
/// adopt a read-only view of a stored section (`adopt`); the first growth copies the view into
/// owned memory, so builders must grow (`grow`, `append`) before they write through `pointer`.
package final class Int32Buffer {
    package private(set) var pointer: UnsafeMutablePointer<Int32>
    package private(set) var count = 0
    private var capacity: Int
    /// Set while `pointer` is a view this buffer does not own (kept alive by `viewOwner` or a
    /// read transaction).
    package private(set) var isView = false
    package private(set) var viewOwner: AnyObject?
    /// Bytes of address space mapped for `pointer` when it is a large buffer (0: malloc'd, or a view).
    private var mappedBytes = 0

    package init(capacity: Int = 16) {
        self.capacity = max(16, capacity)
        (pointer, mappedBytes) = Int32Buffer.allocate(self.capacity, hugePages: true)
    }

    /// Buffers from this size on are mapped rather than malloc'd.
    private static let mappedFrom = 64 << 10
    /// Huge pages from this size on (smaller buffers fit the TLB's reach anyway).
    private static let hugePagesFrom = 4 << 20
    private static let hugePage = 1 << 21

    /// Owned storage: malloc'd while small; from 64 KB on an anonymous mapping, 2 MB-aligned,
    /// with four times the address space (at least 64 MB) reserved untouched, so growth within it
    /// moves nothing. (Doubling by copy moved 16 heads' links into fresh huge pages within one
    /// decode step: 5.7 ms each, 130-170 ms in all, `bench session --layers 4 --kv-heads 4`.)
    /// With `hugePages` (a build, a reservation off the decode path) the part in use is advised
    /// for transparent huge pages from 4 MB on (a graph's links, read at random: on 4 KB pages
    /// nearly every expanded node missed the TLB); the rest of the reservation, which decode-time
    /// adds fault in a 4 KB page at a time, is not: a huge page's first touch costs ~6 ms here.
    /// Returns the mapped bytes (0 for malloc).
    private static func allocate(_ capacity: Int, hugePages: Bool) -> (UnsafeMutablePointer<Int32>, Int) {
        let bytes = capacity * MemoryLayout<Int32>.stride
        guard bytes >= mappedFrom else {
            guard let raw = malloc(bytes) else { fatalError("out of memory for \(bytes) bytes of links") }
            return (raw.bindMemory(to: Int32.self, capacity: capacity), 0)
        }
        // Where the kernel refuses the reservation (strict overcommit, an address-space limit), a
        // mapping of the size asked for, and last malloc: growth copies again, nothing fails.
        var reserved = roundedToHugePages(max(4 * bytes, 64 << 20))
        var mapped = mmap(nil, reserved + hugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if mapped == nil || mapped == MAP_FAILED {
            reserved = roundedToHugePages(bytes)
            mapped = mmap(nil, reserved + hugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        }
        guard let raw = mapped, raw != MAP_FAILED else {
            guard let raw = malloc(bytes) else { fatalError("out of memory for \(bytes) bytes of links") }
            return (raw.bindMemory(to: Int32.self, capacity: capacity), 0)
        }
        // Trim the mapping to a 2 MB-aligned start and `reserved` bytes.
        let start = Int(bitPattern: raw), aligned = roundedToHugePages(start)
        if aligned > start { munmap(raw, aligned - start) }
        let tail = (start + reserved + hugePage) - (aligned + reserved)
        let base = UnsafeMutableRawPointer(bitPattern: aligned)!
        if tail > 0 { munmap(base + reserved, tail) }
        if hugePages { adviseHugePages(base, bytes: bytes) }
        return (base.bindMemory(to: Int32.self, capacity: reserved / MemoryLayout<Int32>.stride), reserved)
    }

    private static func roundedToHugePages(_ n: Int) -> Int { (n + hugePage - 1) / hugePage * hugePage }

    private static func adviseHugePages(_ base: UnsafeMutableRawPointer, bytes: Int) {
        #if os(Linux)
        if bytes >= hugePagesFrom { _ = madvise(base, roundedToHugePages(bytes), 14) }  // MADV_HUGEPAGE
        #endif
    }

    private static func release(_ pointer: UnsafeMutablePointer<Int32>, mappedBytes: Int) {
        if mappedBytes > 0 { munmap(pointer, mappedBytes) } else { free(pointer) }
    }

    convenience init(_ values: [Int32]) {
        self.init(capacity: values.count)
        append(contentsOf: values)
    }

    deinit { if !isView { Int32Buffer.release(pointer, mappedBytes: mappedBytes) } }

    /// Replaces the contents by `elements`: their view when they are one (no copy), else a copy.
    package func adopt(_ elements: SectionArray<Int32>) {
        if let (view, owner) = elements.view, let base = view.baseAddress {
            if !isView { Int32Buffer.release(pointer, mappedBytes: mappedBytes) }
            mappedBytes = 0
            pointer = UnsafeMutablePointer(mutating: base)
            count = view.count
            capacity = view.count
            isView = true
            viewOwner = owner
        } else {
            count = 0
            append(contentsOf: elements.array)
        }
    }

    /// Exchanges contents (owned memory or a view) with `other`, copying nothing.
    package func swapContents(with other: Int32Buffer) {
        swap(&pointer, &other.pointer)
        swap(&count, &other.count)
        swap(&capacity, &other.capacity)
        swap(&isView, &other.isView)
        swap(&viewOwner, &other.viewOwner)
        swap(&mappedBytes, &other.mappedBytes)
    }

    /// Copies an adopted view into owned memory (before any write through `pointer`).
    package func makeOwned() { reserve(count, exactly: true) }

    /// Appends `n` zeros.
    package func grow(by n: Int) {
        reserve(count + n)
        (pointer + count).initialize(repeating: 0, count: n)
        count += n
    }

    package func append(_ value: Int32) {
        reserve(count + 1)
        (pointer + count).initialize(to: value)
        count += 1
    }

    package func append(contentsOf values: [Int32]) {
        reserve(count + values.count)
        values.withUnsafeBufferPointer { (pointer + count).initialize(from: $0.baseAddress!, count: $0.count) }
        count += values.count
    }

    /// Makes room for `needed` elements at once and touches all of it: a builder calls this off
    /// the decode path, so later growth up to `needed` neither reallocates (copying the buffer
    /// into fresh memory) nor faults in fresh pages during a decode step.
    package func reserveAndTouch(_ needed: Int) {
        reserve(needed, exactly: true)
        if capacity > count { (pointer + count).initialize(repeating: 0, count: capacity - count) }
    }

    private func reserve(_ needed: Int, exactly: Bool = false) {
        guard needed > capacity || isView else { return }
        // A bulk request (a build's add, a reservation) may take huge pages; a decode-time add's
        // few elements fault in 4 KB pages.
        let bulk = exactly || (needed - count) * MemoryLayout<Int32>.stride >= 1 << 20
        var newCapacity = max(capacity, 16)
        if exactly { newCapacity = max(newCapacity, needed) }
        while newCapacity < needed { newCapacity *= 2 }
        if !isView, newCapacity * MemoryLayout<Int32>.stride <= mappedBytes {  // within the reserved address space
            capacity = newCapacity
            if bulk { Int32Buffer.adviseHugePages(pointer, bytes: capacity * MemoryLayout<Int32>.stride) }
            return
        }
        let (fresh, freshBytes) = Int32Buffer.allocate(newCapacity, hugePages: bulk)
        if isView {
            fresh.initialize(from: pointer, count: count)
            isView = false
            viewOwner = nil
        } else {
            fresh.moveInitialize(from: pointer, count: count)
            Int32Buffer.release(pointer, mappedBytes: mappedBytes)
        }
        pointer = fresh
        mappedBytes = freshBytes
        capacity = newCapacity
    }

    /// The elements, for writing a section.
    package var elements: UnsafeBufferPointer<Int32> { UnsafeBufferPointer(start: pointer, count: count) }

    package var array: [Int32] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
}
