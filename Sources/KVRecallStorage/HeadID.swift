import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
/// Addresses one attention head's cache: (context, layer, KV head).
public struct HeadID: Hashable, Comparable, Codable, Sendable, CustomStringConvertible {
    public var context: UInt32
    public var layer: UInt16
    public var head: UInt16

    public init(context: UInt32 = 0, layer: UInt16 = 0, head: UInt16 = 0) {
        self.context = context
        self.layer = layer
        self.head = head
    }

    /// Parses "C/L/H" (as printed by `description`).
    public init?(_ text: String) {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 3, let c = UInt32(parts[0]), let l = UInt16(parts[1]), let h = UInt16(parts[2]) else { return nil }
        self.init(context: c, layer: l, head: h)
    }

    public var description: String { "\(context)/\(layer)/\(head)" }

    public static func < (a: HeadID, b: HeadID) -> Bool {
        (a.context, a.layer, a.head) < (b.context, b.layer, b.head)
    }
}

/// How vectors are stored. Scores are always computed in f32.
public enum DType: String, Codable, CaseIterable, Sendable {
    case f32, f16, bf16

    public var byteWidth: Int { self == .f32 ? 4 : 2 }
}

/// The three vector streams a head keeps.
public enum VectorKind: UInt8, CaseIterable, Sendable, CustomStringConvertible {
    case keys = 0, values = 1
    /// Prefill queries, kept for query-aware indexes (RetrievalAttention).
    case queries = 2

    public var description: String {
        switch self {
        case .keys: return "keys"
        case .values: return "values"
        case .queries: return "queries"
        }
    }
}

/// A head's record: shape, storage type and counts. Keys and values always have `count` rows.
public struct HeadInfo: Codable, Equatable, Sendable {
    public var id: HeadID
    public var dimension: Int
    public var dtype: DType
    /// Vectors per LMDB value.
    public var blockSize: Int
    /// Number of key (and value) vectors.
    public var count: Int
    /// Number of stored prefill queries.
    public var queryCount: Int
    public var metadata: [String: String]
    /// The quantized tier's format, when the head keeps codes of its keys and values (nil: none;
    /// records written before the tier decode without it).
    public var codes: CodeFormat? = nil

    public func rows(_ kind: VectorKind) -> Int { kind == .queries ? queryCount : count }
    public var bytesPerVector: Int { dimension * dtype.byteWidth }
}

/// Big-endian fixed-width keys, so one head's blocks are contiguous and ordered in the B-tree.
enum StoreKey {
    static func head(_ id: HeadID) -> [UInt8] {
        var key = [UInt8]()
        key.reserveCapacity(8)
        appendBE(&key, id.context)
        appendBE(&key, id.layer)
        appendBE(&key, id.head)
        return key
    }

    static func decodeHead(_ bytes: UnsafeRawBufferPointer) -> HeadID? {
        guard bytes.count >= 8 else { return nil }
        let c = bytes.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        let l = bytes[4..<6].reduce(UInt16(0)) { $0 << 8 | UInt16($1) }
        let h = bytes[6..<8].reduce(UInt16(0)) { $0 << 8 | UInt16($1) }
        return HeadID(context: c, layer: l, head: h)
    }

    static func vectorPrefix(_ id: HeadID, _ kind: VectorKind) -> [UInt8] {
        head(id) + [kind.rawValue]
    }

    static func block(_ id: HeadID, _ kind: VectorKind, _ block: UInt32) -> [UInt8] {
        var key = vectorPrefix(id, kind)
        appendBE(&key, block)
        return key
    }

    static func decodeBlockNumber(_ key: UnsafeRawBufferPointer) -> UInt32 {
        key.suffix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }

    /// Index sections: head, index name, section name, chunk number.
    static func indexPrefix(_ id: HeadID, _ name: String) -> [UInt8] {
        head(id) + Array(name.utf8) + [0]
    }

    static func indexChunk(_ id: HeadID, _ name: String, section: String, chunk: UInt32) -> [UInt8] {
        var key = indexPrefix(id, name) + Array(section.utf8) + [0]
        appendBE(&key, chunk)
        return key
    }

    static func appendBE<T: FixedWidthInteger>(_ key: inout [UInt8], _ value: T) {
        withUnsafeBytes(of: value.bigEndian) { key.append(contentsOf: $0) }
    }
}
