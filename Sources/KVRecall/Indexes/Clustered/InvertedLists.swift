/// Inverted lists in CSR form (faiss's `InvertedLists` without the codes): list `l` holds the key
/// positions `ids[offsets[l]..<offsets[l + 1]]`, ascending. Shared by IVF (one list per
/// centroid), the centroid tree (one per fine centroid) and the estimation zone.
public struct InvertedLists: Sendable, Equatable {
    /// `lists + 1` offsets into `ids`, from 0 to the number of keys.
    public private(set) var offsets: [Int]
    /// Key positions, list after list.
    public private(set) var ids: [Int32]

    /// `lists` empty lists.
    public init(lists: Int) {
        offsets = [Int](repeating: 0, count: lists + 1)
        ids = []
    }

    /// Lists read from disk, checked: `lists + 1` non-decreasing offsets from 0 to `keyCount`, and
    /// ids forming a permutation of 0..<keyCount, so a damaged section can never send a scan out of bounds.
    init(validating offsets: [Int], ids: [Int32], lists: Int, keyCount count: Int, what: String) throws {
        guard offsets.count == lists + 1, offsets.first == 0, offsets.last == count, ids.count == count else {
            throw IndexError.corrupt("\(what) list offsets do not cover its \(count) keys in \(lists) lists")
        }
        for l in 0..<lists where offsets[l] > offsets[l + 1] {
            throw IndexError.corrupt("\(what) list \(l) has negative length")
        }
        var seen = [Bool](repeating: false, count: count)
        for id in ids {
            guard id >= 0, Int(id) < count, !seen[Int(id)] else {
                throw IndexError.corrupt("\(what) lists name key \(id) out of range or twice")
            }
            seen[Int(id)] = true
        }
        self.offsets = offsets
        self.ids = ids
    }

    /// Number of lists.
    public var count: Int { offsets.count - 1 }

    /// Keys in all lists.
    public var keyCount: Int { ids.count }

    /// Keys in each list.
    public var sizes: [Int] { (0..<count).map { offsets[$0 + 1] - offsets[$0] } }

    /// Positions of the keys in list `l`, ascending.
    public func list(_ l: Int) -> ArraySlice<Int32> { ids[offsets[l]..<offsets[l + 1]] }

    /// Appends keys `firstID...` with `labels[j]` naming the list of key `firstID + j`, rebuilding
    /// the CSR arrays in one pass; ids stay ascending per list when `firstID` exceeds every stored id.
    public mutating func append(labels: [Int32], firstID: Int) {
        let lists = count
        var newOffsets = [Int](repeating: 0, count: lists + 1)
        for l in 0..<lists { newOffsets[l + 1] = offsets[l + 1] - offsets[l] }
        for l in labels { newOffsets[Int(l) + 1] += 1 }
        for l in 0..<lists { newOffsets[l + 1] += newOffsets[l] }
        var newIDs = [Int32](repeating: 0, count: newOffsets[lists])
        var cursor = [Int](repeating: 0, count: lists)
        newIDs.withUnsafeMutableBufferPointer { out in
            ids.withUnsafeBufferPointer { old in
                for l in 0..<lists {
                    var at = newOffsets[l]
                    for p in offsets[l]..<offsets[l + 1] { out[at] = old[p]; at += 1 }
                    cursor[l] = at
                }
            }
            for (j, l) in labels.enumerated() {
                out[cursor[Int(l)]] = Int32(firstID + j)
                cursor[Int(l)] += 1
            }
        }
        offsets = newOffsets
        ids = newIDs
    }

    /// Writes offsets then ids.
    func write(to writer: inout ByteWriter) {
        writer.write(array: offsets.map(Int64.init))
        writer.write(array: ids)
    }

    /// Reads what `write` wrote and validates it (see `init(validating:)`).
    static func read(from reader: inout ByteReader, lists: Int, keyCount: Int, what: String) throws -> InvertedLists {
        let offsets = try reader.readArray(Int64.self).map { Int(truncatingIfNeeded: $0) }
        let ids = try reader.readArray(Int32.self)
        return try InvertedLists(validating: offsets, ids: ids, lists: lists, keyCount: keyCount, what: what)
    }

    /// Keys prefetched ahead of the one being scored.
    static let prefetchDistance = 8

    /// Scores every key of the lists kept in `selected` into `top`; returns the keys scored. A
    /// second cursor runs `prefetchDistance` keys ahead (across list boundaries) and prefetches
    /// their rows, so the cache and TLB misses of these random reads overlap.
    @inline(__always)
    static func scan(query: UnsafePointer<Float>, lists selected: TopK<Int32>, offsets: UnsafeBufferPointer<Int>,
                     ids: UnsafeBufferPointer<Int32>, keys: VectorView, into top: inout TopK<Int32>) -> Int {
        let n = selected.count
        var aheadList = 0, ahead = 0, aheadEnd = 0
        @inline(__always) func prefetchNext() {
            while ahead == aheadEnd && aheadList < n {
                let l = Int(selected.id(at: aheadList))
                ahead = offsets[l]
                aheadEnd = offsets[l + 1]
                aheadList += 1
            }
            if ahead < aheadEnd {
                keys.prefetch(row: Int(ids[ahead]))
                ahead += 1
            }
        }
        for _ in 0..<prefetchDistance { prefetchNext() }
        var scanned = 0
        for j in 0..<n {
            let l = Int(selected.id(at: j))
            let lo = offsets[l], hi = offsets[l + 1]
            scanned += hi - lo
            for p in lo..<hi {
                prefetchNext()
                let id = ids[p]
                let s = keys.score(query: query, row: Int(id))
                if s >= top.threshold { top.push(s, id) }
            }
        }
        return scanned
    }
}
