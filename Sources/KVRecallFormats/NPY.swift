import Foundation

/// Reader and writer for NumPy `.npy` files holding one KV-cache tensor.
///
/// Accepted: format versions 1.0, 2.0 and 3.0; dtypes `<f4` and `<f2` (also
/// spelled `=`/`|`/unprefixed, which mean little-endian on every supported
/// host); C order; shape `[N, d]` or `[heads, N, d]` with no zero axis; a
/// payload of exactly shape × item size bytes. Everything else is reported as a
/// `FormatError` naming the file; object arrays are never unpickled.
public enum NPY {
    /// Largest header accepted, in bytes. numpy itself writes < 1 KiB for any
    /// array this tool handles; a bigger value means corruption.
    public static let maxHeaderLength = 65_536
    /// More axes than this is reported as an absurd header before anything else.
    public static let maxRank = 8

    private static let magic: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59] // \x93NUMPY

    /// Reads `path`. The header is read and validated first; the payload is
    /// then read straight into the tensor's storage (one copy, and only after
    /// its size matched the file size). The tensor is named after the file
    /// (`keys.npy` -> `keys`).
    public static func read(path: String) throws -> Tensor {
        let reader = try FormatFileIO.Reader(path: path)
        let prefix = try reader.read(offset: 0, count: min(reader.size, 12 + maxHeaderLength))
        let header = try prefix.withUnsafeBytes { try parseHeader($0, fileSize: reader.size, path: path) }
        let payload = try reader.read(offset: header.dataOffset, count: header.payloadLength)
        return Tensor(name: tensorName(path), shape: header.shape, dtype: header.dtype, data: payload)
    }

    /// Parses a complete `.npy` image; `path` is used in errors and to name the tensor.
    public static func parse(_ bytes: [UInt8], path: String) throws -> Tensor {
        try bytes.withUnsafeBytes { try parse(raw: $0, path: path) }
    }

    /// Parses a complete `.npy` image held in `Data` (e.g. memory-mapped).
    public static func parse(_ data: Data, path: String) throws -> Tensor {
        try data.withUnsafeBytes { try parse(raw: $0, path: path) }
    }

    /// Encodes as format 1.0 exactly as `np.save` does: the header dict with
    /// sorted keys, numpy's spare spaces, padded so the data starts at a
    /// multiple of 64 bytes, ending in `\n`. Throws `.unsupportedDType` for
    /// bf16, which has no `.npy` dtype.
    public static func encode(_ tensor: Tensor) throws -> [UInt8] {
        var bytes = try headerBytes(for: tensor, path: "<memory>")
        bytes.reserveCapacity(bytes.count + tensor.data.count)
        bytes.append(contentsOf: tensor.data)
        return bytes
    }

    /// Writes `encode(tensor)` to `path` atomically (temporary file + rename),
    /// without building the whole image in memory.
    public static func write(_ tensor: Tensor, to path: String) throws {
        let header = try headerBytes(for: tensor, path: path)
        try FormatFileIO.writeAtomically(path: path, chunks: [header, tensor.data])
    }

    // MARK: - Reading

    struct Header {
        var dtype: TensorDType
        var shape: [Int]
        var dataOffset: Int
        var payloadLength: Int
    }

    private static func parse(raw: UnsafeRawBufferPointer, path: String) throws -> Tensor {
        let header = try parseHeader(raw, fileSize: raw.count, path: path)
        let payload = [UInt8](UnsafeRawBufferPointer(rebasing: raw[header.dataOffset ..< header.dataOffset + header.payloadLength]))
        return Tensor(name: tensorName(path), shape: header.shape, dtype: header.dtype, data: payload)
    }

    /// Validates everything but the payload bytes. `raw` is the start of the
    /// file (at least `min(fileSize, 12 + maxHeaderLength)` bytes).
    static func parseHeader(_ raw: UnsafeRawBufferPointer, fileSize: Int, path: String) throws -> Header {
        func fail(_ problem: FormatError.Problem) -> FormatError { FormatError(path: path, problem: problem) }

        if fileSize == 0 { throw fail(.emptyFile) }
        let magicCount = min(magic.count, raw.count)
        guard raw.prefix(magicCount).elementsEqual(magic.prefix(magicCount)) else { throw fail(.notNPY) }
        guard fileSize >= 8 else { throw fail(.truncated(expected: 10, actual: fileSize)) }

        let major = Int(raw[6]), minor = Int(raw[7])
        guard minor == 0, (1...3).contains(major) else { throw fail(.unsupportedVersion(major: major, minor: minor)) }
        let lengthFieldSize = major == 1 ? 2 : 4
        let prelude = 8 + lengthFieldSize
        guard fileSize >= prelude else { throw fail(.truncated(expected: prelude, actual: fileSize)) }

        var headerLength = 0
        for i in 0..<lengthFieldSize { headerLength |= Int(raw[8 + i]) << (8 * i) }
        guard headerLength <= maxHeaderLength else {
            throw fail(.headerTooLarge(length: UInt64(headerLength), limit: maxHeaderLength))
        }
        let dataOffset = prelude + headerLength
        guard fileSize >= dataOffset else { throw fail(.truncated(expected: dataOffset, actual: fileSize)) }

        let text = Array(raw[prelude ..< dataOffset])
        let (dtype, shape) = try interpretHeader(text, utf8: major == 3, path: path)

        // shapeProblem guarantees the product fits.
        let payloadLength = shape.reduce(dtype.byteWidth, *)
        let available = fileSize - dataOffset
        if available < payloadLength {
            throw fail(.truncated(expected: dataOffset + payloadLength, actual: fileSize))
        }
        if available > payloadLength {
            throw fail(.shapeMismatch(expected: payloadLength, actual: available))
        }
        return Header(dtype: dtype, shape: shape, dataOffset: dataOffset, payloadLength: payloadLength)
    }

    /// Checks the header dict: exactly the keys `descr`, `fortran_order` and
    /// `shape` (any order). The dtype is judged first so that, say, a pickled
    /// 1-D array is reported as pickled rather than as a bad shape.
    private static func interpretHeader(_ text: [UInt8], utf8: Bool, path: String) throws -> (TensorDType, [Int]) {
        func fail(_ problem: FormatError.Problem) -> FormatError { FormatError(path: path, problem: problem) }

        var parser = PyLiteralParser(bytes: text, utf8: utf8)
        let root: PyLiteral
        do {
            root = try parser.parseDocument()
        } catch let error as PyLiteralParser.SyntaxError {
            throw fail(.malformedHeader(error.message))
        }
        guard case .dict(let items) = root else {
            throw fail(.malformedHeader("expected a dict literal, found \(root.kindName)"))
        }
        var fields: [String: PyLiteral] = [:]
        for (key, value) in items {
            guard case .string(let name) = key else {
                throw fail(.malformedHeader("dict key \(key.repr) is not a string"))
            }
            guard ["descr", "fortran_order", "shape"].contains(name) else {
                throw fail(.malformedHeader("unexpected key '\(name)'"))
            }
            guard fields.updateValue(value, forKey: name) == nil else {
                throw fail(.malformedHeader("duplicate key '\(name)'"))
            }
        }
        for name in ["descr", "fortran_order", "shape"] where fields[name] == nil {
            throw fail(.malformedHeader("missing key '\(name)'"))
        }

        let dtype: TensorDType
        switch fields["descr"]! {
        case .string(let descr):
            dtype = try npyDType(descr, path: path)
        case .list(let items):
            // A structured (record) dtype: a list of (name, type) tuples.
            throw fail(.unsupportedDType(abbreviate(PyLiteral.list(items).repr)))
        case let other:
            throw fail(.malformedHeader("'descr' must be a string, found \(other.kindName)"))
        }

        switch fields["fortran_order"]! {
        case .bool(false): break
        case .bool(true): throw fail(.fortranOrder)
        case let other: throw fail(.malformedHeader("'fortran_order' must be True or False, found \(other.repr)"))
        }

        guard case .tuple(let axes) = fields["shape"]! else {
            throw fail(.malformedHeader("'shape' must be a tuple, found \(fields["shape"]!.repr)"))
        }
        if axes.count > maxRank {
            throw fail(.badShape("\(axes.count) dimensions is absurd (at most \(maxRank) accepted, 2 or 3 used)"))
        }
        var shape: [Int] = []
        for (axis, value) in axes.enumerated() {
            switch value {
            case .int(let d): shape.append(d)
            case .bigInt(let digits):
                throw fail(.badShape("dimension \(digits) on axis \(axis) is absurdly large"))
            default:
                throw fail(.malformedHeader("shape entry \(value.repr) on axis \(axis) is not an integer"))
            }
        }
        if let problem = Tensor.shapeProblem(shape, dtype: dtype) {
            throw fail(.badShape(problem))
        }
        return (dtype, shape)
    }

    /// Maps an array-protocol type string to a supported dtype.
    private static func npyDType(_ descr: String, path: String) throws -> TensorDType {
        var body = Substring(descr)
        var order: Character? = nil
        if let first = body.first, "<>=|".contains(first) {
            order = first
            body = body.dropFirst()
        }
        if body == "O" || body == "O4" || body == "O8" {
            throw FormatError(path: path, problem: .pickledObject(descr: descr))
        }
        let dtype: TensorDType
        switch body {
        case "f4": dtype = .f32
        case "f2": dtype = .f16
        default: throw FormatError(path: path, problem: .unsupportedDType(descr))
        }
        if order == ">" {
            throw FormatError(path: path, problem: .bigEndian(descr: descr))
        }
        #if _endian(big)
        // '=', '|' and unprefixed would mean big-endian here.
        if order != "<" { throw FormatError(path: path, problem: .bigEndian(descr: descr)) }
        #endif
        return dtype
    }

    private static func abbreviate(_ text: String) -> String {
        text.count <= 80 ? text : String(text.prefix(77)) + "..."
    }

    /// `dir/keys.npy` -> `keys`.
    static func tensorName(_ path: String) -> String {
        let file = path.split(separator: "/", omittingEmptySubsequences: false).last.map(String.init) ?? path
        if file.hasSuffix(".npy"), file.count > 4 { return String(file.dropLast(4)) }
        return file
    }

    // MARK: - Writing

    /// Magic, version 1.0, length and padded header, exactly like numpy's
    /// `_write_array_header` (including its 21-digit growth allowance).
    private static func headerBytes(for tensor: Tensor, path: String) throws -> [UInt8] {
        let descr: String
        switch tensor.dtype {
        case .f32: descr = "<f4"
        case .f16: descr = "<f2"
        case .bf16:
            throw FormatError(path: path, tensor: tensor.name, problem: .unsupportedDType("bf16 (.npy has no bfloat16 dtype; convert to f32 or use safetensors)"))
        }
        let dims = tensor.shape.map(String.init)
        let shapeRepr = "(" + dims.joined(separator: ", ") + (dims.count == 1 ? "," : "") + ")"
        var dict = "{'descr': '\(descr)', 'fortran_order': False, 'shape': \(shapeRepr), }"
        if let first = dims.first { dict += String(repeating: " ", count: max(0, 21 - first.count)) }
        let lengthWithNewline = dict.utf8.count + 1
        let padding = 64 - ((magic.count + 2 + 2 + lengthWithNewline) % 64)
        let headerLength = lengthWithNewline + padding
        guard headerLength <= Int(UInt16.max) else {
            throw FormatError(path: path, tensor: tensor.name, problem: .headerTooLarge(length: UInt64(headerLength), limit: Int(UInt16.max)))
        }
        var bytes = magic
        bytes += [1, 0, UInt8(headerLength & 0xFF), UInt8(headerLength >> 8)]
        bytes += Array(dict.utf8)
        bytes += [UInt8](repeating: 0x20, count: padding)
        bytes.append(0x0A)
        return bytes
    }
}

