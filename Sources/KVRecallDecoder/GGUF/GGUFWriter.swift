// A small GGUF v3 writer and reference quantizers, for tests that need tiny model files.

import Foundation

/// Builds a GGUF v3 file in memory: metadata in insertion order, tensors in insertion order, each tensor's
/// data at the next multiple of the alignment (no padding after the last one).
public struct GGUFWriter {
    private var keys: [String] = []
    private var values: [String: GGUFValue] = [:]
    private var tensors: [(name: String, dimensions: [Int], type: GGMLType, data: [UInt8])] = []

    public init() {}

    /// Sets a metadata value; a key set again keeps its first position.
    public mutating func set(_ key: String, _ value: GGUFValue) {
        if values[key] == nil { keys.append(key) }
        values[key] = value
    }

    /// Adds a tensor from raw ggml bytes. Dimensions are in ggml order (dimensions[0] innermost).
    /// Precondition: 1...4 positive dimensions, dimensions[0] a multiple of the block size, data of the right size.
    public mutating func addTensor(name: String, dimensions: [Int], type: GGMLType, data: [UInt8]) {
        precondition((1...4).contains(dimensions.count) && dimensions.allSatisfy { $0 > 0 },
                     "GGUFWriter: tensor '\(name)' needs 1 to 4 positive dimensions, got \(dimensions)")
        precondition(dimensions[0] % type.blockSize == 0,
                     "GGUFWriter: tensor '\(name)' row length \(dimensions[0]) is not a multiple of \(type.blockSize)")
        let expected = dimensions.reduce(1, *) / type.blockSize * type.bytesPerBlock
        precondition(data.count == expected,
                     "GGUFWriter: tensor '\(name)' of type \(type.name) \(dimensions) needs \(expected) bytes, got \(data.count)")
        precondition(!tensors.contains { $0.name == name }, "GGUFWriter: duplicate tensor '\(name)'")
        tensors.append((name, dimensions, type, data))
    }

    /// Adds a tensor from f32 values in ggml order, stored as `type`: f32, f16, bf16 or q8_0.
    public mutating func addTensor(name: String, dimensions: [Int], values: [Float], as type: GGMLType) {
        precondition(values.count == dimensions.reduce(1, *),
                     "GGUFWriter: tensor '\(name)' \(dimensions) needs \(dimensions.reduce(1, *)) values, got \(values.count)")
        let data: [UInt8]
        switch type {
        case .f32: data = values.withUnsafeBytes { raw in littleEndianBytes(raw, of: UInt32.self) }
        case .f16: data = ggmlQuantizeF16(values)
        case .bf16: data = ggmlQuantizeBF16(values)
        case .q8_0: data = ggmlQuantizeQ8_0(values)
        default: preconditionFailure("GGUFWriter: cannot quantize to \(type.name)")
        }
        addTensor(name: name, dimensions: dimensions, type: type, data: data)
    }

    /// The file's bytes. `general.alignment`, when set, takes precedence over `alignment`; when it is not set
    /// and `alignment` is not 32, it is added.
    public func serialized(alignment: Int = 32) -> [UInt8] {
        var keys = self.keys
        var values = self.values
        var align = alignment
        if let a = values["general.alignment"]?.intValue, a > 0 {
            align = a
        } else if alignment != 32 {
            keys.append("general.alignment")
            values["general.alignment"] = .uint32(UInt32(alignment))
        }
        precondition(align > 0, "GGUFWriter: alignment must be positive")

        var out: [UInt8] = []
        out.append(contentsOf: Array("GGUF".utf8))
        append(UInt32(3), to: &out)
        append(UInt64(tensors.count), to: &out)
        append(UInt64(keys.count), to: &out)
        for key in keys {
            appendString(key, to: &out)
            let value = values[key]!
            append(value.typeID, to: &out)
            appendValue(value, to: &out)
        }
        var offset = 0
        var offsets: [Int] = []
        for t in tensors {
            offsets.append(offset)
            offset = roundUp(offset + t.data.count, align)
        }
        for (t, o) in zip(tensors, offsets) {
            appendString(t.name, to: &out)
            append(UInt32(t.dimensions.count), to: &out)
            for d in t.dimensions { append(UInt64(d), to: &out) }
            append(t.type.rawValue, to: &out)
            append(UInt64(o), to: &out)
        }
        if !tensors.isEmpty {
            let dataStart = roundUp(out.count, align)
            for (t, o) in zip(tensors, offsets) {
                out.append(contentsOf: repeatElement(0, count: dataStart + o - out.count))
                out.append(contentsOf: t.data)
            }
        }
        return out
    }

