import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage
/// Landmark attention's block representatives (training-free): keys in blocks of `blockSize`
/// positions, each summarised by its mean key and, for Quest's bound, its per-channel min and
/// max. Search scores the blocks, keeps the best ones and returns the best keys inside them.
public final class LandmarkIndex: BuildableIndex, @unchecked Sendable {
    public static let kind = IndexKind.landmark
    public static let formatVersion = 2
    public let dimension: Int
    public private(set) var count = 0
    public private(set) var mapSnapshot: MapIdentity?
    public let blockSize: Int
    /// Per block: the sum of its keys (the mean is sum / rows), min and max per channel (views
    /// of the stored section once loaded).
    private(set) var sums: SectionArray<Float> = []
    private(set) var mins: SectionArray<Float> = []
    private(set) var maxs: SectionArray<Float> = []

    public init(dimension: Int, blockSize: Int = 64) throws {
        guard blockSize >= 1 else { throw IndexError.invalidParameter("landmark block size must be at least 1") }
        self.dimension = dimension
        self.blockSize = blockSize
    }

    var blockCount: Int { (count + blockSize - 1) / blockSize }

    /// Landmarks learn nothing before adding.
    public var isTrained: Bool { true }
    public func train(keys: VectorView, range: Range<Int>, queries: VectorView? = nil) throws {}

    public func add(keys: VectorView, range: Range<Int>, progress: ((Int, Int) -> Void)? = nil) throws {
        try checkAdd(keys: keys, range: range, name: "the landmark index")
        let d = dimension
        let blocks = (range.upperBound + blockSize - 1) / blockSize
        let fresh = blocks * d - sums.count
        if fresh > 0 {
            sums.append(contentsOf: repeatElement(0, count: fresh))
            mins.append(contentsOf: repeatElement(.infinity, count: fresh))
            maxs.append(contentsOf: repeatElement(-.infinity, count: fresh))
        }
        var row = [Float](repeating: 0, count: d)
        sums.withUnsafeMutableBufferPointer { sums in
            mins.withUnsafeMutableBufferPointer { mins in
                maxs.withUnsafeMutableBufferPointer { maxs in
                    for i in range {
                        let b = i / blockSize
                        keys.decodeRow(i, into: &row)
                        for j in 0..<d {
                            sums[b * d + j] += row[j]
                            mins[b * d + j] = min(mins[b * d + j], row[j])
                            maxs[b * d + j] = max(maxs[b * d + j], row[j])
                        }
                    }
                }
            }
        }
        count = range.upperBound
        progress?(range.count, range.count)
    }

    /// Score of a block for `query`: mean key, or Quest's upper bound sum_j max(q_j min_j, q_j max_j).
    @inline(__always)
    func blockScore(_ b: Int, query: UnsafePointer<Float>, bound: Bool, sums: UnsafeBufferPointer<Float>,
                    mins: UnsafeBufferPointer<Float>, maxs: UnsafeBufferPointer<Float>) -> Float {
        let d = dimension
        var s: Float = 0
        if bound {
            for j in 0..<d { s += max(query[j] * mins[b * d + j], query[j] * maxs[b * d + j]) }
        } else {
            let rows = Float(min(blockSize, count - b * blockSize))
            for j in 0..<d { s += query[j] * sums[b * d + j] }
            s /= rows
        }
        return s
    }

    public func search(_ queries: UnsafeBufferPointer<Float>, k: Int, parameters: SearchParameters,
                       keys: VectorView) throws -> SearchResults {
        let m = try checkSearch(queries, k: k, keys: keys, name: "the landmark index")
        try parameters.landmark.validate()
        let keep = min(blockCount, parameters.landmark.blocks > 0 ? parameters.landmark.blocks : (4 * k + blockSize - 1) / blockSize)
        var results = SearchResults(k: k, queryCount: m)
        results.stats.keyCount = count
        for q in 0..<m {
            let query = queries.baseAddress! + q * dimension
            var best = TopK<Int>(k: keep)
            sums.withUnsafeBufferPointer { sums in
                mins.withUnsafeBufferPointer { mins in
                    maxs.withUnsafeBufferPointer { maxs in
                        for b in 0..<blockCount {
                            best.push(blockScore(b, query: query, bound: parameters.landmark.bound, sums: sums, mins: mins, maxs: maxs), b)
                        }
                    }
                }
            }
            results.stats.auxiliaryComputations += blockCount
            var top = TopK<Int>(k: k)
            for block in best.sorted().map(\.id).sorted() {
                for i in (block * blockSize)..<min(count, (block + 1) * blockSize) {
                    top.push(keys.score(query: query, row: i), i)
                    results.stats.distanceComputations += 1
                }
            }
            results.store(top, query: q)
        }
        return results
    }

    public func sections() -> [String: [UInt8]] {
        var meta = ByteWriter()
        for v in [dimension, count, blockSize] { meta.write(Int64(v)) }
        var blocks = ByteWriter()
        blocks.write(alignedArray: sums)
        blocks.write(alignedArray: mins)
        blocks.write(alignedArray: maxs)
        return ["meta": meta.bytes, "blocks": blocks.bytes]
    }

    public convenience init(sections: IndexSections) throws {
        let v = try readSection(sections, "meta", of: .landmark) { meta in try (0..<3).map { _ in Int(try meta.read(Int64.self)) } }
        guard (1...65536).contains(v[0]), (0...Int(Int32.max)).contains(v[1]), (1...Int(Int32.max)).contains(v[2]) else {
            throw IndexError.corrupt("landmark meta out of range")
        }
        try self.init(dimension: v[0], blockSize: v[2])
        (sums, mins, maxs) = try readSection(sections, "blocks", of: .landmark) {
            try ($0.readAlignedArray(Float.self), $0.readAlignedArray(Float.self), $0.readAlignedArray(Float.self))
        }
        count = v[1]
        let expected = blockCount * dimension
        guard sums.count == expected, mins.count == expected, maxs.count == expected,
              sums.withUnsafeBufferPointer({ $0.allSatisfy(\.isFinite) }),
              mins.withUnsafeBufferPointer({ mins in maxs.withUnsafeBufferPointer { maxs in
                  zip(mins, maxs).allSatisfy({ $0 <= $1 && $0.isFinite && $1.isFinite }) } }) else {
            throw IndexError.corrupt("landmark blocks have the wrong size, or bounds that are not finite and ordered")
        }
        mapSnapshot = sections.mapSnapshot
    }
}

extension LandmarkIndex {
    /// Landmark's entry in the catalog: blocks of positions; no calibrated knob.
    public static let descriptor = IndexDescriptor(
        kind: .landmark, type: LandmarkIndex.self, knob: nil,
        make: { d, _, p in try LandmarkIndex(dimension: d, blockSize: p.landmarkBlockSize) },
        describe: { $0.landmark.blocks > 0 ? "blocks \($0.landmark.blocks)" : "blocks auto (4k / block size)" })
}
