import CLMDB
#if canImport(Glibc)
import Glibc
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
#endif

/// The one error type of the storage layer: what went wrong, the LMDB (or errno) code behind it,
/// and where — the store path and the head — when known.
public struct StoreError: Error, CustomStringConvertible, Equatable, Sendable {
    public enum Kind: String, Sendable {
        case lmdb              // an LMDB call failed; `code` is its return code
        case notAStore         // the directory holds no KVRecall store, or a foreign LMDB file
        case unsupportedVersion
        case headNotFound
        case headExists
        case shapeMismatch     // dimension, dtype or row count disagrees with the head
        case nonFinite         // NaN or Inf in input vectors
        case outOfRange        // a finite input value beyond the head's dtype (f16: |x| > 65504)
        case invalidArgument
        case mapFull           // the map is full and growth is disabled or at its limit
        case readOnly
        case corrupt           // a record that cannot be decoded
        case io
        case inUse             // the store is open elsewhere in this process, or the head has a writer
    }

    public let kind: Kind
    /// LMDB return code or errno; 0 when the error did not come from a C call.
    public let code: Int32
    public let message: String
    public var path: String?
    public var head: HeadID?

    public init(_ kind: Kind, code: Int32 = 0, _ message: String, path: String? = nil, head: HeadID? = nil) {
        self.kind = kind
        self.code = code
        self.message = message
        self.path = path
        self.head = head
    }

    /// An error from an LMDB return code, with LMDB's own message.
    static func lmdb(_ code: Int32, _ operation: String, path: String? = nil, head: HeadID? = nil) -> StoreError {
        let text = String(cString: mdb_strerror(code))
        let kind: Kind
        switch code {
        case MDB_MAP_FULL: kind = .mapFull
        case EACCES, EROFS: kind = .readOnly
        case MDB_INVALID, MDB_VERSION_MISMATCH: kind = .notAStore
        case MDB_CORRUPTED, MDB_PAGE_NOTFOUND: kind = .corrupt
        default: kind = .lmdb
        }
        return StoreError(kind, code: code, "\(operation): \(text)", path: path, head: head)
    }

    public var description: String {
        var where_ = ""
        if let path { where_ += path }
        if let head { where_ += (where_.isEmpty ? "" : " ") + "head \(head)" }
        let codeText = code != 0 ? " (code \(code))" : ""
        return where_.isEmpty ? "\(message)\(codeText)" : "\(where_): \(message)\(codeText)"
    }
}

/// Throws `StoreError.lmdb` unless `rc` is `MDB_SUCCESS`.
@inline(__always)
func check(_ rc: Int32, _ operation: @autoclosure () -> String, path: String? = nil) throws {
    if rc != MDB_SUCCESS { throw StoreError.lmdb(rc, operation(), path: path) }
}