    /// Writes the file; throws a GGUFError naming the path if it cannot.
    public func write(to path: String, alignment: Int = 32) throws {
        let bytes = serialized(alignment: alignment)
        do {
            try Data(bytes).write(to: URL(fileURLWithPath: path))
        } catch {
            throw GGUFError(path: path, message: "cannot write: \(error.localizedDescription)")
        }
    }

    private func roundUp(_ n: Int, _ a: Int) -> Int { (n + a - 1) / a * a }

    private func append<T: FixedWidthInteger>(_ v: T, to out: inout [UInt8]) {
        withUnsafeBytes(of: v.littleEndian) { out.append(contentsOf: $0) }
    }

    private func appendString(_ s: String, to out: inout [UInt8]) {
        append(UInt64(s.utf8.count), to: &out)
        out.append(contentsOf: s.utf8)
    }

    private func appendValue(_ value: GGUFValue, to out: inout [UInt8]) {
        switch value {
        case .uint8(let v): append(v, to: &out)
        case .int8(let v): append(v, to: &out)
        case .uint16(let v): append(v, to: &out)
        case .int16(let v): append(v, to: &out)
        case .uint32(let v): append(v, to: &out)
        case .int32(let v): append(v, to: &out)
        case .float32(let v): append(v.bitPattern, to: &out)
        case .bool(let v): append(UInt8(v ? 1 : 0), to: &out)
        case .string(let s): appendString(s, to: &out)
        case .array(let elements):
            let elementType = elements.first?.typeID ?? 0
            precondition(elements.allSatisfy { $0.typeID == elementType },
                         "GGUFWriter: the elements of a GGUF array must all have one type")
            append(elementType, to: &out)
            append(UInt64(elements.count), to: &out)
            for e in elements { appendValue(e, to: &out) }
        case .uint64(let v): append(v, to: &out)
        case .int64(let v): append(v, to: &out)
        case .float64(let v): append(v.bitPattern, to: &out)
        }
    }
}

private func littleEndianBytes<T: FixedWidthInteger>(_ raw: UnsafeRawBufferPointer, of _: T.Type) -> [UInt8] {
    #if _endian(little)
    return Array(raw)
    #else
    var out = [UInt8](); out.reserveCapacity(raw.count)
    for i in stride(from: 0, to: raw.count, by: MemoryLayout<T>.size) {
        withUnsafeBytes(of: raw.loadUnaligned(fromByteOffset: i, as: T.self).littleEndian) { out.append(contentsOf: $0) }
    }
    return out
    #endif
}

/// Q8_0 blocks as ggml's `quantize_row_q8_0_ref`: per 32 values d = max|x| / 127 (stored as f16) and
/// q = round(x / d) (halves away from zero). `values.count` must be a multiple of 32.
public func ggmlQuantizeQ8_0(_ values: [Float]) -> [UInt8] {
    precondition(values.count % 32 == 0, "ggmlQuantizeQ8_0: \(values.count) values is not a multiple of 32")
    var out = [UInt8](repeating: 0, count: values.count / 32 * 34)
    for b in 0..<values.count / 32 {
        var amax: Float = 0
        for j in 0..<32 { amax = max(amax, abs(values[b * 32 + j])) }
        let d = amax / 127
        let id: Float = d != 0 ? 1 / d : 0
        let dh = Float16(d).bitPattern
        out[b * 34] = UInt8(dh & 0xFF)
        out[b * 34 + 1] = UInt8(dh >> 8)
        for j in 0..<32 {
            out[b * 34 + 2 + j] = UInt8(bitPattern: Int8((values[b * 32 + j] * id).rounded(.toNearestOrAwayFromZero)))
        }
    }
    return out
}

/// IEEE half bits (round to nearest even), little-endian.
public func ggmlQuantizeF16(_ values: [Float]) -> [UInt8] {
    var out = [UInt8]()
    out.reserveCapacity(values.count * 2)
    for v in values {
        let h = Float16(v).bitPattern
        out.append(UInt8(h & 0xFF))
        out.append(UInt8(h >> 8))
    }
    return out
}

/// bfloat16 bits as ggml's `ggml_compute_fp32_to_bf16` (round to nearest even; NaN kept quiet), little-endian.
public func ggmlQuantizeBF16(_ values: [Float]) -> [UInt8] {
    var out = [UInt8]()
    out.reserveCapacity(values.count * 2)
    for v in values {
        let u = v.bitPattern
        let h: UInt16 = v.isNaN ? UInt16(u >> 16) | 64 : UInt16((u &+ (0x7FFF &+ ((u >> 16) & 1))) >> 16)
        out.append(UInt8(h & 0xFF))
        out.append(UInt8(h >> 8))
    }
    return out
}
