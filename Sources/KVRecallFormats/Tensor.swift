import Foundation

// MARK: - Element types

/// Element type of a KV-cache tensor as stored on disk (always little-endian).
public enum TensorDType: String, Sendable, CaseIterable {
    /// IEEE 754 binary32.
    case f32
    /// IEEE 754 binary16 ("half").
    case f16
    /// bfloat16: the top 16 bits of a binary32.
    case bf16

    /// Bytes per element.
    public var byteWidth: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        }
    }

    /// The largest finite magnitude the type holds: 65504 for f16, 3.3895314e38 for bf16,
    /// `Float.greatestFiniteMagnitude` for f32. A finite value beyond it would be stored as ±Inf
    /// (and attention over it would answer NaN), so the stores refuse it.
    public var largestFinite: Float {
        switch self {
        case .f32: return .greatestFiniteMagnitude
        case .f16: return 65504
        case .bf16: return Float(bitPattern: 0x7F7F_0000)
        }
    }

    /// "f16's range (|x| <= 65504)": the range named in out-of-range messages.
    public var rangeDescription: String {
        switch self {
        case .f32: return "f32's range"
        case .f16: return "f16's range (|x| <= 65504)"
        case .bf16: return "bf16's range (|x| <= 3.3895314e+38)"
        }
    }
}

// MARK: - Tensor

/// A dense 2-D `[N, d]` or 3-D `[heads, N, d]` tensor of raw little-endian
/// elements in C (row-major) order.
///
/// Invariants (checked by every initializer, and by the readers before they
/// build a tensor): rank 2 or 3, every dimension in `1...Tensor.maxDimension`,
/// and `data.count == count * dtype.byteWidth`. The readers report violations
/// as `FormatError`s; constructing one directly with inconsistent arguments is
/// a programming error and traps.
public struct Tensor: Sendable, Equatable {
    public let name: String
    public let shape: [Int]
    public let dtype: TensorDType
    /// Little-endian raw elements, C order.
    public let data: [UInt8]

    /// Largest accepted single dimension (2^40); larger values only come from
    /// corrupt headers.
    public static let maxDimension = 1 << 40

    /// Wraps raw little-endian bytes. Traps if `shape` breaks the invariants
    /// or `data.count` disagrees with `shape` and `dtype`.
    public init(name: String, shape: [Int], dtype: TensorDType, data: [UInt8]) {
        if let problem = Tensor.shapeProblem(shape, dtype: dtype) {
            preconditionFailure("Tensor '\(name)': \(problem)")
        }
        let expected = shape.reduce(1, *) * dtype.byteWidth
        precondition(data.count == expected,
                     "Tensor '\(name)': \(data.count) bytes of data but shape \(Tensor.describe(shape)) of \(dtype) needs \(expected)")
        self.name = name
        self.shape = shape
        self.dtype = dtype
        self.data = data
    }

    /// Encodes `floats` as `dtype` (round-to-nearest-even for f16/bf16;
    /// out-of-range values become ±Inf, NaN stays NaN). Traps like
    /// `init(name:shape:dtype:data:)` if `floats.count` disagrees with `shape`.
    public init(name: String, shape: [Int], dtype: TensorDType, floats: [Float]) {
        var bytes = [UInt8]()
        bytes.reserveCapacity(floats.count * dtype.byteWidth)
        switch dtype {
        case .f32:
            for f in floats { Tensor.appendLE(f.bitPattern, to: &bytes) }
        case .f16:
            for f in floats { Tensor.appendLE(FloatBits.f16(from: f), to: &bytes) }
        case .bf16:
            for f in floats { Tensor.appendLE(FloatBits.bf16(from: f), to: &bytes) }
        }
        self.init(name: name, shape: shape, dtype: dtype, data: bytes)
    }

    /// Number of elements.
    public var count: Int { data.count / dtype.byteWidth }

    /// Length of the last axis (`d`): the width of one key/value vector.
    public var dim: Int { shape[shape.count - 1] }

    /// Number of `dim`-wide rows: `N` for `[N, d]`, `heads * N` for `[heads, N, d]`.
    public var rows: Int { count / dim }

