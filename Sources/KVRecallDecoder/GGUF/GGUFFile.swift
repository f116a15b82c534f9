// A GGUF (v2/v3) reader over a read-only memory map. Every count, length and offset is checked against the
// file's size before it is used, so a damaged or hostile file gives a GGUFError, never a crash or a huge allocation.

import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One tensor's entry in a GGUF file's tensor table.
public struct GGUFTensorInfo: Sendable, Equatable {
    public let name: String
    /// ggml order: dimensions[0] is the contiguous (innermost) axis; a matrix [rows, cols] is [cols, rows].
    public let dimensions: [Int]
    public let type: GGMLType
    /// Byte offset of the tensor's data, relative to the data section.
    public let offset: Int

    public init(name: String, dimensions: [Int], type: GGMLType, offset: Int) {
        self.name = name
        self.dimensions = dimensions
        self.type = type
        self.offset = offset
    }

    public var elementCount: Int { dimensions.reduce(1, *) }
    public var byteCount: Int { elementCount / type.blockSize * type.bytesPerBlock }
    /// Product of dimensions[1...] (1 for a vector).
    public var rows: Int { dimensions.dropFirst().reduce(1, *) }
    /// dimensions[0].
    public var rowLength: Int { dimensions[0] }
    /// Bytes of one row.
    public var rowByteCount: Int { rowLength / type.blockSize * type.bytesPerBlock }
}

/// A GGUF file, memory-mapped read-only. Tensor bytes are views into the map, valid until `close()`.
/// Reads may run concurrently; `close()` must not race with them.
public final class GGUFFile: @unchecked Sendable {
    public let path: String
    public let version: UInt32
    /// `general.alignment`, or 32.
    public let alignment: Int
    /// Metadata keys in file order.
    public let metadataKeys: [String]
    public let metadata: [String: GGUFValue]
    /// Tensors in file order.
    public let tensors: [GGUFTensorInfo]
    /// Size of the file in bytes.
    public let fileSize: Int
    /// Absolute file offset of the data section (tensor offsets are relative to it).
    public let dataOffset: Int

    private var map: UnsafeMutableRawPointer?
    private let tensorIndex: [String: Int]

    /// Maps and validates the file; throws a GGUFError naming the file and the problem.
    public init(path: String) throws {
        self.path = path
        let (map, size) = try GGUFFile.mapFile(path)
        do {
            var reader = GGUFParser(base: UnsafeRawPointer(map), size: size, path: path)
            let parsed = try reader.parse()
            version = parsed.version
            alignment = parsed.alignment
            metadataKeys = parsed.keys
            metadata = parsed.metadata
            tensors = parsed.tensors
            dataOffset = parsed.dataOffset
            tensorIndex = parsed.index
        } catch {
            munmap(map, size)
            throw error
        }
        fileSize = size
        self.map = map
    }

    deinit { close() }

    /// Unmaps the file. Buffers from `bytes(of:)` are invalid afterwards. Idempotent.
    public func close() {
        if let map {
            munmap(map, fileSize)
            self.map = nil
        }
    }

    public var isClosed: Bool { map == nil }

    public func tensor(_ name: String) -> GGUFTensorInfo? {
        tensorIndex[name].map { tensors[$0] }
    }

    public func requireTensor(_ name: String) throws -> GGUFTensorInfo {
        guard let t = tensor(name) else { throw GGUFError(path: path, message: "no tensor '\(name)'") }
        return t
    }

    /// The metadata value for `key`, or a GGUFError "no metadata key 'x'".
    public func requireMetadata(_ key: String) throws -> GGUFValue {
        guard let v = metadata[key] else { throw GGUFError(path: path, message: "no metadata key '\(key)'") }
        return v
    }

    /// The tensor's raw bytes, zero-copy from the map; valid until `close()`.
    /// Precondition: the file is open and the tensor lies inside its data section (true for this file's tensors).
    public func bytes(of tensor: GGUFTensorInfo) -> UnsafeRawBufferPointer {
        do {
            return UnsafeRawBufferPointer(start: try checkedData(tensor, needDequantize: false), count: tensor.byteCount)
        } catch {
            preconditionFailure("\(error)")
        }
    }

