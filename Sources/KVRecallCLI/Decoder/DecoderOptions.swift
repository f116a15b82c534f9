import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface
import KVRecallDecoder

/// `--model FILE`: the GGUF model, by default the cache Tools/fetch_model.sh fills.
struct ModelOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Gemma 3 GGUF file (default: $KVRECALL_MODELS or ~/.cache/kvrecall/models, filled by Tools/fetch_model.sh).",
                               valueName: "file"))
    var model: String?

    func load() throws -> Gemma3Model {
        let path = try Gemma3Model.resolvePath(model)
        let start = monotonicNanos()
        let loaded = try Gemma3Model(path: path)
        let c = loaded.configuration
        FileHandle.standardError.write(
            "model: \(path) (\(c.blockCount) blocks, \(c.queryHeads) query heads over \(c.kvHeads) KV head, d \(c.headDimension), global blocks \(c.globalBlocks.map(String.init).joined(separator: ",")); loaded in \(fmt(Double(monotonicNanos() - start) / 1e9, 1)) s)\n"
                .data(using: .utf8)!)
        return loaded
    }
}

/// How the global layers attend at decode time: the method(s) and their knobs.
struct DecoderMethodOptions: ParsableArguments {
    static let methods = AttentionMethod.allCases

    @Option(help: ArgumentHelp("Decode-time attention of the global layers: \(methods.map(\.rawValue).joined(separator: ", ")); a comma-separated list or 'all' runs each from one shared prefill.",
                               valueName: "method"))
    var method: String = "exact"
    @Option(name: .short, parsing: .unconditional, help: "Positions retrieved per query head beyond the static part (index methods: a floor, see --budget-mass).")
    var k: Int = 100
    @Option(help: ArgumentHelp("Adaptive budget of index methods: at the index build each head's k is raised (200, 400, ... at most 10% of its keys) until its neediest query head keeps this much of its attention mass with its exact top-k on held-out prefill queries; 0 keeps -k fixed.",
                               valueName: "mass"))
    var budgetMass: Double = 0.9
    @Option(parsing: .unconditional, help: "First positions always attended (attention sinks).")
    var sinks: Int = 4
    @Option(parsing: .unconditional, help: "Last positions always attended (recent window) in the global layers.")
    var window: Int = 64
    @OptionGroup var search: SearchKnobOptions
    @Option(help: "Recall@k against exact search the calibrated ef / nprobe / beam reach on held-out prefill queries.")
    var targetRecall: Double = 0.95
    @Option(help: "Storage type of the cached keys and values: f32, f16, bf16.")
    var dtype: DType = .f16
    @Option(help: "GQA selection of index-backed methods: union (every query head's own top-k, attended by all), union-capped, summed.")
    var groupSelection: GroupSelection = .union
    @Option(help: "Prefill queries kept per KV head (retrieval graph training, auto's profile, calibration): every-head (each query head's own) or summed (the group's sum per position).")
    var prefillQueries: PrefillQueryRule = .everyHead
    @Option(help: ArgumentHelp("Long decodes: a head's plan, budget, index and calibration are made again once the keys it indexed during decoding pass this fraction of those it was planned over (trained on the decode queries too); 'none': never.",
                               valueName: "fraction"))
    var refreshFraction: String = SessionConfiguration.defaultRefreshFraction.map { "\($0)" } ?? "none"
    @Flag(help: "Build each refresh within the decode step that starts it (results independent of timing) instead of on a background thread.")
    var refreshInline = false
    @Option(help: ArgumentHelp("auto: the median output error against exact attention (a head's held-out prefill queries) its plan may reach; the cheapest candidate within it wins, exact attention when none is cheaper.",
                               valueName: "error"))
    var targetError: Double = PolicyParameters().targetError

    func validate() throws {
        _ = try methodList()
        if k < 1 { throw ValidationError("-k must be at least 1 (got \(k))") }
        if sinks < 0 { throw ValidationError("--sinks must be non-negative (got \(sinks))") }
        if window < 0 { throw ValidationError("--window must be non-negative (got \(window))") }
        if !(targetRecall > 0 && targetRecall <= 1) { throw ValidationError("--target-recall must be in (0, 1] (got \(targetRecall))") }
        if !(budgetMass >= 0 && budgetMass <= 1) { throw ValidationError("--budget-mass must be in [0, 1], 0 for a fixed k (got \(budgetMass))") }
        if !(targetError > 0 && targetError.isFinite) { throw ValidationError("--target-error must be a positive number (got \(targetError))") }
        _ = try refresh()
    }

