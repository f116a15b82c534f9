import KVRecallSupport
import KVRecallKernels
import KVRecallFormats
/// Ingest of parsed tensors (`.npy`, `.safetensors`) into heads.
extension KVStore {
    /// Checks that keys, values and optional prefill queries form a valid ingest: 2-D `[N, d]`
    /// (one head) or 3-D `[heads, N, d]` (consecutive heads), values shaped like keys, queries
    /// with the same head count and dimension, no NaN/Inf unless allowed, and (with `storage`) no
    /// finite value beyond the range of the type it will be stored in (f16: |x| > 65504).
    /// Errors name the offending file, the row, the column and the value.
    public static func validateIngest(keys: Tensor, keysPath: String, values: Tensor, valuesPath: String,
                                      queries: Tensor?, queriesPath: String?, allowNonFinite: Bool,
                                      storage: DType? = nil) throws {
        guard keys.shape.count == 2 || keys.shape.count == 3 else {
            throw FormatError(path: keysPath, problem: .badShape("keys must be [N, d] or [heads, N, d], got \(keys.shape)"))
        }
        guard values.shape == keys.shape else {
            throw FormatError(path: valuesPath,
                              problem: .badShape("values shape \(values.shape) differs from keys shape \(keys.shape)"))
        }
        if let queries, let queriesPath {
            guard queries.shape.count == keys.shape.count else {
                throw FormatError(path: queriesPath, problem: .badShape("queries have rank \(queries.shape.count), keys \(keys.shape.count)"))
            }
            guard queries.shape.last == keys.shape.last else {
                throw FormatError(path: queriesPath,
                                  problem: .badShape("queries have dimension \(queries.shape.last ?? 0), keys \(keys.shape.last ?? 0)"))
            }
            if keys.shape.count == 3 && queries.shape[0] != keys.shape[0] {
                throw FormatError(path: queriesPath,
                                  problem: .badShape("queries hold \(queries.shape[0]) heads, keys \(keys.shape[0])"))
            }
        }
        let d = keys.shape.last!
        for (tensor, path) in [(keys, keysPath), (values, valuesPath)] + (queries.map { [($0, queriesPath ?? "")] } ?? []) {
            if !allowNonFinite, let bad = tensor.firstNonFinite(rowWidth: d) {
                throw FormatError(path: path, problem: .nonFinite(row: bad.row, column: bad.column))
            }
            if let storage, let bad = tensor.firstOutOfRange(for: TensorDType(storage), rowWidth: d) {
                throw FormatError(path: path, problem: .outOfRange(row: bad.row, column: bad.column, value: bad.value,
                                                                   storage: TensorDType(storage)))
            }
        }
    }

    /// Appends validated tensors to head `first` (2-D) or heads `first.head ..< first.head + H` (3-D),
    /// creating the heads with `dtype` when needed. Each head's rows are committed in transactions of at
    /// most `rowsPerTransaction` rows (see `append`). Returns the heads' records afterwards.
    @discardableResult
    public func ingest(keys: Tensor, values: Tensor, queries: Tensor?, first: HeadID, dtype: DType,
                       blockSize: Int = KVStore.defaultBlockSize, allowNonFinite: Bool = false,
                       metadata: [String: String] = [:], rowsPerTransaction: Int = 16384,
                       progress: ((Int, Int) -> Void)? = nil) throws -> [HeadInfo] {
        let headCount = keys.shape.count == 3 ? keys.shape[0] : 1
        let d = keys.shape.last!
        let rows = keys.shape[keys.shape.count - 2]
        let queryRows = queries.map { $0.shape[$0.shape.count - 2] } ?? 0
        guard Int(first.head) + headCount - 1 <= Int(UInt16.max) else {
            throw StoreError(.invalidArgument, "head numbers \(first.head)+\(headCount) overflow", path: path)
        }
        let keyFloats = keys.floats()
        let valueFloats = values.floats()
        let queryFloats = queries?.floats() ?? []
        let totalRows = headCount * (rows + queryRows)
        var doneBefore = 0
        var infos: [HeadInfo] = []
        for h in 0..<headCount {
            var id = first
            id.head = first.head + UInt16(h)
            try createHead(id, dimension: d, dtype: dtype, blockSize: blockSize, metadata: metadata)
            let span = (h * rows * d)..<((h + 1) * rows * d)
            try keyFloats.withUnsafeBufferPointer { kb in
                try valueFloats.withUnsafeBufferPointer { vb in
                    try append(id, keys: UnsafeBufferPointer(rebasing: kb[span]), values: UnsafeBufferPointer(rebasing: vb[span]),
                               allowNonFinite: allowNonFinite, rowsPerTransaction: rowsPerTransaction) { done, _ in
                        progress?(doneBefore + done, totalRows)
                    }
                }
            }
            doneBefore += rows
            if queryRows > 0 {
                let qspan = (h * queryRows * d)..<((h + 1) * queryRows * d)
                try queryFloats.withUnsafeBufferPointer { qb in
                    try appendQueries(id, queries: UnsafeBufferPointer(rebasing: qb[qspan]), allowNonFinite: allowNonFinite,
                                      rowsPerTransaction: rowsPerTransaction) { done, _ in
                        progress?(doneBefore + done, totalRows)
                    }
                }
                doneBefore += queryRows
            }
            infos.append(try info(id))
        }
        return infos
    }
}

extension DType {
    public init(_ tensor: TensorDType) {
        switch tensor {
        case .f32: self = .f32
        case .f16: self = .f16
        case .bf16: self = .bf16
        }
    }
}