    /// All elements as f32, in ggml order (row r = elements r*rowLength ..< (r+1)*rowLength).
    public func dequantize(_ tensor: GGUFTensorInfo) throws -> [Float] {
        let src = try checkedData(tensor, needDequantize: true)
        let count = tensor.elementCount
        let type = tensor.type
        return [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            let dst = SendablePointers(src: src, dst: buffer.baseAddress!)
            let blocks = count / type.blockSize
            let chunks = count < 1 << 18 ? 1 : min(blocks, ProcessInfo.processInfo.activeProcessorCount * 4)
            if chunks <= 1 {
                ggmlDequantizeUnchecked(type, from: src, count: count, into: dst.dst)
            } else {
                let perChunk = (blocks + chunks - 1) / chunks
                DispatchQueue.concurrentPerform(iterations: chunks) { c in
                    let first = c * perChunk
                    let last = min(blocks, first + perChunk)
                    guard first < last else { return }
                    ggmlDequantizeUnchecked(type, from: dst.src + first * type.bytesPerBlock,
                                            count: (last - first) * type.blockSize,
                                            into: dst.dst + first * type.blockSize)
                }
            }
            initialized = count
        }
    }

    /// Dequantizes rows `rows` (of `tensor.rows`) into `into`: rows.count * rowLength floats.
    public func dequantizeRows(_ tensor: GGUFTensorInfo, rows: Range<Int>, into: UnsafeMutablePointer<Float>) throws {
        let src = try checkedData(tensor, needDequantize: true)
        guard rows.lowerBound >= 0, rows.upperBound <= tensor.rows else {
            throw GGUFError(path: path,
                            message: "rows \(rows) out of range for tensor '\(tensor.name)' with \(tensor.rows) rows")
        }
        ggmlDequantizeUnchecked(tensor.type, from: src + rows.lowerBound * tensor.rowByteCount,
                                count: rows.count * tensor.rowLength, into: into)
    }

    /// Start of the tensor's data after checking the file is open, the tensor lies in the data section and,
    /// optionally, its type can be dequantized.
    private func checkedData(_ tensor: GGUFTensorInfo, needDequantize: Bool) throws -> UnsafeRawPointer {
        guard let map else { throw GGUFError(path: path, message: "file is closed") }
        let dims = tensor.dimensions
        guard (1...4).contains(dims.count), dims.allSatisfy({ $0 > 0 }), dims[0] % tensor.type.blockSize == 0,
              tensor.offset >= 0, let bytes = GGUFParser.byteCount(dims: dims, type: tensor.type),
              tensor.offset <= fileSize - dataOffset, bytes <= fileSize - dataOffset - tensor.offset
        else {
            throw GGUFError(path: path, message: "tensor '\(tensor.name)' does not lie inside this file's data section")
        }
        if needDequantize && !tensor.type.canDequantize {
            throw GGUFError(path: path,
                            message: "cannot dequantize tensor '\(tensor.name)' of type \(tensor.type.name)")
        }
        return UnsafeRawPointer(map) + dataOffset + tensor.offset
    }

    private static func mapFile(_ path: String) throws -> (UnsafeMutableRawPointer, Int) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            throw GGUFError(path: path, message: "cannot open: \(String(cString: strerror(errno)))")
        }
        defer { _ = Glibc_close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            throw GGUFError(path: path, message: "cannot stat: \(String(cString: strerror(errno)))")
        }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw GGUFError(path: path, message: "not a regular file")
        }
        let size = Int(st.st_size)
        guard size > 0 else { throw GGUFError(path: path, message: "empty file") }
        guard let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0),
              p != UnsafeMutableRawPointer(bitPattern: -1) else {
            throw GGUFError(path: path, message: "cannot map: \(String(cString: strerror(errno)))")
        }
        return (p, size)
    }
}

/// `close(2)`, named apart from GGUFFile.close().
@inline(__always)
private func Glibc_close(_ fd: Int32) -> Int32 {
    #if canImport(Glibc)
    return Glibc.close(fd)
    #else
    return Darwin.close(fd)
    #endif
}

private struct SendablePointers: @unchecked Sendable {
    let src: UnsafeRawPointer
    let dst: UnsafeMutablePointer<Float>
}

// MARK: - Parser

struct GGUFParser {
    let base: UnsafeRawPointer
    let size: Int
    let path: String
    var pos = 0

    struct Result {
        var version: UInt32
        var alignment: Int
        var keys: [String]
        var metadata: [String: GGUFValue]
        var tensors: [GGUFTensorInfo]
        var index: [String: Int]
        var dataOffset: Int
    }

    /// Deepest nesting of arrays accepted (real files use 1; the limit bounds the recursion).
    static let maxArrayDepth = 8
    /// Smallest encoding of a value of each GGUF type id, to bound counts before allocating.
    static let minValueSize: [Int] = [1, 1, 2, 2, 4, 4, 4, 1, 8, 12, 8, 8, 8]

    init(base: UnsafeRawPointer, size: Int, path: String) {
        self.base = base
        self.size = size
        self.path = path
    }