    /// `--refresh-fraction` as the session takes it (nil: never).
    func refresh() throws -> Double? { try parseRefreshFraction(refreshFraction) }

    func methodList() throws -> [AttentionMethod] {
        try parseMethodList(method, allowed: Self.methods) ?? Self.methods
    }

    func options(for method: AttentionMethod) -> DecoderAttentionOptions {
        var o = DecoderAttentionOptions()
        o.method = method
        o.k = k
        o.sinks = sinks
        o.window = window
        o.ef = search.ef
        o.nprobe = search.nprobe
        o.beam = search.beam
        o.targetRecall = targetRecall
        o.budgetMass = budgetMass > 0 ? budgetMass : nil
        o.minCollisions = search.minCollisions
        o.dtype = dtype
        o.groupSelection = groupSelection
        o.prefillQueries = prefillQueries
        o.refreshFraction = (try? refresh()) ?? nil
        o.refreshInBackground = !refreshInline
        o.targetError = targetError
        return o
    }
}

/// A `--refresh-fraction` value as the session takes it: a positive fraction, or nil for 'none'.
func parseRefreshFraction(_ text: String) throws -> Double? {
    if text == "none" { return nil }
    guard let f = Double(text), f > 0, f <= SessionConfiguration.maximumRefreshFraction else {
        throw ValidationError("--refresh-fraction must be a positive number up to \(Int(SessionConfiguration.maximumRefreshFraction)) or 'none' (got \(text))")
    }
    return f
}

/// Writes a line to standard error.
func note(_ line: String) {
    fflush(stdout)
    FileHandle.standardError.write((line + "\n").data(using: .utf8)!)
}

/// Reads a UTF-8 text file, naming it in the error (and, for bytes that are not UTF-8, where).
func readText(_ path: String) throws -> String {
    guard FileManager.default.fileExists(atPath: path) else { throw RunError("\(path): no such file") }
    guard let data = FileManager.default.contents(atPath: path) else { throw RunError("\(path): cannot be read") }
    let bytes = [UInt8](data)
    if let bad = firstInvalidUTF8(bytes) {
        throw RunError("\(path): not UTF-8 text: \(describeInvalidUTF8(bytes, at: bad))")
    }
    return String(decoding: bytes, as: UTF8.self)
}

/// Byte offset of the first byte that does not start or continue a valid UTF-8 sequence (RFC 3629:
/// no overlong forms, no surrogates, nothing above U+10FFFF), or nil when all of `bytes` is UTF-8.
func firstInvalidUTF8(_ bytes: [UInt8]) -> Int? {
    var i = 0
    while i < bytes.count {
        let b = bytes[i]
        let length: Int, low: UInt8, high: UInt8  // allowed range of the second byte
        switch b {
        case 0x00...0x7F: i += 1; continue
        case 0xC2...0xDF: (length, low, high) = (2, 0x80, 0xBF)
        case 0xE0: (length, low, high) = (3, 0xA0, 0xBF)
        case 0xED: (length, low, high) = (3, 0x80, 0x9F)
        case 0xE1...0xEC, 0xEE...0xEF: (length, low, high) = (3, 0x80, 0xBF)
        case 0xF0: (length, low, high) = (4, 0x90, 0xBF)
        case 0xF1...0xF3: (length, low, high) = (4, 0x80, 0xBF)
        case 0xF4: (length, low, high) = (4, 0x80, 0x8F)
        default: return i
        }
        guard i + 1 < bytes.count, (low...high).contains(bytes[i + 1]) else { return i }
        for j in 2..<length {
            guard i + j < bytes.count, (0x80...0xBF).contains(bytes[i + j]) else { return i }
        }
        i += length
    }
    return nil
}

/// "byte 0xFF at offset 1234 (line 7, after 'Anne haggard')": where invalid UTF-8 starts.
func describeInvalidUTF8(_ bytes: [UInt8], at offset: Int) -> String {
    let line = 1 + bytes[..<offset].filter { $0 == 0x0A }.count
    let lineStart = bytes[..<offset].lastIndex(of: 0x0A).map { $0 + 1 } ?? 0
    let before = String(decoding: bytes[max(lineStart, offset - 24)..<offset], as: UTF8.self)
    return "byte 0x\(String(bytes[offset], radix: 16, uppercase: true)) at offset \(offset) (line \(line)"
        + (before.isEmpty ? ")" : ", after '\(before)')")
}