// MARK: - Python literal subset

extension NPY {
    /// The values that can appear in an `.npy` header (a Python dict literal).
    indirect enum PyLiteral {
        case string(String)
        case int(Int)
        /// An integer literal that does not fit in `Int`, kept as written.
        case bigInt(String)
        case bool(Bool)
        case none
        case tuple([PyLiteral])
        case list([PyLiteral])
        case dict([(PyLiteral, PyLiteral)])

        var kindName: String {
            switch self {
            case .string: return "a string"
            case .int, .bigInt: return "an integer"
            case .bool: return "a boolean"
            case .none: return "None"
            case .tuple: return "a tuple"
            case .list: return "a list"
            case .dict: return "a dict"
            }
        }

        /// Python-style rendering for messages.
        var repr: String {
            switch self {
            case .string(let s): return "'\(s)'"
            case .int(let i): return String(i)
            case .bigInt(let digits): return digits
            case .bool(let b): return b ? "True" : "False"
            case .none: return "None"
            case .tuple(let items):
                return "(" + items.map(\.repr).joined(separator: ", ") + (items.count == 1 ? ",)" : ")")
            case .list(let items): return "[" + items.map(\.repr).joined(separator: ", ") + "]"
            case .dict(let items): return "{" + items.map { "\($0.0.repr): \($0.1.repr)" }.joined(separator: ", ") + "}"
            }
        }
    }

