import CKernels
import CLMDB
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

// The quantized tier in the store: a head whose record names a `CodeFormat` keeps one code row per
// complete group of positions in a stream of its own (kind byte 3, blocks numbered like the vector
// blocks: code block b codes positions b * blockSize ..< (b + 1) * blockSize). Appends code the
// groups they complete in their own transaction; truncation cuts the codes with the vectors.

extension StoreKey {
    /// The code stream's kind byte, after the vector kinds.
    static let codeKind: UInt8 = 3

    static func codePrefix(_ id: HeadID) -> [UInt8] { head(id) + [codeKind] }

    static func codeBlock(_ id: HeadID, _ block: UInt32) -> [UInt8] {
        var key = codePrefix(id)
        appendBE(&key, block)
        return key
    }
}

extension HeadInfo {
    /// Complete groups of positions, coded when the head has a code format.
    public var codedGroups: Int { codes.map { count / $0.group } ?? 0 }
}

extension KVStore {
    /// Codes every complete group of head `id` in `format` (replacing codes of another format) and
    /// keeps them current from then on: what a head stored before the quantized tier gets at its
    /// first build, or from `kvrecall codes`. One transaction: a crash leaves the old state.
    public func buildCodes(_ id: HeadID, format: CodeFormat) throws {
        try environment.write { txn in try recode(txn, id, format: format) }
    }

    @inline(never)
    private func recode(_ txn: WriteTransaction, _ id: HeadID, format: CodeFormat) throws {
        guard let raw = try txn.reader.get(headsDB, StoreKey.head(id)) else {
            throw StoreError(.headNotFound, "no head \(id) in this store", path: path, head: id)
        }
        var info = try decodeRecord(raw)
        if let problem = format.problem(dimension: info.dimension, blockSize: info.blockSize) {
            throw StoreError(.invalidArgument, problem, path: path, head: id)
        }
        _ = try txn.deletePrefix(vectorsDB, StoreKey.codePrefix(id))
        if format.inBlocks { try require(version: 2, txn) }
        info.codes = format.fitted(to: info.dtype)
        try writeCodes(txn, info, groups: 0..<(info.count / format.group))
        try putInfo(txn, info)
    }

    /// Codes the groups an append of `info.count - previous` positions completed (`info` as after it).
    func codeAppended(_ txn: WriteTransaction, _ info: HeadInfo, previous: Int) throws {
        guard let format = info.codes else { return }
        let first = previous / format.group, last = info.count / format.group
        if last > first { try writeCodes(txn, info, groups: first..<last) }
    }

    /// Cuts the code stream of `info` (before the cut) to the groups `tokens` positions complete.
    func cutCodes(_ txn: WriteTransaction, _ info: HeadInfo, to tokens: Int) throws {
        guard let format = info.codes else { return }
        let kept = tokens / format.group, current = info.codedGroups
        guard current > kept else { return }
        let perBlock = info.blockSize / format.group
        let rowBytes = format.layout(dimension: info.dimension).rowBytes
        for block in ((kept + perBlock - 1) / perBlock)..<((current + perBlock - 1) / perBlock) {
            try txn.delete(vectorsDB, StoreKey.codeBlock(info.id, UInt32(block)))
        }
        if kept % perBlock != 0 {
            let key = StoreKey.codeBlock(info.id, UInt32(kept / perBlock))
            guard let old = try txn.reader.get(vectorsDB, key), old.count >= (kept % perBlock) * rowBytes else {
                throw StoreError(.corrupt, "code block \(kept / perBlock) is missing or short", path: path, head: info.id)
            }
            try txn.put(vectorsDB, key, Array(old.prefix((kept % perBlock) * rowBytes)))
        }
    }

    /// Writes the code rows of `groups` (the stream holds exactly `groups.lowerBound` rows before),
    /// coding the vectors as stored (rounded to the head's dtype).
    private func writeCodes(_ txn: WriteTransaction, _ info: HeadInfo, groups: Range<Int>) throws {
        guard let format = info.codes, !groups.isEmpty else { return }
        let d = info.dimension, g = format.group
        let layout = format.layout(dimension: d)
        let perBlock = info.blockSize / g
        let k = UnsafeMutablePointer<Float>.allocate(capacity: g * d), v = UnsafeMutablePointer<Float>.allocate(capacity: g * d)
        defer { k.deallocate(); v.deallocate() }
        var group = groups.lowerBound
        while group < groups.upperBound {
            let block = group / perBlock, inBlock = group % perBlock
            let take = min(perBlock - inBlock, groups.upperBound - group)
            let key = StoreKey.codeBlock(info.id, UInt32(block))
            var rows = [UInt8](repeating: 0, count: (inBlock + take) * layout.rowBytes)
            if inBlock > 0 {
                guard let old = try txn.reader.get(vectorsDB, key), old.count >= inBlock * layout.rowBytes else {
                    throw StoreError(.corrupt, "code block \(block) is missing or short", path: path, head: info.id)
                }
                // Copied: the put below invalidates `old`.
                rows.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: old[0..<(inBlock * layout.rowBytes)])) }
            }
            for j in 0..<take {
                let first = (group + j) * g
                try decodeStored(txn, info, .keys, rows: first..<(first + g), into: k)
                try decodeStored(txn, info, .values, rows: first..<(first + g), into: v)
                rows.withUnsafeMutableBytes { out in
                    format.encodeGroup(keys: k, values: v, dimension: d, into: out.baseAddress! + (inBlock + j) * layout.rowBytes)
                }
            }
            try txn.put(vectorsDB, key, rows)
            group += take
        }
    }
}

