import Dispatch

/// Monotonic nanoseconds, for latency figures.
@inline(__always)
public func monotonicNanos() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

/// Median of a sample (mean of the middle two for an even count); 0 for an empty one.
public func median<T: BinaryFloatingPoint>(_ values: [T]) -> T {
    guard !values.isEmpty else { return 0 }
    let s = values.sorted()
    let mid = s.count / 2
    return s.count % 2 == 1 ? s[mid] : (s[mid - 1] + s[mid]) / 2
}

/// Fraction of `exact` ids found in `retrieved` (recall@k with k = exact.count).
public func recall(retrieved: some Sequence<Int>, exact: some Collection<Int>) -> Double {
    guard !exact.isEmpty else { return 1 }
    let truth = Set(exact)
    var hit = 0
    for id in retrieved where truth.contains(id) { hit += 1 }
    return Double(hit) / Double(exact.count)
}