    /// The elements widened to `Float` (exact for f16 and bf16, including
    /// subnormals, infinities and NaN).
    public func floats() -> [Float] {
        let n = count
        let dtype = self.dtype
        return [Float](unsafeUninitializedCapacity: n) { out, initialized in
            data.withUnsafeBytes { raw in
                switch dtype {
                case .f32:
                    #if _endian(little)
                    if n > 0 { UnsafeMutableRawBufferPointer(out).copyMemory(from: raw) }
                    #else
                    for i in 0..<n {
                        out[i] = Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
                    }
                    #endif
                case .f16:
                    for i in 0..<n {
                        out[i] = FloatBits.float(fromF16: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                    }
                case .bf16:
                    for i in 0..<n {
                        out[i] = FloatBits.float(fromBF16: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                    }
                }
            }
            initialized = n
        }
    }

    /// Position of the first NaN or ±Inf when the elements are read as rows of
    /// `rowWidth` (row = flat index / rowWidth), or nil if all are finite.
    /// Works on the raw bits, so it never converts or allocates.
    /// `rowWidth` must be positive.
    public func firstNonFinite(rowWidth: Int) -> (row: Int, column: Int)? {
        precondition(rowWidth > 0, "rowWidth must be positive")
        guard let index = firstNonFiniteIndex() else { return nil }
        return (index / rowWidth, index % rowWidth)
    }

    /// `firstNonFinite(rowWidth: dim)`.
    public func firstNonFinite() -> (row: Int, column: Int)? {
        firstNonFinite(rowWidth: dim)
    }

    /// Throws `.nonFinite` naming the first bad row (of width `dim`) so that
    /// ingest can reject NaN/Inf input instead of indexing garbage.
    public func requireFinite(path: String) throws {
        if let (row, column) = firstNonFinite() {
            throw FormatError(path: path, tensor: name, problem: .nonFinite(row: row, column: column))
        }
    }

    /// Position and value of the first finite element whose magnitude exceeds what `target` holds
    /// (`TensorDType.largestFinite`), with rows of width `rowWidth`, or nil. NaN and Inf are left to
    /// `firstNonFinite`. Nothing is read when every value of this tensor's type fits `target`.
    public func firstOutOfRange(for target: TensorDType, rowWidth: Int) -> (row: Int, column: Int, value: Float)? {
        precondition(rowWidth > 0, "rowWidth must be positive")
        let limit = target.largestFinite
        guard limit < dtype.largestFinite else { return nil }
        let n = count
        let dtype = self.dtype
        let index = data.withUnsafeBytes { raw -> (Int, Float)? in
            for i in 0..<n {
                let x: Float
                switch dtype {
                case .f32: x = Float(bitPattern: UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)))
                case .f16: x = FloatBits.float(fromF16: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                case .bf16: x = FloatBits.float(fromBF16: UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)))
                }
                if x.isFinite && x.magnitude > limit { return (i, x) }
            }
            return nil
        }
        return index.map { ($0.0 / rowWidth, $0.0 % rowWidth, $0.1) }
    }

    private func firstNonFiniteIndex() -> Int? {
        let n = count
        return data.withUnsafeBytes { raw -> Int? in
            switch dtype {
            case .f32:
                for i in 0..<n where UInt32(littleEndian: raw.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self)) & 0x7F80_0000 == 0x7F80_0000 {
                    return i
                }
            case .f16:
                for i in 0..<n where UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) & 0x7C00 == 0x7C00 {
                    return i
                }
            case .bf16:
                for i in 0..<n where UInt16(littleEndian: raw.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) & 0x7F80 == 0x7F80 {
                    return i
                }
            }
            return nil
        }
    }

    // MARK: Shared validation (used by the readers)

    /// Why `shape` cannot be a `Tensor` of `dtype`, or nil if it can. Checks, in
    /// order: negative or absurd dimensions, rank (2 or 3), zero dimensions and
    /// byte-size overflow, so the message names the most basic fault.
    static func shapeProblem(_ shape: [Int], dtype: TensorDType) -> String? {
        for (axis, d) in shape.enumerated() {
            if d < 0 { return "negative dimension \(d) on axis \(axis) of shape \(describe(shape))" }
            if d > maxDimension { return "dimension \(d) on axis \(axis) of shape \(describe(shape)) is absurdly large (limit 2^40)" }
        }
        guard shape.count == 2 || shape.count == 3 else {
            return "expected a 2-D [N, d] or 3-D [heads, N, d] array, got \(shape.count)-D shape \(describe(shape))"
        }
        if let axis = shape.firstIndex(of: 0) {
            return "shape \(describe(shape)) has a zero-length axis \(axis); an empty KV dump is not accepted"
        }
        var bytes = dtype.byteWidth
        for d in shape {
            let (product, overflow) = bytes.multipliedReportingOverflow(by: d)
            if overflow { return "shape \(describe(shape)) overflows the addressable byte count" }
            bytes = product
        }
        return nil
    }

    /// `[3, 4]`-style rendering used in messages.
    static func describe(_ shape: [Int]) -> String {
        "[" + shape.map(String.init).joined(separator: ", ") + "]"
    }

    private static func appendLE<T: FixedWidthInteger>(_ value: T, to bytes: inout [UInt8]) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }
}

