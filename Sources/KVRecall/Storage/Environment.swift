import CLMDB
import Foundation

/// One LMDB environment: owns the `MDB_env` handle and its named databases.
///
/// Mirrors LMDB's discipline: one writer at a time, any number of readers, each inside a closure
/// (`read`, `write`) whose transaction never outlives it. Pointers into the memory map are valid
/// only inside the closure that produced them.
///
/// The map grows by itself: a write transaction that hits `MDB_MAP_FULL` is aborted, the map is
/// enlarged while no transaction of this process is open (readers hold a shared lock that the
/// resize takes exclusively), and the whole transaction is retried.
public final class Environment: @unchecked Sendable {
    public struct Options: Sendable {
        /// Initial map size in bytes. The map is virtual address space; the file grows as data is written.
        public var mapSize: Int = 1 << 32
        /// Largest map the automatic growth may reach; `nil` for no limit but the address space.
        public var maxMapSize: Int? = nil
        /// Grow the map on `MDB_MAP_FULL`; when false, a full map is an error.
        public var growth: Bool = true
        public var readOnly: Bool = false
        public var maxDatabases: UInt32 = 16
        public var maxReaders: UInt32 = 256
        /// Skip fsync at commit (faster bulk ingest; a crash may lose the last transactions, never corrupt).
        public var noSync: Bool = false
        public init() {}
    }

    public let path: String
    public let options: Options
    private var env: OpaquePointer?
    private var rwlock = pthread_rwlock_t()
    private let writerLock = NSLock()
    private var databases: [String: MDB_dbi] = [:]
    private let databasesLock = NSLock()
    /// Current map size in bytes.
    public private(set) var mapSize: Int
    /// How many times the map has grown since this environment was opened.
    public private(set) var growthCount = 0

    public init(path: String, options: Options = Options()) throws {
        self.path = path
        self.options = options
        self.mapSize = options.mapSize
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        #if os(Linux)
        // Writer preference: a resize must not starve behind a stream of readers.
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        #endif
        pthread_rwlock_init(&rwlock, &attr)
        pthread_rwlockattr_destroy(&attr)

        var handle: OpaquePointer?
        try check(mdb_env_create(&handle), "mdb_env_create", path: path)
        env = handle
        do {
            try check(mdb_env_set_maxdbs(handle, options.maxDatabases), "mdb_env_set_maxdbs", path: path)
            try check(mdb_env_set_maxreaders(handle, options.maxReaders), "mdb_env_set_maxreaders", path: path)
            try check(mdb_env_set_mapsize(handle, options.mapSize), "mdb_env_set_mapsize", path: path)
            var flags = UInt32(MDB_NOTLS)
            if options.readOnly { flags |= UInt32(MDB_RDONLY) }
            if options.noSync { flags |= UInt32(MDB_NOSYNC) }
            try check(mdb_env_open(handle, path, flags, 0o644), "cannot open LMDB environment", path: path)
            var info = MDB_envinfo()
            if mdb_env_info(handle, &info) == MDB_SUCCESS { mapSize = Int(info.me_mapsize) }
        } catch {
            mdb_env_close(handle)
            env = nil
            pthread_rwlock_destroy(&rwlock)
            throw error
        }
    }

    deinit { close() }

    /// Closes the environment. Every transaction must have ended; further use throws.
    public func close() {
        pthread_rwlock_wrlock(&rwlock)
        if let env {
            mdb_env_close(env)
            self.env = nil
        }
        pthread_rwlock_unlock(&rwlock)
    }

    public var isOpen: Bool { env != nil }

    private func handle() throws -> OpaquePointer {
        guard let env else { throw StoreError(.invalidArgument, "environment is closed", path: path) }
        return env
    }

