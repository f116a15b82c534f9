/// Little-endian binary encoding of index sections: scalars and whole arrays, copied in bulk.
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []
    public init() {}

    public mutating func write<T: FixedWidthInteger>(_ value: T) {
        withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) }
    }

    public mutating func write(_ value: Float) { write(value.bitPattern) }
    public mutating func write(_ value: Double) { write(value.bitPattern) }

    /// Writes the element count then the elements (little-endian platforms only store as-is).
    public mutating func write<T: FixedWidthInteger>(array: [T]) {
        write(UInt64(array.count))
        array.withUnsafeBytes { bytes.append(contentsOf: $0) }
    }

    public mutating func write(array: [Float]) {
        write(UInt64(array.count))
        array.withUnsafeBytes { bytes.append(contentsOf: $0) }
    }
}

/// Reads what `ByteWriter` wrote, throwing `CorruptBytes` on any short or inconsistent read (the
/// index catalog reports it as a corrupt section).
public struct ByteReader {
    let bytes: [UInt8]
    public private(set) var offset = 0
    let context: String

    public init(_ bytes: [UInt8], context: String) {
        self.bytes = bytes
        self.context = context
    }

    public var isAtEnd: Bool { offset == bytes.count }

    mutating func take(_ n: Int) throws -> Range<Int> {
        guard n >= 0, n <= bytes.count - offset else {
            throw CorruptBytes("\(context): needs \(n) bytes at offset \(offset), \(bytes.count - offset) left")
        }
        defer { offset += n }
        return offset..<(offset + n)
    }

    public mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) throws -> T {
        let r = try take(MemoryLayout<T>.size)
        var value = T.zero
        withUnsafeMutableBytes(of: &value) { $0.copyBytes(from: bytes[r]) }
        return T(littleEndian: value)
    }

    public mutating func readFloat() throws -> Float { Float(bitPattern: try read(UInt32.self)) }
    public mutating func readDouble() throws -> Double { Double(bitPattern: try read(UInt64.self)) }

    public mutating func readArray<T: FixedWidthInteger>(_: T.Type = T.self, maxCount: Int = Int.max) throws -> [T] {
        let n = try read(UInt64.self)
        guard n <= UInt64(min(maxCount, (bytes.count - offset) / MemoryLayout<T>.size)) else {
            throw CorruptBytes("\(context): array of \(n) elements does not fit")
        }
        let r = try take(Int(n) * MemoryLayout<T>.size)
        return [T](unsafeUninitializedCapacity: Int(n)) { buf, count in
            UnsafeMutableRawBufferPointer(buf).copyBytes(from: bytes[r])
            count = Int(n)
        }
    }

    public mutating func readFloatArray(maxCount: Int = Int.max) throws -> [Float] {
        try readArray(UInt32.self, maxCount: maxCount).map(Float.init(bitPattern:))
    }
}

/// Bytes that do not hold what their reader expects: too short, or a count that does not fit.
public struct CorruptBytes: Error, CustomStringConvertible, Equatable, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}
