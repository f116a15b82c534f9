import Foundation
import KVRecall
import KVRecallABI

// The C ABI (include/kvrecall.h). Every entry point catches every Swift error and turns it into a
// status code plus a per-thread message; handles are looked up in a registry before use, so a
// closed or foreign handle is refused rather than dereferenced.

/// Live sessions by handle address.
private final class Registry: @unchecked Sendable {
    private let lock = NSLock()
    private var sessions: [UnsafeMutableRawPointer: KVSession] = [:]

    func insert(_ session: KVSession) -> UnsafeMutableRawPointer {
        let handle = UnsafeMutableRawPointer.allocate(byteCount: 1, alignment: 1)
        lock.lock(); sessions[handle] = session; lock.unlock()
        return handle
    }

    func session(_ handle: OpaquePointer?) -> KVSession? {
        guard let handle else { return nil }
        lock.lock(); defer { lock.unlock() }
        return sessions[UnsafeMutableRawPointer(handle)]
    }

    func remove(_ handle: OpaquePointer?) -> KVSession? {
        guard let handle else { return nil }
        let key = UnsafeMutableRawPointer(handle)
        lock.lock()
        let session = sessions.removeValue(forKey: key)
        lock.unlock()
        if session != nil { key.deallocate() }
        return session
    }
}

private let registry = Registry()

/// The calling thread's last error message, kept as a C string owned by the thread.
private final class LastError: @unchecked Sendable {
    let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { free($0) }
        return key
    }()

    func set(_ message: String) {
        if let old = pthread_getspecific(key) { free(old) }
        pthread_setspecific(key, strdup(message))
    }

    var current: UnsafePointer<CChar> {
        if let p = pthread_getspecific(key) { return UnsafePointer(p.assumingMemoryBound(to: CChar.self)) }
        set("")
        return UnsafePointer(pthread_getspecific(key)!.assumingMemoryBound(to: CChar.self))
    }
}

private let lastError = LastError()

/// Runs `body`, mapping errors to status codes and recording their message.
private func guarded(_ body: () throws -> Void) -> Int32 {
    do {
        try body()
        lastError.set("")
        return Int32(KVRECALL_OK.rawValue)
    } catch let error as ABIError {
        lastError.set(error.message)
        return Int32(error.status.rawValue)
    } catch let error as SessionError {
        lastError.set(error.description)
        switch error {
        case .invalidArgument: return Int32(KVRECALL_ERR_ARGUMENT.rawValue)
        case .wrongOrder: return Int32(KVRECALL_ERR_ORDER.rawValue)
        case .unknownLayer: return Int32(KVRECALL_ERR_LAYER.rawValue)
        }
    } catch let error as StoreError {
        lastError.set(error.description)
        return Int32(KVRECALL_ERR_STORE.rawValue)
    } catch let error as IndexError {
        lastError.set(error.description)
        return Int32(KVRECALL_ERR_INDEX.rawValue)
    } catch {
        lastError.set("\(error)")
        return Int32(KVRECALL_ERR_INTERNAL.rawValue)
    }
}

private struct ABIError: Error {
    let status: kvrecall_status
    let message: String
    init(_ status: kvrecall_status, _ message: String) {
        self.status = status
        self.message = message
    }
}

private func session(_ handle: OpaquePointer?, _ function: String) throws -> KVSession {
    guard handle != nil else { throw ABIError(KVRECALL_ERR_NULL, "\(function): session is NULL") }
    guard let s = registry.session(handle) else {
        throw ABIError(KVRECALL_ERR_HANDLE, "\(function): unknown or closed session handle")
    }
    return s
}

private func layerIndex(_ layer: UInt32, _ s: KVSession) throws -> Int {
    guard Int(layer) < s.configuration.layers else {
        throw ABIError(KVRECALL_ERR_LAYER, "layer \(layer) does not exist (the session has \(s.configuration.layers) layers)")
    }
    return Int(layer)
}

