import CBLAS
import KVRecallSupport

/// Thin, audited wrappers over the CBLAS calls KVRecall uses.
public enum BLAS {
    /// Sets OpenBLAS's own thread count. KVRecall parallelises over heads and queries itself,
    /// so it pins BLAS to one thread by default rather than nesting thread pools.
    public static func setThreads(_ n: Int) { openblas_set_num_threads(Int32(max(1, n))) }

    /// C[m x n] = A[m x k] * B[n x k]^T (all row-major): scores of m queries against n rows.
    @inline(__always)
    public static func scoresNT(m: Int, n: Int, k: Int, a: UnsafePointer<Float>, b: UnsafePointer<Float>,
                                c: UnsafeMutablePointer<Float>, alpha: Float = 1, beta: Float = 0) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(m), Int32(n), Int32(k),
                    alpha, a, Int32(k), b, Int32(k), beta, c, Int32(n))
    }

    /// C[m x n] = A[m x k] * B[k x n] (row-major).
    @inline(__always)
    public static func gemm(m: Int, n: Int, k: Int, a: UnsafePointer<Float>, b: UnsafePointer<Float>,
                            c: UnsafeMutablePointer<Float>, alpha: Float = 1, beta: Float = 0) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(m), Int32(n), Int32(k),
                    alpha, a, Int32(k), b, Int32(n), beta, c, Int32(n))
    }

    /// The second moment X^T X / n of `n` rows of `d` floats (row-major), accumulated in double
    /// (`d x d`, row-major): a singular moment's zero eigenvalues stay near zero.
    public static func secondMoment(_ x: UnsafePointer<Float>, rows n: Int, dimension d: Int) -> [Double] {
        let wide = (0..<(n * d)).map { Double(x[$0]) }
        var out = [Double](repeating: 0, count: d * d)
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(d), Int32(d), Int32(n),
                    1 / Double(max(1, n)), wide, Int32(d), wide, Int32(d), 0, &out, Int32(d))
        return out
    }

    /// y[n] = A[n x k] * x[k] (row-major): one query against n rows.
    @inline(__always)
    public static func gemv(n: Int, k: Int, a: UnsafePointer<Float>, x: UnsafePointer<Float>,
                            y: UnsafeMutablePointer<Float>) {
        cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(n), Int32(k), 1, a, Int32(k), x, 1, 0, y, 1)
    }
}
