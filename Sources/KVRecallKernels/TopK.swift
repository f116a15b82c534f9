import KVRecallSupport
/// A bounded selection of the `k` best (score, id) pairs: highest score first, ties to the lower id.
/// Generic over the id type: `Int` for positions handed to callers, `Int32` for list and node
/// numbers inside the indexes (half the memory traffic in a scan).
///
/// A binary min-heap over flat arrays whose root is the worst kept pair, so rejecting a
/// candidate — the common case in a scan — costs one comparison against `threshold`. Reused
/// across queries: `reset` keeps the storage, `drain` writes the pairs best first without allocating.
public struct TopK<ID: FixedWidthInteger> {
    public let k: Int
    // Stored state is usable from inlinable code: the layers above specialise this type for their
    // id type (a generic call across modules would otherwise go through metadata per push).
    @usableFromInline var kept = 0
    @usableFromInline var scores: [Float]
    @usableFromInline var ids: [ID]

    /// Pairs kept.
    @inlinable public var count: Int { kept }

    @inlinable
    public init(k: Int) {
        precondition(k > 0, "k must be positive")
        self.k = k
        kept = 0
        scores = [Float](repeating: 0, count: k)
        ids = [ID](repeating: 0, count: k)
    }

    /// Score a candidate must reach (and beat, or tie with a lower id) to enter; -inf while not full.
    @inlinable @inline(__always)
    public var threshold: Float { kept < k ? -.infinity : scores[0] }

    @inlinable @inline(__always)
    public mutating func reset() { kept = 0 }

    /// Kept id `i`, in heap order (not ranked).
    @inlinable @inline(__always) public func id(at i: Int) -> ID { ids[i] }

    /// Kept score `i`, in heap order.
    @inlinable @inline(__always) public func score(at i: Int) -> Float { scores[i] }

    /// True when (s1, i1) ranks after (s2, i2).
    @inlinable @inline(__always)
    static func worse(_ s1: Float, _ i1: ID, _ s2: Float, _ i2: ID) -> Bool {
        s1 < s2 || (s1 == s2 && i1 > i2)
    }

    @inlinable @inline(__always)
    public mutating func push(_ score: Float, _ id: ID) {
        if kept < k {
            var i = kept
            kept += 1
            scores[i] = score
            ids[i] = id
            while i > 0 {  // sift up
                let parent = (i - 1) / 2
                guard Self.worse(scores[i], ids[i], scores[parent], ids[parent]) else { break }
                scores.swapAt(i, parent)
                ids.swapAt(i, parent)
                i = parent
            }
            return
        }
        guard Self.worse(scores[0], ids[0], score, id) else { return }
        scores[0] = score
        ids[0] = id
        siftDown()
    }

    /// Scores `n` candidates with ids `firstID...` in one pass.
    @inlinable @inline(__always)
    public mutating func push(scores s: UnsafePointer<Float>, count n: Int, firstID: ID = 0) {
        var i = 0
        while i < n && kept < k {
            push(s[i], firstID + ID(truncatingIfNeeded: i))
            i += 1
        }
        var t = threshold
        while i < n {
            if s[i] > t {  // equal scores come with higher ids here, so they never enter
                push(s[i], firstID + ID(truncatingIfNeeded: i))
                t = scores[0]
            }
            i += 1
        }
    }

    @inlinable
    mutating func siftDown() {
        var i = 0
        while true {
            let l = 2 * i + 1
            if l >= kept { return }
            var w = l
            let r = l + 1
            if r < kept && Self.worse(scores[r], ids[r], scores[l], ids[l]) { w = r }
            guard Self.worse(scores[w], ids[w], scores[i], ids[i]) else { return }
            scores.swapAt(i, w)
            ids.swapAt(i, w)
            i = w
        }
    }

    /// The kept pairs, best first.
    @inlinable
    public func sorted() -> [(score: Float, id: ID)] {
        (0..<kept).map { (scores[$0], ids[$0]) }.sorted { Self.worse($1.0, $1.1, $0.0, $0.1) }
    }

    /// Writes the kept pairs best first to `ids` / `scores` and empties the selection; returns how many.
    @inlinable @discardableResult
    public mutating func drain(ids outIDs: UnsafeMutablePointer<Int>, scores outScores: UnsafeMutablePointer<Float>) -> Int {
        let n = kept
        while kept > 0 {
            outIDs[kept - 1] = Int(ids[0])
            outScores[kept - 1] = scores[0]
            kept -= 1
            if kept > 0 {
                scores[0] = scores[kept]
                ids[0] = ids[kept]
                siftDown()
            }
        }
        return n
    }
}