// MARK: - Half-precision conversions

/// Bit-exact conversions between `Float` and the 16-bit formats, written out
/// by hand because `Float16` is unavailable on some platforms (macOS x86_64).
public enum FloatBits {
    /// Widens IEEE binary16 bits to `Float` (exact; subnormals, ±Inf and NaN
    /// payloads preserved).
    @inline(__always)
    public static func float(fromF16 h: UInt16) -> Float {
        let sign = UInt32(h & 0x8000) << 16
        let exponent = UInt32(h >> 10) & 0x1F
        let mantissa = UInt32(h & 0x3FF)
        if exponent == 0 {
            // Zero or subnormal: mantissa * 2^-24 is exact in binary32.
            let magnitude = Float(mantissa) * 0x1p-24
            return sign == 0 ? magnitude : -magnitude
        }
        if exponent == 0x1F {
            return Float(bitPattern: sign | 0x7F80_0000 | (mantissa << 13))
        }
        return Float(bitPattern: sign | ((exponent + 112) << 23) | (mantissa << 13))
    }

    /// Narrows to IEEE binary16 bits, rounding to nearest even; values at or
    /// beyond 65520 in magnitude become ±Inf and NaN becomes a quiet NaN.
    public static func f16(from value: Float) -> UInt16 {
        var bits = value.bitPattern
        let sign = UInt16((bits >> 16) & 0x8000)
        bits &= 0x7FFF_FFFF
        if bits >= 0x4780_0000 { // >= 65536 (or Inf/NaN): all exponent bits set
            return sign | (bits > 0x7F80_0000 ? 0x7E00 : 0x7C00)
        }
        if bits < 0x3880_0000 { // < 2^-14: result is subnormal or zero
            // Adding 0.5 aligns the 10 result bits at the bottom of the
            // mantissa; the FPU rounds to nearest even for us.
            let shifted = Float(bitPattern: bits) + 0.5
            return sign | UInt16(shifted.bitPattern - 0x3F00_0000)
        }
        let odd = (bits >> 13) & 1
        bits = bits &- 0x3800_0000 // rebias exponent 127 -> 15
        bits = bits &+ 0x0FFF &+ odd // round to nearest even (carry may reach Inf)
        return sign | UInt16(bits >> 13)
    }

    /// Widens bfloat16 bits to `Float` (exact).
    @inline(__always)
    public static func float(fromBF16 b: UInt16) -> Float {
        Float(bitPattern: UInt32(b) << 16)
    }

    /// Narrows to bfloat16 bits, rounding to nearest even; NaN stays a quiet NaN.
    public static func bf16(from value: Float) -> UInt16 {
        let bits = value.bitPattern
        if value.isNaN { return UInt16(bits >> 16) | 0x0040 }
        let rounded = bits &+ 0x7FFF &+ ((bits >> 16) & 1)
        return UInt16(rounded >> 16)
    }
}

// MARK: - Errors

/// A file that cannot be read as a KV-cache tensor. `description` is one
/// sentence that starts with the file path, suitable for printing as is.
public struct FormatError: Error, CustomStringConvertible, Equatable, Sendable, LocalizedError {
    /// The file (or `"<memory>"` for in-memory encoding) the problem is in.
    public let path: String
    /// The tensor the problem concerns, when the file holds several (safetensors) or
    /// the problem is about one tensor's values.
    public let tensor: String?
    public let problem: Problem

    public init(path: String, tensor: String? = nil, problem: Problem) {
        self.path = path
        self.tensor = tensor
        self.problem = problem
    }

