import CKernels
import Foundation
import KVRecall
import KVRecallABI

// The C ABI, version 2 (include/kvrecall.h). Every entry point catches every Swift error and
// turns it into a status code plus a per-thread message; handles are ids looked up in a
// registry, never pointers, and an id is never handed out twice.

/// One open session behind a handle: its calls are serialised by `lock`.
private final class SessionEntry: @unchecked Sendable {
    let session: KVSession
    let lock = NSLock()
    var closed = false
    init(_ session: KVSession) { self.session = session }
}

/// Live sessions by handle id. Ids count up from a tag in the high bits (an address no process
/// maps on 64-bit Linux), so a stale handle can neither alias a later session nor be mistaken
/// for memory.
private final class Registry: @unchecked Sendable {
    private let lock = NSLock()
    private var entries: [UInt: SessionEntry] = [:]
    private var next: UInt = 0
    static let tag: UInt = MemoryLayout<UInt>.size == 8 ? 0x4B56_0000_0000_0000 : 0x4000_0000

    func insert(_ session: KVSession) -> OpaquePointer {
        lock.lock(); defer { lock.unlock() }
        next += 1
        let id = Registry.tag | next
        entries[id] = SessionEntry(session)
        return OpaquePointer(bitPattern: id)!
    }

    func entry(_ handle: OpaquePointer?) -> SessionEntry? {
        guard let handle else { return nil }
        lock.lock(); defer { lock.unlock() }
        return entries[UInt(bitPattern: handle)]
    }