    /// Parses the literal subset numpy writes (and `ast.literal_eval` would
    /// accept for it): quoted strings, integers (optional Python 2 `L`), True,
    /// False, None, tuples, lists and dicts, with trailing commas. Nesting is
    /// capped, so hostile input cannot exhaust the stack.
    struct PyLiteralParser {
        struct SyntaxError: Error { let message: String }

        private let bytes: [UInt8]
        private let utf8: Bool
        private var position = 0
        private static let maxDepth = 32

        init(bytes: [UInt8], utf8: Bool) {
            self.bytes = bytes
            self.utf8 = utf8
        }

        /// One value followed only by whitespace (numpy pads with spaces and `\n`).
        mutating func parseDocument() throws -> PyLiteral {
            let value = try parseValue(depth: 0)
            skipWhitespace()
            if position < bytes.count {
                throw error("unexpected \(describeByte(bytes[position])) after the header dict")
            }
            return value
        }

        private func error(_ message: String) -> SyntaxError {
            SyntaxError(message: "\(message) at header offset \(position)")
        }

        private func describeByte(_ b: UInt8) -> String {
            (0x21...0x7E).contains(b) ? "character '\(Character(Unicode.Scalar(b)))'" : "byte 0x\(String(b, radix: 16))"
        }

        private mutating func skipWhitespace() {
            while position < bytes.count, [0x20, 0x09, 0x0A, 0x0D, 0x0C, 0x0B].contains(bytes[position]) {
                position += 1
            }
        }