    /// What is wrong. Byte counts are `Int`s; lengths read from a header that do
    /// not fit are reported as `UInt64`.
    public enum Problem: Equatable, Sendable {
        /// The file could not be opened, read or written (message from the OS).
        case io(String)
        /// The file has zero bytes.
        case emptyFile
        /// The file does not start with the `\x93NUMPY` magic.
        case notNPY
        /// An `.npy` format version other than 1.0, 2.0 or 3.0.
        case unsupportedVersion(major: Int, minor: Int)
        /// The declared header length exceeds `limit` (64 KiB for .npy, 100 MB for safetensors).
        case headerTooLarge(length: UInt64, limit: Int)
        /// The header is not the expected Python dict / JSON document.
        case malformedHeader(String)
        /// An `.npy` object array, whose payload is a pickle (never unpickled).
        case pickledObject(descr: String)
        /// An `.npy` array stored in Fortran (column-major) order.
        case fortranOrder
        /// A big-endian float dtype such as `>f4`.
        case bigEndian(descr: String)
        /// A dtype this reader does not convert (e.g. `<f8`, `<i4`, structured, `F64`, `I64`).
        case unsupportedDType(String)
        /// The shape is negative, absurd, overflowing, empty or of the wrong rank.
        case badShape(String)
        /// Shape × item size (`expected`) disagrees with the bytes present or
        /// declared (`actual`): a longer .npy payload or a safetensors range of the wrong size.
        case shapeMismatch(expected: Int, actual: Int)
        /// The file ends early: it needs `expected` bytes in total but has `actual`.
        case truncated(expected: Int, actual: Int)
        /// No tensor of that name; `available` lists the names present (sorted).
        case tensorNotFound(name: String, available: [String])
        /// Two tensors with the same name were given to the encoder.
        case duplicateTensor(String)
        /// Two tensors' data ranges share bytes (first begins earlier).
        case overlappingTensors(String, String)
        /// `data_offsets` are reversed or reach beyond the data area of `dataLength` bytes.
        case offsetsOutOfBounds(begin: Int, end: Int, dataLength: Int)
        /// Data bytes `begin..<end` belong to no tensor (a gap or trailing bytes),
        /// which the reference safetensors implementation also rejects.
        case unreferencedBytes(begin: Int, end: Int)
        /// First NaN or ±Inf at (`row`, `column`) with rows of width `dim`.
        case nonFinite(row: Int, column: Int)
        /// A finite `value` at (`row`, `column`) beyond the range of `storage`, the type it was to be
        /// stored in (it would become ±Inf there).
        case outOfRange(row: Int, column: Int, value: Float, storage: TensorDType)
    }

    public var description: String {
        let subject = tensor.map { "tensor '\($0)': " } ?? ""
        return "\(path): \(subject)\(problem.sentence)"
    }

    public var errorDescription: String? { description }
}