extension KVStore {
    /// Rows `rows` (inside one block) of a stream as stored, decoded to f32, read inside `txn`.
    fileprivate func decodeStored(_ txn: WriteTransaction, _ info: HeadInfo, _ kind: VectorKind, rows: Range<Int>,
                                  into out: UnsafeMutablePointer<Float>) throws {
        let bs = info.blockSize, width = info.bytesPerVector, block = rows.lowerBound / bs
        let data = try storedBlock(txn, info, kind, block)
        guard rows.upperBound <= info.rows(kind), (rows.upperBound - 1) / bs == block,
              data.count >= (rows.upperBound - block * bs) * width, let base = data.baseAddress else {
            throw StoreError(.corrupt, "\(kind) rows \(rows) to code are missing or short", path: path, head: info.id)
        }
        let src = base + (rows.lowerBound - block * bs) * width
        let n = rows.count * info.dimension
        switch info.dtype {
        case .f32: UnsafeMutableRawPointer(out).copyMemory(from: src, byteCount: n * 4)
        case .f16: kvr_f16_to_f32(src.assumingMemoryBound(to: UInt16.self), out, n)
        case .bf16: kvr_bf16_to_f32(src.assumingMemoryBound(to: UInt16.self), out, n)
        }
    }

    /// Block `block` of a stream (an empty buffer when missing). Not inlined: inlined into the code
    /// writer, this read left Swift's error register set on its normal return in optimised builds
    /// (Swift 6.3.1, x86_64), so a successful recode was reported as a thrown error.
    @inline(never)
    fileprivate func storedBlock(_ txn: WriteTransaction, _ info: HeadInfo, _ kind: VectorKind, _ block: Int) throws -> UnsafeRawBufferPointer {
        try txn.reader.get(vectorsDB, StoreKey.block(info.id, kind, UInt32(block))) ?? UnsafeRawBufferPointer(start: nil, count: 0)
    }
}

extension StoreSnapshot {
    /// The head's code stream: one row per complete group (nil when the head keeps no codes).
    public func codes(_ id: HeadID) throws -> CodeView? {
        let info = try store.info(txn, id)
        guard info.codes != nil else { return nil }
        return try CodeView(txn: txn, db: store.vectorsDB, info: info, path: store.path, keeping: [][...])
    }

    /// `previous` brought up to `count` positions without reading its whole block table (see
    /// `vectors(continuing:count:)`): for the head's only writer, after nothing but appends.
    public func codes(continuing previous: CodeView, count: Int) throws -> CodeView {
        guard let old = previous.snapshot, old.sameMap(as: txn.mapIdentity), count >= previous.positions else {
            return try codes(previous.info.id) ?? previous
        }
        var info = previous.info
        info.count = count
        let full = previous.count / previous.groupsPerBlock
        return try CodeView(txn: txn, db: store.vectorsDB, info: info, path: store.path,
                            keeping: previous.blocks.prefix(full))
    }
}

/// A zero-copy view of a head's code rows (one per complete group of positions) inside one read
/// transaction, like `VectorView`: a block table into the memory map.
public struct CodeView {
    public let info: HeadInfo
    public let format: CodeFormat
    public let layout: CodeFormat.Layout
    public let snapshot: MapIdentity?
    /// Complete groups (code rows).
    public let count: Int
    public let groupsPerBlock: Int
    public let blocks: [UnsafeRawPointer]

    init(txn: ReadTransaction, db: MDB_dbi, info: HeadInfo, path: String, keeping kept: ArraySlice<UnsafeRawPointer>) throws {
        guard let format = info.codes else {
            throw StoreError(.invalidArgument, "head \(info.id) keeps no codes", path: path, head: info.id)
        }
        self.info = info
        self.format = format
        layout = format.layout(dimension: info.dimension)
        snapshot = txn.mapIdentity
        count = info.codedGroups
        groupsPerBlock = info.blockSize / format.group
        let expected = (count + groupsPerBlock - 1) / groupsPerBlock
        let rowBytes = layout.rowBytes, perBlock = groupsPerBlock, count = count
        let table = try txn.blockTable(db, prefix: StoreKey.codePrefix(info.id), key: { StoreKey.codeBlock(info.id, $0) },
                                       keeping: kept, expected: expected, bytes: { min(perBlock, count - $0 * perBlock) * rowBytes },
                                       what: "the code stream", advice: "; rebuild the codes", path: path, head: info.id)
        blocks = table
    }

    /// Positions the codes cover (whole groups).
    public var positions: Int { count * format.group }

    /// Code row of group `g`.
    @inlinable @inline(__always)
    public func row(_ g: Int) -> UnsafeRawPointer {
        blocks[g / groupsPerBlock] + (g % groupsPerBlock) * layout.rowBytes
    }
}