    /// Bytes of a tensor with these dimensions and type, nil on overflow.
    static func byteCount(dims: [Int], type: GGMLType) -> Int? {
        var count = 1
        for d in dims {
            let (p, o) = count.multipliedReportingOverflow(by: d)
            if o { return nil }
            count = p
        }
        let (bytes, o) = (count / type.blockSize).multipliedReportingOverflow(by: type.bytesPerBlock)
        return o ? nil : bytes
    }

    func error(_ message: String) -> GGUFError { GGUFError(path: path, message: message) }

    var remaining: Int { size - pos }

    mutating func need(_ n: Int, _ what: @autoclosure () -> String) throws {
        if n > remaining {
            throw error("truncated: the file ends (at byte \(size)) inside \(what()) at byte \(pos)")
        }
    }

    mutating func read<T: FixedWidthInteger>(_: T.Type, _ what: @autoclosure () -> String) throws -> T {
        try need(MemoryLayout<T>.size, what())
        let v = T(littleEndian: base.loadUnaligned(fromByteOffset: pos, as: T.self))
        pos += MemoryLayout<T>.size
        return v
    }

    mutating func readString(_ what: @autoclosure () -> String) throws -> String {
        let length = try read(UInt64.self, "the length of \(what())")
        guard length <= UInt64(remaining) else {
            throw error("\(what()): string length \(length) at byte \(pos - 8) runs past the end of the file (\(size) bytes)")
        }
        let n = Int(length)
        let bytes = UnsafeBufferPointer(start: (base + pos).assumingMemoryBound(to: UInt8.self), count: n)
        guard let s = String(validating: bytes, as: UTF8.self) else {
            throw error("\(what()): invalid UTF-8 at byte \(pos)")
        }
        pos += n
        return s
    }

    mutating func parse() throws -> Result {
        try need(4, "the magic")
        let magic = base.loadUnaligned(fromByteOffset: 0, as: UInt32.self)
        guard UInt32(littleEndian: magic) == 0x4655_4747 else {     // "GGUF"
            let shown = (0..<4).map { base.load(fromByteOffset: $0, as: UInt8.self) }
                .map { (32..<127).contains($0) ? String(UnicodeScalar($0)) : "\\x" + String($0, radix: 16) }.joined()
            throw error("not a GGUF file (bad magic \"\(shown)\", expected \"GGUF\")")
        }
        pos = 4
        let version = try read(UInt32.self, "the version")
        guard version == 2 || version == 3 else {
            if version == 1 { throw error("GGUF version 1 is not supported (only versions 2 and 3)") }
            throw error("unknown GGUF version \(version) (only versions 2 and 3 are supported)")
        }
        let tensorCount = try read(UInt64.self, "the tensor count")
        let kvCount = try read(UInt64.self, "the metadata count")
        // Every tensor info takes at least 32 bytes and every key-value pair 13: bound the counts by the file.
        guard tensorCount <= UInt64(remaining / 32) else {
            throw error("tensor count \(tensorCount) is impossible in a file of \(size) bytes")
        }
        guard kvCount <= UInt64(remaining / 13), Int(tensorCount) * 32 + Int(kvCount) * 13 <= remaining else {
            throw error("metadata count \(kvCount) is impossible in a file of \(size) bytes")
        }

        var keys: [String] = []
        var metadata: [String: GGUFValue] = [:]
        keys.reserveCapacity(Int(kvCount))
        for i in 0..<Int(kvCount) {
            let key = try readString("metadata key \(i)")
            guard metadata[key] == nil else { throw error("duplicate metadata key '\(key)'") }
            let type = try read(UInt32.self, "the value type of '\(key)'")
            metadata[key] = try readValue(type: type, key: key, depth: 0)
            keys.append(key)
        }

        var alignment = 32
        if let a = metadata["general.alignment"] {
            guard let v = a.intValue else { throw error("general.alignment is not an integer: \(a)") }
            guard v > 0, v & (v - 1) == 0 else { throw error("general.alignment \(v) is not a power of two") }
            alignment = v
        }

        var tensors: [GGUFTensorInfo] = []
        var index: [String: Int] = [:]
        tensors.reserveCapacity(Int(tensorCount))
        for i in 0..<Int(tensorCount) {
            let name = try readString("the name of tensor \(i)")
            guard index[name] == nil else { throw error("duplicate tensor name '\(name)'") }
            let nDims = try read(UInt32.self, "the dimension count of tensor '\(name)'")
            guard (1...4).contains(nDims) else {
                throw error("tensor '\(name)': \(nDims) dimensions (must be 1 to 4)")
            }
            var dims: [Int] = []
            for k in 0..<Int(nDims) {
                let d = try read(UInt64.self, "dimension \(k) of tensor '\(name)'")
                guard d != 0 else { throw error("tensor '\(name)': dimension \(k) is zero") }
                guard d <= UInt64(Int64.max) else {
                    throw error("tensor '\(name)': dimension \(k) is negative (\(Int64(bitPattern: d)))")
                }
                dims.append(Int(d))
            }
            let rawType = try read(UInt32.self, "the type of tensor '\(name)'")
            guard let type = GGMLType(rawValue: rawType) else {
                throw error("tensor '\(name)': unknown tensor type \(rawType)")
            }
            let offset = try read(UInt64.self, "the offset of tensor '\(name)'")
            guard let bytes = GGUFParser.byteCount(dims: dims, type: type) else {
                throw error("tensor '\(name)': size of \(dims) overflows")
            }
            guard dims[0] % type.blockSize == 0 else {
                throw error("tensor '\(name)': row length \(dims[0]) is not a multiple of the \(type.name) block size \(type.blockSize)")
            }
            guard offset % UInt64(alignment) == 0 else {
                throw error("tensor '\(name)': offset \(offset) is not a multiple of the alignment \(alignment)")
            }
            guard offset <= UInt64(size), UInt64(bytes) <= UInt64(size) - offset else {
                throw error("tensor '\(name)': data (offset \(offset), \(bytes) bytes) runs past the end of the file (\(size) bytes)")
            }
            index[name] = tensors.count
            tensors.append(GGUFTensorInfo(name: name, dimensions: dims, type: type, offset: Int(offset)))
        }

        // The data section starts at the next multiple of the alignment.
        let (padded, overflow) = pos.addingReportingOverflow(alignment - 1)
        let dataOffset = overflow ? Int.max : padded / alignment * alignment
        if !tensors.isEmpty {
            let dataSize = dataOffset <= size ? size - dataOffset : -1
            guard dataSize >= 0 else {
                throw error("truncated: the file ends (at byte \(size)) before the data section at byte \(dataOffset)")
            }
            for t in tensors where t.byteCount > dataSize - t.offset {
                throw error("truncated: tensor '\(t.name)' (bytes \(t.offset)..<\(t.offset + t.byteCount) of the data section) runs past the end of the file (the data section holds \(dataSize) bytes)")
            }
            let byOffset = tensors.sorted { $0.offset < $1.offset }
            for (a, b) in zip(byOffset, byOffset.dropFirst()) where b.offset < a.offset + a.byteCount {
                throw error("tensors '\(a.name)' and '\(b.name)' overlap (bytes \(a.offset)..<\(a.offset + a.byteCount) and \(b.offset)..<\(b.offset + b.byteCount) of the data section)")
            }
        }
        return Result(version: version, alignment: alignment, keys: keys, metadata: metadata,
                      tensors: tensors, index: index, dataOffset: dataOffset)
    }

