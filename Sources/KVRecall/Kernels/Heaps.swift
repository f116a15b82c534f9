/// Binary heaps of (score, id) over flat arrays, reused across queries (no per-push allocation
/// once warmed). `MaxScoreHeap` pops the best candidate; `MinScoreHeap` keeps the worst of a
/// bounded result set at its root.
public struct MaxScoreHeap {
    public private(set) var scores: [Float] = []
    public private(set) var ids: [Int32] = []
    public init(capacity: Int = 0) { scores.reserveCapacity(capacity); ids.reserveCapacity(capacity) }

    public var count: Int { scores.count }
    public var isEmpty: Bool { scores.isEmpty }
    public var topScore: Float { scores[0] }
    public var topID: Int32 { ids[0] }
    public mutating func removeAll() { scores.removeAll(keepingCapacity: true); ids.removeAll(keepingCapacity: true) }

    public mutating func push(_ s: Float, _ id: Int32) {
        scores.append(s); ids.append(id)
        var i = scores.count - 1
        while i > 0 {
            let p = (i - 1) >> 1
            if scores[p] >= scores[i] { break }
            scores.swapAt(p, i); ids.swapAt(p, i)
            i = p
        }
    }

    @discardableResult
    public mutating func pop() -> (score: Float, id: Int32) {
        let top = (scores[0], ids[0])
        let last = scores.count - 1
        scores.swapAt(0, last); ids.swapAt(0, last)
        scores.removeLast(); ids.removeLast()
        var i = 0
        let n = scores.count
        while true {
            let l = 2 * i + 1
            if l >= n { break }
            var c = l
            if l + 1 < n && scores[l + 1] > scores[l] { c = l + 1 }
            if scores[c] <= scores[i] { break }
            scores.swapAt(c, i); ids.swapAt(c, i)
            i = c
        }
        return top
    }
}

public struct MinScoreHeap {
    public private(set) var scores: [Float] = []
    public private(set) var ids: [Int32] = []
    public init(capacity: Int = 0) { scores.reserveCapacity(capacity); ids.reserveCapacity(capacity) }

    public var count: Int { scores.count }
    public var isEmpty: Bool { scores.isEmpty }
    /// The worst kept score.
    public var bottomScore: Float { scores[0] }
    public mutating func removeAll() { scores.removeAll(keepingCapacity: true); ids.removeAll(keepingCapacity: true) }

    public mutating func push(_ s: Float, _ id: Int32) {
        scores.append(s); ids.append(id)
        var i = scores.count - 1
        while i > 0 {
            let p = (i - 1) >> 1
            if scores[p] <= scores[i] { break }
            scores.swapAt(p, i); ids.swapAt(p, i)
            i = p
        }
    }

    @discardableResult
    public mutating func pop() -> (score: Float, id: Int32) {
        let top = (scores[0], ids[0])
        let last = scores.count - 1
        scores.swapAt(0, last); ids.swapAt(0, last)
        scores.removeLast(); ids.removeLast()
        var i = 0
        let n = scores.count
        while true {
            let l = 2 * i + 1
            if l >= n { break }
            var c = l
            if l + 1 < n && scores[l + 1] < scores[l] { c = l + 1 }
            if scores[c] >= scores[i] { break }
            scores.swapAt(c, i); ids.swapAt(c, i)
            i = c
        }
        return top
    }

    /// Contents sorted best first (score descending, ties by lower id).
    public func sortedDescending() -> [(score: Float, id: Int32)] {
        zip(scores, ids).map { ($0, $1) }.sorted { $0.0 != $1.0 ? $0.0 > $1.0 : $0.1 < $1.1 }
    }
}

/// A visited set for graph walks: one stamp per node, cleared in O(1) by bumping the generation.
public final class VisitedSet {
    private var stamps: [UInt32]
    private var generation: UInt32 = 0

    public init(capacity: Int) { stamps = [UInt32](repeating: 0, count: capacity) }

    /// Starts a new walk over `capacity` nodes.
    public func reset(capacity: Int) {
        if stamps.count < capacity { stamps = [UInt32](repeating: 0, count: capacity); generation = 0 }
        generation &+= 1
        if generation == 0 {
            for i in stamps.indices { stamps[i] = 0 }
            generation = 1
        }
    }

    /// Marks `i`; returns true when it was not yet visited in this walk.
    @inline(__always)
    public func insert(_ i: Int) -> Bool {
        if stamps[i] == generation { return false }
        stamps[i] = generation
        return true
    }
}
