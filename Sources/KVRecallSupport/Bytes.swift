/// Little-endian binary encoding of index sections: scalars and whole arrays, copied in bulk.
/// `write(alignedArray:)` pads so the elements start at a multiple of `ByteWriter.alignment`
/// from the section's start: a section whose first byte is that aligned (LMDB's overflow pages
/// are) is read back as views of the stored bytes, without a copy.
public struct ByteWriter {
    /// Alignment of aligned arrays relative to the section start (enough for any element).
    public static let alignment = 16
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

    /// Writes the element count, zero padding up to the next aligned offset, then the elements.
    public mutating func write<T: BitwiseCopyable>(alignedArray elements: some Collection<T>) {
        write(UInt64(elements.count))
        bytes.append(contentsOf: repeatElement(0, count: ByteWriter.padding(at: bytes.count)))
        let bulk: Void? = elements.withContiguousStorageIfAvailable { bytes.append(contentsOf: UnsafeRawBufferPointer($0)) }
        if bulk == nil {
            for element in elements { withUnsafeBytes(of: element) { bytes.append(contentsOf: $0) } }
        }
    }

    static func padding(at offset: Int) -> Int { (alignment - offset % alignment) % alignment }
}

/// What a view into a store's memory map depends on: the environment, the map's placement and
/// the last commit (see `ReadTransaction.mapIdentity`).
public struct MapIdentity: Hashable, Sendable, CustomStringConvertible {
    let environment: Int
    let mapEpoch: Int
    public let generation: Int
    package init(environment: Int, mapEpoch: Int, generation: Int) {
        (self.environment, self.mapEpoch, self.generation) = (environment, mapEpoch, generation)
    }
    public var description: String { "store \(environment), map \(mapEpoch), generation \(generation)" }

    /// Same environment and map placement (pointers into the map stay valid), any commit;
    /// never for views read inside a write transaction (negative generation: dirty pages).
    package func sameMap(as other: MapIdentity) -> Bool {
        environment == other.environment && mapEpoch == other.mapEpoch && generation >= 0 && other.generation >= 0
    }
}

/// One stored section's bytes: memory kept alive by `owner`, or (owner nil) by a read
/// transaction of identity `snapshot` on the store's map.
public struct SectionBytes: @unchecked Sendable {
    public let bytes: UnsafeRawBufferPointer
    public let owner: AnyObject?
    /// The snapshot whose map these bytes are a view of (nil when `owner` keeps them).
    public let snapshot: MapIdentity?

    /// A view of bytes someone else keeps alive.
    public init(view bytes: UnsafeRawBufferPointer, owner: AnyObject?, snapshot: MapIdentity? = nil) {
        self.bytes = bytes
        self.owner = owner
        self.snapshot = owner == nil ? snapshot : nil
    }

    /// A copy of `bytes`, in a buffer aligned like an LMDB overflow page (so its arrays are views too).
    public init(copying bytes: some Collection<UInt8>) {
        let buffer = AlignedBytes(count: bytes.count)
        UnsafeMutableRawBufferPointer(start: buffer.pointer, count: bytes.count).copyBytes(from: bytes)
        self.init(view: UnsafeRawBufferPointer(start: buffer.pointer, count: bytes.count), owner: buffer)
    }

    public var count: Int { bytes.count }
    /// The bytes as an array (a copy).
    public var array: [UInt8] { withExtendedLifetime(owner) { Array(bytes) } }
}

/// The named sections of one stored index.
public typealias IndexSections = [String: SectionBytes]

/// Heap bytes aligned to `ByteWriter.alignment`, freed with the object.
final class AlignedBytes {
    let pointer: UnsafeMutableRawPointer
    init(count: Int) {
        pointer = .allocate(byteCount: max(count, 1), alignment: ByteWriter.alignment)
    }
    deinit { pointer.deallocate() }
}

/// Reads what `ByteWriter` wrote, throwing `CorruptBytes` on any short or inconsistent read (the
/// index catalog reports it as a corrupt section).
public struct ByteReader {
    let section: SectionBytes
    public private(set) var offset = 0
    let context: String

    public init(_ section: SectionBytes, context: String) {
        self.section = section
        self.context = context
    }

    /// Reads a copy of `bytes`.
    public init(_ bytes: [UInt8], context: String) {
        self.init(SectionBytes(copying: bytes), context: context)
    }

