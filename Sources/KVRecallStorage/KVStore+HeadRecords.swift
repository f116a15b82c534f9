import Foundation

// Head records are JSON with sorted keys, readable by every version of the store. An append reads
// its head's record and writes it back with new counts: two JSON passes per head and token that cost
// more than the append's own writes at one token a decode step, and allocate all the way. The cache
// below keeps the records this store last read or wrote with their decoded values (a record read
// back byte for byte is not decoded again), and per head the encoding of everything but the counts,
// into which a new record's counts are spliced: the bytes JSONEncoder writes, without its cost.

/// Decoded head records by their bytes, and per head the record's encoding around its counts.
final class HeadRecordCache: @unchecked Sendable {
    /// A record's JSON cut around its two counts: `pieces[0] count pieces[1] queryCount pieces[2]`,
    /// for the head's fields other than the counts as in `fixed` (counts 0).
    private struct Template {
        var fixed: HeadInfo
        var pieces: [[UInt8]]?
    }

    /// A record's bytes as a dictionary key, hashed once in one pass over its memory and compared by
    /// that hash first (an `[UInt8]` key fed the hasher a byte at a time and compared a probe's
    /// records byte by byte, and a head's records differ only at their counts: with an append's
    /// lookups per head, that was a third of the append's CPU time in a profile of a decode session).
    private struct RecordBytes: Hashable {
        let bytes: [UInt8]
        let hash: Int
        init(_ bytes: [UInt8]) {
            self.bytes = bytes
            var hasher = Hasher()
            bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
            hash = hasher.finalize()
        }
        func hash(into hasher: inout Hasher) { hasher.combine(hash) }
        static func == (a: RecordBytes, b: RecordBytes) -> Bool {
            a.hash == b.hash && a.bytes.count == b.bytes.count
                && (a.bytes.isEmpty || a.bytes.withUnsafeBytes { x in b.bytes.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 } })
        }
    }

    private let lock = NSLock()
    private var decoded: [RecordBytes: HeadInfo] = [:]
    private var templates: [HeadID: Template] = [:]
    /// Records remembered at most (a store of many heads re-decodes beyond it, nothing else).
    private let capacity = 4096

    /// The head record `raw` decoded (from the cache when these bytes were read or written before).
    func decode(_ raw: UnsafeRawBufferPointer, path: String) throws -> HeadInfo {
        let key = RecordBytes([UInt8](raw))
        if let info = lock.withLock({ decoded[key] }) { return info }
        let info = try KVStore.decodeInfo(raw, path: path)
        remember(key, info)
        return info
    }

    /// `info`'s record: spliced into the head's template when its other fields are unchanged.
    func encode(_ info: HeadInfo) throws -> [UInt8] {
        var fixed = info
        fixed.count = 0
        fixed.queryCount = 0
        let template = lock.withLock { templates[info.id] }
        let pieces: [[UInt8]]?
        if let template, template.fixed == fixed {
            pieces = template.pieces
        } else {
            pieces = try Self.cut(fixed)
            lock.withLock { templates[info.id] = Template(fixed: fixed, pieces: pieces) }
        }
        let bytes: [UInt8]
        if let pieces {
            bytes = pieces[0] + Array(String(info.count).utf8) + pieces[1] + Array(String(info.queryCount).utf8) + pieces[2]
        } else {
            bytes = try Self.json(info)
        }
        remember(RecordBytes(bytes), info)
        return bytes
    }

    /// JSONEncoder's record of `info` (sorted keys).
    static func json(_ info: HeadInfo) throws -> [UInt8] {
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        return Array(try encoder.encode(info))
    }

    /// The record of `fixed` (counts 0) cut around its counts, checked: a splice of two other counts
    /// must equal JSONEncoder's record for them, or the head is always encoded in full (nil).
    private static func cut(_ fixed: HeadInfo) throws -> [[UInt8]]? {
        let whole = try json(fixed)
        // Top-level keys are unique, other keys and every string are quoted or escaped differently
        // ("count" in metadata is followed by a string), and the check below catches the rest.
        guard let count = whole.firstRange(of: Array("\"count\":0".utf8)),
              let queries = whole.firstRange(of: Array("\"queryCount\":0".utf8)), count.upperBound < queries.lowerBound else { return nil }
        let pieces = [Array(whole[..<(count.upperBound - 1)]), Array(whole[count.upperBound..<(queries.upperBound - 1)]),
                      Array(whole[queries.upperBound...])]
        var probe = fixed
        probe.count = 1_234_567
        probe.queryCount = 89
        let spliced = pieces[0] + Array("1234567".utf8) + pieces[1] + Array("89".utf8) + pieces[2]
        return try spliced == json(probe) ? pieces : nil
    }

    private func remember(_ key: RecordBytes, _ info: HeadInfo) {
        lock.withLock {
            if decoded.count >= capacity { decoded.removeAll(keepingCapacity: true) }
            decoded[key] = info
        }
    }
}
