import CLMDB
import CKernels
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

/// A KVRecall store: one directory, one LMDB environment, any number of heads.
///
/// Named databases: `meta` (magic and format version), `heads` (one `HeadInfo` per head),
/// `vectors` (blocks of `blockSize` vectors keyed by head, kind and block number) and
/// `indexes` (persisted index sections).
public final class KVStore: @unchecked Sendable {
    /// On-disk format version this build reads. A store is written at version 1 and raised to 2 when
    /// it first holds codes in blocks (`CodeFormat.Order.blocks`), which a build reading version 1
    /// would scan in position order: it refuses such a store instead of attending through garbage.
    public static let formatVersion: UInt32 = 2
    /// The version a store is created at.
    static let baseVersion: UInt32 = 1
    static let magic = "KVRecall store"
    public static let defaultBlockSize = 256

    public let path: String
    public let environment: Environment
    let metaDB: MDB_dbi
    let headsDB: MDB_dbi
    let vectorsDB: MDB_dbi
    let indexesDB: MDB_dbi
    /// Head records read or written lately, decoded (KVStore+HeadRecords.swift).
    let records = HeadRecordCache()

    /// Opens the store at `path`. With `create`, makes the directory and a new store when none
    /// exists. Fails with `.notAStore` for a directory without a store or with a foreign LMDB
    /// file, and `.unsupportedVersion` for a store written by a newer format.
    public init(path: String, create: Bool = false, options: Environment.Options = Environment.Options()) throws {
        self.path = path
        let fm = FileManager.default
        var isDir: ObjCBool = false
        let exists = fm.fileExists(atPath: path, isDirectory: &isDir)
        if exists && !isDir.boolValue {
            throw StoreError(.notAStore, "not a directory (a store is a directory holding data.mdb)", path: path)
        }
        var hasData = fm.fileExists(atPath: path + "/data.mdb")
        // A process killed while creating a store can leave a 0-byte data.mdb (before LMDB wrote its
        // meta pages) or an LMDB environment with no database yet (before the first commit below).
        // Neither holds data: creating finishes the job; anything else gets a clear error.
        let interrupted = "holds an empty LMDB environment (a store creation was interrupted); ingest into it to create the store"
        if hasData, ((try? fm.attributesOfItem(atPath: path + "/data.mdb"))?[.size] as? NSNumber)?.intValue == 0 {
            guard create, !options.readOnly else { throw StoreError(.notAStore, interrupted, path: path) }
        }
        if !hasData {
            guard create else {
                throw StoreError(.notAStore, exists ? "no KVRecall store here (no data.mdb)" : "no such store directory", path: path)
            }
            if options.readOnly { throw StoreError(.readOnly, "cannot create a store read-only", path: path) }
            // A store is a directory of its own: creating one among unrelated files (a home or
            // project directory given by mistake) would write data.mdb there without a word.
            let ours: Set<String> = ["data.mdb", "lock.mdb", "writers.lock"]
            if exists, let other = try? fm.contentsOfDirectory(atPath: path).filter({ !ours.contains($0) }).sorted(), !other.isEmpty {
                let shown = other.prefix(3).map { "'\($0)'" }.joined(separator: ", ") + (other.count > 3 ? " and \(other.count - 3) more" : "")
                throw StoreError(.notAStore, "not empty and holds no KVRecall store (\(shown)); a new store needs a new or empty directory",
                                 path: path)
            }
            try KVStore.makeDirectories(path)
        }
        let env = try Environment(path: path, options: options)
        environment = env
        do {
            if hasData, try env.isEmpty() {
                guard create, !options.readOnly else { throw StoreError(.notAStore, interrupted, path: path) }
                hasData = false
            }
            let names = ["meta", "heads", "vectors", "indexes"]
            let handles: [MDB_dbi]
            if hasData {
                // An existing environment must already be a KVRecall store: check before writing anything.
                handles = try env.openDatabases(names, create: false, validate: { txn, dbis in
                    try KVStore.checkFormat(txn, meta: dbis[0], path: path)
                })
            } else {
                // The databases and the format records are created in one transaction.
                handles = try env.openDatabases(names, create: true, initialize: { txn, dbis in
                    try txn.put(dbis[0], Array("magic".utf8), Array(KVStore.magic.utf8))
                    var version = [UInt8]()
                    StoreKey.appendBE(&version, KVStore.baseVersion)
                    try txn.put(dbis[0], Array("version".utf8), version)
                })
            }
            (metaDB, headsDB, vectorsDB, indexesDB) = (handles[0], handles[1], handles[2], handles[3])
        } catch var error as StoreError {
            env.close()
            if error.kind == .notAStore && error.message.hasPrefix("no database") {
                error = StoreError(.notAStore, code: error.code,
                                   "an LMDB environment that is not a KVRecall store (\(error.message))", path: path)
            }
            throw error
        } catch {
            env.close()
            throw error
        }
    }

