import Foundation

/// Reader and writer for the safetensors format: an 8-byte little-endian
/// header length `N`, `N` bytes of JSON
/// (`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}, ...}`),
/// then the data area that `data_offsets` index into.
///
/// Validation follows the reference implementation and is stricter where it
/// is silent: header at most 100 MB and inside the file; strict JSON (RFC
/// 8259) with no duplicate keys; each entry has exactly the three fields with
/// the right types; known dtype; non-negative integer shape; range length ==
/// shape product × item size; ranges inside the data area, not overlapping
/// and covering it completely. The JSON is parsed by a small built-in parser
/// rather than `JSONSerialization`, so integers are exact, booleans are never
/// mistaken for numbers and duplicate keys cannot silently hide a tensor.
public enum Safetensors {
    /// Largest header accepted (same limit as the reference implementation).
    public static let maxHeaderLength = 100_000_000

    /// Reads and validates the header of `path`; tensor data are read lazily by
    /// `SafetensorsFile.tensor(named:)`, so opening a multi-GB file costs only
    /// its header.
    public static func read(path: String) throws -> SafetensorsFile {
        let reader = try FormatFileIO.Reader(path: path)
        let headerLength = try checkPrelude(fileSize: reader.size, path: path) {
            try reader.read(offset: 0, count: 8)
        }
        let header = try reader.read(offset: 8, count: headerLength)
        let layout = try header.withUnsafeBytes {
            try parseHeader($0, dataLength: reader.size - 8 - headerLength, path: path)
        }
        return SafetensorsFile(path: path, layout: layout, dataStart: 8 + headerLength,
                               fileSize: reader.size, source: .file)
    }

    /// Parses a complete in-memory image. The tensors share `bytes`' storage
    /// until requested.
    public static func parse(_ bytes: [UInt8], path: String) throws -> SafetensorsFile {
        let headerLength = try checkPrelude(fileSize: bytes.count, path: path) { Array(bytes.prefix(8)) }
        let layout = try bytes.withUnsafeBytes {
            try parseHeader(UnsafeRawBufferPointer(rebasing: $0[8 ..< 8 + headerLength]),
                            dataLength: bytes.count - 8 - headerLength, path: path)
        }
        return SafetensorsFile(path: path, layout: layout, dataStart: 8 + headerLength,
                               fileSize: bytes.count, source: .memory(bytes))
    }

    /// Encodes `tensors` like the reference writer: compact JSON with
    /// `__metadata__` first (omitted when empty), then the tensors with names
    /// sorted; data ordered by descending alignment (F32, BF16, F16) then name;
    /// header padded with spaces to a multiple of 8 bytes. Throws for duplicate
    /// names or a tensor named `__metadata__`.
    public static func encode(tensors: [Tensor], metadata: [String: String] = [:]) throws -> [UInt8] {
        let (prefix, ordered) = try prepare(tensors: tensors, metadata: metadata, path: "<memory>")
        var bytes = prefix
        bytes.reserveCapacity(prefix.count + ordered.reduce(0) { $0 + $1.data.count })
        for tensor in ordered { bytes.append(contentsOf: tensor.data) }
        return bytes
    }

    /// Writes `encode(tensors:metadata:)` to `path` atomically, streaming each
    /// tensor's data rather than concatenating them.
    public static func write(tensors: [Tensor], metadata: [String: String] = [:], to path: String) throws {
        let (prefix, ordered) = try prepare(tensors: tensors, metadata: metadata, path: path)
        try FormatFileIO.writeAtomically(path: path, chunks: [prefix] + ordered.map(\.data))
    }

    // MARK: - Reading

    /// Parsed and validated header.
    struct Layout {
        var metadata: [String: String]
        var entries: [SafetensorsFile.Entry] // by offset
    }