    func remove(_ handle: OpaquePointer?) -> SessionEntry? {
        guard let handle else { return nil }
        lock.lock(); defer { lock.unlock() }
        return entries.removeValue(forKey: UInt(bitPattern: handle))
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

/// The process-wide log callback.
private final class Logger: @unchecked Sendable {
    private let lock = NSLock()
    private var callback: kvrecall_log_callback?
    private var userData: UnsafeMutableRawPointer?

    func set(_ callback: kvrecall_log_callback?, _ userData: UnsafeMutableRawPointer?) {
        lock.lock(); self.callback = callback; self.userData = userData; lock.unlock()
    }

    func log(_ level: kvrecall_log_level, _ message: String) {
        lock.lock()
        let (callback, userData) = (self.callback, self.userData)
        lock.unlock()
        guard let callback else { return }
        message.withCString { callback(Int32(level.rawValue), $0, userData) }
    }
}

private let logger = Logger()

private struct ABIError: Error {
    let status: kvrecall_status
    let message: String
    init(_ status: kvrecall_status, _ message: String) {
        self.status = status
        self.message = message
    }
}

/// The status code and message of any error the library throws.
private func classify(_ error: Error) -> (kvrecall_status, String) {
    switch error {
    case let e as ABIError: return (e.status, e.message)
    case let e as SessionError:
        switch e {
        case .invalidArgument: return (KVRECALL_ERR_ARGUMENT, e.description)
        case .wrongOrder: return (KVRECALL_ERR_ORDER, e.description)
        case .unknownLayer: return (KVRECALL_ERR_LAYER, e.description)
        }
    case let e as StoreError: return (e.kind == .inUse ? KVRECALL_ERR_BUSY : KVRECALL_ERR_STORE, e.description)
    case let e as IndexError:
        if case .invalidParameter = e { return (KVRECALL_ERR_ARGUMENT, e.description) }
        return (KVRECALL_ERR_INDEX, e.description)
    default: return (KVRECALL_ERR_INTERNAL, "\(error)")
    }
}

/// Runs `body`, mapping errors to status codes, recording their message and logging it.
private func guarded(_ function: String, _ body: () throws -> Void) -> Int32 {
    do {
        try body()
        lastError.set("")
        return Int32(KVRECALL_OK.rawValue)
    } catch {
        let (status, message) = classify(error)
        lastError.set(message)
        logger.log(KVRECALL_LOG_ERROR, "\(function): \(message)")
        return Int32(status.rawValue)
    }
}

/// Runs `body` with the session behind `handle`, holding its lock (calls on one session are serialised).
private func withSession<T>(_ handle: OpaquePointer?, _ function: String, _ body: (KVSession) throws -> T) throws -> T {
    guard handle != nil else { throw ABIError(KVRECALL_ERR_NULL, "\(function): session is NULL") }
    guard let entry = registry.entry(handle) else {
        throw ABIError(KVRECALL_ERR_HANDLE, "\(function): unknown or closed session handle")
    }
    entry.lock.lock()
    defer { entry.lock.unlock() }
    guard !entry.closed else { throw ABIError(KVRECALL_ERR_HANDLE, "\(function): unknown or closed session handle") }
    return try body(entry.session)
}

private func layerIndex(_ layer: UInt32, _ s: KVSession) throws -> Int {
    guard Int(layer) < s.configuration.layers else {
        throw ABIError(KVRECALL_ERR_LAYER, "layer \(layer) does not exist (the session has \(s.configuration.layers) layers)")
    }
    return Int(layer)
}

/// The method of a `kvrecall_method` value (`AttentionMethod.table` holds the C values).
private func method(_ number: Int32) throws -> AttentionMethod {
    guard let m = AttentionMethod(cValue: number) else {
        let values = AttentionMethod.table.map { "\($0.cValue) \($0.method.rawValue)" }.joined(separator: ", ")
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.method \(number) is not a kvrecall_method (\(values))")
    }
    return m
}

/// Each method's name as a C string that lives as long as the library, by C value.
private let methodNameStrings: [Int32: UnsafePointer<CChar>] = Dictionary(uniqueKeysWithValues:
    AttentionMethod.table.map { ($0.cValue, UnsafePointer(strdup($0.method.rawValue)!)) })

@_cdecl("kvrecall_method_name")
public func kvrecall_method_name(_ method: Int32) -> UnsafePointer<CChar>? { methodNameStrings[method] }

private let dtypes: [DType] = [.f32, .f16, .bf16]

/// Size of the version-1 `kvrecall_config` (up to `nprobe`, padded), still accepted.
private let configV1Size = (MemoryLayout<kvrecall_config>.offset(of: \kvrecall_config.scale)! + 7) / 8 * 8

/// Size of the first ABI-2 `kvrecall_config` (before `budget_mass`), still accepted.
private let configV2Size = (MemoryLayout<kvrecall_config>.offset(of: \kvrecall_config.budget_mass)! + 7) / 8 * 8

/// Size of the second ABI-2 `kvrecall_config` (before `refresh_fraction`), still accepted.
private let configV2bSize = (MemoryLayout<kvrecall_config>.offset(of: \kvrecall_config.refresh_fraction)! + 7) / 8 * 8

/// Size of the third ABI-2 `kvrecall_config` (before `target_error`), still accepted.
private let configV2cSize = (MemoryLayout<kvrecall_config>.offset(of: \kvrecall_config.target_error)! + 7) / 8 * 8

/// Every accepted `struct_size` of `kvrecall_config`.
private var configSizes: Set<Int> { [MemoryLayout<kvrecall_config>.size, configV2cSize, configV2bSize, configV2Size, configV1Size] }

/// Copies a caller's config of any ABI version into a full one (later fields zero: those
/// versions' behaviour, e.g. a fixed k).
private func readConfig(_ config: UnsafePointer<kvrecall_config>) throws -> kvrecall_config {
    let size = UnsafeRawPointer(config).load(as: Int.self)
    guard configSizes.contains(size) else {
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.struct_size is \(size), this library expects \(MemoryLayout<kvrecall_config>.size) (ABI 2), \(configV2cSize) (ABI 2 before target_error), \(configV2bSize) (ABI 2 before refresh_fraction), \(configV2Size) (ABI 2 before budget_mass) or \(configV1Size) (ABI 1): header mismatch or unset (use kvrecall_config_default)")
    }
    var c = kvrecall_config()
    withUnsafeMutableBytes(of: &c) { $0.copyMemory(from: UnsafeRawBufferPointer(start: config, count: size)) }
    return c
}

private func configuration(_ c: kvrecall_config) throws -> SessionConfiguration {
    guard c.dtype >= 0, Int(c.dtype) < dtypes.count else {
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.dtype \(c.dtype) is not a kvrecall_dtype (0...2)")
    }
    guard c.scale.isFinite, c.scale >= 0 else {
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.scale must be finite and positive, or 0 for 1/sqrt(head_dim) (got \(c.scale))")
    }
    guard c.soft_cap.isFinite, c.soft_cap >= 0 else {
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.soft_cap must be finite and positive, or 0 for none (got \(c.soft_cap))")
    }
    guard c.budget_mass.isFinite, c.budget_mass >= 0, c.budget_mass <= 1 else {
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.budget_mass must be in (0, 1], or 0 for a fixed k (got \(c.budget_mass))")
    }
    var s = SessionConfiguration(
        layers: Int(c.layers), kvHeads: Int(c.kv_heads), queryHeadsPerKV: Int(c.query_heads_per_kv),
        headDimension: Int(c.head_dim), dtype: dtypes[Int(c.dtype)], method: try method(c.method), k: Int(c.k),
        sinks: Int(c.sinks), window: Int(c.window), ef: c.ef == 0 ? nil : Int(c.ef), nprobe: c.nprobe == 0 ? nil : Int(c.nprobe),
        budgetMass: c.budget_mass == 0 ? nil : (Double(c.budget_mass) * 1e6).rounded() / 1e6)
    s.scale = c.scale == 0 ? nil : c.scale
    s.softCap = c.soft_cap == 0 ? nil : c.soft_cap
    guard c.refresh_fraction.isFinite else {
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.refresh_fraction must be finite: positive, 0 for the default, negative for never (got \(c.refresh_fraction))")
    }
    s.refreshFraction = c.refresh_fraction == 0 ? SessionConfiguration.defaultRefreshFraction
        : c.refresh_fraction < 0 ? nil : c.refresh_fraction
    guard c.target_error.isFinite, c.target_error >= 0 else {
        throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.target_error must be finite and positive, or 0 for the default (got \(c.target_error))")
    }
    if c.target_error > 0 { s.targetError = c.target_error }
    return s
}

private func threadCount(_ requested: UInt32) -> Int {
    requested == 0 ? ProcessInfo.processInfo.activeProcessorCount : Int(requested)
}

@_cdecl("kvrecall_version")
public func kvrecall_version() -> UnsafePointer<CChar> { versionString }
private let versionString: UnsafePointer<CChar> = UnsafePointer(strdup(KVRecallVersion.string)!)

@_cdecl("kvrecall_abi_version")
public func kvrecall_abi_version() -> Int32 { Int32(KVRecallVersion.abi) }

@_cdecl("kvrecall_set_log_callback")
public func kvrecall_set_log_callback(_ callback: kvrecall_log_callback?, _ userData: UnsafeMutableRawPointer?) {
    logger.set(callback, userData)
}

/// The C defaults are `SessionConfiguration`'s, so they are written once, in the library.
@_cdecl("kvrecall_config_default")
public func kvrecall_config_default(_ config: UnsafeMutablePointer<kvrecall_config>?, _ layers: UInt32, _ kvHeads: UInt32,
                                    _ queryHeadsPerKV: UInt32, _ headDim: UInt32) {
    guard let config else { return }
    let defaults = SessionConfiguration(layers: Int(layers), kvHeads: Int(kvHeads), queryHeadsPerKV: Int(queryHeadsPerKV),
                                        headDimension: Int(headDim))
    config.pointee = cConfig(defaults, threads: 0)
}

private func cConfig(_ s: SessionConfiguration, threads: UInt32) -> kvrecall_config {
    var c = kvrecall_config()
    c.struct_size = MemoryLayout<kvrecall_config>.size
    c.layers = UInt32(s.layers)
    c.kv_heads = UInt32(s.kvHeads)
    c.query_heads_per_kv = UInt32(s.queryHeadsPerKV)
    c.head_dim = UInt32(s.headDimension)
    c.dtype = Int32(dtypes.firstIndex(of: s.dtype)!)
    c.method = s.method.entry.cValue
    c.k = UInt32(s.k)
    c.sinks = UInt32(s.sinks)
    c.window = UInt32(s.window)
    c.ef = UInt32(s.ef ?? 0)  // 0: calibrated at build
    c.nprobe = UInt32(s.nprobe ?? 0)
    c.scale = s.scale ?? 0
    c.soft_cap = s.softCap ?? 0
    c.threads = threads
    c.budget_mass = Float(s.budgetMass ?? 0)
    c.refresh_fraction = s.refreshFraction ?? -1
    c.target_error = s.targetError
    return c
}

@_cdecl("kvrecall_session_open")
public func kvrecall_session_open(_ config: UnsafePointer<kvrecall_config>?, _ directory: UnsafePointer<CChar>?,
                                  _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded("kvrecall_session_open") {
        guard let config, let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_open: config and out must not be NULL") }
        out.pointee = nil
        let c = try readConfig(config)
        let s = try KVSession(configuration: try configuration(c), directory: directory.map { String(cString: $0) })
        s.threads = threadCount(c.threads)
        out.pointee = registry.insert(s)
    }
}

@_cdecl("kvrecall_session_resume")
public func kvrecall_session_resume(_ directory: UnsafePointer<CChar>?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    kvrecall_session_resume_ex(directory, nil, out)
}

@_cdecl("kvrecall_session_resume_ex")
public func kvrecall_session_resume_ex(_ directory: UnsafePointer<CChar>?, _ info: UnsafeMutablePointer<kvrecall_resume_info>?,
                                       _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded("kvrecall_session_resume") {
        guard let directory, let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_resume: directory and out must not be NULL") }
        out.pointee = nil
        if let info, info.pointee.struct_size != MemoryLayout<kvrecall_resume_info>.size {
            throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_resume_info.struct_size is \(info.pointee.struct_size), this library expects \(MemoryLayout<kvrecall_resume_info>.size)")
        }
        let path = String(cString: directory)
        let s = try KVSession(resuming: path)
        if let report = s.resumeReport {
            let cut = report.longest > report.tokens || report.indexesRebuilt > 0 || report.indexesMissing > 0
            logger.log(cut ? KVRECALL_LOG_WARN : KVRECALL_LOG_INFO, "\(path): \(report.description)")
            if let info {
                info.pointee.tokens = report.tokens
                info.pointee.longest = report.longest
                info.pointee.indexes_loaded = UInt32(report.indexesLoaded)
                info.pointee.indexes_rebuilt = UInt32(report.indexesRebuilt)
                info.pointee.indexes_missing = UInt32(report.indexesMissing)
            }
        }
        out.pointee = registry.insert(s)
    }
}

@_cdecl("kvrecall_session_get_config")
public func kvrecall_session_get_config(_ handle: OpaquePointer?, _ out: UnsafeMutablePointer<kvrecall_config>?) -> Int32 {
    guarded("kvrecall_session_get_config") {
        try withSession(handle, "kvrecall_session_get_config") { s in
            guard let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_get_config: out must not be NULL") }
            let size = UnsafeRawPointer(out).load(as: Int.self)
            guard configSizes.contains(size) else {
                throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_config.struct_size is \(size); set it to sizeof(kvrecall_config) (\(MemoryLayout<kvrecall_config>.size))")
            }
            var c = cConfig(s.configuration, threads: UInt32(s.threads))
            c.struct_size = size
            withUnsafeBytes(of: &c) { UnsafeMutableRawPointer(out).copyMemory(from: $0.baseAddress!, byteCount: size) }
        }
    }
}

private func tokenCount(_ tokens: Int) throws {
    guard tokens > 0, tokens <= 1 << 24 else { throw ABIError(KVRECALL_ERR_ARGUMENT, "tokens must be in 1...16777216 (got \(tokens))") }
}

@_cdecl("kvrecall_session_append")
public func kvrecall_session_append(_ handle: OpaquePointer?, _ layer: UInt32, _ keys: UnsafePointer<Float>?,
                                    _ values: UnsafePointer<Float>?, _ tokens: Int) -> Int32 {
    guarded("kvrecall_session_append") {
        try withSession(handle, "kvrecall_session_append") { s in
            let l = try layerIndex(layer, s)
            guard let keys, let values else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_append: keys and values must not be NULL") }
            try tokenCount(tokens)
            let n = tokens * s.configuration.kvHeads * s.configuration.headDimension
            try s.append(layer: l, keys: UnsafeBufferPointer(start: keys, count: n), values: UnsafeBufferPointer(start: values, count: n))
        }
    }
}

/// Appends 16-bit input (`f16` or `bf16` words), converted to float32 first.
private func append16(_ function: String, _ handle: OpaquePointer?, _ layer: UInt32, _ keys: UnsafePointer<UInt16>?,
                      _ values: UnsafePointer<UInt16>?, _ tokens: Int, bf16: Bool) -> Int32 {
    guarded(function) {
        try withSession(handle, function) { s in
            let l = try layerIndex(layer, s)
            guard let keys, let values else { throw ABIError(KVRECALL_ERR_NULL, "\(function): keys and values must not be NULL") }
            try tokenCount(tokens)
            let n = tokens * s.configuration.kvHeads * s.configuration.headDimension
            var k = [Float](repeating: 0, count: n), v = [Float](repeating: 0, count: n)
            k.withUnsafeMutableBufferPointer { bf16 ? kvr_bf16_to_f32(keys, $0.baseAddress!, n) : kvr_f16_to_f32(keys, $0.baseAddress!, n) }
            v.withUnsafeMutableBufferPointer { bf16 ? kvr_bf16_to_f32(values, $0.baseAddress!, n) : kvr_f16_to_f32(values, $0.baseAddress!, n) }
            try k.withUnsafeBufferPointer { kb in try v.withUnsafeBufferPointer { vb in try s.append(layer: l, keys: kb, values: vb) } }
        }
    }
}

@_cdecl("kvrecall_session_append_f16")
public func kvrecall_session_append_f16(_ handle: OpaquePointer?, _ layer: UInt32, _ keys: UnsafePointer<UInt16>?,
                                        _ values: UnsafePointer<UInt16>?, _ tokens: Int) -> Int32 {
    append16("kvrecall_session_append_f16", handle, layer, keys, values, tokens, bf16: false)
}

@_cdecl("kvrecall_session_append_bf16")
public func kvrecall_session_append_bf16(_ handle: OpaquePointer?, _ layer: UInt32, _ keys: UnsafePointer<UInt16>?,
                                         _ values: UnsafePointer<UInt16>?, _ tokens: Int) -> Int32 {
    append16("kvrecall_session_append_bf16", handle, layer, keys, values, tokens, bf16: true)
}

@_cdecl("kvrecall_session_prefill_queries")
public func kvrecall_session_prefill_queries(_ handle: OpaquePointer?, _ layer: UInt32, _ queries: UnsafePointer<Float>?,
                                             _ tokens: Int) -> Int32 {
    guarded("kvrecall_session_prefill_queries") {
        try withSession(handle, "kvrecall_session_prefill_queries") { s in
            let l = try layerIndex(layer, s)
            guard let queries else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_prefill_queries: queries must not be NULL") }
            try tokenCount(tokens)
            let n = tokens * s.configuration.kvHeads * s.configuration.headDimension
            try s.appendPrefillQueries(layer: l, queries: UnsafeBufferPointer(start: queries, count: n))
        }
    }
}

@_cdecl("kvrecall_build_params_default")
public func kvrecall_build_params_default(_ params: UnsafeMutablePointer<kvrecall_build_params>?) {
    guard let params else { return }
    let d = IndexBuildParameters()
    var p = kvrecall_build_params()
    p.struct_size = MemoryLayout<kvrecall_build_params>.size
    p.threads = 0
    p.hnsw_m = UInt32(d.M)
    p.ef_construction = UInt32(d.efConstruction)
    p.nlist = UInt32(d.nlist ?? 0)
    p.kmeans_iterations = UInt32(d.iterations)
    p.lsh_tables = UInt32(d.tables)
    p.lsh_bits = UInt32(d.bits)
    p.graph_degree = UInt32(d.graphDegree)
    p.seed = d.seed
    p.progress = nil
    p.user_data = nil
    params.pointee = p
}

@_cdecl("kvrecall_session_build_indexes")
public func kvrecall_session_build_indexes(_ handle: OpaquePointer?) -> Int32 {
    kvrecall_session_build_indexes_ex(handle, nil)
}

@_cdecl("kvrecall_session_build_indexes_ex")
public func kvrecall_session_build_indexes_ex(_ handle: OpaquePointer?, _ params: UnsafePointer<kvrecall_build_params>?) -> Int32 {
    guarded("kvrecall_session_build_indexes") {
        try withSession(handle, "kvrecall_session_build_indexes") { s in
            var p = kvrecall_build_params()
            if let params {
                guard params.pointee.struct_size == MemoryLayout<kvrecall_build_params>.size else {
                    throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_build_params.struct_size is \(params.pointee.struct_size), this library expects \(MemoryLayout<kvrecall_build_params>.size) (use kvrecall_build_params_default)")
                }
                p = params.pointee
            } else {
                kvrecall_build_params_default(&p)
            }
            var build = IndexBuildParameters()
            build.threads = p.threads == 0 ? s.threads : Int(p.threads)
            build.M = Int(p.hnsw_m)
            build.efConstruction = Int(p.ef_construction)
            build.nlist = p.nlist == 0 ? nil : Int(p.nlist)
            build.iterations = Int(p.kmeans_iterations)
            build.tables = Int(p.lsh_tables)
            build.bits = Int(p.lsh_bits)
            build.graphDegree = Int(p.graph_degree)
            build.seed = p.seed
            try build.validate()
            for layer in 0..<s.configuration.layers where try s.length(layer: layer) == 0 {
                throw ABIError(KVRECALL_ERR_ORDER, "kvrecall_session_build_indexes: layer \(layer) has no keys yet; append the prompt first")
            }
            let callback = p.progress, userData = p.user_data
            try s.buildIndexes(parameters: build, progress: callback.map { callback in
                { done, total in
                    if callback(done, total, userData) != 0 {
                        throw ABIError(KVRECALL_ERR_ABORTED, "kvrecall_session_build_indexes: stopped by the progress callback after \(done) of \(total) heads")
                    }
                }
            })
        }
    }
}

@_cdecl("kvrecall_session_attend")
public func kvrecall_session_attend(_ handle: OpaquePointer?, _ layer: UInt32, _ queries: UnsafePointer<Float>?,
                                    _ out: UnsafeMutablePointer<Float>?, _ outFloats: Int) -> Int32 {
    kvrecall_session_attend_ex(handle, layer, queries, out, outFloats, nil, 0)
}

@_cdecl("kvrecall_session_attend_ex")
public func kvrecall_session_attend_ex(_ handle: OpaquePointer?, _ layer: UInt32, _ queries: UnsafePointer<Float>?,
                                       _ out: UnsafeMutablePointer<Float>?, _ outFloats: Int,
                                       _ lse: UnsafeMutablePointer<Float>?, _ lseFloats: Int) -> Int32 {
    guarded("kvrecall_session_attend") {
        try withSession(handle, "kvrecall_session_attend") { s in
            let l = try layerIndex(layer, s)
            guard let queries, let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_attend: queries and out must not be NULL") }
            // Sizes, finiteness and order are the session's checks (one place); it writes into `out` directly.
            guard outFloats >= 0, lseFloats >= 0 else {
                throw ABIError(KVRECALL_ERR_ARGUMENT, "kvrecall_session_attend: out_floats \(outFloats) and lse_floats \(lseFloats) must be sizes")
            }
            let c = s.configuration
            let n = c.kvHeads * c.queryHeadsPerKV * c.headDimension
            try s.attend(layer: l, queries: UnsafeBufferPointer(start: queries, count: n),
                         into: UnsafeMutableBufferPointer(start: out, count: outFloats),
                         lse: lse.map { UnsafeMutableBufferPointer(start: $0, count: lseFloats) })
        }
    }
}

@_cdecl("kvrecall_session_length")
public func kvrecall_session_length(_ handle: OpaquePointer?, _ layer: UInt32, _ out: UnsafeMutablePointer<Int>?) -> Int32 {
    guarded("kvrecall_session_length") {
        try withSession(handle, "kvrecall_session_length") { s in
            let l = try layerIndex(layer, s)
            guard let out else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_length: out must not be NULL") }
            out.pointee = try s.length(layer: l)
        }
    }
}

@_cdecl("kvrecall_session_head_length")
public func kvrecall_session_head_length(_ handle: OpaquePointer?, _ layer: UInt32, _ head: UInt32,
                                         _ tokens: UnsafeMutablePointer<Int>?, _ indexed: UnsafeMutablePointer<Int>?) -> Int32 {
    guarded("kvrecall_session_head_length") {
        try withSession(handle, "kvrecall_session_head_length") { s in
            let l = try layerIndex(layer, s)
            guard Int(head) < s.configuration.kvHeads else {
                throw ABIError(KVRECALL_ERR_LAYER, "KV head \(head) does not exist (the session has \(s.configuration.kvHeads))")
            }
            guard let tokens else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_head_length: tokens must not be NULL") }
            tokens.pointee = try s.length(layer: l, head: Int(head))
            indexed?.pointee = try s.indexedCount(layer: l, head: Int(head))
        }
    }
}

@_cdecl("kvrecall_session_report")
public func kvrecall_session_report(_ handle: OpaquePointer?, _ buffer: UnsafeMutablePointer<CChar>?, _ capacity: Int,
                                    _ length: UnsafeMutablePointer<Int>?) -> Int32 {
    guarded("kvrecall_session_report") {
        try withSession(handle, "kvrecall_session_report") { s in
            guard let length else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_report: length must not be NULL") }
            let text = Array(s.report().joined(separator: "\n").utf8)
            length.pointee = text.count
            guard capacity > 0 else { return }
            guard let buffer else { throw ABIError(KVRECALL_ERR_NULL, "kvrecall_session_report: buffer is NULL but capacity is \(capacity)") }
            let n = min(text.count, capacity - 1)
            text.withUnsafeBufferPointer { t in
                UnsafeMutableRawPointer(buffer).copyMemory(from: t.baseAddress!, byteCount: n)
            }
            buffer[n] = 0
        }
    }
}

@_cdecl("kvrecall_session_truncate")
public func kvrecall_session_truncate(_ handle: OpaquePointer?, _ tokens: Int) -> Int32 {
    guarded("kvrecall_session_truncate") {
        try withSession(handle, "kvrecall_session_truncate") { s in try s.truncate(to: tokens) }
    }
}

@_cdecl("kvrecall_session_checkpoint")
public func kvrecall_session_checkpoint(_ handle: OpaquePointer?) -> Int32 {
    guarded("kvrecall_session_checkpoint") {
        try withSession(handle, "kvrecall_session_checkpoint") { s in try s.checkpoint() }
    }
}

@_cdecl("kvrecall_session_close")
public func kvrecall_session_close(_ handle: OpaquePointer?) {
    guard let entry = registry.remove(handle) else { return }
    entry.lock.lock()
    entry.closed = true
    entry.session.close()
    entry.lock.unlock()
}

@_cdecl("kvrecall_last_error")
public func kvrecall_last_error() -> UnsafePointer<CChar> { lastError.current }