    /// `mkdir -p` with the failing directory and errno's reason in the error (Foundation's
    /// messages, e.g. "NSCocoaErrorDomain error 512", name neither).
    static func makeDirectories(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for part in path.split(separator: "/") {
            prefix += part
            if mkdir(prefix, 0o755) != 0 && errno != EEXIST {
                let code = errno
                let reason = code == ENOTDIR ? "a component of the path is a file, not a directory"
                    : code == EACCES ? "permission denied" : String(cString: strerror(code))
                throw StoreError(code == EACCES || code == EROFS ? .readOnly : .io, code: code,
                                 "cannot create directory \(prefix): \(reason)", path: path)
            }
            var info = stat()
            if stat(prefix, &info) == 0, (info.st_mode & S_IFMT) != S_IFDIR {
                throw StoreError(.io, "cannot create directory \(prefix): a file of that name exists", path: path)
            }
            prefix += "/"
        }
    }

    private static func checkFormat(_ txn: ReadTransaction, meta: MDB_dbi, path: String) throws {
        guard let magic = try txn.get(meta, Array("magic".utf8)), Array(magic) == Array(KVStore.magic.utf8) else {
            throw StoreError(.notAStore, "an LMDB environment that is not a KVRecall store (no magic record)", path: path)
        }
        let version = try recordedVersion(txn, meta: meta, path: path)
        guard version <= KVStore.formatVersion, version >= 1 else {
            throw StoreError(.unsupportedVersion,
                             "store format version \(version) is not supported by this build (it reads version \(KVStore.formatVersion)); upgrade kvrecall",
                             path: path)
        }
    }

    /// The format version record of `meta` (a big-endian u32).
    private static func recordedVersion(_ reader: ReadTransaction, meta: MDB_dbi, path: String) throws -> UInt32 {
        guard let raw = try reader.get(meta, Array("version".utf8)), raw.count == 4 else {
            throw StoreError(.corrupt, "the format version record is missing or malformed", path: path)
        }
        return raw.reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
    }

    /// The store's format version as recorded.
    func storedVersion(_ reader: ReadTransaction) throws -> UInt32 { try Self.recordedVersion(reader, meta: metaDB, path: path) }

    /// The store's format version as recorded (1, or 2 once it holds codes in blocks).
    public func recordedVersion() throws -> UInt32 { try environment.read { try storedVersion($0) } }

    /// Raises the store's recorded version to `version` (inside the write that needs it).
    func require(version: UInt32, _ txn: WriteTransaction) throws {
        guard try storedVersion(txn.reader) < version else { return }
        var raw = [UInt8]()
        StoreKey.appendBE(&raw, version)
        try txn.put(metaDB, Array("version".utf8), raw)
    }

    /// Closes the environment; every transaction must have ended.
    public func close() { environment.close() }

    // MARK: Heads

    /// Every head, in (context, layer, head) order.
    public func heads() throws -> [HeadInfo] {
        try environment.read { txn in try KVStore.heads(txn, headsDB, path: path) }
    }

    static func heads(_ txn: ReadTransaction, _ db: MDB_dbi, path: String) throws -> [HeadInfo] {
        var result: [HeadInfo] = []
        try txn.scan(db, prefix: []) { _, value in
            result.append(try decodeInfo(value, path: path))
            return true
        }
        return result
    }

