import CLMDB
import Foundation
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

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
    /// Changes whenever this process maps the file anew (its own growth, or adopting another
    /// process's size): pointers into the old map are then stale.
    private(set) var mapEpoch = 0
    /// Distinguishes this environment from any other opened in the process, before or after.
    let serial = Environment.nextSerial()
    /// The directory's (device, inode) while this environment holds it in `OpenEnvironments`.
    private var identity: OpenEnvironments.Identity?

    public init(path: String, options: Options = Options()) throws {
        self.path = path
        self.options = options
        self.mapSize = options.mapSize
        // LMDB: "do not have open an LMDB database twice in the same process at the same time"
        // (closing one copy would drop the other's locks). Refused here with a clear error.
        identity = try OpenEnvironments.shared.register(path: path)
        var attr = pthread_rwlockattr_t()
        pthread_rwlockattr_init(&attr)
        #if os(Linux)
        // Writer preference: a resize must not starve behind a stream of readers.
        pthread_rwlockattr_setkind_np(&attr, Int32(PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP))
        #endif
        pthread_rwlock_init(&rwlock, &attr)
        pthread_rwlockattr_destroy(&attr)

        // (A throw from here on still runs deinit, whose close() takes the rwlock: it is not destroyed.)
        if !options.readOnly { try Environment.allocateLockFile(path: path, maxReaders: options.maxReaders) }
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
            let rc = mdb_env_open(handle, path, flags, 0o644)
            if rc == EACCES {
                // Even a reader writes LMDB's lock file (lock.mdb, its reader table) in the store directory.
                throw StoreError(.readOnly, code: rc,
                                 "permission denied opening the store: LMDB needs read and write access to data.mdb and to lock.mdb (its reader table, written even by readers) in this directory; ask for write access to the directory or copy the store",
                                 path: path)
            }
            try check(rc, "cannot open LMDB environment", path: path)
            var info = MDB_envinfo()
            if mdb_env_info(handle, &info) == MDB_SUCCESS { mapSize = Int(info.me_mapsize) }
            try Environment.checkNotTruncated(handle, path: path)
        } catch {
            mdb_env_close(handle)
            env = nil
            throw error
        }
    }

    deinit { close() }

    /// LMDB reads pages through the memory map, so a data file cut short (a bad copy, a full disk
    /// during a copy) would kill the process with SIGBUS at the first read past its end. The meta
    /// page (read with `pread` by `mdb_env_open`) names the last page in use: compare before any
    /// other page is touched. The meta is read before the size, and a writer writes pages before
    /// the meta that names them, so a concurrent writer in another process cannot cause a false alarm.
    private static func checkNotTruncated(_ handle: OpaquePointer?, path: String) throws {
        var info = MDB_envinfo()
        var stat = MDB_stat()
        guard mdb_env_info(handle, &info) == MDB_SUCCESS, mdb_env_stat(handle, &stat) == MDB_SUCCESS else { return }
        let needed = (Int(info.me_last_pgno) + 1) * Int(stat.ms_psize)
        guard let attrs = try? FileManager.default.attributesOfItem(atPath: path + "/data.mdb"),
              let size = (attrs[.size] as? NSNumber)?.intValue else { return }
        if size < needed {
            throw StoreError(.corrupt, "data.mdb is truncated: it has \(size) bytes but its last committed page ends at byte \(needed)",
                             path: path)
        }
    }

    /// LMDB sizes a new lock.mdb with ftruncate and then writes it through a memory map: on a full
    /// file system the first write to that sparse file's pages kills the process with SIGBUS. So a
    /// missing or empty lock file is created here with its blocks allocated, which turns a full disk
    /// into an error. The size is at least what LMDB asks for ((maxreaders - 1) reader slots of 64
    /// bytes plus a header under 4 KiB); LMDB adopts a lock file that is already big enough. A lock
    /// file that exists with a size is left alone: other processes may have it mapped.
    static func allocateLockFile(path: String, maxReaders: UInt32) throws {
        let lockPath = path + "/lock.mdb"
        let fd = open(lockPath, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }  // LMDB reports why when it opens the file itself
        defer { closeDescriptor(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0, info.st_size == 0 else { return }
        #if os(Linux)
        let size = off_t((Int(maxReaders) * 64 + 4096 + 4095) / 4096 * 4096)
        let rc = posix_fallocate(fd, 0, size)
        if rc == ENOSPC || rc == EDQUOT {
            _ = ftruncate(fd, 0)
            throw StoreError(.io, code: rc, "cannot create lock.mdb: \(String(cString: strerror(rc))): the disk is probably full", path: path)
        }
        #endif
    }

    /// A failed commit. LMDB reports a short write, which is what a full file system gives, as EIO;
    /// for EIO, ENOSPC and EDQUOT the error says how much room the file system has left.
    static func commitError(_ rc: Int32, path: String) -> StoreError {
        let error = StoreError.lmdb(rc, "mdb_txn_commit", path: path)
        guard rc == EIO || rc == ENOSPC || rc == EDQUOT else { return error }
        var fs = statvfs()
        guard statvfs(path, &fs) == 0 else { return error }
        let free = Int(fs.f_bavail) * Int(fs.f_frsize)
        let hint = free < 64 << 20 ? ": the disk is probably full" : ""
        return StoreError(.io, code: rc, "\(error.message) writing the transaction; the file system holding the store has \(free) bytes free\(hint)",
                          path: path)
    }

    /// Whether the environment holds nothing at all: no named database and no record in the main
    /// database. That is what a store creation interrupted before its first commit leaves.
    func isEmpty() throws -> Bool {
        try read { txn in
            var dbi = MDB_dbi()
            try check(mdb_dbi_open(txn.txn, nil, 0, &dbi), "mdb_dbi_open (main)", path: path)
            var stat = MDB_stat()
            try check(mdb_stat(txn.txn, dbi, &stat), "mdb_stat", path: path)
            return stat.ms_entries == 0
        }
    }

    /// Closes the environment. Every transaction must have ended; further use throws.
    public func close() {
        pthread_rwlock_wrlock(&rwlock)
        if let env {
            mdb_env_close(env)
            self.env = nil
        }
        if let identity {
            OpenEnvironments.shared.unregister(identity)
            self.identity = nil
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
            // The shared lock is held again before any error leaves (the defer releases it).
            pthread_rwlock_unlock(&rwlock)
            let adopted = Result { try adoptForeignMapSize() }
            pthread_rwlock_rdlock(&rwlock)
            try adopted.get()
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
                let rc = mdb_txn_commit(txn)
                if rc != MDB_SUCCESS { throw Environment.commitError(rc, path: path) }
                outcome = .success(value)
            } catch {
                outcome = .failure(error)
            }
            pthread_rwlock_unlock(&rwlock)

            switch outcome {
            case .success(let value):
                return value
            case .failure(let error):
                // Another process grew the map past this one's size: adopt it and begin again
                // (`body` has not run: the error came from mdb_txn_begin).
                if let e = error as? StoreError, e.code == MDB_MAP_RESIZED {
                    try adoptForeignMapSize()
                    continue
                }
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
        mapEpoch += 1
    }

    private func adoptForeignMapSize() throws {
        pthread_rwlock_wrlock(&rwlock)
        defer { pthread_rwlock_unlock(&rwlock) }
        let env = try handle()
        try check(mdb_env_set_mapsize(env, 0), "mdb_env_set_mapsize", path: path)
        mapEpoch += 1
        var info = MDB_envinfo()
        if mdb_env_info(env, &info) == MDB_SUCCESS { mapSize = Int(info.me_mapsize) }
    }

    nonisolated(unsafe) private static var serials = 0
    private static let serialLock = NSLock()
    private static func nextSerial() -> Int {
        serialLock.lock(); defer { serialLock.unlock() }
        serials += 1
        return serials
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
            let rc = mdb_txn_commit(txn)
            if rc != MDB_SUCCESS { txn = nil; throw Environment.commitError(rc, path: path) }
            return handles
        } catch {
            if txn != nil { mdb_txn_abort(txn) }
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

/// The environments open in this process, by directory identity (device, inode), so a second
/// open of the same store is refused instead of silently breaking LMDB's locking.
final class OpenEnvironments: @unchecked Sendable {
    struct Identity: Hashable { let device: UInt64; let inode: UInt64 }
    static let shared = OpenEnvironments()
    private let lock = NSLock()
    private var open: Set<Identity> = []
    /// The process the set describes: a child made by fork() starts with none open.
    private var owner = getpid()

    func register(path: String) throws -> Identity? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }  // LMDB reports a missing directory itself
        let identity = Identity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
        lock.lock(); defer { lock.unlock() }
        if owner != getpid() { open = []; owner = getpid() }
        guard open.insert(identity).inserted else {
            throw StoreError(.inUse, "the store is already open in this process (LMDB allows one open environment per store and process): close it first, or share the open KVStore or session",
                             path: path)
        }
        return identity
    }

    func unregister(_ identity: Identity) {
        lock.lock(); open.remove(identity); lock.unlock()
    }
}

/// `close(2)`, which the methods above cannot name directly (`Environment.close()` shadows it).
private func closeDescriptor(_ fd: Int32) { _ = close(fd) }