        private mutating func parseValue(depth: Int) throws -> PyLiteral {
            guard depth < Self.maxDepth else { throw error("nesting deeper than \(Self.maxDepth) levels") }
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of header") }
            let b = bytes[position]
            switch b {
            case UInt8(ascii: "'"), UInt8(ascii: "\""):
                return .string(try parseString())
            case UInt8(ascii: "("):
                position += 1
                let (items, sawComma) = try parseItems(until: UInt8(ascii: ")"), depth: depth)
                // `(3)` is just a parenthesised 3 in Python, not a tuple.
                return items.count == 1 && !sawComma ? items[0] : .tuple(items)
            case UInt8(ascii: "["):
                position += 1
                return .list(try parseItems(until: UInt8(ascii: "]"), depth: depth).items)
            case UInt8(ascii: "{"):
                position += 1
                return try parseDict(depth: depth)
            case UInt8(ascii: "-"), UInt8(ascii: "+"), UInt8(ascii: "0")...UInt8(ascii: "9"):
                return try parseInteger()
            case UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "_"):
                let start = position
                while position < bytes.count, isIdentifierByte(bytes[position]) { position += 1 }
                let word = String(decoding: bytes[start..<position], as: UTF8.self)
                switch word {
                case "True": return .bool(true)
                case "False": return .bool(false)
                case "None": return .none
                default:
                    position = start
                    throw error("unexpected name '\(word)'")
                }
            default:
                throw error("unexpected \(describeByte(b))")
            }
        }

