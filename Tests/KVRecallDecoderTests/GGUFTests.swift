import Foundation
import KVRecallTestSupport
import Testing
@testable import KVRecallDecoder

// MARK: - Helpers

/// Little-endian bytes of an integer.
private func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
    withUnsafeBytes(of: v.littleEndian) { Array($0) }
}

/// IEEE half bits of `f` (via the standard library's Float16, not the code under test), little-endian.
private func halfBytes(_ f: Float) -> [UInt8] { le(Float16(f).bitPattern) }

/// Runs ggmlDequantize over raw blocks.
private func dequantized(_ type: GGMLType, _ bytes: [UInt8], count: Int) throws -> [Float] {
    var out = [Float](repeating: .nan, count: count)
    try bytes.withUnsafeBytes { raw in
        try out.withUnsafeMutableBufferPointer { try ggmlDequantize(type, from: raw.baseAddress!, count: count, into: $0.baseAddress!) }
    }
    return out
}

/// Deterministic pseudo-random bytes.
private func pseudoRandomBytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var rng = SeededRandom(seed: seed)
    return (0..<count).map { _ in UInt8.random(in: 0...255, using: &rng) }
}

/// Writes `bytes` to a fresh file in `dir` and opens it.
private func openBytes(_ bytes: [UInt8], in dir: TemporaryDirectory, name: String = "t.gguf") throws -> GGUFFile {
    let path = dir.path + "/" + name
    try Data(bytes).write(to: URL(fileURLWithPath: path))
    return try GGUFFile(path: path)
}

/// The GGUFError message from opening `bytes`, or nil if it opened.
private func openError(_ bytes: [UInt8], in dir: TemporaryDirectory) -> String? {
    let path = dir.path + "/bad.gguf"
    try? Data(bytes).write(to: URL(fileURLWithPath: path))
    do {
        _ = try GGUFFile(path: path)
        return nil
    } catch let e as GGUFError {
        #expect(e.path == path)
        #expect(e.description == "\(path): \(e.message)")
        return e.message
    } catch {
        Issue.record("not a GGUFError: \(error)")
        return "\(error)"
    }
}

/// Index just past a GGUF string (u64 length + bytes) equal to `s` in `bytes`.
private func positionAfterString(_ s: String, in bytes: [UInt8]) -> Int {
    let needle = le(UInt64(s.utf8.count)) + Array(s.utf8)
    for i in 0...(bytes.count - needle.count) where Array(bytes[i..<i + needle.count]) == needle {
        return i + needle.count
    }
    fatalError("string \(s) not found")
}

private func patch<T: FixedWidthInteger>(_ bytes: inout [UInt8], at i: Int, _ v: T) {
    let b = le(v)
    bytes.replaceSubrange(i..<i + b.count, with: b)
}

/// A small valid file: two metadata pairs (one a string array) and two Q8_0/F32 tensors.
private func smallFile() -> [UInt8] {
    var w = GGUFWriter()
    w.set("general.architecture", .string("test"))
    w.set("tok.list", .array([.string("a"), .string("bc")]))
    w.addTensor(name: "w8", dimensions: [64, 2], values: (0..<128).map { Float($0 % 17) - 8 }, as: .q8_0)
    w.addTensor(name: "v32", dimensions: [3], values: [1, 2, 3], as: .f32)
    return w.serialized()
}

private let modelPath: String = {
    let dir = ProcessInfo.processInfo.environment["KVRECALL_MODELS"].flatMap { $0.isEmpty ? nil : $0 }
        ?? (NSHomeDirectory() + "/.cache/kvrecall/models")
    return dir + "/gemma-3-270m-q4_k_m.gguf"
}()

// MARK: - Dequantization of hand-made blocks

@Suite("GGUF dequantization")
struct GGUFDequantizeTests {
    @Test func f32IsCopied() throws {
        let values: [Float] = [0, -1.5, 3.25, .greatestFiniteMagnitude, -0.0]
        let bytes = values.flatMap { le($0.bitPattern) }
        let out = try dequantized(.f32, bytes, count: values.count)
        #expect(out.map(\.bitPattern) == values.map(\.bitPattern))
    }

