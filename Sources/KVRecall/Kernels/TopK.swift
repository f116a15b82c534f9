/// A bounded selection of the `k` best (score, id) pairs: highest score first, ties to the lower id.
///
/// A binary min-heap over flat arrays whose root is the worst kept pair, so rejecting a
/// candidate — the common case in a scan — costs one comparison against `threshold`.
public struct TopK {
    public let k: Int
    public private(set) var count = 0
    private var scores: [Float]
    private var ids: [Int]

    public init(k: Int) {
        precondition(k > 0, "k must be positive")
        self.k = k
        scores = [Float](repeating: 0, count: k)
        ids = [Int](repeating: 0, count: k)
    }

    /// Score a candidate must beat (or tie with a lower id) to enter; -inf while not full.
    @inline(__always)
    public var threshold: Float { count < k ? -.infinity : scores[0] }

    public mutating func reset() { count = 0 }

    /// True when (s1, i1) ranks after (s2, i2).
    @inline(__always)
    static func worse(_ s1: Float, _ i1: Int, _ s2: Float, _ i2: Int) -> Bool {
        s1 < s2 || (s1 == s2 && i1 > i2)
    }

    @inline(__always)
    public mutating func push(_ score: Float, _ id: Int) {
        if count < k {
            var i = count
            count += 1
            scores[i] = score
            ids[i] = id
            while i > 0 {  // sift up
                let parent = (i - 1) / 2
                guard TopK.worse(scores[i], ids[i], scores[parent], ids[parent]) else { break }
                scores.swapAt(i, parent)
                ids.swapAt(i, parent)
                i = parent
            }
            return
        }
        guard TopK.worse(scores[0], ids[0], score, id) else { return }
        scores[0] = score
        ids[0] = id
        siftDown(0)
    }

    /// Scores `n` candidates with ids `firstID...` in one pass.
    @inline(__always)
    public mutating func push(scores s: UnsafePointer<Float>, count n: Int, firstID: Int) {
        var i = 0
        while i < n && count < k {
            push(s[i], firstID + i)
            i += 1
        }
        var t = threshold
        while i < n {
            if s[i] > t {  // equal scores come with higher ids here, so they never enter
                push(s[i], firstID + i)
                t = scores[0]
            }
            i += 1
        }
    }

    private mutating func siftDown(_ start: Int) {
        var i = start
        while true {
            let l = 2 * i + 1
            if l >= count { return }
            var w = l
            let r = l + 1
            if r < count && TopK.worse(scores[r], ids[r], scores[l], ids[l]) { w = r }
            guard TopK.worse(scores[w], ids[w], scores[i], ids[i]) else { return }
            scores.swapAt(i, w)
            ids.swapAt(i, w)
            i = w
        }
    }

    /// The kept pairs, best first.
    public func sorted() -> [(score: Float, id: Int)] {
        (0..<count).map { (scores[$0], ids[$0]) }.sorted { TopK.worse($1.0, $1.1, $0.0, $0.1) }
    }
}