extension FormatError.Problem {
    /// The problem as a lower-case clause, without the path.
    var sentence: String {
        switch self {
        case .io(let message):
            return "I/O error: \(message)"
        case .emptyFile:
            return "file is empty (0 bytes)"
        case .notNPY:
            return "not a .npy file (it does not start with the \\x93NUMPY magic string)"
        case let .unsupportedVersion(major, minor):
            return "unsupported .npy format version \(major).\(minor) (supported: 1.0, 2.0, 3.0)"
        case let .headerTooLarge(length, limit):
            return "declared header length \(length) bytes exceeds the \(limit)-byte limit; the file is corrupt or not in this format"
        case .malformedHeader(let detail):
            return "malformed header: \(detail)"
        case .pickledObject(let descr):
            return "pickled object arrays are not supported (dtype '\(descr)'); save with allow_pickle=False"
        case .fortranOrder:
            return "Fortran-ordered (column-major) arrays are not supported; save np.ascontiguousarray(a) instead"
        case .bigEndian(let descr):
            return "big-endian dtype '\(descr)' is not supported; convert with a.astype('<\(descr.dropFirst())') before saving"
        case .unsupportedDType(let dtype):
            return "unsupported dtype '\(dtype)'; only float32, float16 and bfloat16 are supported"
        case .badShape(let detail):
            return "bad shape: \(detail)"
        case let .shapeMismatch(expected, actual):
            return "shape and dtype need \(expected) data bytes but the file has \(actual) for this array"
        case let .truncated(expected, actual):
            return "file is truncated: expected \(expected) bytes, found \(actual)"
        case let .tensorNotFound(name, available):
            let shown = available.prefix(20).map { "'\($0)'" }.joined(separator: ", ")
            let more = available.count > 20 ? " and \(available.count - 20) more" : ""
            return available.isEmpty
                ? "no tensor named '\(name)'; the file contains no tensors"
                : "no tensor named '\(name)'; available: \(shown)\(more)"
        case .duplicateTensor(let name):
            return "tensor name '\(name)' is used more than once"
        case let .overlappingTensors(first, second):
            return "tensors '\(first)' and '\(second)' have overlapping data ranges"
        case let .offsetsOutOfBounds(begin, end, dataLength):
            return "data_offsets [\(begin), \(end)] are not a valid range within the \(dataLength)-byte data area"
        case let .unreferencedBytes(begin, end):
            return "data bytes \(begin)..<\(end) belong to no tensor (gap or trailing bytes)"
        case let .nonFinite(row, column):
            return "non-finite value (NaN or Inf) at row \(row), column \(column)"
        case let .outOfRange(row, column, value, storage):
            return "value \(value) at row \(row), column \(column) is beyond \(storage.rangeDescription): stored as \(storage) it would "
                + "become Inf; store it as \(storage == .f16 ? "bf16 or f32" : "f32"), or scale the input"
        }
    }
}

// MARK: - File access

/// Minimal POSIX file access: one copy from the kernel straight into the
/// destination array, explicit sizes (no unbounded reads), and atomic writes.
enum FormatFileIO {
    /// A read-only descriptor plus the file size taken at open time.
    final class Reader {
        let path: String
        let size: Int
        private let fd: Int32

        init(path: String) throws {
            self.path = path
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw FormatFileIO.error(path, "cannot open for reading") }
            var info = stat()
            guard fstat(fd, &info) == 0 else {
                let error = FormatFileIO.error(path, "cannot stat")
                close(fd)
                throw error
            }
            if (UInt32(info.st_mode) & UInt32(S_IFMT)) == UInt32(S_IFDIR) {
                close(fd)
                throw FormatError(path: path, problem: .io("is a directory"))
            }
            self.fd = fd
            self.size = Int(info.st_size)
        }

        deinit { close(fd) }

        /// Reads exactly `count` bytes at `offset` into a new array.
        func read(offset: Int, count: Int) throws -> [UInt8] {
            try [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
                initialized = 0
                guard count > 0, let base = buffer.baseAddress else { return }
                var done = 0
                while done < count {
                    let n = pread(fd, base + done, count - done, off_t(offset + done))
                    if n < 0 {
                        if errno == EINTR { continue }
                        throw FormatFileIO.error(path, "read failed")
                    }
                    if n == 0 {
                        throw FormatError(path: path, problem: .truncated(expected: offset + count, actual: offset + done))
                    }
                    done += n
                    initialized = done
                }
            }
        }
    }

    /// Writes `chunks` to a temporary file next to `path`, then renames it over
    /// `path`, so readers never see a half-written file.
    static func writeAtomically(path: String, chunks: [[UInt8]]) throws {
        let temporary = "\(path).tmp-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw error(path, "cannot create temporary file '\(temporary)'") }
        var failure: FormatError?
        outer: for chunk in chunks {
            let ok = chunk.withUnsafeBytes { raw -> Bool in
                var done = 0
                while done < raw.count {
                    let n = write(fd, raw.baseAddress! + done, raw.count - done)
                    if n < 0 {
                        if errno == EINTR { continue }
                        return false
                    }
                    done += n
                }
                return true
            }
            if !ok { failure = error(path, "write failed"); break outer }
        }
        if close(fd) != 0, failure == nil { failure = error(path, "close failed") }
        if failure == nil, rename(temporary, path) != 0 { failure = error(path, "cannot rename temporary file into place") }
        if let failure {
            unlink(temporary)
            throw failure
        }
    }

    static func error(_ path: String, _ action: String) -> FormatError {
        let code = errno
        return FormatError(path: path, problem: .io("\(action): \(String(cString: strerror(code)))"))
    }
}
