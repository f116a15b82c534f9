import CKernels

/// Evicts the last-level cache by reading a buffer twice or more its size, touching every line:
/// what a decoder's other layers do to a head's keys, values and codes between two of its steps.
/// Timing a method right after an eviction measures it as a decode step meets it (a method whose
/// bytes fit in the cache would otherwise look cheaper than it is when timed over and over).
public final class CacheEvictor: @unchecked Sendable {
    /// Bytes read per eviction (96 MB: three times this machine's 32 MB L3).
    public let bytes: Int
    private let buffer: UnsafeMutableRawPointer

    public init(bytes: Int = 96 << 20) {
        self.bytes = bytes
        buffer = .allocate(byteCount: bytes, alignment: 64)
        buffer.initializeMemory(as: UInt8.self, repeating: 1, count: bytes)
    }

    deinit { buffer.deallocate() }

    public func evict() { _ = kvr_read_bytes(buffer, bytes) }
}