private let methods: [Int32: AttentionMethod] = [
    0: .exact, 1: .retrieval, 2: .hip, 3: .landmark, 4: .hnsw, 5: .ivf, 6: .lsh, 7: .tree, 8: .estimate,
]

private let dtypes: [Int32: DType] = [0: .f32, 1: .f16, 2: .bf16]

/// The C defaults are `SessionConfiguration`'s, so they are written once, in the library.
@_cdecl("kvrecall_config_default")
public func kvrecall_config_default(_ config: UnsafeMutablePointer<kvrecall_config>?, _ layers: UInt32, _ kvHeads: UInt32,
                                    _ queryHeadsPerKV: UInt32, _ headDim: UInt32) {
    guard let config else { return }
    let defaults = SessionConfiguration(layers: Int(layers), kvHeads: Int(kvHeads), queryHeadsPerKV: Int(queryHeadsPerKV),
                                        headDimension: Int(headDim))
    var c = kvrecall_config()
    c.struct_size = MemoryLayout<kvrecall_config>.size
    c.layers = layers
    c.kv_heads = kvHeads
    c.query_heads_per_kv = queryHeadsPerKV
    c.head_dim = headDim
    c.dtype = dtypes.first { $0.value == defaults.dtype }!.key
    c.method = methods.first { $0.value == defaults.attentionMethod }!.key
    c.k = UInt32(defaults.k)
    c.sinks = UInt32(defaults.sinks)
    c.window = UInt32(defaults.window)
    c.ef = UInt32(defaults.ef)
    c.nprobe = UInt32(defaults.nprobe)
    config.pointee = c
}

@_cdecl("kvrecall_session_open")
public func kvrecall_session_open(_ config: UnsafePointer<kvrecall_config>?, _ directory: UnsafePointer<CChar>?,
                                  _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        guard let config, let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_open: config and out must not be NULL") }
        out.pointee = nil
        let c = config.pointee
        guard c.struct_size == MemoryLayout<kvrecall_config>.size else {
            throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.struct_size is \(c.struct_size), this library expects \(MemoryLayout<kvrecall_config>.size): header mismatch or unset (use kvrecall_config_default)")
        }
        guard let method = methods[c.method] else { throw ABIError(KVRECALL_ERR_ARGUMENT, "unknown method \(c.method)") }
        guard let dtype = dtypes[c.dtype] else { throw ABIError(KVRECALL_ERR_ARGUMENT, "unknown dtype \(c.dtype)") }
        let configuration = SessionConfiguration(
            layers: Int(c.layers), kvHeads: Int(c.kv_heads), queryHeadsPerKV: Int(c.query_heads_per_kv),
            headDimension: Int(c.head_dim), dtype: dtype, method: method, k: Int(c.k), sinks: Int(c.sinks),
            window: Int(c.window), ef: Int(c.ef), nprobe: Int(c.nprobe))
        let s = try KVSession(configuration: configuration, directory: directory.map { String(cString: $0) })
        out.pointee = OpaquePointer(registry.insert(s))
    }
}

@_cdecl("kvrecall_session_resume")
public func kvrecall_session_resume(_ directory: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        guard let directory, let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_resume: directory and out must not be NULL") }
        out.pointee = nil
        let s = try KVSession(resuming: String(cString: directory))
        out.pointee = OpaquePointer(registry.insert(s))
    }
}

@_cdecl("kvrecall_session_append")
public func kvrecall_session_append(_ handle: OpaquePointer?, _ layer: UInt32, _ keys: UnsafePointer<Float>?,
                                    _ values: UnsafePointer<Float>?, _ tokens: Int) -> Int32 {
    guarded {
        let s = try session(handle, "kvrecall_session_append")
        let l = try layerIndex(layer, s)
        guard let keys, let values else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_append: keys and values must not be NULL") }
        guard tokens > 0, tokens <= 1 << 24 else { throw ABIError(KVRECALL_ERR_ARGUMENT, "tokens must be in 1...16777216 (got \(tokens))") }
        let n = tokens * s.configuration.kvHeads * s.configuration.headDimension
        try s.append(layer: l, keys: UnsafeBufferPointer(start: keys, count: n), values: UnsafeBufferPointer(start: values, count: n))
    }
}