    @Test func f16AndBF16() throws {
        // Half bits and their values by the IEEE binary16 definition.
        let halves: [(UInt16, Float)] = [
            (0x3C00, 1), (0xC000, -2), (0x3800, 0.5), (0x7BFF, 65504), (0x0001, 0x1p-24), (0x03FF, 1023 * 0x1p-24),
            (0x0400, 0x1p-14), (0x8000, -0.0), (0x7C00, .infinity), (0xFC00, -.infinity), (0x3555, 0.25 * (1 + 341.0 / 1024)),
        ]
        let out = try dequantized(.f16, halves.flatMap { le($0.0) }, count: halves.count)
        for (i, (_, want)) in halves.enumerated() { #expect(out[i].bitPattern == want.bitPattern, "half #\(i)") }
        #expect(try dequantized(.f16, le(UInt16(0x7E00)), count: 1)[0].isNaN)

        // bf16 is the top half of an f32.
        let bf: [(UInt16, Float)] = [(0x3F80, 1), (0xC040, -3), (0x4049, 3.140625), (0x0000, 0), (0xFF80, -.infinity)]
        let outB = try dequantized(.bf16, bf.flatMap { le($0.0) }, count: bf.count)
        for (i, (_, want)) in bf.enumerated() { #expect(outB[i] == want, "bf16 #\(i)") }
    }

    @Test func q8_0() throws {
        // Block 0: d = 0.5, qs = -128, -120, ..., 120. Block 1: d = -0.25, qs = 0, 1, ..., 31.
        let qs0: [Int8] = (0..<32).map { Int8($0 * 8 - 128) }
        let qs1: [Int8] = (0..<32).map { Int8($0) }
        let bytes = halfBytes(0.5) + qs0.map { UInt8(bitPattern: $0) } + halfBytes(-0.25) + qs1.map { UInt8(bitPattern: $0) }
        let out = try dequantized(.q8_0, bytes, count: 64)
        for j in 0..<32 {
            #expect(out[j] == Float(j * 8 - 128) * 0.5)
            #expect(out[32 + j] == Float(j) * -0.25)
        }
        #expect(out[0] == -64 && out[31] == 60)
    }

    @Test func q4_0() throws {
        // d = 2; byte j holds nibble j (low) and 15 - j (high); value = (nibble - 8) * d.
        let qs: [UInt8] = (0..<16).map { UInt8($0) | UInt8(15 - $0) << 4 }
        let out = try dequantized(.q4_0, halfBytes(2) + qs, count: 32)
        for j in 0..<16 {
            #expect(out[j] == Float(j - 8) * 2)
            #expect(out[16 + j] == Float(15 - j - 8) * 2)
        }
    }

    @Test func q5_0() throws {
        // d = 0.25; element e's 4 low bits are nibble (e < 16 ? low of qs[e] : high of qs[e - 16]),
        // its 5th bit is bit e of qh; value = (q - 16) * d.
        let d: Float = 0.25
        let qh: UInt32 = 0xA5C3_0F96
        let qs = pseudoRandomBytes(16, seed: 5)
        let out = try dequantized(.q5_0, halfBytes(d) + le(qh) + qs, count: 32)
        for e in 0..<32 {
            let nibble = e < 16 ? Int(qs[e] & 15) : Int(qs[e - 16] >> 4)
            let q = nibble | Int((qh >> UInt32(e)) & 1) << 4
            #expect(out[e] == Float(q - 16) * d, "element \(e)")
        }
    }

    /// The 12 Q4_K/Q5_K scale bytes for 8 six-bit scales and mins, packed as ggml packs them.
    private func packScalesK(_ sc: [UInt8], _ m: [UInt8]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 12)
        for j in 0..<4 {
            b[j] = sc[j] | (sc[j + 4] >> 4) << 6
            b[j + 4] = m[j] | (m[j + 4] >> 4) << 6
            b[j + 8] = (sc[j + 4] & 15) | (m[j + 4] & 15) << 4
        }
        return b
    }

    @Test func q4_K() throws {
        // Super-block of 8 sub-blocks of 32: value = d * scale[s] * q - dmin * min[s], q the 4-bit quant.
        // Sub-block s lives in bytes 32*(s/2) ..< 32*(s/2)+32 of qs, low nibbles for even s, high for odd.
        let d: Float = 0.5, dmin: Float = 0.25
        let sc: [UInt8] = [1, 63, 17, 32, 5, 48, 0, 33]
        let m: [UInt8] = [0, 7, 63, 16, 40, 1, 31, 62]
        let qs = pseudoRandomBytes(128, seed: 4)
        let bytes = halfBytes(d) + halfBytes(dmin) + packScalesK(sc, m) + qs
        #expect(bytes.count == GGMLType.q4_K.bytesPerBlock)
        let out = try dequantized(.q4_K, bytes + bytes, count: 512)
        for e in 0..<256 {
            let s = e / 32
            let byte = qs[32 * (s / 2) + e % 32]
            let q = s % 2 == 0 ? byte & 15 : byte >> 4
            let want = Double(d) * Double(sc[s]) * Double(q) - Double(dmin) * Double(m[s])
            #expect(out[e] == Float(want), "element \(e)")
            #expect(out[256 + e] == out[e])
        }
    }

    @Test func q5_K() throws {
        // As Q4_K with a 5th bit: bit s of qh[e % 32] for sub-block s.
        let d: Float = 0.125, dmin: Float = 1
        let sc: [UInt8] = [3, 60, 21, 9, 63, 16, 2, 47]
        let m: [UInt8] = [5, 0, 33, 63, 12, 20, 49, 1]
        let qh = pseudoRandomBytes(32, seed: 55), qs = pseudoRandomBytes(128, seed: 56)
        let bytes = halfBytes(d) + halfBytes(dmin) + packScalesK(sc, m) + qh + qs
        let out = try dequantized(.q5_K, bytes, count: 256)
        for e in 0..<256 {
            let s = e / 32, l = e % 32
            let byte = qs[32 * (s / 2) + l]
            let q = Int(s % 2 == 0 ? byte & 15 : byte >> 4) + Int((qh[l] >> UInt8(s)) & 1) * 16
            let want = Double(d) * Double(sc[s]) * Double(q) - Double(dmin) * Double(m[s])
            #expect(out[e] == Float(want), "element \(e)")
        }
    }

    @Test func q6_K() throws {
        // Two halves of 128; in half n, quarter k (32 elements, l = 0..<31): low 4 bits from ql[64n + 32*(k%2) + l]
        // (low nibble for k < 2, high for k >= 2), high 2 bits are bits 2k, 2k+1 of qh[32n + l];
        // scale = scales[8n + 2k + l/16]; value = d * scale * (q - 32).
        let d: Float = 0.125
        let ql = pseudoRandomBytes(128, seed: 6), qh = pseudoRandomBytes(64, seed: 7)
        let scales: [Int8] = [1, -1, 2, -2, 3, 5, -8, 127, -128, 0, 9, 10, -11, 12, 64, -64]
        let bytes = ql + qh + scales.map { UInt8(bitPattern: $0) } + halfBytes(d)
        #expect(bytes.count == GGMLType.q6_K.bytesPerBlock)
        let out = try dequantized(.q6_K, bytes, count: 256)
        for e in 0..<256 {
            let n = e / 128, k = (e % 128) / 32, l = e % 32
            let lowByte = ql[64 * n + 32 * (k % 2) + l]
            let low = Int(k < 2 ? lowByte & 15 : lowByte >> 4)
            let high = Int((qh[32 * n + l] >> UInt8(2 * k)) & 3)
            let q = low | high << 4
            let want = Double(d) * Double(scales[8 * n + 2 * k + l / 16]) * Double(q - 32)
            #expect(out[e] == Float(want), "element \(e)")
        }
    }

    @Test func refusesUnsupportedTypesAndPartialBlocks() throws {
        let bytes = [UInt8](repeating: 0, count: 1024)
        #expect(!GGMLType.iq2_xxs.canDequantize)
        #expect(throws: GGUFError.self) { _ = try dequantized(.iq2_xxs, bytes, count: 256) }
        #expect(throws: GGUFError.self) { _ = try dequantized(.q8_0, bytes, count: 33) }
        for t in [GGMLType.f32, .f16, .bf16, .q4_0, .q5_0, .q8_0, .q4_K, .q5_K, .q6_K] { #expect(t.canDequantize) }
    }

    @Test func typeTable() {
        #expect(GGMLType(rawValue: 30) == .bf16 && GGMLType(rawValue: 4) == nil && GGMLType(rawValue: 77) == nil)
        #expect(GGMLType.q8_0.blockSize == 32 && GGMLType.q8_0.bytesPerBlock == 34)
        #expect(GGMLType.q4_K.blockSize == 256 && GGMLType.q4_K.bytesPerBlock == 144)
        #expect(GGMLType.q5_K.bytesPerBlock == 176 && GGMLType.q6_K.bytesPerBlock == 210)
        #expect(GGMLType.q5_0.bytesPerBlock == 22 && GGMLType.f16.blockSize == 1 && GGMLType.f32.bytesPerBlock == 4)
        #expect(GGMLType.q4_K.name == "Q4_K" && GGMLType.iq4_xs.name == "IQ4_XS")
    }
}

// MARK: - Writer and reader

@Suite("GGUF reader and writer")
struct GGUFReaderWriterTests {
    @Test func metadataRoundTripsEveryType() throws {
        let dir = TemporaryDirectory("gguf")
        let entries: [(String, GGUFValue)] = [
            ("u8", .uint8(200)), ("i8", .int8(-100)), ("u16", .uint16(60000)), ("i16", .int16(-30000)),
            ("u32", .uint32(4_000_000_000)), ("i32", .int32(-2_000_000_000)), ("f32", .float32(-1.5e-6)),
            ("b.true", .bool(true)), ("b.false", .bool(false)), ("s", .string("héllo ▁wörld \u{1F600}")),
            ("s.empty", .string("")), ("u64", .uint64(.max)), ("i64", .int64(.min)), ("f64", .float64(3.141592653589793)),
            ("a.strings", .array([.string("<pad>"), .string(""), .string("▁the")])),
            ("a.f32", .array((0..<100).map { .float32(Float($0) / 3) })),
            ("a.i32", .array([.int32(-1), .int32(0), .int32(.max)])),
            ("a.empty", .array([])),
            ("a.nested", .array([.array([.uint8(1), .uint8(2)]), .array([.string("x")]), .array([])])),
            ("a.deep", .array([.array([.array([.float64(1), .float64(-2)])])])),
            ("a.bool", .array([.bool(true), .bool(false)])),
        ]
        var w = GGUFWriter()
        for (k, v) in entries { w.set(k, v) }
        w.set("u8", .uint8(201))   // setting again replaces the value and keeps the position
        let path = dir.path + "/meta.gguf"
        try w.write(to: path)
        let f = try GGUFFile(path: path)
        #expect(f.version == 3 && f.alignment == 32 && f.tensors.isEmpty)
        #expect(f.metadataKeys == entries.map(\.0))
        for (k, v) in entries where k != "u8" { #expect(f.metadata[k] == v, "\(k)") }
        #expect(f.metadata["u8"] == .uint8(201))

        #expect(f.metadata["u32"]?.intValue == 4_000_000_000)
        #expect(f.metadata["u64"]?.intValue == nil)          // does not fit an Int
        #expect(f.metadata["i64"]?.intValue == Int.min)
        #expect(f.metadata["f32"]?.doubleValue == Double(Float(-1.5e-6)))
        #expect(f.metadata["i16"]?.doubleValue == -30000)
        #expect(f.metadata["s"]?.stringValue == "héllo ▁wörld \u{1F600}")
        #expect(f.metadata["s"]?.intValue == nil && f.metadata["u8"]?.stringValue == nil)
        #expect(f.metadata["a.strings"]?.arrayValue?.compactMap(\.stringValue) == ["<pad>", "", "▁the"])
        #expect(f.metadata["b.true"]?.boolValue == true)
        #expect(try f.requireMetadata("s") == .string("héllo ▁wörld \u{1F600}"))
        #expect(throws: GGUFError(path: path, message: "no metadata key 'nope'")) { try f.requireMetadata("nope") }
    }

    @Test func tensorsRoundTrip() throws {
        let dir = TemporaryDirectory("gguf")
        var rng = SeededRandom(seed: 11)
        let a = rng.gaussianMatrix(rows: 3, dim: 5)
        let b = rng.gaussianMatrix(rows: 4, dim: 64)
        let c = rng.gaussianMatrix(rows: 2, dim: 7)
        let e = rng.gaussianMatrix(rows: 1, dim: 9)
        let raw = pseudoRandomBytes(2 * 144, seed: 3)
        var w = GGUFWriter()
        w.set("general.architecture", .string("test"))
        w.addTensor(name: "a", dimensions: [5, 3], values: a, as: .f32)
        w.addTensor(name: "b", dimensions: [64, 2, 2], values: b, as: .q8_0)
        w.addTensor(name: "c", dimensions: [7, 2], values: c, as: .f16)
        w.addTensor(name: "e", dimensions: [9], values: e, as: .bf16)
        w.addTensor(name: "k", dimensions: [256, 2], type: .q4_K, data: raw)
        let path = dir.path + "/t.gguf"
        try w.write(to: path)
        let f = try GGUFFile(path: path)
        defer { f.close() }
        #expect(f.tensors.map(\.name) == ["a", "b", "c", "e", "k"])
        let tb = try f.requireTensor("b")
        #expect(tb.dimensions == [64, 2, 2] && tb.type == .q8_0 && tb.rows == 4 && tb.rowLength == 64)
        #expect(tb.elementCount == 256 && tb.byteCount == 8 * 34 && tb.rowByteCount == 68)
        for t in f.tensors { #expect(t.offset % 32 == 0) }
        #expect(try f.dequantize(f.requireTensor("a")) == a)
        #expect(try f.dequantize(f.requireTensor("c")) == c.map { Float(Float16($0)) })
        let eOut = try f.dequantize(f.requireTensor("e"))
        for (x, y) in zip(e, eOut) { #expect(abs(x - y) <= abs(x) * 0x1p-8) }
        #expect(try Array(f.bytes(of: f.requireTensor("k"))) == raw)

        // dequantize == dequantizeRows, and rows come out in ggml order.
        let bAll = try f.dequantize(tb)
        var rows = [Float](repeating: 0, count: 2 * 64)
        try rows.withUnsafeMutableBufferPointer { try f.dequantizeRows(tb, rows: 1..<3, into: $0.baseAddress!) }
        #expect(rows == Array(bAll[64..<192]))
        #expect(throws: GGUFError.self) {
            try rows.withUnsafeMutableBufferPointer { try f.dequantizeRows(tb, rows: 3..<5, into: $0.baseAddress!) }
        }
        #expect(throws: GGUFError(path: path, message: "no tensor 'zz'")) { try f.requireTensor("zz") }
        #expect(f.tensor("zz") == nil)
    }

    @Test func parallelDequantizeMatchesRows() throws {
        // Over 2^18 elements, dequantize splits the work across threads.
        let dir = TemporaryDirectory("gguf")
        let rows = 1100, cols = 256
        var w = GGUFWriter()
        w.addTensor(name: "big", dimensions: [cols, rows], type: .q4_K,
                    data: pseudoRandomBytes(rows * 144, seed: 99).enumerated().map { i, b in
                        i % 144 == 1 || i % 144 == 3 ? b & 0x3B : b })   // finite f16 scales
        let f = try openBytes(w.serialized(), in: dir)
        let t = try f.requireTensor("big")
        let all = try f.dequantize(t)
        var serial = [Float](repeating: 0, count: rows * cols)
        try serial.withUnsafeMutableBufferPointer { try f.dequantizeRows(t, rows: 0..<rows, into: $0.baseAddress!) }
        #expect(all.map(\.bitPattern) == serial.map(\.bitPattern))
    }

    @Test func customAlignment() throws {
        let dir = TemporaryDirectory("gguf")
        var w = GGUFWriter()
        w.addTensor(name: "x", dimensions: [3], values: [1, 2, 3], as: .f32)
        w.addTensor(name: "y", dimensions: [5], values: [4, 5, 6, 7, 8], as: .f32)
        let path = dir.path + "/a.gguf"
        try w.write(to: path, alignment: 64)
        let f = try GGUFFile(path: path)
        #expect(f.alignment == 64 && f.metadata["general.alignment"] == .uint32(64))
        #expect(f.tensors.map(\.offset) == [0, 64] && f.dataOffset % 64 == 0)
        #expect(try f.dequantize(f.requireTensor("y")) == [4, 5, 6, 7, 8])
    }

    @Test func q8_0QuantizationErrorBound() throws {
        var rng = SeededRandom(seed: 8)
        var values = (0..<(32 * 64)).map { _ in rng.gaussian() * 3 }
        for j in 0..<32 { values[j] = 0 }                 // an all-zero block
        values[40] = 1000                                  // an outlier block
        let bytes = ggmlQuantizeQ8_0(values)
        #expect(bytes.count == 64 * 34)
        let out = try dequantized(.q8_0, bytes, count: values.count)
        for b in 0..<64 {
            let block = values[(b * 32)..<(b * 32 + 32)]
            let amax = block.map(abs).max()!
            // Rounding to the grid costs d/2; storing d as f16 costs at most 127 * d * 2^-11 more.
            let bound = amax / 127 * (0.5 + 127 * 0x1p-11) * 1.0001
            for j in block.indices { #expect(abs(out[j] - values[j]) <= bound, "element \(j)") }
        }
        #expect(out[0..<32].allSatisfy { $0 == 0 })
        #expect(abs(out[40] - 1000) <= 1000 * 0x1p-11)
    }

    @Test func closeInvalidatesReads() throws {
        let dir = TemporaryDirectory("gguf")
        let f = try openBytes(smallFile(), in: dir)
        let t = try f.requireTensor("w8")
        #expect(try f.dequantize(t).count == 128)
        f.close()
        f.close()   // idempotent
        #expect(f.isClosed)
        #expect(throws: GGUFError(path: f.path, message: "file is closed")) { try f.dequantize(t) }
        // Metadata stays readable.
        #expect(f.metadata["general.architecture"] == .string("test"))
    }

    @Test func acceptsVersion2AndNoTensors() throws {
        let dir = TemporaryDirectory("gguf")
        var bytes = smallFile()
        patch(&bytes, at: 4, UInt32(2))
        #expect(try openBytes(bytes, in: dir).version == 2)
        var w = GGUFWriter()
        w.set("k", .uint32(1))
        #expect(try openBytes(w.serialized(), in: dir, name: "n.gguf").tensors.isEmpty)
        #expect(try openBytes(GGUFWriter().serialized(), in: dir, name: "e.gguf").metadataKeys.isEmpty)
    }
}

// MARK: - Damaged files

@Suite("GGUF damaged files")
struct GGUFDamagedFileTests {
    @Test func refusesMissingDirectoryAndEmpty() throws {
        let dir = TemporaryDirectory("gguf")
        #expect(throws: GGUFError(path: dir.path + "/none.gguf", message: "cannot open: No such file or directory")) {
            try GGUFFile(path: dir.path + "/none.gguf")
        }
        #expect(throws: GGUFError(path: dir.path, message: "not a regular file")) { try GGUFFile(path: dir.path) }
        #expect(openError([], in: dir) == "empty file")
    }

    @Test func refusesBadMagicAndVersions() throws {
        let dir = TemporaryDirectory("gguf")
        var bytes = smallFile()
        bytes[0] = UInt8(ascii: "X")
        #expect(openError(bytes, in: dir) == "not a GGUF file (bad magic \"XGUF\", expected \"GGUF\")")
        bytes = smallFile()
        patch(&bytes, at: 4, UInt32(1))
        #expect(openError(bytes, in: dir) == "GGUF version 1 is not supported (only versions 2 and 3)")
        patch(&bytes, at: 4, UInt32(99))
        #expect(openError(bytes, in: dir) == "unknown GGUF version 99 (only versions 2 and 3 are supported)")
    }

    @Test func refusesEveryTruncation() throws {
        let dir = TemporaryDirectory("gguf")
        let bytes = smallFile()
        #expect(openError(bytes, in: dir) == nil)
        for cut in 0..<bytes.count {
            guard let message = openError(Array(bytes[..<cut]), in: dir) else {
                Issue.record("a file cut to \(cut) of \(bytes.count) bytes was accepted")
                continue
            }
            let expected = ["truncated", "past the end", "impossible", "empty file"]
            #expect(expected.contains { message.contains($0) }, "cut \(cut): \(message)")
        }
    }

    @Test func refusesBadTensorInfos() throws {
        let dir = TemporaryDirectory("gguf")
        let good = smallFile()
        // Layout after tensor "w8"'s name: n_dims u32, dims u64 x 2, type u32, offset u64.
        let w8 = positionAfterString("w8", in: good)
        let v32 = positionAfterString("v32", in: good)   // n_dims 1: dims at +4, type at +12, offset at +16

        var b = good
        patch(&b, at: v32 + 16, UInt64(1 << 20))
        #expect(openError(b, in: dir)?.contains("tensor 'v32': data (offset 1048576, 12 bytes) runs past the end of the file") == true)
        b = good
        patch(&b, at: v32 + 16, UInt64(192))   // aligned, inside the file, but the data runs past its end
        #expect(openError(b, in: dir)?.hasPrefix("truncated: tensor 'v32'") == true)
        b = good
        patch(&b, at: v32 + 16, UInt64(4))
        #expect(openError(b, in: dir) == "tensor 'v32': offset 4 is not a multiple of the alignment 32")
        b = good
        patch(&b, at: v32 + 16, UInt64(0))
        #expect(openError(b, in: dir)?.hasPrefix("tensors 'w8' and 'v32' overlap") == true
                || openError(b, in: dir)?.hasPrefix("tensors 'v32' and 'w8' overlap") == true)
        b = good
        patch(&b, at: v32 + 12, UInt32(77))
        #expect(openError(b, in: dir) == "tensor 'v32': unknown tensor type 77")
        b = good
        patch(&b, at: v32 + 12, UInt32(4))   // a removed ggml type id
        #expect(openError(b, in: dir) == "tensor 'v32': unknown tensor type 4")
        b = good
        patch(&b, at: w8 + 4, UInt64(0))
        #expect(openError(b, in: dir) == "tensor 'w8': dimension 0 is zero")
        b = good
        patch(&b, at: w8 + 12, UInt64.max)
        #expect(openError(b, in: dir) == "tensor 'w8': dimension 1 is negative (-1)")
        b = good
        patch(&b, at: w8, UInt32(0))
        #expect(openError(b, in: dir) == "tensor 'w8': 0 dimensions (must be 1 to 4)")
        b = good
        patch(&b, at: w8, UInt32(5))
        #expect(openError(b, in: dir) == "tensor 'w8': 5 dimensions (must be 1 to 4)")
        b = good
        patch(&b, at: w8 + 4, UInt64(48))
        #expect(openError(b, in: dir) == "tensor 'w8': row length 48 is not a multiple of the Q8_0 block size 32")
        b = good
        patch(&b, at: w8 + 4, UInt64(1) << 40)
        patch(&b, at: w8 + 12, UInt64(1) << 40)
        #expect(openError(b, in: dir)?.contains("overflows") == true)
        var w = GGUFWriter()
        w.addTensor(name: "t1", dimensions: [1], values: [1], as: .f32)
        w.addTensor(name: "t2", dimensions: [1], values: [2], as: .f32)
        b = w.serialized()
        b[positionAfterString("t2", in: b) - 1] = UInt8(ascii: "1")
        #expect(openError(b, in: dir) == "duplicate tensor name 't1'")
    }

    @Test func refusesBadMetadata() throws {
        let dir = TemporaryDirectory("gguf")
        var w = GGUFWriter()
        w.set("k.a", .uint32(7))
        w.set("k.b", .bool(true))
        w.set("k.s", .string("text"))
        w.set("k.arr", .array([.string("x"), .string("y")]))
        w.addTensor(name: "v", dimensions: [2], values: [1, 2], as: .f32)
        let good = w.serialized()
        #expect(openError(good, in: dir) == nil)

        var b = good
        patch(&b, at: positionAfterString("k.a", in: b), UInt32(13))
        #expect(openError(b, in: dir) == "metadata 'k.a': unknown value type 13")
        b = good
        b[positionAfterString("k.b", in: b) - 1] = UInt8(ascii: "a")
        #expect(openError(b, in: dir) == "duplicate metadata key 'k.a'")
        b = good
        b[positionAfterString("k.b", in: b) + 4] = 2
        #expect(openError(b, in: dir) == "metadata 'k.b': invalid bool value 2")
        b = good
        let s = positionAfterString("text", in: b)
        b[s - 2] = 0xFF
        #expect(openError(b, in: dir)?.contains("invalid UTF-8") == true)
        b = good
        patch(&b, at: positionAfterString("text", in: b) - 12, UInt64(1) << 62)
        #expect(openError(b, in: dir)?.contains("string length 4611686018427387904") == true)
        b = good
        let arr = positionAfterString("k.arr", in: b)           // type u32, element type u32, length u64
        patch(&b, at: arr + 8, UInt64.max / 2)
        #expect(openError(b, in: dir) == "metadata 'k.arr': array length 9223372036854775807 runs past the end of the file (\(good.count) bytes)")
        b = good
        patch(&b, at: arr + 4, UInt32(99))
        #expect(openError(b, in: dir) == "metadata 'k.arr': unknown array element type 99")
        b = good
        patch(&b, at: 8, UInt64(1) << 60)
        #expect(openError(b, in: dir) == "tensor count 1152921504606846976 is impossible in a file of \(good.count) bytes")
        b = good
        patch(&b, at: 16, UInt64.max)
        #expect(openError(b, in: dir) == "metadata count 18446744073709551615 is impossible in a file of \(good.count) bytes")
    }

    @Test func refusesBadAlignment() throws {
        let dir = TemporaryDirectory("gguf")
        for bad in [0, 48] {
            var w = GGUFWriter()
            w.set("general.alignment", .uint32(UInt32(bad)))
            w.addTensor(name: "v", dimensions: [2], values: [1, 2], as: .f32)
            #expect(openError(w.serialized(), in: dir) == "general.alignment \(bad) is not a power of two")
        }
        var w = GGUFWriter()
        w.set("general.alignment", .string("32"))
        #expect(openError(w.serialized(), in: dir)?.hasPrefix("general.alignment is not an integer") == true)
    }

    @Test func refusesDeepNesting() throws {
        let dir = TemporaryDirectory("gguf")
        var v = GGUFValue.uint8(1)
        for _ in 0..<GGUFParser.maxArrayDepth { v = .array([v]) }
        var w = GGUFWriter()
        w.set("deep", v)
        #expect(openError(w.serialized(), in: dir) == nil)
        w.set("deep", .array([v]))
        #expect(openError(w.serialized(), in: dir) == "metadata 'deep': arrays nested deeper than \(GGUFParser.maxArrayDepth)")
    }
}

// MARK: - The real model

@Suite("GGUF real model")
struct GGUFRealModelTests {
    /// Reference values from the `gguf` Python package 0.19.0 (gguf.GGUFReader + gguf.quants.dequantize, numpy
    /// float32), printed with repr(float(x)): (tensor, row, [(column, value)]).
    static let references: [(String, GGMLType, Int, [(Int, Float)])] = [
        ("output_norm.weight", .f32, 0, [(0, 7.125), (1, 9.5625), (639, 21.625)]),
        ("token_embd.weight", .q8_0, 2, [(0, -0.014242410659790039), (1, 0.010566949844360352),
                                          (2, 0.013323545455932617), (639, -0.07030820846557617)]),
        ("token_embd.weight", .q8_0, 262143, [(0, -0.007550239562988281), (639, -0.017424583435058594)]),
        ("blk.0.attn_q.weight", .q5_0, 5, [(0, -0.027099609375), (100, -0.00909423828125), (639, 0.004241943359375)]),
        ("blk.0.attn_output.weight", .q4_K, 3, [(0, 0.026765823364257812), (255, 0.0325775146484375),
                                                 (1023, -0.01853346824645996)]),
        ("blk.0.ffn_down.weight", .q6_K, 7, [(0, 0.014164209365844727), (1000, -0.03935694694519043),
                                              (2047, -0.009334325790405273)]),
        ("blk.17.ffn_down.weight", .q6_K, 639, [(0, 0.0009579658508300781), (2047, -0.005988121032714844)]),
    ]

    @Test(.enabled(if: FileManager.default.fileExists(atPath: modelPath), "needs the Gemma 3 270M GGUF (Tools/fetch_model.sh)"))
    func gemma3_270m() throws {
        let f = try GGUFFile(path: modelPath)
        defer { f.close() }
        #expect(f.version == 3 && f.alignment == 32)
        #expect(f.tensors.count == 236 && f.metadataKeys.count == 33)
        #expect(f.metadataKeys.first == "general.architecture")
        #expect(f.metadata["general.architecture"] == .string("gemma3"))
        #expect(f.metadata["gemma3.block_count"]?.intValue == 18)
        #expect(f.metadata["gemma3.embedding_length"]?.intValue == 640)
        #expect(f.metadata["gemma3.attention.key_length"]?.intValue == 256)
        #expect(f.metadata["gemma3.attention.head_count_kv"]?.intValue == 1)
        #expect(f.metadata["gemma3.attention.layer_norm_rms_epsilon"] == .float32(1e-6))
        #expect(f.metadata["general.tags"]?.arrayValue?.compactMap(\.stringValue) == ["gemma3", "gemma", "google", "text-generation"])
        let tokens = try #require(f.metadata["tokenizer.ggml.tokens"]?.arrayValue)
        #expect(tokens.count == 262144)
        #expect(tokens[0...3].compactMap(\.stringValue) == ["<pad>", "<eos>", "<bos>", "<unk>"])
        #expect(tokens[106] == .string("<end_of_turn>") && tokens[107] == .string("\n"))
        #expect(f.metadata["tokenizer.ggml.scores"]?.arrayValue?[1000] == .float32(-506))
        #expect(f.metadata["tokenizer.ggml.token_type"]?.arrayValue?[2] == .int32(3))

        let embed = try f.requireTensor("token_embd.weight")
        #expect(embed.type == .q8_0 && embed.dimensions == [640, 262144] && embed.rows == 262144)
        #expect(Set(f.tensors.map(\.type)) == [.f32, .q4_K, .q5_0, .q6_K, .q8_0])

        for (name, type, row, values) in Self.references {
            let t = try f.requireTensor(name)
            #expect(t.type == type, "\(name)")
            var out = [Float](repeating: .nan, count: t.rowLength)
            try out.withUnsafeMutableBufferPointer { try f.dequantizeRows(t, rows: row..<row + 1, into: $0.baseAddress!) }
            for (col, want) in values { #expect(out[col] == want, "\(name)[\(row), \(col)]") }
            #expect(out.allSatisfy { $0.isFinite })
        }
        // The whole-tensor path agrees with the row path.
        let attnOut = try f.requireTensor("blk.0.attn_output.weight")
        let all = try f.dequantize(attnOut)
        #expect(all.count == 1024 * 640 && all[3 * 1024 + 255] == 0.0325775146484375)
    }
}