    public func info(_ id: HeadID) throws -> HeadInfo {
        try environment.read { txn in try info(txn, id) }
    }

    func info(_ txn: ReadTransaction, _ id: HeadID) throws -> HeadInfo {
        guard let raw = try txn.get(headsDB, StoreKey.head(id)) else {
            throw StoreError(.headNotFound, "no head \(id) in this store", path: path, head: id)
        }
        return try decodeRecord(raw)
    }

    static func decodeInfo(_ raw: UnsafeRawBufferPointer, path: String) throws -> HeadInfo {
        do {
            return try JSONDecoder().decode(HeadInfo.self, from: Data(raw))
        } catch {
            throw StoreError(.corrupt, "a head record cannot be decoded: \(error)", path: path)
        }
    }

    func putInfo(_ txn: WriteTransaction, _ info: HeadInfo) throws {
        try txn.put(headsDB, StoreKey.head(info.id), try records.encode(info))
    }

    /// A head record read in this store, decoded through the cache of records.
    func decodeRecord(_ raw: UnsafeRawBufferPointer) throws -> HeadInfo {
        try records.decode(raw, path: path)
    }

    /// Creates an empty head. Fails if it exists with a different dimension or dtype;
    /// returns the existing record when it matches (so ingest can be resumed).
    @discardableResult
    public func createHead(_ id: HeadID, dimension: Int, dtype: DType, blockSize: Int = KVStore.defaultBlockSize,
                           metadata: [String: String] = [:], codes: CodeFormat? = nil) throws -> HeadInfo {
        guard dimension > 0, dimension <= 65536 else {
            throw StoreError(.invalidArgument, "dimension \(dimension) is out of range 1...65536", path: path, head: id)
        }
        guard blockSize > 0, blockSize <= 1 << 20 else {
            throw StoreError(.invalidArgument, "block size \(blockSize) is out of range", path: path, head: id)
        }
        if let problem = codes?.problem(dimension: dimension, blockSize: blockSize) {
            throw StoreError(.invalidArgument, problem, path: path, head: id)
        }
        return try environment.write { txn in
            if let raw = try txn.reader.get(headsDB, StoreKey.head(id)) {
                let existing = try decodeRecord(raw)
                guard existing.dimension == dimension, existing.dtype == dtype else {
                    throw StoreError(.shapeMismatch,
                                     "head exists with dimension \(existing.dimension) and dtype \(existing.dtype.rawValue); asked for \(dimension) \(dtype.rawValue)",
                                     path: path, head: id)
                }
                return existing
            }
            let info = HeadInfo(id: id, dimension: dimension, dtype: dtype, blockSize: blockSize,
                                count: 0, queryCount: 0, metadata: metadata, codes: codes?.fitted(to: dtype))
            if let codes, codes.inBlocks { try require(version: 2, txn) }
            try putInfo(txn, info)
            return info
        }
    }

    /// Deletes a head with its vectors and indexes.
    public func dropHead(_ id: HeadID) throws {
        try environment.write { txn in
            guard try txn.delete(headsDB, StoreKey.head(id)) else {
                throw StoreError(.headNotFound, "no head \(id) in this store", path: path, head: id)
            }
            try txn.deletePrefix(vectorsDB, StoreKey.head(id))
            try txn.deletePrefix(indexesDB, StoreKey.head(id))
        }
    }

    // MARK: Appending

