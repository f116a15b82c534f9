/// Which of two scores a heap keeps at its root.
public protocol HeapOrder {
    static func before(_ a: Float, _ b: Float) -> Bool
}

/// The best (highest) score at the root: candidate lists.
public enum HighestFirst: HeapOrder {
    @inline(__always) public static func before(_ a: Float, _ b: Float) -> Bool { a > b }
}

/// The worst (lowest) score at the root: bounded result sets.
public enum LowestFirst: HeapOrder {
    @inline(__always) public static func before(_ a: Float, _ b: Float) -> Bool { a < b }
}

/// A binary heap of (score, id) over raw buffers, for graph walks. A plain struct of pointers
/// so a hot loop can hold it in a local variable (no exclusivity checks, no copy-on-write);
/// the owner calls `deallocate()`.
public struct ScoreHeap<Order: HeapOrder> {
    public private(set) var scores: UnsafeMutablePointer<Float>
    public private(set) var ids: UnsafeMutablePointer<Int32>
    public private(set) var count = 0
    private var capacity: Int

    public init(capacity: Int = 64) {
        self.capacity = max(16, capacity)
        scores = .allocate(capacity: self.capacity)
        ids = .allocate(capacity: self.capacity)
    }

    public func deallocate() { scores.deallocate(); ids.deallocate() }

    public var isEmpty: Bool { count == 0 }
    /// The root's score: the best for `HighestFirst`, the worst kept for `LowestFirst`.
    public var rootScore: Float { scores[0] }
    public mutating func removeAll() { count = 0 }

    private mutating func grow() {
        let newCapacity = capacity * 2
        let s = UnsafeMutablePointer<Float>.allocate(capacity: newCapacity)
        let i = UnsafeMutablePointer<Int32>.allocate(capacity: newCapacity)
        s.moveInitialize(from: scores, count: count)
        i.moveInitialize(from: ids, count: count)
        deallocate()
        scores = s
        ids = i
        capacity = newCapacity
    }

    @inline(__always)
    public mutating func push(_ s: Float, _ id: Int32) {
        if count == capacity { grow() }
        var i = count
        count += 1
        while i > 0 {
            let p = (i - 1) >> 1
            if !Order.before(s, scores[p]) { break }
            scores[i] = scores[p]; ids[i] = ids[p]
            i = p
        }
        scores[i] = s; ids[i] = id
    }

    @inline(__always) @discardableResult
    public mutating func pop() -> (score: Float, id: Int32) {
        let top = (scores[0], ids[0])
        count -= 1
        let s = scores[count], id = ids[count]
        var i = 0
        while true {
            let l = 2 * i + 1
            if l >= count { break }
            var c = l
            if l + 1 < count && Order.before(scores[l + 1], scores[l]) { c = l + 1 }
            if !Order.before(scores[c], s) { break }
            scores[i] = scores[c]; ids[i] = ids[c]
            i = c
        }
        scores[i] = s; ids[i] = id
        return top
    }
}

public typealias MaxScoreHeap = ScoreHeap<HighestFirst>
public typealias MinScoreHeap = ScoreHeap<LowestFirst>

extension ScoreHeap where Order == LowestFirst {
    /// The worst kept score.
    public var bottomScore: Float { rootScore }

    /// Empties the heap into a list sorted best first (score descending; equal scores keep heap order).
    public mutating func drainDescending() -> [(score: Float, id: Int32)] {
        var out = [(score: Float, id: Int32)](repeating: (0, 0), count: count)
        var j = count - 1
        while count > 0 {
            out[j] = pop()
            j -= 1
        }
        return out
    }
}

/// A visited set for graph walks: one stamp per node, cleared in O(1) by bumping the generation.
public final class VisitedSet {
    private var stamps: UnsafeMutablePointer<UInt32>
    private var capacity: Int
    private var generation: UInt32 = 0

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
    public var walk: (stamps: UnsafeMutablePointer<UInt32>, generation: UInt32) { (stamps, generation) }

    /// Marks `i`; returns true when it was not yet visited in this walk.
    @inline(__always)
    public func insert(_ i: Int) -> Bool {
        if stamps[i] == generation { return false }
        stamps[i] = generation
        return true
    }
}

/// A growable Int32 buffer with a stable raw pointer between growths (graph links).
final class Int32Buffer {
    private(set) var pointer: UnsafeMutablePointer<Int32>
    private(set) var count = 0
    private var capacity: Int

    init(capacity: Int = 16) {
        self.capacity = max(16, capacity)
        pointer = .allocate(capacity: self.capacity)
    }

    convenience init(_ values: [Int32]) {
        self.init(capacity: values.count)
        append(contentsOf: values)
    }

    deinit { pointer.deallocate() }

    /// Appends `n` zeros.
    func grow(by n: Int) {
        reserve(count + n)
        (pointer + count).initialize(repeating: 0, count: n)
        count += n
    }

    func append(contentsOf values: [Int32]) {
        reserve(count + values.count)
        values.withUnsafeBufferPointer { (pointer + count).initialize(from: $0.baseAddress!, count: $0.count) }
        count += values.count
    }

    private func reserve(_ needed: Int) {
        guard needed > capacity else { return }
        var newCapacity = capacity
        while newCapacity < needed { newCapacity *= 2 }
        let fresh = UnsafeMutablePointer<Int32>.allocate(capacity: newCapacity)
        fresh.moveInitialize(from: pointer, count: count)
        pointer.deallocate()
        pointer = fresh
        capacity = newCapacity
    }

    var array: [Int32] { Array(UnsafeBufferPointer(start: pointer, count: count)) }
}
