import Foundation
#if canImport(Glibc)
import Glibc
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
#endif

/// The write lease of some heads of a store (see `KVStore.lockHeads`): one byte per head of
/// `writers.lock` in the store directory, locked with an open-file-description lock (Linux
/// `F_OFD_SETLK`; whole-file `flock` elsewhere). Such locks belong to this open file, so two
/// writers in one process conflict just like two processes, and the kernel releases them when
/// the holder exits or is killed: a crashed ingest never leaves a head locked.
public final class HeadWriterLock: @unchecked Sendable {
    public let heads: [HeadID]
    private var descriptor: Int32

    init(store: String, heads: [HeadID]) throws {
        self.heads = heads
        let file = store + "/writers.lock"
        descriptor = open(file, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard descriptor >= 0 else {
            let code = errno
            throw StoreError(code == EACCES || code == EROFS ? .readOnly : .io, code: code,
                             "cannot open writers.lock, which serialises writers of a head: \(String(cString: strerror(code)))",
                             path: store)
        }
        #if os(Linux)
        for id in heads {
            var range = flock()
            range.l_type = Int16(F_WRLCK)
            range.l_whence = Int16(SEEK_SET)
            range.l_start = HeadWriterLock.offset(id)
            range.l_len = 1
            if fcntl(descriptor, 37 /* F_OFD_SETLK */, &range) != 0 {
                let code = errno
                release()
                if code == EAGAIN || code == EACCES {
                    throw StoreError(.inUse, "the head is being written by another ingest or session (one writer per head; wait for it to finish)",
                                     path: store, head: id)
                }
                throw StoreError(.io, code: code, "cannot lock head \(id) in writers.lock: \(String(cString: strerror(code)))",
                                 path: store, head: id)
            }
        }
        #else
        if flock(descriptor, LOCK_EX | LOCK_NB) != 0 {
            release()
            throw StoreError(.inUse, "the store is being written by another ingest or session (one writer at a time)", path: store)
        }
        #endif
    }

    /// The byte of `writers.lock` that stands for a head (contexts past 2^31 share bytes with
    /// lower ones: such writers are serialised, never allowed to interleave).
    static func offset(_ id: HeadID) -> off_t {
        off_t(id.context & 0x7FFF_FFFF) << 32 | off_t(id.layer) << 16 | off_t(id.head)
    }

    /// Releases the lease (also done when the lock is deallocated).
    public func release() {
        if descriptor >= 0 { _ = Glibc.close(descriptor) }
        descriptor = -1
    }

    deinit { release() }
}