    /// Appends `rows` key and value vectors (row-major f32, `rows x dimension` each) to a head,
    /// converting to the head's dtype. Work is split into transactions of at most
    /// `rowsPerTransaction` rows; each commits whole blocks and the new count together, so a crash
    /// leaves a prefix of the input and readers always see keys and values that agree.
    /// Rejects NaN/Inf naming the first bad row unless `allowNonFinite`, and always a finite value
    /// beyond the head's dtype (f16: |x| > 65504), which would be stored as Inf.
    public func append(_ id: HeadID, keys: UnsafeBufferPointer<Float>, values: UnsafeBufferPointer<Float>,
                       allowNonFinite: Bool = false, rowsPerTransaction: Int = 16384,
                       progress: ((Int, Int) -> Void)? = nil) throws {
        let info = try self.info(id)
        let d = info.dimension
        guard keys.count % d == 0, values.count % d == 0 else {
            throw StoreError(.shapeMismatch, "vector data is not a whole number of \(d)-dimensional rows", path: path, head: id)
        }
        let rows = keys.count / d
        guard values.count / d == rows else {
            throw StoreError(.shapeMismatch, "\(rows) keys but \(values.count / d) values", path: path, head: id)
        }
        for (label, data) in [("keys", keys), ("values", values)] {
            if let bad = firstUnstorableValue(data, dtype: info.dtype, allowNonFinite: allowNonFinite) {
                throw unstorableError(bad, label, dimension: d, path: path, head: id)
            }
        }
        try appendRows(id, kinds: [(.keys, keys), (.values, values)], rows: rows,
                       rowsPerTransaction: rowsPerTransaction, progress: progress)
    }

    /// Appends prefill queries (`rows x dimension`, row-major f32) to a head.
    public func appendQueries(_ id: HeadID, queries: UnsafeBufferPointer<Float>, allowNonFinite: Bool = false,
                              rowsPerTransaction: Int = 16384, progress: ((Int, Int) -> Void)? = nil) throws {
        let info = try self.info(id)
        guard queries.count % info.dimension == 0 else {
            throw StoreError(.shapeMismatch, "query data is not a whole number of \(info.dimension)-dimensional rows", path: path, head: id)
        }
        if let bad = firstUnstorableValue(queries, dtype: info.dtype, allowNonFinite: allowNonFinite) {
            throw unstorableError(bad, "queries", dimension: info.dimension, path: path, head: id)
        }
        try appendRows(id, kinds: [(.queries, queries)], rows: queries.count / info.dimension,
                       rowsPerTransaction: rowsPerTransaction, progress: progress)
    }

    private func appendRows(_ id: HeadID, kinds: [(VectorKind, UnsafeBufferPointer<Float>)], rows: Int,
                            rowsPerTransaction: Int, progress: ((Int, Int) -> Void)?) throws {
        guard rowsPerTransaction > 0 else {
            throw StoreError(.invalidArgument, "rowsPerTransaction must be at least 1 (got \(rowsPerTransaction))", path: path, head: id)
        }
        var done = 0
        progress?(0, rows)
        while done < rows {
            let chunk = min(rowsPerTransaction, rows - done)
            try environment.write { txn in
                try appendChunk(txn, id, kinds: kinds, from: done, rows: chunk)
            }
            done += chunk
            progress?(done, rows)
        }
    }

    /// Rows `from ..< from + rows` of every stream in `kinds`, appended to head `id` inside `txn`.
    private func appendChunk(_ txn: WriteTransaction, _ id: HeadID, kinds: [(VectorKind, UnsafeBufferPointer<Float>)],
                             from: Int, rows: Int) throws {
        guard let raw = try txn.reader.get(headsDB, StoreKey.head(id)) else {
            throw StoreError(.headNotFound, "no head \(id) in this store", path: path, head: id)
        }
        var info = try decodeRecord(raw)
        for (kind, data) in kinds {
            let slice = UnsafeBufferPointer(rebasing: data[(from * info.dimension)..<((from + rows) * info.dimension)])
            try writeRows(txn, info, kind, start: info.rows(kind), rows: slice)
        }
        if kinds.contains(where: { $0.0 == .keys }) {
            info.count += rows
            try codeAppended(txn, info, previous: info.count - rows)
        }
        if kinds.contains(where: { $0.0 == .queries }) { info.queryCount += rows }
        try putInfo(txn, info)
    }

    /// Rows for one head of an atomic multi-head append: keys with values, or prefill queries.
    public struct HeadRows {
        public var id: HeadID
        public var streams: [(VectorKind, UnsafeBufferPointer<Float>)]

        /// Keys and values (`rows x dimension` each, row-major f32).
        public static func keysAndValues(_ id: HeadID, keys: UnsafeBufferPointer<Float>, values: UnsafeBufferPointer<Float>) -> HeadRows {
            HeadRows(id: id, streams: [(.keys, keys), (.values, values)])
        }