@_cdecl("kvrecall_session_prefill_queries")
public func kvrecall_session_prefill_queries(_ handle: OpaquePointer?, _ layer: UInt32, _ queries: UnsafePointer<Float>?,
                                             _ tokens: Int) -> Int32 {
    guarded {
        let s = try session(handle, "kvrecall_session_prefill_queries")
        let l = try layerIndex(layer, s)
        guard let queries else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_prefill_queries: queries must not be NULL") }
        guard tokens > 0, tokens <= 1 << 24 else { throw ABIError(KVRECALL_ERR_ARGUMENT, "tokens must be in 1...16777216 (got \(tokens))") }
        let n = tokens * s.configuration.kvHeads * s.configuration.headDimension
        try s.appendPrefillQueries(layer: l, queries: UnsafeBufferPointer(start: queries, count: n))
    }
}

@_cdecl("kvrecall_session_build_indexes")
public func kvrecall_session_build_indexes(_ handle: OpaquePointer?) -> Int32 {
    guarded {
        let s = try session(handle, "kvrecall_session_build_indexes")
        for layer in 0..<s.configuration.layers where try s.length(layer: layer) == 0 {
            throw ABIError(KVRECALL_ERR_ORDER, "kvrecall_session_build_indexes: layer \(layer) has no keys yet; append the prompt first")
        }
        try s.buildIndexes()
    }
}

@_cdecl("kvrecall_session_attend")
public func kvrecall_session_attend(_ handle: OpaquePointer?, _ layer: UInt32, _ queries: UnsafePointer<Float>?,
                                    _ out: UnsafeMutablePointer<Float>?, _ outFloats: Int) -> Int32 {
    guarded {
        let s = try session(handle, "kvrecall_session_attend")
        let l = try layerIndex(layer, s)
        guard let queries, let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_attend: queries and out must not be NULL") }
        let c = s.configuration
        let n = c.kvHeads * c.queryHeadsPerKV * c.headDimension
        guard outFloats == n else {
            throw ABIError(KVRECALL_ERR_ARGUMENT, "out holds \(outFloats) floats; this session needs kv_heads * query_heads_per_kv * head_dim = \(n)")
        }
        guard try s.length(layer: l) > 0 else {
            throw ABIError(KVRECALL_ERR_ORDER, "kvrecall_session_attend: layer \(l) is empty; append keys and values first")
        }
        let result = try s.attend(layer: l, queries: UnsafeBufferPointer(start: queries, count: n))
        result.withUnsafeBufferPointer { out.update(from: $0.baseAddress!, count: n) }
    }
}

@_cdecl("kvrecall_session_length")
public func kvrecall_session_length(_ handle: OpaquePointer?, _ layer: UInt32, _ out: UnsafeMutablePointer<Int>?) -> Int32 {
    guarded {
        let s = try session(handle, "kvrecall_session_length")
        let l = try layerIndex(layer, s)
        guard let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_length: out must not be NULL") }
        out.pointee = try s.length(layer: l)
    }
}

@_cdecl("kvrecall_session_checkpoint")
public func kvrecall_session_checkpoint(_ handle: OpaquePointer?) -> Int32 {
    guarded { try session(handle, "kvrecall_session_checkpoint").checkpoint() }
}

@_cdecl("kvrecall_session_close")
public func kvrecall_session_close(_ handle: OpaquePointer?) {
    registry.remove(handle)?.close()
}

@_cdecl("kvrecall_last_error")
public func kvrecall_last_error() -> UnsafePointer<CChar> { lastError.current }
