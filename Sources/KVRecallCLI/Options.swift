import ArgumentParser
import Foundation
import KVRecall
import KVRecallInterface

/// `--store DIR`, shared by every command that reads or writes a store.
struct StoreOptions: ParsableArguments {
    @Option(name: .long, help: ArgumentHelp("Store directory (one LMDB environment).", valueName: "dir"))
    var store: String

    func open(create: Bool = false, readOnly: Bool = false) throws -> KVStore {
        var options = Environment.Options()
        options.readOnly = readOnly
        return try KVStore(path: store, create: create, options: options)
    }
}

/// `--context C --layer L --head H`: which head a command addresses.
struct HeadOptions: ParsableArguments {
    // Parsed unconditionally so a negative value reaches validate() and gets the range, not
    // "Missing value".
    @Option(parsing: .unconditional, help: "Context id (one store may hold several sequences; 0...4294967295).")
    var context: Int = 0
    @Option(parsing: .unconditional, help: "Layer number (0...65535).")
    var layer: Int = 0
    @Option(parsing: .unconditional, help: "KV-head number (0...65535; the first head, for 3-D inputs).")
    var head: Int = 0

    func validate() throws {
        if !(0...Int(UInt32.max)).contains(context) { throw ValidationError("--context must be in 0...\(UInt32.max) (got \(context))") }
        if !(0...Int(UInt16.max)).contains(layer) { throw ValidationError("--layer must be in 0...65535 (got \(layer))") }
        if !(0...Int(UInt16.max)).contains(head) { throw ValidationError("--head must be in 0...65535 (got \(head))") }
    }

    var id: HeadID { HeadID(context: UInt32(context), layer: UInt16(layer), head: UInt16(head)) }
}

/// Loads an f32 matrix `[rows, d]` from `.npy` or from a named tensor of a `.safetensors` file.
func loadTensor(path: String, tensorName: String?, role: String) throws -> Tensor {
    if path.hasSuffix(".safetensors") {
        guard let tensorName else {
            let names = (try? Safetensors.read(path: path).names()) ?? []
            throw RunError("\(path): a .safetensors file needs --\(role)-tensor NAME (tensors: \(names.joined(separator: ", ")))")
        }
        return try Safetensors.read(path: path).tensor(named: tensorName)
    }
    if tensorName != nil {
        throw RunError("--\(role)-tensor applies to .safetensors files; \(path) is read as .npy")
    }
    return try NPY.read(path: path)
}

/// A single 2-D query matrix, checked against the head's dimension.
func loadQueries(path: String, tensorName: String?, dimension: Int) throws -> (rows: Int, values: [Float]) {
    let t = try loadTensor(path: path, tensorName: tensorName, role: "queries")
    guard t.shape.count == 2 else {
        throw FormatError(path: path, problem: .badShape("queries must be [M, d], got \(t.shape)"))
    }
    guard t.shape[1] == dimension else {
        throw FormatError(path: path, problem: .badShape("queries have dimension \(t.shape[1]) but the head has \(dimension)"))
    }
    if let bad = t.firstNonFinite(rowWidth: dimension) {
        throw FormatError(path: path, problem: .nonFinite(row: bad.row, column: bad.column))
    }
    return (t.shape[0], t.floats())
}

/// A progress bar on standard error, drawn only when it is a terminal.
final class ProgressBar {
    let label: String
    let enabled: Bool
    private var lastDrawn = -1
    private let start = monotonicNanos()

    init(_ label: String, enabled: Bool = isatty(2) != 0) {
        self.label = label
        self.enabled = enabled
    }

    func update(_ done: Int, _ total: Int) {
        guard enabled, total > 0 else { return }
        let percent = done * 100 / total
        guard percent != lastDrawn else { return }
        lastDrawn = percent
        let width = 30
        let filled = width * done / total
        let elapsed = Double(monotonicNanos() - start) / 1e9
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        FileHandle.standardError.write("\r\(label) [\(bar)] \(percent)% \(done)/\(total) \(fmt(elapsed, 1))s".data(using: .utf8)!)
        if done >= total { FileHandle.standardError.write("\n".data(using: .utf8)!) }
    }
}

/// Serialises a JSON-compatible value with stable key order.
func jsonString(_ object: Any) throws -> String {
    let data = try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys])
    return String(decoding: data, as: UTF8.self)
}

/// Replaces non-finite floats (not representable in JSON) by nil.
func jsonNumber(_ x: Float) -> Any { x.isFinite ? Double(x) : NSNull() }
func jsonNumber(_ x: Double) -> Any { x.isFinite ? x : NSNull() }

/// Per-call search knobs, named as faiss and hnswlib users know them. ef, nprobe and beam left
/// unset take the value calibrated at build for the index's target recall (`build --target-recall`),
/// or the library's default for an index built without prefill queries to calibrate on.
/// The index search knobs (unset: each head's calibrated value, else the library default).
struct SearchKnobOptions: ParsableArguments {
    @Option(parsing: .unconditional, help: "HNSW, retrieval: candidate list size at search (default: calibrated at build, else 64).")
    var ef: Int?
    @Option(parsing: .unconditional, help: "IVF: lists probed (default: calibrated at build, else 8). (estimate's retrieval zone is set by -k or --top-p, not by --nprobe.)")
    var nprobe: Int?
    @Option(parsing: .unconditional, help: "Tree: clusters kept per level (default: calibrated at build, else 8).")
    var beam: Int?
    @Option(help: "LSH: tables a key must share with the query to be a candidate (default: calibrated at build, else 2).")
    var minCollisions: Int?

    func validate() throws {
        try validateSettings { try parameters.validate() }
    }

    var parameters: SearchParameters {
        var p = SearchParameters()
        p.graph.efSetting = ef
        p.ivf.nprobeSetting = nprobe
        p.tree.beamSetting = beam
        p.lsh.minCollisionsSetting = minCollisions
        return p
    }
}

/// The search knobs and the threads a batch of queries is split over (`query`, `attend`).
struct SearchParameterOptions: ParsableArguments {
    @OptionGroup var knobs: SearchKnobOptions
    @Option(help: "Threads over the query batch.")
    var threads: Int = 1

    var parameters: SearchParameters {
        var p = knobs.parameters
        p.threads = threads
        return p
    }
}

/// A failure found while running a command (not a usage mistake): printed without the usage text.
struct RunError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