        /// Prefill queries (`rows x dimension`, row-major f32).
        public static func queries(_ id: HeadID, _ queries: UnsafeBufferPointer<Float>) -> HeadRows {
            HeadRows(id: id, streams: [(.queries, queries)])
        }
    }

    /// Appends to several heads in one write transaction: after a failure or a crash either every
    /// head grew or none did (one decode step of a layer is one call). Shapes are checked against
    /// every head before anything is written; values must be finite unless `allowNonFinite`, and
    /// within the range of each head's dtype.
    public func appendAtomically(_ batch: [HeadRows], allowNonFinite: Bool = false) throws {
        try environment.write { txn in
            var rowsOf: [Int] = []
            for item in batch {
                guard let raw = try txn.reader.get(headsDB, StoreKey.head(item.id)) else {
                    throw StoreError(.headNotFound, "no head \(item.id) in this store", path: path, head: item.id)
                }
                let info = try decodeRecord(raw)
                let d = info.dimension
                guard let first = item.streams.first, first.1.count % d == 0,
                      item.streams.allSatisfy({ $0.1.count == first.1.count }) else {
                    throw StoreError(.shapeMismatch, "vector data is not a whole number of \(d)-dimensional rows, the same for every stream",
                                     path: path, head: item.id)
                }
                for (kind, data) in item.streams {
                    if let bad = firstUnstorableValue(data, dtype: info.dtype, allowNonFinite: allowNonFinite) {
                        throw unstorableError(bad, "\(kind)", dimension: d, suffix: "; nothing was appended", path: path, head: item.id)
                    }
                }
                rowsOf.append(first.1.count / d)
            }
            for (item, rows) in zip(batch, rowsOf) where rows > 0 {
                try appendChunk(txn, item.id, kinds: item.streams, from: 0, rows: rows)
            }
        }
    }

    // MARK: Truncating

    /// Cuts every head of `ids` back to `tokens` keys and values (heads already shorter are left
    /// alone) and their prefill queries to `queryTokens` when given, in one write transaction.
    /// A stored index of a cut head that records covering more than `tokens` keys is deleted in
    /// the same transaction (it would name positions that no longer exist). Returns the heads
    /// whose indexes were deleted.
    @discardableResult
    public func truncate(_ ids: [HeadID], to tokens: Int, queryTokens: Int? = nil) throws -> Set<HeadID> {
        guard tokens >= 0, (queryTokens ?? 0) >= 0 else {
            throw StoreError(.invalidArgument, "cannot truncate to a negative length (\(tokens))", path: path)
        }
        return try environment.write { txn in
            var dropped: Set<HeadID> = []
            for id in ids {
                guard let raw = try txn.reader.get(headsDB, StoreKey.head(id)) else {
                    throw StoreError(.headNotFound, "no head \(id) in this store", path: path, head: id)
                }
                var info = try decodeRecord(raw)
                var changed = false
                if info.count > tokens {
                    for kind in [VectorKind.keys, .values] { try cutStream(txn, info, kind, to: tokens) }
                    try cutCodes(txn, info, to: tokens)
                    info.count = tokens
                    changed = true
                    // (Records without coverage, such as `auto` plans or indexes of older builds, stay:
                    // readers compare a loaded index's count with the head's.)
                    for (name, covered) in try indexCoverage(txn.reader, id) where (covered ?? 0) > tokens {
                        try txn.deletePrefix(indexesDB, StoreKey.indexPrefix(id, name))
                        info.metadata[KVStore.coverageKey(name)] = nil
                        dropped.insert(id)
                    }
                }
                if let queryTokens, info.queryCount > queryTokens {
                    try cutStream(txn, info, .queries, to: queryTokens)
                    info.queryCount = queryTokens
                    changed = true
                }
                if changed { try putInfo(txn, info) }
            }
            return dropped
        }
    }