    /// Bits per element of every dtype the reference implementation knows.
    /// Only F32, F16 and BF16 can be turned into a `Tensor`; the others are
    /// validated and listed.
    static let knownDTypeBits: [String: Int] = [
        "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
        "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
        "I32": 32, "U32": 32, "F32": 32,
        "I64": 64, "U64": 64, "F64": 64, "C64": 64,
        "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    ]

    /// Validates the file size and the 8-byte length field; returns `N`.
    private static func checkPrelude(fileSize: Int, path: String, readLength: () throws -> [UInt8]) throws -> Int {
        if fileSize == 0 { throw FormatError(path: path, problem: .emptyFile) }
        guard fileSize >= 8 else { throw FormatError(path: path, problem: .truncated(expected: 8, actual: fileSize)) }
        let lengthBytes = try readLength()
        var length: UInt64 = 0
        for (i, b) in lengthBytes.prefix(8).enumerated() { length |= UInt64(b) << (8 * UInt64(i)) }
        guard length <= UInt64(maxHeaderLength) else {
            throw FormatError(path: path, problem: .headerTooLarge(length: length, limit: maxHeaderLength))
        }
        let headerLength = Int(length)
        guard 8 + headerLength <= fileSize else {
            throw FormatError(path: path, problem: .truncated(expected: 8 + headerLength, actual: fileSize))
        }
        return headerLength
    }

    static func parseHeader(_ header: UnsafeRawBufferPointer, dataLength: Int, path: String) throws -> Layout {
        func fail(_ problem: FormatError.Problem, _ tensor: String? = nil) -> FormatError {
            FormatError(path: path, tensor: tensor, problem: problem)
        }
        let root: JSONValue
        do {
            var parser = JSONParser(bytes: header)
            root = try parser.parseDocument()
        } catch let error as JSONParser.SyntaxError {
            throw fail(.malformedHeader("invalid JSON: \(error.message)"))
        }
        guard case .object(let members) = root else {
            throw fail(.malformedHeader("expected a JSON object, found \(root.kindName)"))
        }

        var metadata: [String: String] = [:]
        var entries: [SafetensorsFile.Entry] = []
        entries.reserveCapacity(members.count)
        for (name, value) in members {
            if name == "__metadata__" {
                metadata = try parseMetadata(value, path: path)
            } else {
                entries.append(try parseEntry(name: name, value: value, dataLength: dataLength, path: path))
            }
        }

        // Ranges must tile the data area exactly, like the reference requires.
        entries.sort { ($0.dataOffsets.lowerBound, $0.dataOffsets.upperBound, $0.name) < ($1.dataOffsets.lowerBound, $1.dataOffsets.upperBound, $1.name) }
        var cursor = 0
        var last: String? = nil
        for entry in entries {
            let range = entry.dataOffsets
            if range.lowerBound < cursor, let last {
                throw fail(.overlappingTensors(last, entry.name))
            }
            if range.lowerBound > cursor {
                throw fail(.unreferencedBytes(begin: cursor, end: range.lowerBound))
            }
            if range.upperBound > cursor || last == nil {
                cursor = range.upperBound
                last = entry.name
            }
        }
        if cursor != dataLength {
            throw fail(.unreferencedBytes(begin: cursor, end: dataLength))
        }
        return Layout(metadata: metadata, entries: entries)
    }

    private static func parseMetadata(_ value: JSONValue, path: String) throws -> [String: String] {
        switch value {
        case .null:
            return [:]
        case .object(let members):
            var result: [String: String] = [:]
            for (key, item) in members {
                guard case .string(let text) = item else {
                    throw FormatError(path: path, problem: .malformedHeader("__metadata__ values must be strings; '\(key)' is \(item.kindName)"))
                }
                result[key] = text
            }
            return result
        default:
            throw FormatError(path: path, problem: .malformedHeader("__metadata__ must be an object of strings, found \(value.kindName)"))
        }
    }

    private static func parseEntry(name: String, value: JSONValue, dataLength: Int, path: String) throws -> SafetensorsFile.Entry {
        func fail(_ problem: FormatError.Problem) -> FormatError {
            FormatError(path: path, tensor: name, problem: problem)
        }
        guard case .object(let fields) = value else {
            throw fail(.malformedHeader("entry must be an object with dtype, shape and data_offsets, found \(value.kindName)"))
        }
        var dtype: String?
        var shapeValue: [JSONValue]?
        var offsetsValue: [JSONValue]?
        for (key, field) in fields {
            switch key {
            case "dtype":
                guard case .string(let s) = field else { throw fail(.malformedHeader("'dtype' must be a string, found \(field.kindName)")) }
                dtype = s
            case "shape":
                guard case .array(let a) = field else { throw fail(.malformedHeader("'shape' must be an array, found \(field.kindName)")) }
                shapeValue = a
            case "data_offsets":
                guard case .array(let a) = field else { throw fail(.malformedHeader("'data_offsets' must be an array, found \(field.kindName)")) }
                offsetsValue = a
            default:
                throw fail(.malformedHeader("unexpected field '\(key)'"))
            }
        }
        guard let dtype else { throw fail(.malformedHeader("missing field 'dtype'")) }
        guard let shapeValue else { throw fail(.malformedHeader("missing field 'shape'")) }
        guard let offsetsValue else { throw fail(.malformedHeader("missing field 'data_offsets'")) }

        guard let bits = knownDTypeBits[dtype] else { throw fail(.unsupportedDType(dtype)) }

        var shape: [Int] = []
        shape.reserveCapacity(shapeValue.count)
        for (axis, item) in shapeValue.enumerated() {
            switch item {
            case .integer(let d) where d >= 0: shape.append(d)
            case .integer(let d): throw fail(.badShape("negative dimension \(d) on axis \(axis)"))
            case .number(let text) where JSONValue.isIntegerLiteral(text):
                throw fail(.badShape("dimension \(text) on axis \(axis) is out of range"))
            default:
                throw fail(.malformedHeader("shape[\(axis)] must be a non-negative integer, found \(item.kindName)"))
            }
        }

        guard offsetsValue.count == 2 else {
            throw fail(.malformedHeader("'data_offsets' must hold exactly 2 integers, found \(offsetsValue.count) values"))
        }
        var offsets: [Int] = []
        for (i, item) in offsetsValue.enumerated() {
            guard case .integer(let offset) = item else {
                let what = if case .number(let text) = item { "'\(text)'" } else { item.kindName }
                throw fail(.malformedHeader("data_offsets[\(i)] must be an integer byte offset, found \(what)"))
            }
            offsets.append(offset)
        }
        let (begin, end) = (offsets[0], offsets[1])
        guard 0 <= begin, begin <= end, end <= dataLength else {
            throw fail(.offsetsOutOfBounds(begin: begin, end: end, dataLength: dataLength))
        }

        var totalBits = bits
        for d in shape {
            let (product, overflow) = totalBits.multipliedReportingOverflow(by: d)
            if overflow { throw fail(.badShape("shape \(Tensor.describe(shape)) of \(dtype) overflows the addressable byte count")) }
            totalBits = product
        }
        guard totalBits % 8 == 0 else {
            throw fail(.badShape("shape \(Tensor.describe(shape)) of \(dtype) does not fill a whole number of bytes"))
        }
        let expected = totalBits / 8
        guard end - begin == expected else {
            throw fail(.shapeMismatch(expected: expected, actual: end - begin))
        }
        return SafetensorsFile.Entry(name: name, dtype: dtype, shape: shape, dataOffsets: begin ..< end)
    }

    // MARK: - Writing

    /// Builds length + header and returns the tensors in data order.
    private static func prepare(tensors: [Tensor], metadata: [String: String], path: String) throws -> ([UInt8], [Tensor]) {
        var seen = Set<String>()
        for tensor in tensors {
            if tensor.name == "__metadata__" {
                throw FormatError(path: path, tensor: tensor.name, problem: .malformedHeader("the name '__metadata__' is reserved"))
            }
            guard seen.insert(tensor.name).inserted else {
                throw FormatError(path: path, problem: .duplicateTensor(tensor.name))
            }
        }
        func rank(_ dtype: TensorDType) -> Int {
            switch dtype { case .f32: return 0; case .bf16: return 1; case .f16: return 2 }
        }
        let ordered = tensors.sorted { (rank($0.dtype), $0.name) < (rank($1.dtype), $1.name) }
        var offsets: [String: (Int, Int)] = [:]
        var cursor = 0
        for tensor in ordered {
            offsets[tensor.name] = (cursor, cursor + tensor.data.count)
            cursor += tensor.data.count
        }

        var json = "{"
        var first = true
        if !metadata.isEmpty {
            json += "\"__metadata__\":{"
            json += metadata.sorted { $0.key < $1.key }
                .map { "\(jsonString($0.key)):\(jsonString($0.value))" }
                .joined(separator: ",")
            json += "}"
            first = false
        }
        for tensor in tensors.sorted(by: { $0.name < $1.name }) {
            let (begin, end) = offsets[tensor.name]!
            if !first { json += "," }
            first = false
            json += "\(jsonString(tensor.name)):{\"dtype\":\"\(safetensorsName(tensor.dtype))\","
            json += "\"shape\":[\(tensor.shape.map(String.init).joined(separator: ","))],"
            json += "\"data_offsets\":[\(begin),\(end)]}"
        }
        json += "}"
        var header = Array(json.utf8)
        header += [UInt8](repeating: 0x20, count: (8 - header.count % 8) % 8)

        var prefix = [UInt8]()
        prefix.reserveCapacity(8 + header.count)
        withUnsafeBytes(of: UInt64(header.count).littleEndian) { prefix.append(contentsOf: $0) }
        prefix += header
        return (prefix, ordered)
    }

    static func safetensorsName(_ dtype: TensorDType) -> String {
        switch dtype {
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        }
    }

    /// JSON string literal escaping exactly what RFC 8259 requires.
    static func jsonString(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            case let c where c.value < 0x20:
                let hex = String(c.value, radix: 16)
                out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

// MARK: - Parsed file

/// A validated safetensors header plus the means to fetch tensor bytes.
public struct SafetensorsFile: Sendable {
    /// One header entry, as declared (dtype kept verbatim, e.g. `"F64"`).
    public struct Entry: Sendable, Equatable {
        public let name: String
        public let dtype: String
        public let shape: [Int]
        /// Byte range within the data area (after the header).
        public let dataOffsets: Range<Int>

        /// The `TensorDType` for F32/F16/BF16, nil for other dtypes.
        public var tensorDType: TensorDType? {
            switch dtype {
            case "F32": return .f32
            case "F16": return .f16
            case "BF16": return .bf16
            default: return nil
            }
        }
    }

    enum Source: Sendable {
        case file
        case memory([UInt8])
    }

    public let path: String
    /// `__metadata__` (empty when absent or null).
    public let metadata: [String: String]
    /// Every entry, in data (offset) order.
    public let entries: [Entry]

    private let index: [String: Int]
    private let dataStart: Int
    private let fileSize: Int
    private let source: Source

    init(path: String, layout: Safetensors.Layout, dataStart: Int, fileSize: Int, source: Source) {
        self.path = path
        self.metadata = layout.metadata
        self.entries = layout.entries
        self.dataStart = dataStart
        self.fileSize = fileSize
        self.source = source
        var index: [String: Int] = [:]
        for (i, entry) in layout.entries.enumerated() { index[entry.name] = i }
        self.index = index
    }

    /// Tensor names, sorted.
    public func names() -> [String] {
        entries.map(\.name).sorted()
    }

    /// The header entry for `name`, if present.
    public func entry(named name: String) -> Entry? {
        index[name].map { entries[$0] }
    }

    /// Loads one tensor (reading only its byte range from disk). Throws
    /// `.tensorNotFound` listing the available names, `.unsupportedDType` for
    /// dtypes other than F32/F16/BF16, `.badShape` unless it is a non-empty 2-D
    /// or 3-D array, and `.truncated`/`.io` if the file changed since `read`.
    public func tensor(named name: String) throws -> Tensor {
        guard let entry = entry(named: name) else {
            throw FormatError(path: path, problem: .tensorNotFound(name: name, available: names()))
        }
        guard let dtype = entry.tensorDType else {
            throw FormatError(path: path, tensor: name, problem: .unsupportedDType(entry.dtype))
        }
        if let problem = Tensor.shapeProblem(entry.shape, dtype: dtype) {
            throw FormatError(path: path, tensor: name, problem: .badShape(problem))
        }
        let begin = dataStart + entry.dataOffsets.lowerBound
        let data: [UInt8]
        switch source {
        case .memory(let bytes):
            data = Array(bytes[begin ..< dataStart + entry.dataOffsets.upperBound])
        case .file:
            let reader = try FormatFileIO.Reader(path: path)
            guard reader.size == fileSize else {
                throw FormatError(path: path, problem: .io("file changed size since its header was read (\(fileSize) -> \(reader.size) bytes)"))
            }
            data = try reader.read(offset: begin, count: entry.dataOffsets.count)
        }
        return Tensor(name: name, shape: entry.shape, dtype: dtype, data: data)
    }
}

// MARK: - Strict JSON

extension Safetensors {
    /// JSON values; objects keep member order, numbers keep integers exact.
    indirect enum JSONValue {
        case object([(String, JSONValue)])
        case array([JSONValue])
        case string(String)
        /// A number written without fraction or exponent that fits in `Int`.
        case integer(Int)
        /// Any other number, as written.
        case number(String)
        case bool(Bool)
        case null

        var kindName: String {
            switch self {
            case .object: return "an object"
            case .array: return "an array"
            case .string: return "a string"
            case .integer: return "an integer"
            case .number(let text): return Self.isIntegerLiteral(text) ? "an out-of-range integer" : "a non-integer number"
            case .bool: return "a boolean"
            case .null: return "null"
            }
        }

        static func isIntegerLiteral(_ text: String) -> Bool {
            !text.contains(where: { $0 == "." || $0 == "e" || $0 == "E" })
        }
    }

    /// RFC 8259 parser over raw bytes: rejects invalid UTF-8, lone surrogates,
    /// control characters in strings, duplicate object keys, trailing garbage
    /// (only whitespace padding may follow) and nesting deeper than 64.
    struct JSONParser {
        struct SyntaxError: Error { let message: String }

        private let bytes: UnsafeRawBufferPointer
        private var position = 0
        private static let maxDepth = 64

        init(bytes: UnsafeRawBufferPointer) { self.bytes = bytes }

        mutating func parseDocument() throws -> JSONValue {
            let value = try parseValue(depth: 0)
            skipWhitespace()
            if position < bytes.count { throw error("unexpected \(describe(bytes[position])) after the top-level value") }
            return value
        }

        private func error(_ message: String) -> SyntaxError {
            SyntaxError(message: "\(message) at byte \(position)")
        }

        private func describe(_ b: UInt8) -> String {
            (0x21...0x7E).contains(b) ? "'\(Character(Unicode.Scalar(b)))'" : "byte 0x\(String(b, radix: 16))"
        }

        private mutating func skipWhitespace() {
            while position < bytes.count {
                switch bytes[position] {
                case 0x20, 0x09, 0x0A, 0x0D: position += 1
                default: return
                }
            }
        }

        private mutating func parseValue(depth: Int) throws -> JSONValue {
            guard depth < Self.maxDepth else { throw error("nesting deeper than \(Self.maxDepth) levels") }
            skipWhitespace()
            guard position < bytes.count else { throw error("unexpected end of input") }
            switch bytes[position] {
            case UInt8(ascii: "{"): return try parseObject(depth: depth)
            case UInt8(ascii: "["): return try parseArray(depth: depth)
            case UInt8(ascii: "\""): return .string(try parseString())
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
            case UInt8(ascii: "t"): try expectWord("true"); return .bool(true)
            case UInt8(ascii: "f"): try expectWord("false"); return .bool(false)
            case UInt8(ascii: "n"): try expectWord("null"); return .null
            case let b: throw error("unexpected \(describe(b))")
            }
        }

        private mutating func expectWord(_ word: StaticString) throws {
            let count = word.utf8CodeUnitCount
            let matches = position + count <= bytes.count && word.withUTF8Buffer { expected in
                (0..<count).allSatisfy { bytes[position + $0] == expected[$0] }
            }
            guard matches else { throw error("invalid literal") }
            position += count
        }

        private mutating func parseObject(depth: Int) throws -> JSONValue {
            position += 1
            var members: [(String, JSONValue)] = []
            var keys = Set<String>()
            skipWhitespace()
            if position < bytes.count, bytes[position] == UInt8(ascii: "}") { position += 1; return .object(members) }
            while true {
                skipWhitespace()
                guard position < bytes.count, bytes[position] == UInt8(ascii: "\"") else { throw error("expected a string key") }
                let keyStart = position
                let key = try parseString()
                guard keys.insert(key).inserted else {
                    position = keyStart
                    throw error("duplicate key \(Safetensors.jsonString(key))")
                }
                skipWhitespace()
                guard position < bytes.count, bytes[position] == UInt8(ascii: ":") else { throw error("expected ':'") }
                position += 1
                members.append((key, try parseValue(depth: depth + 1)))
                skipWhitespace()
                guard position < bytes.count else { throw error("unterminated object") }
                if bytes[position] == UInt8(ascii: ",") { position += 1; continue }
                if bytes[position] == UInt8(ascii: "}") { position += 1; return .object(members) }
                throw error("expected ',' or '}' but found \(describe(bytes[position]))")
            }
        }

        private mutating func parseArray(depth: Int) throws -> JSONValue {
            position += 1
            var items: [JSONValue] = []
            skipWhitespace()
            if position < bytes.count, bytes[position] == UInt8(ascii: "]") { position += 1; return .array(items) }
            while true {
                items.append(try parseValue(depth: depth + 1))
                skipWhitespace()
                guard position < bytes.count else { throw error("unterminated array") }
                if bytes[position] == UInt8(ascii: ",") { position += 1; continue }
                if bytes[position] == UInt8(ascii: "]") { position += 1; return .array(items) }
                throw error("expected ',' or ']' but found \(describe(bytes[position]))")
            }
        }

        private mutating func parseString() throws -> String {
            position += 1 // opening quote
            var buffer: [UInt8] = []
            var runStart = position
            while true {
                guard position < bytes.count else { throw error("unterminated string") }
                let b = bytes[position]
                if b == UInt8(ascii: "\"") { break }
                if b < 0x20 { throw error("unescaped control character in string") }
                if b != UInt8(ascii: "\\") { position += 1; continue }
                buffer.append(contentsOf: bytes[runStart..<position])
                position += 1
                guard position < bytes.count else { throw error("unterminated escape") }
                let escape = bytes[position]
                position += 1
                switch escape {
                case UInt8(ascii: "\""): buffer.append(0x22)
                case UInt8(ascii: "\\"): buffer.append(0x5C)
                case UInt8(ascii: "/"): buffer.append(0x2F)
                case UInt8(ascii: "b"): buffer.append(0x08)
                case UInt8(ascii: "f"): buffer.append(0x0C)
                case UInt8(ascii: "n"): buffer.append(0x0A)
                case UInt8(ascii: "r"): buffer.append(0x0D)
                case UInt8(ascii: "t"): buffer.append(0x09)
                case UInt8(ascii: "u"):
                    var scalar = try parseHex4()
                    if (0xD800...0xDBFF).contains(scalar) {
                        guard position + 1 < bytes.count, bytes[position] == UInt8(ascii: "\\"), bytes[position + 1] == UInt8(ascii: "u") else {
                            throw error("unpaired surrogate")
                        }
                        position += 2
                        let low = try parseHex4()
                        guard (0xDC00...0xDFFF).contains(low) else { throw error("unpaired surrogate") }
                        scalar = 0x10000 + ((scalar - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(scalar) {
                        throw error("unpaired surrogate")
                    }
                    buffer.append(contentsOf: Array(String(Character(Unicode.Scalar(scalar)!)).utf8))
                default:
                    position -= 1
                    throw error("invalid escape '\\\(Character(Unicode.Scalar(escape)))'")
                }
                runStart = position
            }
            let end = position
            position += 1 // closing quote
            let text: String?
            if buffer.isEmpty {
                text = String(bytes: bytes[runStart..<end], encoding: .utf8)
            } else {
                buffer.append(contentsOf: bytes[runStart..<end])
                text = String(bytes: buffer, encoding: .utf8)
            }
            guard let text else { position = runStart; throw error("invalid UTF-8 in string") }
            return text
        }

        private mutating func parseHex4() throws -> UInt32 {
            guard position + 4 <= bytes.count else { throw error("truncated \\u escape") }
            var value: UInt32 = 0
            for _ in 0..<4 {
                let b = bytes[position]
                let digit: UInt32
                switch b {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): digit = UInt32(b - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): digit = UInt32(b - UInt8(ascii: "a") + 10)
                case UInt8(ascii: "A")...UInt8(ascii: "F"): digit = UInt32(b - UInt8(ascii: "A") + 10)
                default: throw error("invalid \\u escape")
                }
                value = value << 4 | digit
                position += 1
            }
            return value
        }

        private mutating func parseNumber() throws -> JSONValue {
            let start = position
            func isDigit(_ i: Int) -> Bool { i < bytes.count && (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(bytes[i]) }
            if bytes[position] == UInt8(ascii: "-") { position += 1 }
            guard isDigit(position) else { throw error("invalid number") }
            if bytes[position] == UInt8(ascii: "0") {
                position += 1
                if isDigit(position) { throw error("leading zero in number") }
            } else {
                while isDigit(position) { position += 1 }
            }
            var integral = true
            if position < bytes.count, bytes[position] == UInt8(ascii: ".") {
                integral = false
                position += 1
                guard isDigit(position) else { throw error("invalid number") }
                while isDigit(position) { position += 1 }
            }
            if position < bytes.count, bytes[position] == UInt8(ascii: "e") || bytes[position] == UInt8(ascii: "E") {
                integral = false
                position += 1
                if position < bytes.count, bytes[position] == UInt8(ascii: "+") || bytes[position] == UInt8(ascii: "-") { position += 1 }
                guard isDigit(position) else { throw error("invalid number") }
                while isDigit(position) { position += 1 }
            }
            let text = String(decoding: bytes[start..<position], as: UTF8.self)
            if integral, let value = Int(text) { return .integer(value) }
            return .number(text)
        }
    }
}
