import KVRecallSupport
/// Which of two scores a heap keeps at its root.
public protocol HeapOrder {
    static func before(_ a: Float, _ b: Float) -> Bool
}

/// The best (highest) score at the root: candidate lists.
public enum HighestFirst: HeapOrder {
    @inlinable @inline(__always) public static func before(_ a: Float, _ b: Float) -> Bool { a > b }
}

/// The worst (lowest) score at the root: bounded result sets.
public enum LowestFirst: HeapOrder {
    @inlinable @inline(__always) public static func before(_ a: Float, _ b: Float) -> Bool { a < b }
}

/// A binary heap of (score, id) over raw buffers, for graph walks. A plain struct of pointers
/// so a hot loop can hold it in a local variable (no exclusivity checks, no copy-on-write);
/// the owner calls `deallocate()`.
public struct ScoreHeap<Order: HeapOrder> {
    // Stored state is usable from inlinable code, so the layers above specialise push and pop.
    @usableFromInline var scoreBuffer: UnsafeMutablePointer<Float>
    @usableFromInline var idBuffer: UnsafeMutablePointer<Int32>
    @usableFromInline var size = 0
    @usableFromInline var capacity: Int

    @inlinable public var scores: UnsafeMutablePointer<Float> { scoreBuffer }
    @inlinable public var ids: UnsafeMutablePointer<Int32> { idBuffer }
    @inlinable public var count: Int { size }

    public init(capacity: Int = 64) {
        self.capacity = max(16, capacity)
        scoreBuffer = .allocate(capacity: self.capacity)
        idBuffer = .allocate(capacity: self.capacity)
    }

    public func deallocate() { scoreBuffer.deallocate(); idBuffer.deallocate() }

    @inlinable public var isEmpty: Bool { size == 0 }
    /// The root's score: the best for `HighestFirst`, the worst kept for `LowestFirst`.
    @inlinable public var rootScore: Float { scoreBuffer[0] }
    @inlinable public mutating func removeAll() { size = 0 }

    @usableFromInline
    mutating func grow() {
        let newCapacity = capacity * 2
        let s = UnsafeMutablePointer<Float>.allocate(capacity: newCapacity)
        let i = UnsafeMutablePointer<Int32>.allocate(capacity: newCapacity)
        s.moveInitialize(from: scoreBuffer, count: size)
        i.moveInitialize(from: idBuffer, count: size)
        deallocate()
        scoreBuffer = s
        idBuffer = i
        capacity = newCapacity
    }

    @inlinable @inline(__always)
    public mutating func push(_ s: Float, _ id: Int32) {
        if size == capacity { grow() }
        var i = size
        size += 1
        while i > 0 {
            let p = (i - 1) >> 1
            if !Order.before(s, scoreBuffer[p]) { break }
            scoreBuffer[i] = scoreBuffer[p]; idBuffer[i] = idBuffer[p]
            i = p
        }
        scoreBuffer[i] = s; idBuffer[i] = id
    }

    @inlinable @inline(__always) @discardableResult
    public mutating func pop() -> (score: Float, id: Int32) {
        let top = (scoreBuffer[0], idBuffer[0])
        size -= 1
        let s = scoreBuffer[size], id = idBuffer[size]
        var i = 0
        while true {
            let l = 2 * i + 1
            if l >= size { break }
            var c = l
            if l + 1 < size && Order.before(scoreBuffer[l + 1], scoreBuffer[l]) { c = l + 1 }
            if !Order.before(scoreBuffer[c], s) { break }
            scoreBuffer[i] = scoreBuffer[c]; idBuffer[i] = idBuffer[c]
            i = c
        }
        scoreBuffer[i] = s; idBuffer[i] = id
        return top
    }
}

public typealias MaxScoreHeap = ScoreHeap<HighestFirst>
public typealias MinScoreHeap = ScoreHeap<LowestFirst>

extension ScoreHeap where Order == LowestFirst {
    /// The worst kept score.
    @inlinable public var bottomScore: Float { rootScore }

    /// Empties the heap into a list sorted best first (score descending; equal scores keep heap order).
    @inlinable
    public mutating func drainDescending() -> [(score: Float, id: Int32)] {
        var out = [(score: Float, id: Int32)](repeating: (0, 0), count: size)
        var j = size - 1
        while size > 0 {
            out[j] = pop()
            j -= 1
        }
        return out
    }
}

/// A visited set for graph walks: one stamp per node, cleared in O(1) by bumping the generation.
public final class VisitedSet {
    @usableFromInline var stamps: UnsafeMutablePointer<UInt32>
    @usableFromInline var capacity: Int
    @usableFromInline var generation: UInt32 = 0

    public init(capacity: Int) {
        self.capacity = max(1, capacity)
        stamps = .allocate(capacity: self.capacity)
        stamps.initialize(repeating: 0, count: self.capacity)
    }

    deinit { stamps.deallocate() }

    /// Starts a new walk over `capacity` nodes.
    public func reset(capacity needed: Int) {
        if needed > capacity {
            stamps.deallocate()
            capacity = needed
            stamps = .allocate(capacity: capacity)
            stamps.initialize(repeating: 0, count: capacity)
            generation = 0
        }
        generation &+= 1
        if generation == 0 {
            stamps.update(repeating: 0, count: capacity)
            generation = 1
        }
    }

    /// The stamp buffer and this walk's generation, for hot loops that inline `insert`.
    @inlinable public var walk: (stamps: UnsafeMutablePointer<UInt32>, generation: UInt32) { (stamps, generation) }

    /// Marks `i`; returns true when it was not yet visited in this walk.
    @inlinable @inline(__always)
    public func insert(_ i: Int) -> Bool {
        if stamps[i] == generation { return false }
        stamps[i] = generation
        return true
    }
}

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
        pointer = .allocate(capacity: self.capacity)
    }

    convenience init(_ values: [Int32]) {
        self.init(capacity: values.count)
        append(contentsOf: values)
    }

    deinit { if !isView { pointer.deallocate() } }

    /// Replaces the contents by `elements`: their view when they are one (no copy), else a copy.
    package func adopt(_ elements: SectionArray<Int32>) {
        if let (view, owner) = elements.view, let base = view.baseAddress {
            if !isView { pointer.deallocate() }
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

    package func append(contentsOf values: [Int32]) {
        reserve(count + values.count)
        values.withUnsafeBufferPointer { (pointer + count).initialize(from: $0.baseAddress!, count: $0.count) }
        count += values.count
    }

    private func reserve(_ needed: Int) {
        guard needed > capacity || isView else { return }
        var newCapacity = max(capacity, 16)
        while newCapacity < needed { newCapacity *= 2 }
        let fresh = UnsafeMutablePointer<Int32>.allocate(capacity: newCapacity)
        if isView {
            fresh.initialize(from: pointer, count: count)
            isView = false
            viewOwner = nil
        } else {
            fresh.moveInitialize(from: pointer, count: count)
            pointer.deallocate()
        }
        pointer = fresh
        capacity = newCapacity
    }

    /// The elements, for writing a section.
    package var elements: UnsafeBufferPointer<Int32> { UnsafeBufferPointer(start: pointer, count: count) }

    package var array: [Int32] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
}