    /// Deletes the blocks of one stream past row `rows` and shortens its last block.
    private func cutStream(_ txn: WriteTransaction, _ info: HeadInfo, _ kind: VectorKind, to rows: Int) throws {
        let bs = info.blockSize
        let current = info.rows(kind)
        guard current > rows else { return }
        let firstWhole = (rows + bs - 1) / bs      // first block entirely past the cut
        let lastBlock = (current - 1) / bs
        if firstWhole <= lastBlock {
            for block in firstWhole...lastBlock { try txn.delete(vectorsDB, StoreKey.block(info.id, kind, UInt32(block))) }
        }
        if rows % bs != 0 {
            let block = rows / bs
            let key = StoreKey.block(info.id, kind, UInt32(block))
            guard let old = try txn.reader.get(vectorsDB, key), old.count >= (rows % bs) * info.bytesPerVector else {
                throw StoreError(.corrupt, "block \(block) of \(kind) is missing or short", path: path, head: info.id)
            }
            let kept = Array(old.prefix((rows % bs) * info.bytesPerVector))  // copy: the put invalidates `old`
            try txn.put(vectorsDB, key, kept)
        }
    }

    // MARK: Head writers

    /// Takes the write lease of `ids` for as long as the returned lock lives: a second writer of
    /// any of these heads, in this or another process, gets `.inUse` instead of interleaving its
    /// rows with the first one's. The lease is an open-file-description lock on `writers.lock` in
    /// the store directory, one byte per head, so the kernel drops it when the holder dies.
    public func lockHeads(_ ids: [HeadID]) throws -> HeadWriterLock {
        try HeadWriterLock(store: path, heads: ids)
    }

    /// Writes f32 rows at positions `start...` of one stream, completing a partial last block first.
    private func writeRows(_ txn: WriteTransaction, _ info: HeadInfo, _ kind: VectorKind, start: Int,
                           rows: UnsafeBufferPointer<Float>) throws {
        let d = info.dimension
        let bs = info.blockSize
        let width = info.bytesPerVector
        var position = start
        var offset = 0  // in floats
        let total = rows.count / d
        var written = 0
        while written < total {
            let block = position / bs
            let inBlock = position % bs
            let take = min(bs - inBlock, total - written)
            let key = StoreKey.block(info.id, kind, UInt32(block))
            var existing: [UInt8] = []
            if inBlock > 0 {
                guard let old = try txn.reader.get(vectorsDB, key), old.count >= inBlock * width else {
                    throw StoreError(.corrupt, "block \(block) of \(kind) is missing or short", path: path, head: info.id)
                }
                existing = Array(old.prefix(inBlock * width))  // copy: the put below invalidates `old`
            }
            let src = UnsafeBufferPointer(rebasing: rows[offset..<(offset + take * d)])
            try txn.reserve(vectorsDB, key, count: (inBlock + take) * width) { out in
                existing.withUnsafeBytes { out.copyMemory(from: $0) }
                encode(src, dtype: info.dtype, into: UnsafeMutableRawPointer(out.baseAddress! + inBlock * width))
            }
            position += take
            offset += take * d
            written += take
        }
    }

    // MARK: Reading

    /// Runs `body` on a consistent snapshot of the store.
    public func read<T>(_ body: (StoreSnapshot) throws -> T) throws -> T {
        try environment.read { txn in try body(StoreSnapshot(store: self, txn: txn)) }
    }

    /// Copies rows `range` of one stream out as f32 (`range.count x dimension`).
    public func copyVectors(_ id: HeadID, _ kind: VectorKind, range: Range<Int>? = nil) throws -> [Float] {
        try read { snapshot in
            let view = try snapshot.vectors(id, kind)
            let r = range ?? 0..<view.count
            guard r.lowerBound >= 0, r.upperBound <= view.count else {
                throw StoreError(.invalidArgument, "rows \(r) are outside 0..<\(view.count)", path: path, head: id)
            }
            return view.decode(rows: r)
        }
    }
}

/// Converts f32 rows to `dtype` and writes them at `out`.
func encode(_ src: UnsafeBufferPointer<Float>, dtype: DType, into out: UnsafeMutableRawPointer) {
    guard let base = src.baseAddress, src.count > 0 else { return }
    switch dtype {
    case .f32: out.copyMemory(from: base, byteCount: src.count * 4)
    case .f16: kvr_f32_to_f16(base, out.assumingMemoryBound(to: UInt16.self), src.count)
    case .bf16: kvr_f32_to_bf16(base, out.assumingMemoryBound(to: UInt16.self), src.count)
    }
}

