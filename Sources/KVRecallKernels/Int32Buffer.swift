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

    package init(capacity: Int = 16) {
        self.capacity = max(16, capacity)
        pointer = Int32Buffer.allocate(self.capacity)
    }

    /// Owned storage. From 4 MB on (a graph's links, read at random: on 4 KB pages nearly every
    /// expanded node missed the TLB) 2 MB-aligned and advised for transparent huge pages.
    private static func allocate(_ capacity: Int) -> UnsafeMutablePointer<Int32> {
        let bytes = capacity * MemoryLayout<Int32>.stride
        var raw: UnsafeMutableRawPointer?
        if bytes >= 4 << 20 {
            guard posix_memalign(&raw, 1 << 21, bytes) == 0 else { fatalError("out of memory for \(bytes) bytes of links") }
            #if os(Linux)
            _ = madvise(raw, bytes, 14)  // MADV_HUGEPAGE
            #endif
        } else {
            raw = malloc(bytes)
        }
        guard let raw else { fatalError("out of memory for \(bytes) bytes of links") }
        return raw.bindMemory(to: Int32.self, capacity: capacity)
    }

    private static func release(_ pointer: UnsafeMutablePointer<Int32>) { free(pointer) }

    convenience init(_ values: [Int32]) {
        self.init(capacity: values.count)
        append(contentsOf: values)
    }

    deinit { if !isView { Int32Buffer.release(pointer) } }

    /// Replaces the contents by `elements`: their view when they are one (no copy), else a copy.
    package func adopt(_ elements: SectionArray<Int32>) {
        if let (view, owner) = elements.view, let base = view.baseAddress {
            if !isView { Int32Buffer.release(pointer) }
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
    }

    /// Copies an adopted view into owned memory (before any write through `pointer`).
    package func makeOwned() { reserve(count) }

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

    private func reserve(_ needed: Int) {
        guard needed > capacity || isView else { return }
        var newCapacity = max(capacity, 16)
        while newCapacity < needed { newCapacity *= 2 }
        let fresh = Int32Buffer.allocate(newCapacity)
        if isView {
            fresh.initialize(from: pointer, count: count)
            isView = false
            viewOwner = nil
        } else {
            fresh.moveInitialize(from: pointer, count: count)
            Int32Buffer.release(pointer)
        }
        pointer = fresh
        capacity = newCapacity
    }

    /// The elements, for writing a section.
    package var elements: UnsafeBufferPointer<Int32> { UnsafeBufferPointer(start: pointer, count: count) }

    package var array: [Int32] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
}