    mutating func readValue(type: UInt32, key: String, depth: Int) throws -> GGUFValue {
        func what() -> String { "the value of '\(key)'" }
        switch type {
        case 0: return .uint8(try read(UInt8.self, what()))
        case 1: return .int8(try read(Int8.self, what()))
        case 2: return .uint16(try read(UInt16.self, what()))
        case 3: return .int16(try read(Int16.self, what()))
        case 4: return .uint32(try read(UInt32.self, what()))
        case 5: return .int32(try read(Int32.self, what()))
        case 6: return .float32(Float(bitPattern: try read(UInt32.self, what())))
        case 7:
            let b = try read(UInt8.self, what())
            guard b <= 1 else { throw error("metadata '\(key)': invalid bool value \(b)") }
            return .bool(b == 1)
        case 8: return .string(try readString(what()))
        case 9:
            guard depth < GGUFParser.maxArrayDepth else {
                throw error("metadata '\(key)': arrays nested deeper than \(GGUFParser.maxArrayDepth)")
            }
            let elementType = try read(UInt32.self, "the array element type of '\(key)'")
            guard elementType <= 12 else {
                throw error("metadata '\(key)': unknown array element type \(elementType)")
            }
            let count = try read(UInt64.self, "the array length of '\(key)'")
            guard count <= UInt64(remaining / GGUFParser.minValueSize[Int(elementType)]) else {
                throw error("metadata '\(key)': array length \(count) runs past the end of the file (\(size) bytes)")
            }
            var elements: [GGUFValue] = []
            elements.reserveCapacity(Int(count))
            for _ in 0..<Int(count) {
                elements.append(try readValue(type: elementType, key: key, depth: depth + 1))
            }
            return .array(elements)
        case 10: return .uint64(try read(UInt64.self, what()))
        case 11: return .int64(try read(Int64.self, what()))
        case 12: return .float64(Double(bitPattern: try read(UInt64.self, what())))
        default: throw error("metadata '\(key)': unknown value type \(type)")
        }
    }
}