/// Index of the first row holding NaN or Inf, or nil.
public func firstNonFiniteRow(_ data: UnsafeBufferPointer<Float>, dimension: Int) -> Int? {
    for i in 0..<data.count where !data[i].isFinite { return i / dimension }
    return nil
}

extension DType {
    /// The largest finite magnitude the type stores (f16 65504, bf16 3.3895314e38); a finite value
    /// beyond it would be encoded as ±Inf and attention over it would answer NaN.
    public var largestFinite: Float { TensorDType(self).largestFinite }
    /// "f16's range (|x| <= 65504)".
    public var rangeDescription: String { TensorDType(self).rangeDescription }
}

extension TensorDType {
    public init(_ dtype: DType) {
        switch dtype {
        case .f32: self = .f32
        case .f16: self = .f16
        case .bf16: self = .bf16
        }
    }
}

/// A value that cannot be stored as `dtype`: NaN or Inf, or a finite value beyond the type's range.
public struct UnstorableValue: Equatable, Sendable {
    /// Flat index in the checked buffer (row = index / dimension).
    public let index: Int
    public let value: Float
    public let dtype: DType

    /// "holds NaN or Inf", or "holds 70000.0, beyond f16's range (|x| <= 65504): it would be
    /// stored as Inf".
    public var problem: String {
        value.isFinite
            ? "holds \(value), beyond \(dtype.rangeDescription): stored as \(dtype) it would become Inf"
            : "holds NaN or Inf"
    }
}

/// The first value of `data` that `dtype` cannot hold: NaN or Inf (unless `allowNonFinite`), or a
/// finite value whose magnitude exceeds `dtype.largestFinite` (always: it is not what the caller
/// gave, and it would turn attention into NaN). One pass, nil when every value can be stored.
public func firstUnstorableValue(_ data: UnsafeBufferPointer<Float>, dtype: DType,
                                 allowNonFinite: Bool = false) -> UnstorableValue? {
    let limit = dtype.largestFinite
    for i in 0..<data.count {
        let x = data[i]
        guard !(x.magnitude <= limit) else { continue }  // the common case; NaN falls through
        if x.isFinite || !allowNonFinite { return UnstorableValue(index: i, value: x, dtype: dtype) }
    }
    return nil
}

/// The store's error for an unstorable value in row `index / dimension` of stream `label`.
func unstorableError(_ bad: UnstorableValue, _ label: String, dimension: Int, suffix: String = "",
                     path: String, head: HeadID) -> StoreError {
    let row = bad.index / dimension, column = bad.index % dimension
    return bad.value.isFinite
        ? StoreError(.outOfRange, "\(label) row \(row), column \(column) \(bad.problem)\(suffix)", path: path, head: head)
        : StoreError(.nonFinite, "\(label) row \(row) \(bad.problem)\(suffix)", path: path, head: head)
}

/// One read transaction's view of the store.
public struct StoreSnapshot {
    public let store: KVStore
    public let txn: ReadTransaction

    public func heads() throws -> [HeadInfo] { try KVStore.heads(txn, store.headsDB, path: store.path) }
    public func info(_ id: HeadID) throws -> HeadInfo { try store.info(txn, id) }

    /// A zero-copy view of one stream of a head: a block table pointing into the memory map.
    public func vectors(_ id: HeadID, _ kind: VectorKind) throws -> VectorView {
        let info = try store.info(txn, id)
        return try VectorView(txn: txn, db: store.vectorsDB, info: info, kind: kind, path: store.path)
    }

    /// The stream `previous` was read from, now `count` rows long, reading only what changed (see
    /// `VectorView.init(continuing:)`): for the head's only writer, after nothing but appends. Read
    /// whole when the map moved since `previous`.
    public func vectors(continuing previous: VectorView, count: Int) throws -> VectorView {
        if let view = try VectorView(continuing: previous, count: count, txn: txn, db: store.vectorsDB, path: store.path) {
            return view
        }
        return try vectors(previous.info.id, previous.kind)
    }
}
