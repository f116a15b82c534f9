import CKernels
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
import KVRecallStorage

/// How inverted lists store their keys' copies (faiss's IVFScalarQuantizer codes).
public enum ListCodeKind: String, Sendable, CaseIterable {
    /// Half precision: 2 bytes per dimension.
    case f16
    /// 8-bit scalar quantization with per-dimension ranges (faiss's SQ8): 1 byte per dimension.
    case sq8

    var code: UInt8 { self == .f16 ? 0 : 1 }

    init(code: UInt8) throws {
        switch code {
        case 0: self = .f16
        case 1: self = .sq8
        default: throw IndexError.corrupt("unknown list code kind \(code)")
        }
    }

    /// Bytes per key of dimension `d`.
    public func codeSize(dimension d: Int) -> Int { self == .f16 ? 2 * d : d }
}

/// Encodes keys as residuals from their list's centroid (key - mean - centroid) and scores a
/// query against them. SQ8 maps dimension j's range [vmin_j, vmin_j + vdiff_j] (min and max of
/// the training residuals) to 0...255; values outside are clamped. A query is prepared once:
/// q·r ≈ Σ q_j vmin_j + Σ (q_j vdiff_j / 255) code_j, so the scan is one multiply-add per byte.
struct ListCodec: Equatable, Sendable {
    let kind: ListCodeKind
    let dimension: Int
    /// SQ8 per-dimension minimum and range (empty for f16).
    let vmin: [Float]
    let vdiff: [Float]

    var codeSize: Int { kind.codeSize(dimension: dimension) }

    init(kind: ListCodeKind, dimension: Int, vmin: [Float] = [], vdiff: [Float] = []) {
        self.kind = kind
        self.dimension = dimension
        self.vmin = vmin
        self.vdiff = vdiff
    }

    /// A codec for `kind` trained on `residuals` (`n x dimension`; SQ8: per-dimension min and max).
    static func train(_ kind: ListCodeKind, residuals: UnsafeBufferPointer<Float>, dimension d: Int) -> ListCodec {
        guard kind == .sq8 else { return ListCodec(kind: kind, dimension: d) }
        var lo = [Float](repeating: .infinity, count: d), hi = [Float](repeating: -.infinity, count: d)
        let n = residuals.count / d
        for r in 0..<n {
            for j in 0..<d {
                let x = residuals[r * d + j]
                lo[j] = min(lo[j], x)
                hi[j] = max(hi[j], x)
            }
        }
        if n == 0 { lo = [Float](repeating: 0, count: d); hi = lo }
        return ListCodec(kind: kind, dimension: d, vmin: lo, vdiff: zip(lo, hi).map { max(0, $1 - $0) })
    }

    /// Writes the code of one residual (`dimension` floats) to `out` (`codeSize` bytes).
    @inline(__always)
    func encode(_ residual: UnsafePointer<Float>, into out: UnsafeMutablePointer<UInt8>) {
        let d = dimension
        switch kind {
        case .f16:
            UnsafeMutableRawPointer(out).withMemoryRebound(to: UInt16.self, capacity: d) { kvr_f32_to_f16(residual, $0, d) }
        case .sq8:
            for j in 0..<d {
                let step = vdiff[j]
                let t = step > 0 ? (residual[j] - vmin[j]) / step * 255 : 0
                out[j] = UInt8(max(0, min(255, t.rounded())))
            }
        }
    }

    /// Residual `dimension` floats decoded from `code` (for tests and checks).
    func decode(_ code: UnsafePointer<UInt8>, into out: UnsafeMutablePointer<Float>) {
        let d = dimension
        switch kind {
        case .f16:
            UnsafeRawPointer(code).withMemoryRebound(to: UInt16.self, capacity: d) { kvr_f16_to_f32($0, out, d) }
        case .sq8:
            for j in 0..<d { out[j] = vmin[j] + Float(code[j]) * vdiff[j] / 255 }
        }
    }

    /// Prepares `query` for `scan`: writes the scan's query vector to `prepared` (`dimension`
    /// floats) and returns the constant term to add to every code score.
    @inline(__always)
    func prepare(_ query: UnsafePointer<Float>, into prepared: UnsafeMutablePointer<Float>) -> Float {
        let d = dimension
        switch kind {
        case .f16:
            prepared.update(from: query, count: d)
            return 0
        case .sq8:
            var bias: Float = 0
            for j in 0..<d {
                prepared[j] = query[j] * vdiff[j] / 255
                bias += query[j] * vmin[j]
            }
            return bias
        }
    }

