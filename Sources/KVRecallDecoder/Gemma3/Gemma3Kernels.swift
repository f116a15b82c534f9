import CBLAS
import CDecoderKernels
import CKernels
import Dispatch
import Foundation
import KVRecall

/// The forward pass's numeric building blocks over raw row-major buffers. BLAS does the matrix
/// products (both cores through OpenBLAS's threads); the rest are row loops, parallel over rows
/// when the rows are many.
enum Gemma3Kernels {
    /// `out[n, W.rows] = x[n, W.columns] · Wᵀ`.
    /// One row (a decode step) runs as row-chunked dot products on every core, which holds up
    /// better than BLAS's threaded sgemv on a shared machine.
    static func linear(_ x: UnsafePointer<Float>, rows n: Int, _ w: Matrix, into out: UnsafeMutablePointer<Float>) {
        w.values.withUnsafeBufferPointer { wp in
            if n == 1 {
                let base = wp.baseAddress!
                parallelRows(w.rows, costPerItem: w.columns) { range in
                    kvr_scores_f32(x, base + range.lowerBound * w.columns, range.count, w.columns, out + range.lowerBound)
                }
            } else {
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(n), Int32(w.rows), Int32(w.columns), 1,
                            x, Int32(w.columns), wp.baseAddress, Int32(w.columns), 0, out, Int32(w.rows))
            }
        }
    }

    /// `out[rows] = W x` with W given as Q8_0 blocks `[rows, columns / 32]`.
    static func q8_0MatrixVector(_ blocks: [UInt8], rows: Int, columns: Int, _ x: UnsafePointer<Float>,
                                 into out: UnsafeMutablePointer<Float>) {
        let rowBytes = columns / 32 * 34
        blocks.withUnsafeBytes { b in
            let base = b.baseAddress!
            parallelRows(rows, costPerItem: columns) { range in
                kvd_q8_0_matvec(base + range.lowerBound * rowBytes, range.count, columns, x, out + range.lowerBound)
            }
        }
    }

    /// Runs `body` over `0..<n` in contiguous chunks, in parallel when `n * costPerItem` is large.
    static func parallelRows(_ n: Int, costPerItem: Int, _ body: (Range<Int>) -> Void) {
        let cores = ProcessInfo.processInfo.activeProcessorCount
        guard n > 1, cores > 1, n * costPerItem >= 1 << 16 else {
            body(0..<n)
            return
        }
        let chunks = min(n, cores * 4)
        // SpinJoin: a token runs a few hundred of these; each futex sleep and wake-up of
        // concurrentPerform's caller cost tens of microseconds to a scheduler tick.
        SpinJoin.run(tasks: chunks, threads: cores) { c in
            let lo = c * n / chunks, hi = (c + 1) * n / chunks
            if lo < hi { body(lo..<hi) }
        }
    }

    /// RMS norm of each `width`-wide row of `x` (rows at stride `width`), times `weight`, into `out`
    /// (which may be `x`): y = x / sqrt(mean(x²) + eps) · w.
    static func rmsNorm(_ x: UnsafePointer<Float>, rows n: Int, width: Int, weight: [Float], epsilon: Float,
                        into out: UnsafeMutablePointer<Float>) {
        weight.withUnsafeBufferPointer { w in
            parallelRows(n, costPerItem: width) { range in
                for r in range {
                    let row = x + r * width, dst = out + r * width
                    var sum: Float = 0
                    for i in 0..<width { sum += row[i] * row[i] }
                    let inv = 1 / (sum / Float(width) + epsilon).squareRoot()
                    for i in 0..<width { dst[i] = row[i] * inv * w[i] }
                }
            }
        }
    }

    /// Rotate-half RoPE in place on `[n, heads, d]` rows of token positions `positions[t]`:
    /// dimension i pairs with i + d/2, angle = position · base^(-2i/d).
    static func rope(_ x: UnsafeMutablePointer<Float>, tokens n: Int, heads: Int, dimension d: Int,
                     firstPosition: Int, base: Double) {
        let half = d / 2
        var inverseFrequency = [Double](repeating: 0, count: half)
        for i in 0..<half { inverseFrequency[i] = pow(base, -2 * Double(i) / Double(d)) }
        inverseFrequency.withUnsafeBufferPointer { freq in
            parallelRows(n, costPerItem: heads * d * 8) { range in
                var cosines = [Float](repeating: 0, count: half), sines = [Float](repeating: 0, count: half)
                for t in range {
                    let position = Double(firstPosition + t)
                    for i in 0..<half {
                        let angle = position * freq[i]
                        cosines[i] = Float(cos(angle))
                        sines[i] = Float(sin(angle))
                    }
                    for h in 0..<heads {
                        let row = x + (t * heads + h) * d
                        for i in 0..<half {
                            let a = row[i], b = row[i + half]
                            row[i] = a * cosines[i] - b * sines[i]
                            row[i + half] = a * sines[i] + b * cosines[i]
                        }
                    }
                }
            }
        }
    }

    /// `gate[i] = gelu_tanh(gate[i]) · up[i]` (GeGLU with the tanh approximation).
    static func geglu(gate: UnsafeMutablePointer<Float>, up: UnsafePointer<Float>, count: Int) {
        let c = Float((2 / Double.pi).squareRoot())
        parallelRows(count, costPerItem: 16) { range in
            for i in range {
                let x = gate[i]
                let g = 0.5 * x * (1 + tanh(c * (x + 0.044715 * x * x * x)))
                gate[i] = g * up[i]
            }
        }
    }

    /// Causal attention of a chunk of queries over a key range, for every query head.
    /// - queries: `[n, queryHeads, d]`, token t at position `firstQueryPosition + t`.
    /// - keys, values: `[m, kvHeads, d]`, row j at position `firstKeyPosition + j`.
    /// - window: a query at position p sees keys p-window+1 ... p (nil: every key up to p).
    /// - out: `[n, queryHeads, d]`.
    static func causalAttention(queries: UnsafePointer<Float>, tokens n: Int, firstQueryPosition: Int,
                                keys: UnsafePointer<Float>, values: UnsafePointer<Float>, keyRows m: Int,
                                firstKeyPosition: Int, queryHeads: Int, kvHeads: Int, dimension d: Int,
                                window: Int?, scale: Float, into out: UnsafeMutablePointer<Float>) {
        let group = queryHeads / kvHeads
        let scores = UnsafeMutablePointer<Float>.allocate(capacity: n * m)
        defer { scores.deallocate() }
        // Row t sees key columns lo(t) ..< hi(t).
        func visible(_ t: Int) -> Range<Int> {
            let p = firstQueryPosition + t
            let hi = min(m, p - firstKeyPosition + 1)
            let lo = window.map { max(0, p - $0 + 1 - firstKeyPosition) } ?? 0
            return lo..<max(lo, hi)
        }
        for h in 0..<queryHeads {
            let kvh = h / group
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(n), Int32(m), Int32(d), scale,
                        queries + h * d, Int32(queryHeads * d), keys + kvh * d, Int32(kvHeads * d), 0, scores, Int32(m))
            parallelRows(n, costPerItem: m * 4) { range in
                for t in range {
                    let row = scores + t * m
                    let seen = visible(t)
                    var peak = -Float.infinity
                    for j in seen { peak = max(peak, row[j]) }
                    var sum: Float = 0
                    for j in 0..<m {
                        if seen.contains(j) {
                            let e = exp(row[j] - peak)
                            row[j] = e
                            sum += e
                        } else {
                            row[j] = 0
                        }
                    }
                    let inv = sum > 0 ? 1 / sum : 0
                    for j in seen { row[j] *= inv }
                }
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(n), Int32(d), Int32(m), 1,
                        scores, Int32(m), values + kvh * d, Int32(kvHeads * d), 0, out + h * d, Int32(queryHeads * d))
        }
    }
}