    /// Runs `body` inside a read-only transaction: a consistent snapshot of the last commit.
    public func read<T>(_ body: (ReadTransaction) throws -> T) throws -> T {
        pthread_rwlock_rdlock(&rwlock)
        defer { pthread_rwlock_unlock(&rwlock) }
        let env = try handle()
        var txn: OpaquePointer?
        var rc = mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn)
        if rc == MDB_MAP_RESIZED {
            // Another process grew the map: adopt its size, which needs no transaction open here.
            pthread_rwlock_unlock(&rwlock)
            try adoptForeignMapSize()
            pthread_rwlock_rdlock(&rwlock)
            rc = mdb_txn_begin(env, nil, UInt32(MDB_RDONLY), &txn)
        }
        try check(rc, "mdb_txn_begin (read)", path: path)
        defer { mdb_txn_abort(txn) }
        return try body(ReadTransaction(txn!, environment: self))
    }

    /// Runs `body` inside the single write transaction and commits it. On `MDB_MAP_FULL` the
    /// transaction is aborted, the map grown and `body` run again from the start, so `body`
    /// must not have effects outside the transaction.
    public func write<T>(_ body: (WriteTransaction) throws -> T) throws -> T {
        if options.readOnly { throw StoreError(.readOnly, "store was opened read-only", path: path) }
        writerLock.lock()
        defer { writerLock.unlock() }
        while true {
            pthread_rwlock_rdlock(&rwlock)
            let outcome: Result<T, Error>
            do {
                let env = try handle()
                var txn: OpaquePointer?
                try check(mdb_txn_begin(env, nil, 0, &txn), "mdb_txn_begin (write)", path: path)
                let value: T
                do {
                    value = try body(WriteTransaction(txn!, environment: self))
                } catch {
                    mdb_txn_abort(txn)
                    throw error
                }
                // mdb_txn_commit frees the transaction whether or not it succeeds.
                try check(mdb_txn_commit(txn), "mdb_txn_commit", path: path)
                outcome = .success(value)
            } catch {
                outcome = .failure(error)
            }
            pthread_rwlock_unlock(&rwlock)

            switch outcome {
            case .success(let value):
                return value
            case .failure(let error):
                guard let e = error as? StoreError, e.code == MDB_MAP_FULL, options.growth else { throw error }
                try grow()
            }
        }
    }

    /// Doubles the map (capped by `maxMapSize`) while holding the resize lock exclusively.
    private func grow() throws {
        pthread_rwlock_wrlock(&rwlock)
        defer { pthread_rwlock_unlock(&rwlock) }
        let env = try handle()
        var newSize = mapSize * 2
        if let cap = options.maxMapSize {
            guard mapSize < cap else {
                throw StoreError(.mapFull, code: MDB_MAP_FULL,
                                 "the store's map is full at its limit of \(cap) bytes", path: path)
            }
            newSize = min(newSize, cap)
        }
        try check(mdb_env_set_mapsize(env, newSize), "mdb_env_set_mapsize", path: path)
        var info = MDB_envinfo()
        if mdb_env_info(env, &info) == MDB_SUCCESS { mapSize = Int(info.me_mapsize) } else { mapSize = newSize }
        growthCount += 1
    }

    private func adoptForeignMapSize() throws {
        pthread_rwlock_wrlock(&rwlock)
        defer { pthread_rwlock_unlock(&rwlock) }
        let env = try handle()
        try check(mdb_env_set_mapsize(env, 0), "mdb_env_set_mapsize", path: path)
        var info = MDB_envinfo()
        if mdb_env_info(env, &info) == MDB_SUCCESS { mapSize = Int(info.me_mapsize) }
    }

    /// Opens named databases in their own transaction and commits it, which is what makes LMDB keep
    /// the handles for the environment's lifetime (an aborted transaction discards them). Without
    /// `create` a read-only transaction is used. `initialize` (with `create`) writes the first records
    /// in the same transaction; `validate` checks the result before the commit.
    func openDatabases(_ names: [String], create: Bool,
                       validate: (ReadTransaction, [MDB_dbi]) throws -> Void = { _, _ in },
                       initialize: (WriteTransaction, [MDB_dbi]) throws -> Void = { _, _ in }) throws -> [MDB_dbi] {
        pthread_rwlock_rdlock(&rwlock)
        defer { pthread_rwlock_unlock(&rwlock) }
        let env = try handle()
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, create ? 0 : UInt32(MDB_RDONLY), &txn), "mdb_txn_begin", path: path)
        do {
            let handles = try names.map { try database($0, txn: txn!, create: create) }
            if create { try initialize(WriteTransaction(txn!, environment: self), handles) }
            try validate(ReadTransaction(txn!, environment: self), handles)
            try check(mdb_txn_commit(txn), "mdb_txn_commit", path: path)
            return handles
        } catch {
            mdb_txn_abort(txn)
            databasesLock.lock()
            databases.removeAll()
            databasesLock.unlock()
            throw error
        }
    }

    /// The handle of a named database, opened (and with `create`, created) once and cached.
    /// Must be called inside a transaction of this environment.
    func database(_ name: String, txn: OpaquePointer, create: Bool) throws -> MDB_dbi {
        databasesLock.lock()
        defer { databasesLock.unlock() }
        if let dbi = databases[name] { return dbi }
        var dbi = MDB_dbi()
        let rc = mdb_dbi_open(txn, name, create ? UInt32(MDB_CREATE) : 0, &dbi)
        if rc == MDB_NOTFOUND {
            throw StoreError(.notAStore, code: rc, "no database '\(name)' in this LMDB environment", path: path)
        }
        try check(rc, "mdb_dbi_open \(name)", path: path)
        // A handle opened in a transaction that later aborts is discarded by LMDB; only cache
        // handles of databases that existed before (read) or are created in a committed write.
        databases[name] = dbi
        return dbi
    }

    /// Bytes the data file occupies on disk.
    public func fileSize() -> Int {
        let attrs = try? FileManager.default.attributesOfItem(atPath: path + "/data.mdb")
        return (attrs?[.size] as? NSNumber)?.intValue ?? 0
    }

    /// Flushes buffers to disk (useful after a `noSync` bulk ingest).
    public func sync() throws {
        try check(mdb_env_sync(try handle(), 1), "mdb_env_sync", path: path)
    }
}