    /// SQ8: `prepare`, then the prepared vector quantized to int8 with one per-query scale (its
    /// largest magnitude maps to 127) for the integer scan (`kvr_scan_u8s8`): a code's score is
    /// bias + scale x (code . out). The rounding's mean effect (codes taken at mid-range 127.5) is
    /// folded into the bias; what is left perturbs the order, which the exact re-rank repairs.
    @inline(__always)
    func prepareInt8(_ query: UnsafePointer<Float>, prepared: UnsafeMutablePointer<Float>,
                     into out: UnsafeMutablePointer<Int8>) -> (bias: Float, scale: Float) {
        let d = dimension
        let bias = prepare(query, into: prepared)
        var top: Float = 0
        for j in 0..<d { top = max(top, abs(prepared[j])) }
        guard top > 0, top.isFinite else {
            out.update(repeating: 0, count: d)
            return (bias, 0)
        }
        let scale = top / 127
        var lost: Float = 0
        for j in 0..<d {
            let t = max(-127, min(127, (prepared[j] / scale).rounded()))
            out[j] = Int8(t)
            lost += prepared[j] - scale * t
        }
        return (bias + 127.5 * lost, scale)
    }

    /// Code scores (without the constant term) of `n` contiguous codes, by the C kernels.
    @inline(__always)
    func scan(_ prepared: UnsafePointer<Float>, codes: UnsafePointer<UInt8>, count n: Int, into out: UnsafeMutablePointer<Float>) {
        switch kind {
        case .f16:
            UnsafeRawPointer(codes).withMemoryRebound(to: UInt16.self, capacity: n * dimension) {
                kvr_scores_f16(prepared, $0, n, dimension, out)
            }
        case .sq8:
            kvr_scores_u8(prepared, codes, n, dimension, out)
        }
    }

    /// Writes kind, then the SQ8 ranges.
    func write(to writer: inout ByteWriter) {
        writer.write(kind.code)
        writer.write(array: vmin)
        writer.write(array: vdiff)
    }

    /// Reads what `write` wrote, checked: SQ8 ranges finite, non-negative and of `dimension` entries.
    static func read(from reader: inout ByteReader, dimension d: Int, what: String) throws -> ListCodec {
        let kind = try ListCodeKind(code: try reader.read(UInt8.self))
        let vmin = try reader.readFloatArray(), vdiff = try reader.readFloatArray()
        let expected = kind == .sq8 ? d : 0
        guard vmin.count == expected, vdiff.count == expected, vmin.allSatisfy(\.isFinite),
              vdiff.allSatisfy({ $0.isFinite && $0 >= 0 }) else {
            throw IndexError.corrupt("\(what) \(kind.rawValue) code ranges do not match dimension \(d), or are not finite")
        }
        return ListCodec(kind: kind, dimension: d, vmin: vmin, vdiff: vdiff)
    }

    /// Checks stored codes: f16 codes must be finite (any byte is a valid SQ8 code).
    func validate(_ codes: SectionArray<UInt8>, what: String) throws {
        guard kind == .f16 else { return }
        let bad = codes.withUnsafeBufferPointer { bytes -> Bool in
            let raw = UnsafeRawBufferPointer(bytes)
            let halves = UnsafeBufferPointer(start: raw.baseAddress?.assumingMemoryBound(to: UInt16.self), count: raw.count / 2)
            for h in halves where h & 0x7C00 == 0x7C00 { return true }
            return false
        }
        if bad { throw IndexError.corrupt("\(what) list codes hold a non-finite f16 value") }
    }
}

/// Residual codes of keys `range`: key - mean - centroids[labels[j]], encoded by `codec`, in
/// key order (`range.count x codec.codeSize` bytes); chunks decoded and encoded on `threads`.
func encodeKeys(_ keys: VectorView, range: Range<Int>, labels: [Int32], centroids: [Float], mean: [Float],
                codec: ListCodec, threads: Int) -> [UInt8] {
    let d = keys.dimension, cs = codec.codeSize, n = range.count
    var codes = [UInt8](repeating: 0, count: n * cs)
    let chunk = 4096
    codes.withUnsafeMutableBufferPointer { out in
        labels.withUnsafeBufferPointer { lab in
            centroids.withUnsafeBufferPointer { cen in
                mean.withUnsafeBufferPointer { mu in
                    ChunkPlan(count: n, chunk: chunk, threads: threads).run(scratch: chunk * d) { _, chunks, rows in
                        for (_, part) in chunks {
                            _ = decodeRun(keys, from: range.lowerBound + part.lowerBound, upTo: range.lowerBound + part.upperBound, into: rows)
                            for (r, i) in part.enumerated() {
                                let row = rows + r * d, centre = cen.baseAddress! + Int(lab[i]) * d
                                for j in 0..<d { row[j] -= mu[j] + centre[j] }
                                codec.encode(row, into: out.baseAddress! + i * cs)
                            }
                        }
                    }
                }
            }
        }
    }
    return codes
}

/// Residuals of centred training `rows` from their centroids (`labels`), for `ListCodec.train`.
func trainingResiduals(_ rows: [Float], labels: [Int32], centroids: [Float], dimension d: Int) -> [Float] {
    var out = rows
    let n = min(rows.count / d, labels.count)
    for r in 0..<n {
        let c = Int(labels[r]) * d
        for j in 0..<d { out[r * d + j] -= centroids[c + j] }
    }
    return Array(out.prefix(n * d))
}
