import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

/// Persistence of index data as named binary sections inside the store's `indexes` database.
/// An index is written in one transaction (so after a crash it is either whole or absent). Each
/// section is one LMDB value: a large one lives in overflow pages, whose data starts 16 bytes
/// after a page boundary, so `StoreSnapshot.index` hands out views of the map that an index
/// reads without copying (`ByteReader.readAlignedArray`).
extension KVStore {
    /// Stores written before sections were single values split them at this size; they are
    /// still read (as a copy).
    static let legacySectionChunkBytes = 8 << 20

    /// Head metadata key recording how many keys (positions `0..<n`) index `name` covers.
    static func coverageKey(_ name: String) -> String { "index.\(name).covers" }

    /// Replaces index `name` of head `id` by `sections` (name -> bytes), atomically. With
    /// `covering`, the index records that it holds positions `0..<covering` of the head's keys.
    public func saveIndex(_ id: HeadID, name: String, sections: [String: [UInt8]], covering: Int? = nil) throws {

        guard !name.isEmpty, !name.utf8.contains(0), sections.keys.allSatisfy({ !$0.isEmpty && !$0.utf8.contains(0) }) else {
            throw StoreError(.invalidArgument, "index and section names must be non-empty and hold no NUL", path: path, head: id)
        }
        try environment.write { txn in
            guard try txn.reader.get(headsDB, StoreKey.head(id)) != nil else {
                throw StoreError(.headNotFound, "no head \(id) in this store", path: path, head: id)
            }
            try txn.deletePrefix(indexesDB, StoreKey.indexPrefix(id, name))
            // The coverage goes in the head's record, in the same transaction as the index.
            var info = try info(txn.reader, id)
            info.metadata[KVStore.coverageKey(name)] = covering.map { "\($0)" }
            try putInfo(txn, info)
            for (section, bytes) in sections {
                try txn.put(indexesDB, StoreKey.indexChunk(id, name, section: section, chunk: 0), bytes)
            }
        }
    }

    /// A copy of the sections of index `name`, or nil when that index was never built for this head.
    public func loadIndex(_ id: HeadID, name: String) throws -> IndexSections? {
        try environment.read { txn in
            try loadIndex(txn, id, name: name)?.mapValues { SectionBytes(copying: $0.bytes) }
        }
    }

    /// The sections of index `name` inside `txn`: views of the map (a section a legacy store split
    /// in chunks is joined into a copy).
    func loadIndex(_ txn: ReadTransaction, _ id: HeadID, name: String) throws -> IndexSections? {
        let prefix = StoreKey.indexPrefix(id, name)
        var chunks: [String: [UnsafeRawBufferPointer]] = [:]
        try txn.scan(indexesDB, prefix: prefix) { key, value in
            let rest = key[prefix.count..<(key.count - 4)]
            guard rest.last == 0 else { return true }
            let section = String(decoding: rest.dropLast(), as: UTF8.self)
            chunks[section, default: []].append(value)
            return true
        }
        guard !chunks.isEmpty else { return nil }
        return chunks.mapValues { parts in
            parts.count == 1 ? SectionBytes(view: parts[0], owner: nil, snapshot: txn.mapIdentity) : SectionBytes(copying: parts.joined())
        }
    }

    /// Keys covered by each index of head `id` (nil for an index saved without a coverage record).
    public func indexCoverage(_ id: HeadID) throws -> [String: Int?] {
        try environment.read { txn in try indexCoverage(txn, id) }
    }

    func indexCoverage(_ txn: ReadTransaction, _ id: HeadID) throws -> [String: Int?] {
        let metadata = try info(txn, id).metadata
        var result: [String: Int?] = [:]
        var last: String? = nil
        try txn.scan(indexesDB, prefix: StoreKey.head(id)) { key, _ in
            let rest = key.dropFirst(8)
            guard let end = rest.firstIndex(of: 0) else { return true }
            let name = String(decoding: rest[rest.startIndex..<end], as: UTF8.self)
            if name != last {
                result[name] = .some(metadata[KVStore.coverageKey(name)].flatMap { Int($0) })
                last = name
            }
            return true
        }
        return result
    }

    /// Deletes index `name` of head `id`; returns whether it existed.
    @discardableResult
    public func dropIndex(_ id: HeadID, name: String) throws -> Bool {
        try environment.write { txn in
            if var info = try? info(txn.reader, id), info.metadata.removeValue(forKey: KVStore.coverageKey(name)) != nil {
                try putInfo(txn, info)
            }
            return try txn.deletePrefix(indexesDB, StoreKey.indexPrefix(id, name)) > 0
        }
    }

    /// Names of the indexes built for each head.
    public func indexNames() throws -> [HeadID: Set<String>] {
        try environment.read { txn in
            var result: [HeadID: Set<String>] = [:]
            try txn.scan(indexesDB, prefix: []) { key, _ in
                guard let id = StoreKey.decodeHead(key) else { return true }
                let rest = key.dropFirst(8)
                if let end = rest.firstIndex(of: 0) {
                    result[id, default: []].insert(String(decoding: rest[rest.startIndex..<end], as: UTF8.self))
                }
                return true
            }
            return result
        }
    }
}

extension StoreSnapshot {
    /// Sections of an index inside this snapshot: views of the map, valid while a read transaction
    /// of the same generation and map epoch (`ReadTransaction.mapIdentity`) is open.
    /// With `copy`, the sections are copies that own their bytes, valid after the snapshot.
    public func index(_ id: HeadID, name: String, copy: Bool = false) throws -> IndexSections? {
        let sections = try store.loadIndex(txn, id, name: name)
        return copy ? sections?.mapValues { SectionBytes(copying: $0.bytes) } : sections
    }
}
