import KVRecall
/// Renders rows as an aligned plain-text table: text columns left-aligned, numbers right-aligned.
public struct TextTable {
    public var headers: [String]
    public var rows: [[String]] = []

    public init(_ headers: [String]) { self.headers = headers }

    public mutating func add(_ row: [String]) { rows.append(row) }

    public func render() -> String {
        var widths = headers.map(\.count)
        for row in rows {
            for (i, cell) in row.enumerated() where i < widths.count { widths[i] = max(widths[i], cell.count) }
        }
        func numeric(_ s: String) -> Bool { !s.isEmpty && Double(s.replacingOccurrences(of: "x", with: "").replacingOccurrences(of: "%", with: "")) != nil }
        func line(_ cells: [String]) -> String {
            cells.enumerated().map { i, cell in
                let pad = String(repeating: " ", count: max(0, widths[i] - cell.count))
                return numeric(cell) ? pad + cell : cell + pad
            }.joined(separator: "  ")
        }
        var out = [line(headers), widths.map { String(repeating: "-", count: $0) }.joined(separator: "  ")]
        out += rows.map(line)
        return out.joined(separator: "\n")
    }
}

/// Fixed-point formatting without Foundation's locale machinery.
public func fmt(_ x: Double, _ digits: Int = 3) -> String {
    guard x.isFinite else { return x.isNaN ? "nan" : (x > 0 ? "inf" : "-inf") }
    var p = 1.0
    for _ in 0..<digits { p *= 10 }
    // Beyond what an Int holds in fixed point (it trapped on a score of 1e20): Swift's shortest form.
    guard abs(x) * p < 9e18 else { return "\(x)" }
    let r = (abs(x) * p).rounded()
    let whole = Int(r / p)
    let frac = Int(r) - whole * Int(p)
    let sign = x < 0 && r != 0 ? "-" : ""
    if digits == 0 { return "\(sign)\(whole)" }
    let fs = String(frac)
    return "\(sign)\(whole)." + String(repeating: "0", count: digits - fs.count) + fs
}