    var count: Int { section.bytes.count }
    public var isAtEnd: Bool { offset == count }

    mutating func take(_ n: Int) throws -> Range<Int> {
        guard n >= 0, n <= count - offset else {
            throw CorruptBytes("\(context): needs \(n) bytes at offset \(offset), \(count - offset) left")
        }
        defer { offset += n }
        return offset..<(offset + n)
    }

    public mutating func read<T: FixedWidthInteger>(_: T.Type = T.self) throws -> T {
        let r = try take(MemoryLayout<T>.size)
        var value = T.zero
        withUnsafeMutableBytes(of: &value) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: section.bytes[r])) }
        return T(littleEndian: value)
    }

    public mutating func readFloat() throws -> Float { Float(bitPattern: try read(UInt32.self)) }
    public mutating func readDouble() throws -> Double { Double(bitPattern: try read(UInt64.self)) }

    /// The count of an array of `T`, checked to fit in what is left.
    mutating func readCount<T>(of _: T.Type, maxCount: Int) throws -> Int {
        let n = try read(UInt64.self)
        guard n <= UInt64(min(maxCount, (count - offset) / MemoryLayout<T>.stride)) else {
            throw CorruptBytes("\(context): array of \(n) elements does not fit")
        }
        return Int(n)
    }

    public mutating func readArray<T: FixedWidthInteger>(_: T.Type = T.self, maxCount: Int = Int.max) throws -> [T] {
        let n = try readCount(of: T.self, maxCount: maxCount)
        let r = try take(n * MemoryLayout<T>.size)
        return [T](unsafeUninitializedCapacity: n) { buf, initialized in
            UnsafeMutableRawBufferPointer(buf).copyMemory(from: UnsafeRawBufferPointer(rebasing: section.bytes[r]))
            initialized = n
        }
    }

    public mutating func readFloatArray(maxCount: Int = Int.max) throws -> [Float] {
        try readArray(UInt32.self, maxCount: maxCount).map(Float.init(bitPattern:))
    }

    /// Reads what `write(alignedArray:)` wrote: a view of the section's bytes when their address is a
    /// multiple of `alignment` (at least `T`'s; more for elements reinterpreted as wider ones, as f16
    /// codes read as UInt16), else a copy. The padding must be zeros.
    public mutating func readAlignedArray<T: BitwiseCopyable>(_: T.Type = T.self, maxCount: Int = Int.max,
                                                              alignment: Int = MemoryLayout<T>.alignment) throws -> SectionArray<T> {
        let n64 = try read(UInt64.self)
        let pad = try take(ByteWriter.padding(at: offset))
        guard section.bytes[pad].allSatisfy({ $0 == 0 }) else { throw CorruptBytes("\(context): padding holds data at offset \(pad.lowerBound)") }
        guard n64 <= UInt64(min(maxCount, (count - offset) / MemoryLayout<T>.stride)) else {
            throw CorruptBytes("\(context): array of \(n64) elements does not fit")
        }
        let n = Int(n64)
        let r = try take(n * MemoryLayout<T>.stride)
        guard n > 0 else { return SectionArray() }
        let start = section.bytes.baseAddress! + r.lowerBound
        if Int(bitPattern: start) % max(alignment, MemoryLayout<T>.alignment) == 0 {
            return SectionArray(view: UnsafeBufferPointer(start: start.assumingMemoryBound(to: T.self), count: n), owner: section.owner)
        }
        return SectionArray([T](unsafeUninitializedCapacity: n) { buf, initialized in
            UnsafeMutableRawBufferPointer(buf).copyMemory(from: UnsafeRawBufferPointer(rebasing: section.bytes[r]))
            initialized = n
        })
    }
}

/// Bytes that do not hold what their reader expects: too short, or a count that does not fit.
public struct CorruptBytes: Error, CustomStringConvertible, Equatable, Sendable {
    public var message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension Dictionary where Key == String, Value == SectionBytes {
    /// The snapshot the sections are views of, if any (an index restored from them may only
    /// search keys of a snapshot with that identity).
    public var mapSnapshot: MapIdentity? { values.lazy.compactMap(\.snapshot).first }

    /// Copies of the sections as byte arrays (what `BuildableIndex.sections()` returns).
    public var arrays: [String: [UInt8]] { mapValues(\.array) }
}
