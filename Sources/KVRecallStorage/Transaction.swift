import CLMDB
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

/// A read-only view of one committed snapshot. Valid only inside `Environment.read`.
public struct ReadTransaction {
    let txn: OpaquePointer
    unowned let environment: Environment
    /// True when this reads inside the write transaction (its own uncommitted, dirty pages).
    let insideWrite: Bool

    init(_ txn: OpaquePointer, environment: Environment, insideWrite: Bool = false) {
        self.txn = txn
        self.environment = environment
        self.insideWrite = insideWrite
    }

    /// The id of the last write transaction this snapshot sees: two snapshots with the same id
    /// see the same data, so whatever was derived from one is valid for the other.
    public var generation: Int { Int(mdb_txn_id(txn)) }

    /// What a view into the map read in this snapshot depends on: the environment, the map's
    /// placement and the last commit. A view (vectors, index sections) read in one snapshot stays
    /// valid in another of the same identity while that one is open: its pages are reachable from
    /// the last commit, so no writer can reuse them, and the map has not moved.
    /// Inside the write transaction views may point at dirty pages freed at commit: their identity
    /// (a negative generation) matches no snapshot.
    public var mapIdentity: MapIdentity {
        MapIdentity(environment: environment.serial, mapEpoch: environment.mapEpoch,
                    generation: insideWrite ? -generation : generation)
    }

    /// The value stored under `key`, as a buffer pointing into the memory map, or nil.
    /// The buffer is valid only while this transaction is open.
    public func get(_ dbi: MDB_dbi, _ key: [UInt8]) throws -> UnsafeRawBufferPointer? {
        var k = MDB_val()
        var v = MDB_val()
        return try key.withUnsafeBytes { kb -> UnsafeRawBufferPointer? in
            k.mv_size = kb.count
            k.mv_data = UnsafeMutableRawPointer(mutating: kb.baseAddress)
            let rc = mdb_get(txn, dbi, &k, &v)
            if rc == MDB_NOTFOUND { return nil }
            try check(rc, "mdb_get", path: environment.path)
            return UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size)
        }
    }

    /// Visits, in key order, every entry whose key starts with `prefix` (from the first at or after
    /// `start`, when given); `body` returns false to stop.
    public func scan(_ dbi: MDB_dbi, prefix: [UInt8], from start: [UInt8]? = nil,
                     _ body: (UnsafeRawBufferPointer, UnsafeRawBufferPointer) throws -> Bool) throws {
        let seek = start ?? prefix
        var cursor: OpaquePointer?
        try check(mdb_cursor_open(txn, dbi, &cursor), "mdb_cursor_open", path: environment.path)
        defer { mdb_cursor_close(cursor) }
        var k = MDB_val()
        var v = MDB_val()
        var rc: Int32 = seek.withUnsafeBytes { pb in
            k.mv_size = pb.count
            k.mv_data = UnsafeMutableRawPointer(mutating: pb.baseAddress)
            return seek.isEmpty ? mdb_cursor_get(cursor, &k, &v, MDB_FIRST)
                                  : mdb_cursor_get(cursor, &k, &v, MDB_SET_RANGE)
        }
        while rc == MDB_SUCCESS {
            let key = UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size)
            guard key.count >= prefix.count, zip(key, prefix).allSatisfy({ $0 == $1 }) else { return }
            if try !body(key, UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size)) { return }
            rc = mdb_cursor_get(cursor, &k, &v, MDB_NEXT)
        }
        if rc != MDB_NOTFOUND { try check(rc, "mdb_cursor_get", path: environment.path) }
    }
}

/// The single write transaction. Valid only inside `Environment.write`.
public struct WriteTransaction {
    let txn: OpaquePointer
    unowned let environment: Environment

    init(_ txn: OpaquePointer, environment: Environment) {
        self.txn = txn
        self.environment = environment
    }

    /// Reads see this transaction's own uncommitted writes.
    public var reader: ReadTransaction { ReadTransaction(txn, environment: environment, insideWrite: true) }

    public func put(_ dbi: MDB_dbi, _ key: [UInt8], _ value: UnsafeRawBufferPointer, append: Bool = false) throws {
        var k = MDB_val()
        var v = MDB_val(mv_size: value.count, mv_data: UnsafeMutableRawPointer(mutating: value.baseAddress))
        try key.withUnsafeBytes { kb in
            k.mv_size = kb.count
            k.mv_data = UnsafeMutableRawPointer(mutating: kb.baseAddress)
            try check(mdb_put(txn, dbi, &k, &v, append ? UInt32(MDB_APPEND) : 0), "mdb_put", path: environment.path)
        }
    }

    public func put(_ dbi: MDB_dbi, _ key: [UInt8], _ value: [UInt8], append: Bool = false) throws {
        try value.withUnsafeBytes { try put(dbi, key, $0, append: append) }
    }

    /// Reserves `count` bytes under `key` and lets `fill` write them in place (no extra copy).
    public func reserve(_ dbi: MDB_dbi, _ key: [UInt8], count: Int,
                        _ fill: (UnsafeMutableRawBufferPointer) throws -> Void) throws {
        var k = MDB_val()
        var v = MDB_val(mv_size: count, mv_data: nil)
        try key.withUnsafeBytes { kb in
            k.mv_size = kb.count
            k.mv_data = UnsafeMutableRawPointer(mutating: kb.baseAddress)
            try check(mdb_put(txn, dbi, &k, &v, UInt32(MDB_RESERVE)), "mdb_put (reserve)", path: environment.path)
        }
        try fill(UnsafeMutableRawBufferPointer(start: v.mv_data, count: count))
    }

    @discardableResult
    public func delete(_ dbi: MDB_dbi, _ key: [UInt8]) throws -> Bool {
        var k = MDB_val()
        return try key.withUnsafeBytes { kb in
            k.mv_size = kb.count
            k.mv_data = UnsafeMutableRawPointer(mutating: kb.baseAddress)
            let rc = mdb_del(txn, dbi, &k, nil)
            if rc == MDB_NOTFOUND { return false }
            try check(rc, "mdb_del", path: environment.path)
            return true
        }
    }

    /// Deletes every entry whose key starts with `prefix`; returns how many.
    @discardableResult
    public func deletePrefix(_ dbi: MDB_dbi, _ prefix: [UInt8]) throws -> Int {
        var keys: [[UInt8]] = []
        try reader.scan(dbi, prefix: prefix) { key, _ in keys.append(Array(key)); return true }
        for key in keys { try delete(dbi, key) }
        return keys.count
    }
}