        private func isIdentifierByte(_ b: UInt8) -> Bool {
            (UInt8(ascii: "A")...UInt8(ascii: "Z")).contains(b) || (UInt8(ascii: "a")...UInt8(ascii: "z")).contains(b)
                || (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(b) || b == UInt8(ascii: "_")
        }

        /// Comma-separated values up to `close`; a trailing comma is allowed.
        private mutating func parseItems(until close: UInt8, depth: Int) throws -> (items: [PyLiteral], sawComma: Bool) {
            var items: [PyLiteral] = []
            var sawComma = false
            while true {
                skipWhitespace()
                guard position < bytes.count else { throw error("unterminated '\(Character(Unicode.Scalar(close)))' sequence") }
                if bytes[position] == close { position += 1; return (items, sawComma) }
                items.append(try parseValue(depth: depth + 1))
                skipWhitespace()
                guard position < bytes.count else { throw error("unterminated '\(Character(Unicode.Scalar(close)))' sequence") }
                if bytes[position] == UInt8(ascii: ",") {
                    position += 1
                    sawComma = true
                } else if bytes[position] != close {
                    throw error("expected ',' or '\(Character(Unicode.Scalar(close)))' but found \(describeByte(bytes[position]))")
                }
            }
        }

        private mutating func parseDict(depth: Int) throws -> PyLiteral {
            var items: [(PyLiteral, PyLiteral)] = []
            while true {
                skipWhitespace()
                guard position < bytes.count else { throw error("unterminated dict") }
                if bytes[position] == UInt8(ascii: "}") { position += 1; return .dict(items) }
                let key = try parseValue(depth: depth + 1)
                skipWhitespace()
                guard position < bytes.count, bytes[position] == UInt8(ascii: ":") else {
                    throw error("expected ':' after dict key \(key.repr)")
                }
                position += 1
                let value = try parseValue(depth: depth + 1)
                items.append((key, value))
                skipWhitespace()
                guard position < bytes.count else { throw error("unterminated dict") }
                if bytes[position] == UInt8(ascii: ",") {
                    position += 1
                } else if bytes[position] != UInt8(ascii: "}") {
                    throw error("expected ',' or '}' but found \(describeByte(bytes[position]))")
                }
            }
        }

        /// Quoted string without interpreting escapes (a backslash keeps the next
        /// byte verbatim); only the dtype string is used, and no valid one has escapes.
        private mutating func parseString() throws -> String {
            let quote = bytes[position]
            position += 1
            let start = position
            while position < bytes.count, bytes[position] != quote {
                if bytes[position] == 0x0A { throw error("newline inside a string") }
                if bytes[position] == UInt8(ascii: "\\") { position += 1 }
                position += 1
            }
            guard position < bytes.count else { throw error("unterminated string") }
            let content = bytes[start..<position]
            position += 1
            if utf8 { return String(decoding: content, as: UTF8.self) }
            return String(String.UnicodeScalarView(content.map { Unicode.Scalar($0) })) // latin-1
        }

        private mutating func parseInteger() throws -> PyLiteral {
            let start = position
            var negative = false
            if bytes[position] == UInt8(ascii: "-") || bytes[position] == UInt8(ascii: "+") {
                negative = bytes[position] == UInt8(ascii: "-")
                position += 1
                skipWhitespace()
            }
            let digitsStart = position
            var value = 0
            var overflow = false
            while position < bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[position]) {
                let digit = Int(bytes[position] - UInt8(ascii: "0"))
                let (times10, o1) = value.multipliedReportingOverflow(by: 10)
                let (next, o2) = negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
                overflow = overflow || o1 || o2
                value = next
                position += 1
            }
            guard position > digitsStart else { throw error("expected digits after sign") }
            let text = String(decoding: bytes[start..<position], as: UTF8.self)
            if position < bytes.count, bytes[position] == UInt8(ascii: "L") || bytes[position] == UInt8(ascii: "l") {
                position += 1 // Python 2 long suffix, written by old numpy
            }
            if position < bytes.count, isIdentifierByte(bytes[position]) || bytes[position] == UInt8(ascii: ".") {
                throw error("only plain integers are allowed, found '\(text)\(Character(Unicode.Scalar(bytes[position])))'")
            }
            return overflow ? .bigInt(text) : .int(value)
        }
    }
}
