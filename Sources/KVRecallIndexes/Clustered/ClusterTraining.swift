import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

// Training helpers shared by the clustered indexes (IVF, centroid tree) and LSH's centring.

extension ClusterMetric {
    /// The metric's byte in a stored index.
    var code: UInt8 { self == .l2 ? 0 : 1 }

    init(code: UInt8) throws {
        switch code {
        case 0: self = .l2
        case 1: self = .ip
        default: throw IndexError.corrupt("unknown cluster metric code \(code)")
        }
    }
}

/// Mean of keys `range`, accumulated in double precision.
func meanKey(_ keys: VectorView, range: Range<Int>) -> [Float] {
    let d = keys.dimension
    var sums = [Double](repeating: 0, count: d)
    let chunk = 4096
    let buffer = UnsafeMutablePointer<Float>.allocate(capacity: chunk * d)
    defer { buffer.deallocate() }
    var i = range.lowerBound
    while i < range.upperBound {
        let n = decodeRun(keys, from: i, upTo: min(range.upperBound, i + chunk), into: buffer)
        for r in 0..<n {
            let row = buffer + r * d
            for t in 0..<d { sums[t] += Double(row[t]) }
        }
        i += n
    }
    let inv = 1 / Double(max(1, range.count))
    return sums.map { Float($0 * inv) }
}

/// Decodes rows `from..<upTo` (stopping early at no boundary: blocks are walked) as f32; returns the rows.
func decodeRun(_ keys: VectorView, from: Int, upTo: Int, into out: UnsafeMutablePointer<Float>) -> Int {
    var i = from
    while i < upTo {
        let take = min(keys.blockSize - i % keys.blockSize, upTo - i)
        keys.decodeRows(keys.row(i), count: take, into: out + (i - from) * keys.dimension)
        i += take
    }
    return upTo - from
}

/// Centred training rows for k-means: all of `range` when it holds at most `perCentroid * k` keys
/// (`all` is then true and row j is key `range.lowerBound + j`), else a seeded sample of that size.
func trainingRows(_ keys: VectorView, range: Range<Int>, perCentroid: Int, k: Int, mean: [Float],
                  seed: UInt64) -> (rows: [Float], all: Bool) {
    let d = keys.dimension, n = range.count
    let m = min(n, perCentroid * k)
    var rows = [Float](repeating: 0, count: m * d)
    rows.withUnsafeMutableBufferPointer { out in
        if m == n {
            _ = decodeRun(keys, from: range.lowerBound, upTo: range.upperBound, into: out.baseAddress!)
        } else {
            var rng = SeededGenerator(seed: seed ^ 0x5EED_5A3E_1E00_0000)
            for (j, i) in KMeans.sampleIndices(n: n, count: m, using: &rng).enumerated() {
                keys.decodeRow(range.lowerBound + Int(i), into: out.baseAddress! + j * d)
            }
        }
        for r in 0..<m {
            for t in 0..<d { out[r * d + t] -= mean[t] }
        }
    }
    return (rows, m == n)
}

/// Labels keys `range` (centred by `mean`) with their cluster under `centroids`, in chunks.
func assignKeys(_ keys: VectorView, range: Range<Int>, centroids: [Float], mean: [Float], metric: ClusterMetric,
                threads: Int) -> [Int32] {
    let d = keys.dimension
    var labels = [Int32](repeating: -1, count: range.count)
    let chunk = 16384
    var buffer = [Float](repeating: 0, count: min(chunk, range.count) * d)
    var chunkLabels: [Int32] = []
    var i = range.lowerBound
    while i < range.upperBound {
        let n = min(chunk, range.upperBound - i)
        buffer.withUnsafeMutableBufferPointer { out in
            _ = decodeRun(keys, from: i, upTo: i + n, into: out.baseAddress!)
            for r in 0..<n {
                for t in 0..<d { out[r * d + t] -= mean[t] }
            }
        }
        chunkLabels = [Int32](repeating: -1, count: n)
        buffer.withUnsafeBufferPointer { rows in
            _ = KMeans.assign(UnsafeBufferPointer(rebasing: rows[0..<(n * d)]), dimension: d, centroids: centroids,
                          metric: metric, threads: threads, labels: &chunkLabels)
        }
        for r in 0..<n { labels[i - range.lowerBound + r] = chunkLabels[r] }
        i += n
    }
    return labels
}
