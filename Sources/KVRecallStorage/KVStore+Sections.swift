import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

/// Persistence of index data as named binary sections inside the store's `indexes` database.
/// An index is written in one transaction (so after a crash it is either whole or absent) and
/// read back section by section.
extension KVStore {
    /// Sections larger than this are split over several LMDB values.
    static let sectionChunkBytes = 8 << 20

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
                var chunk: UInt32 = 0
                var offset = 0
                repeat {
                    let end = min(bytes.count, offset + KVStore.sectionChunkBytes)
                    try bytes.withUnsafeBytes { raw in
                        try txn.put(indexesDB, StoreKey.indexChunk(id, name, section: section, chunk: chunk),
                                    UnsafeRawBufferPointer(rebasing: raw[offset..<end]))
                    }
                    chunk += 1
                    offset = end
                } while offset < bytes.count
            }
        }
    }

    /// The sections of index `name`, or nil when that index was never built for this head.
    public func loadIndex(_ id: HeadID, name: String) throws -> [String: [UInt8]]? {
        try environment.read { txn in try loadIndex(txn, id, name: name) }
    }

    func loadIndex(_ txn: ReadTransaction, _ id: HeadID, name: String) throws -> [String: [UInt8]]? {
        let prefix = StoreKey.indexPrefix(id, name)
        var sections: [String: [UInt8]] = [:]
        try txn.scan(indexesDB, prefix: prefix) { key, value in
            let rest = key[prefix.count..<(key.count - 4)]
            guard rest.last == 0 else { return true }
            let section = String(decoding: rest.dropLast(), as: UTF8.self)
            sections[section, default: []].append(contentsOf: value)
            return true
        }
        return sections.isEmpty ? nil : sections
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
    /// Sections of an index, read inside this snapshot.
    public func index(_ id: HeadID, name: String) throws -> [String: [UInt8]]? {
        try store.loadIndex(txn, id, name: name)
    }
}
