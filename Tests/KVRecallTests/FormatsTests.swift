import Foundation
import Testing
@testable import KVRecall
@testable import KVRecallSupport
@testable import KVRecallKernels
@testable import KVRecallFormats
@testable import KVRecallStorage
@testable import KVRecallIndexes
@testable import KVRecallAttention
@testable import KVRecallSession

// Tests for the .npy / safetensors readers and writers and the Tensor helpers.
// Fixtures are built in code or embedded as base64 (the numpy/safetensors ones
// were produced by np.save / safetensors.numpy.save and are byte-compared with
// our encoders), so no Python is needed to run them.

/// Namespace for the format tests, keeping helper names out of the shared test module.
@Suite struct FormatsTests {}

extension FormatsTests {
    // MARK: - Helpers

    typealias Problem = FormatError.Problem

    /// What a malformed input must produce: an exact problem, or a problem case
    /// whose description contains a fragment (for free-text payloads).
    enum Expect: Sendable, CustomStringConvertible {
        case exact(Problem)
        case kind(String, containing: String)

        var description: String {
            switch self {
            case .exact(let p): return "\(p)"
            case let .kind(name, fragment): return "\(name) containing '\(fragment)'"
            }
        }
    }

    /// The enum case name of a problem, e.g. "badShape".
    static func caseName(_ problem: Problem) -> String {
        Mirror(reflecting: problem).children.first?.label ?? "\(problem)"
    }

    /// Runs `body`, which must throw a `FormatError` for `path` matching `expect`
    /// whose description starts with the path. Returns the error for further checks.
    @discardableResult
    static func expectFormatError(_ expect: Expect, path: String, sourceLocation: SourceLocation = #_sourceLocation,
                           _ body: () throws -> Void) -> FormatError? {
        do {
            try body()
            Issue.record("expected \(expect) but nothing was thrown", sourceLocation: sourceLocation)
            return nil
        } catch let error as FormatError {
            #expect(error.path == path, sourceLocation: sourceLocation)
            #expect(error.description.hasPrefix("\(path): "), "\(error)", sourceLocation: sourceLocation)
            switch expect {
            case .exact(let problem):
                #expect(error.problem == problem, "\(error)", sourceLocation: sourceLocation)
            case let .kind(name, fragment):
                #expect(caseName(error.problem) == name, "\(error)", sourceLocation: sourceLocation)
                #expect(error.description.contains(fragment), "\(error)", sourceLocation: sourceLocation)
            }
            return error
        } catch {
            Issue.record("expected FormatError, got \(error)", sourceLocation: sourceLocation)
            return nil
        }
    }

    static func decode64(_ base64: String) -> [UInt8] { [UInt8](Data(base64Encoded: base64)!) }

    static func f32Bytes(_ values: [Float]) -> [UInt8] {
        values.flatMap { f in withUnsafeBytes(of: f.bitPattern.littleEndian) { Array($0) } }
    }

    static func u16Bytes(_ values: [UInt16]) -> [UInt8] {
        values.flatMap { [UInt8($0 & 0xFF), UInt8($0 >> 8)] }
    }

    /// A hand-built .npy image: magic, version, little-endian header length
    /// (`declaredLength` overrides it), header text and payload.
    static func npyImage(_ header: String, major: UInt8 = 1, minor: UInt8 = 0, payload: [UInt8] = [], declaredLength: Int? = nil) -> [UInt8] {
        let text = Array(header.utf8)
        let length = declaredLength ?? text.count
        var out: [UInt8] = [0x93, 0x4E, 0x55, 0x4D, 0x50, 0x59, major, minor]
        let fieldSize = major == 1 ? 2 : 4
        for i in 0..<fieldSize { out.append(UInt8((length >> (8 * i)) & 0xFF)) }
        return out + text + payload
    }

    /// Header dict for a 2x3 array of `descr` (numpy's own spelling).
    static func dict(_ descr: String = "<f4", fortran: String = "False", shape: String = "(2, 3)") -> String {
        "{'descr': '\(descr)', 'fortran_order': \(fortran), 'shape': \(shape), }        \n"
    }

    /// A safetensors image from header JSON text and a zeroed data area.
    static func safetensorsImage(_ json: String, dataLength: Int, declaredLength: UInt64? = nil) -> [UInt8] {
        let header = Array(json.utf8)
        let length = declaredLength ?? UInt64(header.count)
        return withUnsafeBytes(of: length.littleEndian) { Array($0) } + header + [UInt8](repeating: 0, count: dataLength)
    }

    /// One safetensors header entry as JSON text.
    static func tensorEntry(_ dtype: String = "F32", _ shape: String = "[2]", offsets: String) -> String {
        "{\"dtype\":\"\(dtype)\",\"shape\":\(shape),\"data_offsets\":\(offsets)}"
    }

    /// A fresh directory for file-based tests.
    static func temporaryDirectory() throws -> String {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("formats-tests-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url.path
    }

    /// Produced by numpy 2.4 / safetensors 0.8 (see the test file header).
    enum Fixtures {
        /// np.save(np.arange(6, dtype='<f4').reshape(2, 3) * 0.5 - 1)
        static let npF4x2D = "k05VTVBZAQB2AHsnZGVzY3InOiAnPGY0JywgJ2ZvcnRyYW5fb3JkZXInOiBGYWxzZSwgJ3NoYXBlJzogKDIsIDMpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAIC/AAAAvwAAAAAAAAA/AACAPwAAwD8="
        /// np.save(np.array([1, -2.5, 65504, 2**-24, 0, -0.0, 0.1, 3, 4, 5, 6, 7], dtype='<f2').reshape(2, 2, 3))
        static let npF2x3D = "k05VTVBZAQB2AHsnZGVzY3InOiAnPGYyJywgJ2ZvcnRyYW5fb3JkZXInOiBGYWxzZSwgJ3NoYXBlJzogKDIsIDIsIDMpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAPADB/3sBAAAAAIBmLgBCAEQARQBGAEc="
        /// format.write_array(..., [[1.5, 2.5], [3.5, 4.5]] as '<f4', version=(2, 0))
        static let npV2F4 = "k05VTVBZAgB0AAAAeydkZXNjcic6ICc8ZjQnLCAnZm9ydHJhbl9vcmRlcic6IEZhbHNlLCAnc2hhcGUnOiAoMiwgMiksIH0gICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAMA/AAAgQAAAYEAAAJBA"
        /// format.write_array(..., [[1.5, 2.5], [3.5, 4.5]] as '<f2', version=(3, 0))
        static let npV3F2 = "k05VTVBZAwB0AAAAeydkZXNjcic6ICc8ZjInLCAnZm9ydHJhbl9vcmRlcic6IEZhbHNlLCAnc2hhcGUnOiAoMiwgMiksIH0gICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAPgBBAEOARA=="
        /// np.save(np.array([1, 'a'], dtype=object), allow_pickle=True)
        static let npObject = "k05VTVBZAQB2AHsnZGVzY3InOiAnfE8nLCAnZm9ydHJhbl9vcmRlcic6IEZhbHNlLCAnc2hhcGUnOiAoMiwpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAqABJWQAAAAAAAAAIwWbnVtcHkuX2NvcmUubXVsdGlhcnJheZSMDF9yZWNvbnN0cnVjdJSTlIwFbnVtcHmUjAduZGFycmF5lJOUSwCFlEMBYpSHlFKUKEsBSwKFlGgDjAVkdHlwZZSTlIwCTziUiYiHlFKUKEsDjAF8lE5OTkr/////Sv////9LP3SUYoldlChLAYwBYZRldJRiLg=="
        /// np.save(np.asfortranarray(np.arange(6, dtype='<f4').reshape(2, 3)))
        static let npFortran = "k05VTVBZAQB2AHsnZGVzY3InOiAnPGY0JywgJ2ZvcnRyYW5fb3JkZXInOiBUcnVlLCAnc2hhcGUnOiAoMiwgMyksIH0gICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAAAAAABAQAAAgD8AAIBAAAAAQAAAoEA="
        /// np.save(np.arange(6, dtype='>f4').reshape(2, 3))
        static let npBigEndian = "k05VTVBZAQB2AHsnZGVzY3InOiAnPmY0JywgJ2ZvcnRyYW5fb3JkZXInOiBGYWxzZSwgJ3NoYXBlJzogKDIsIDMpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAAAAP4AAAEAAAABAQAAAQIAAAECgAAA="
        /// np.save(np.arange(6, dtype='<f8').reshape(2, 3))
        static let npF8 = "k05VTVBZAQB2AHsnZGVzY3InOiAnPGY4JywgJ2ZvcnRyYW5fb3JkZXInOiBGYWxzZSwgJ3NoYXBlJzogKDIsIDMpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAAAAAAAAAAAAAAAAAPA/AAAAAAAAAEAAAAAAAAAIQAAAAAAAABBAAAAAAAAAFEA="
        /// np.save(np.arange(6, dtype='<i4').reshape(2, 3))
        static let npI4 = "k05VTVBZAQB2AHsnZGVzY3InOiAnPGk0JywgJ2ZvcnRyYW5fb3JkZXInOiBGYWxzZSwgJ3NoYXBlJzogKDIsIDMpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAAAAAQAAAAIAAAADAAAABAAAAAUAAAA="
        /// np.save(np.zeros(2, dtype=[('a', '<f4'), ('b', '<f4')]))
        static let npStructured = "k05VTVBZAQB2AHsnZGVzY3InOiBbKCdhJywgJzxmNCcpLCAoJ2InLCAnPGY0JyldLCAnZm9ydHJhbl9vcmRlcic6IEZhbHNlLCAnc2hhcGUnOiAoMiwpLCB9ICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgICAgIAoAAAAAAAAAAAAAAAAAAAAA"
        /// safetensors.numpy.save({"k": arange(6) '<f4' (2, 3), "v": [[1, -2.5], [65504, 0]] '<f2'},
        ///                        metadata={"model": "tiny", "layer": "0"})
        static let st = "oAAAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJsYXllciI6IjAiLCJtb2RlbCI6InRpbnkifSwiayI6eyJkdHlwZSI6IkYzMiIsInNoYXBlIjpbMiwzXSwiZGF0YV9vZmZzZXRzIjpbMCwyNF19LCJ2Ijp7ImR0eXBlIjoiRjE2Iiwic2hhcGUiOlsyLDJdLCJkYXRhX29mZnNldHMiOlsyNCwzMl19fSAgAAAAAAAAgD8AAABAAABAQAAAgEAAAKBAADwAwf97AAA="
        /// safetensors.numpy.save({"keys": arange(6) '<f4' (3, 2)})
        static let stSingle = "QAAAAAAAAAB7ImtleXMiOnsiZHR5cGUiOiJGMzIiLCJzaGFwZSI6WzMsMl0sImRhdGFfb2Zmc2V0cyI6WzAsMjRdfX0gICAgAAAAAAAAgD8AAABAAABAQAAAgEAAAKBA"
    }

    struct NPYCase: Sendable, CustomTestStringConvertible {
        let label: String
        let bytes: [UInt8]
        let expect: Expect
        var testDescription: String { label }
    }

    struct SafetensorsCase: Sendable, CustomTestStringConvertible {
        let label: String
        let bytes: [UInt8]
        let expect: Expect
        var testDescription: String { label }

        init(_ label: String, _ json: String, data: Int, _ expect: Expect) {
            self.label = label
            self.bytes = safetensorsImage(json, dataLength: data)
            self.expect = expect
        }

        init(_ label: String, raw: [UInt8], _ expect: Expect) {
            self.label = label
            self.bytes = raw
            self.expect = expect
        }
    }
}

extension FormatsTests {
    // MARK: - Tensor helpers and conversions

    @Suite struct Tensors {
        @Test func shapeHelpers() {
            let t2 = Tensor(name: "k", shape: [4, 3], dtype: .f32, floats: Array(repeating: 1, count: 12))
            #expect(t2.count == 12 && t2.rows == 4 && t2.dim == 3 && t2.data.count == 48)
            let t3 = Tensor(name: "k", shape: [2, 4, 3], dtype: .f16, floats: Array(repeating: 1, count: 24))
            #expect(t3.count == 24 && t3.rows == 8 && t3.dim == 3 && t3.data.count == 48)
            #expect(TensorDType.f32.byteWidth == 4 && TensorDType.f16.byteWidth == 2 && TensorDType.bf16.byteWidth == 2)
        }

        /// (bits, expected value) for binary16; NaN compared with isNaN.
        static let f16Known: [(UInt16, Float)] = [
            (0x3C00, 1.0), (0xC100, -2.5), (0x7BFF, 65504), (0xFBFF, -65504),
            (0x0001, 0x1p-24), (0x8001, -0x1p-24), (0x03FF, 0x1.FF8p-15), (0x0400, 0x1p-14),
            (0x0000, 0), (0x8000, -0.0), (0x3555, 0x1.554p-2),
            (0x7C00, .infinity), (0xFC00, -.infinity), (0x7E00, .nan), (0xFE01, .nan),
        ]

        @Test func f16ToFloatKnownValues() {
            for (bits, expected) in Self.f16Known {
                let value = FloatBits.float(fromF16: bits)
                if expected.isNaN {
                    #expect(value.isNaN, "0x\(String(bits, radix: 16))")
                } else {
                    #expect(value.bitPattern == expected.bitPattern, "0x\(String(bits, radix: 16)) -> \(value)")
                }
            }
            // Through Tensor.floats(), from little-endian bytes.
            let finite = Self.f16Known.filter { !$0.1.isNaN }
            let t = Tensor(name: "h", shape: [1, finite.count], dtype: .f16, data: u16Bytes(finite.map(\.0)))
            #expect(t.floats().map(\.bitPattern) == finite.map(\.1.bitPattern))
        }

        @Test func bf16ToFloatKnownValues() {
            let known: [(UInt16, Float)] = [
                (0x3F80, 1.0), (0xC020, -2.5), (0x4780, 65536), (0x477F, 65280),
                (0x0001, 0x1p-133), (0x8000, -0.0), (0x7F80, .infinity), (0xFF80, -.infinity),
            ]
            for (bits, expected) in known {
                #expect(FloatBits.float(fromBF16: bits).bitPattern == expected.bitPattern)
            }
            #expect(FloatBits.float(fromBF16: 0x7FC0).isNaN)
            let t = Tensor(name: "b", shape: [2, 4], dtype: .bf16, data: u16Bytes(known.map(\.0)))
            #expect(t.floats().map(\.bitPattern) == known.map(\.1.bitPattern))
        }

        @Test func floatToF16Rounding() {
            #expect(FloatBits.f16(from: 1.0) == 0x3C00)
            #expect(FloatBits.f16(from: -2.5) == 0xC100)
            #expect(FloatBits.f16(from: 65504) == 0x7BFF)
            #expect(FloatBits.f16(from: 65519.99) == 0x7BFF) // below the halfway point to 65536
            #expect(FloatBits.f16(from: 65520) == 0x7C00) // ties to even -> Inf
            #expect(FloatBits.f16(from: 1e10) == 0x7C00)
            #expect(FloatBits.f16(from: -.infinity) == 0xFC00)
            #expect(FloatBits.f16(from: .nan) & 0x7C00 == 0x7C00 && FloatBits.f16(from: .nan) & 0x3FF != 0)
            #expect(FloatBits.f16(from: 1 + 0x1p-11) == 0x3C00) // tie -> even
            #expect(FloatBits.f16(from: 1 + 0x3p-11) == 0x3C02) // tie -> even (up)
            #expect(FloatBits.f16(from: 0x1p-24) == 0x0001)
            #expect(FloatBits.f16(from: 0x1p-25) == 0x0000) // tie -> even (zero)
            #expect(FloatBits.f16(from: 0x1.8p-25) == 0x0001)
            #expect(FloatBits.f16(from: -0.0) == 0x8000)
            // Every non-NaN half survives a round trip through Float.
            for bits in UInt16.min...UInt16.max where bits & 0x7C00 != 0x7C00 || bits & 0x3FF == 0 {
                #expect(FloatBits.f16(from: FloatBits.float(fromF16: bits)) == bits)
            }
        }

        @Test func floatToBF16Rounding() {
            #expect(FloatBits.bf16(from: 1.0) == 0x3F80)
            #expect(FloatBits.bf16(from: -2.5) == 0xC020)
            #expect(FloatBits.bf16(from: 65504) == 0x4780) // rounds up to 65536
            #expect(FloatBits.bf16(from: Float(bitPattern: 0x3F80_8000)) == 0x3F80) // tie -> even
            #expect(FloatBits.bf16(from: Float(bitPattern: 0x3F81_8000)) == 0x3F82) // tie -> even (up)
            #expect(FloatBits.bf16(from: .infinity) == 0x7F80)
            #expect(FloatBits.float(fromBF16: FloatBits.bf16(from: .nan)).isNaN)
            #expect(FloatBits.float(fromBF16: FloatBits.bf16(from: Float(bitPattern: 0x7F80_0001))).isNaN) // NaN stays NaN
        }

        #if !(os(macOS) && arch(x86_64))
        @Test func f16MatchesStandardLibraryExhaustively() {
            var mismatches = 0
            for bits in UInt16.min...UInt16.max {
                let ours = FloatBits.float(fromF16: bits)
                let reference = Float(Float16(bitPattern: bits))
                if ours.isNaN ? !reference.isNaN : ours.bitPattern != reference.bitPattern { mismatches += 1 }
            }
            #expect(mismatches == 0)
            var generator = SystemRandomNumberGenerator()
            for _ in 0..<100_000 {
                let f = Float(bitPattern: UInt32.random(in: 0...UInt32.max, using: &generator))
                if f.isNaN { continue }
                #expect(FloatBits.f16(from: f) == Float16(f).bitPattern, "\(f)")
            }
        }
        #endif

        @Test func floatsInitRoundTrip() {
            let values: [Float] = [1, -2.5, 0.5, 1024, -0.25, 3]
            for dtype in TensorDType.allCases {
                let t = Tensor(name: "x", shape: [2, 3], dtype: dtype, floats: values)
                #expect(t.floats() == values, "\(dtype)")
            }
        }

        @Test func firstNonFinite() throws {
            for dtype in TensorDType.allCases {
                var values = [Float](repeating: 0.5, count: 12)
                #expect(Tensor(name: "k", shape: [3, 4], dtype: dtype, floats: values).firstNonFinite() == nil)
                values[9] = .nan
                values[11] = .infinity
                let t = Tensor(name: "k", shape: [3, 4], dtype: dtype, floats: values)
                let hit = try #require(t.firstNonFinite())
                #expect(hit.row == 2 && hit.column == 1, "\(dtype)")
                let narrow = try #require(t.firstNonFinite(rowWidth: 2))
                #expect(narrow.row == 4 && narrow.column == 1)
                let error = expectFormatError(.exact(.nonFinite(row: 2, column: 1)), path: "dump/keys.npy") {
                    try t.requireFinite(path: "dump/keys.npy")
                }
                #expect(error?.tensor == "k")
                #expect(error?.description == "dump/keys.npy: tensor 'k': non-finite value (NaN or Inf) at row 2, column 1")
            }
            // -Inf in the very first element of a 3-D tensor.
            var values = [Float](repeating: 1, count: 24)
            values[0] = -.infinity
            let t3 = Tensor(name: "v", shape: [2, 3, 4], dtype: .f16, floats: values)
            #expect(t3.firstNonFinite().map { [$0.row, $0.column] } == [0, 0])
            #expect(throws: Never.self) { try Tensor(name: "ok", shape: [1, 1], dtype: .f32, floats: [1]).requireFinite(path: "x") }
        }
    }
}

extension FormatsTests {
    // MARK: - NPY

    @Suite struct NPYFormat {
        static let path = "dump/keys.npy"
        static let payload23 = f32Bytes([1, 2, 3, 4, 5, 6])

        static let malformed: [NPYCase] = [
            NPYCase(label: "empty file", bytes: [], expect: .exact(.emptyFile)),
            NPYCase(label: "bad magic (zip)", bytes: Array("PK\u{3}\u{4}not numpy at all".utf8), expect: .exact(.notNPY)),
            NPYCase(label: "bad magic (short)", bytes: [0x93, 0x4E, 0x00], expect: .exact(.notNPY)),
            NPYCase(label: "magic prefix only", bytes: [0x93, 0x4E, 0x55], expect: .exact(.truncated(expected: 10, actual: 3))),
            NPYCase(label: "version 4.0", bytes: npyImage(dict(), major: 4, payload: payload23), expect: .exact(.unsupportedVersion(major: 4, minor: 0))),
            NPYCase(label: "version 1.1", bytes: npyImage(dict(), minor: 1, payload: payload23), expect: .exact(.unsupportedVersion(major: 1, minor: 1))),
            NPYCase(label: "absurd header length (v2)", bytes: npyImage(dict(), major: 2, payload: payload23, declaredLength: 0xFFFF_FFFF),
                    expect: .exact(.headerTooLarge(length: 0xFFFF_FFFF, limit: 65_536))),
            NPYCase(label: "header length past end of file", bytes: npyImage(dict(), payload: payload23, declaredLength: 0xFFFF),
                    expect: .exact(.truncated(expected: 10 + 0xFFFF, actual: 10 + dict().utf8.count + 24))),
            NPYCase(label: "pickled object array (numpy)", bytes: decode64(Fixtures.npObject), expect: .exact(.pickledObject(descr: "|O"))),
            NPYCase(label: "fortran order (numpy)", bytes: decode64(Fixtures.npFortran), expect: .exact(.fortranOrder)),
            NPYCase(label: "big-endian >f4 (numpy)", bytes: decode64(Fixtures.npBigEndian), expect: .exact(.bigEndian(descr: ">f4"))),
            NPYCase(label: "big-endian >f2", bytes: npyImage(dict(">f2"), payload: [UInt8](repeating: 0, count: 12)), expect: .exact(.bigEndian(descr: ">f2"))),
            NPYCase(label: "<f8 (numpy)", bytes: decode64(Fixtures.npF8), expect: .exact(.unsupportedDType("<f8"))),
            NPYCase(label: "<i4 (numpy)", bytes: decode64(Fixtures.npI4), expect: .exact(.unsupportedDType("<i4"))),
            NPYCase(label: "structured dtype (numpy)", bytes: decode64(Fixtures.npStructured), expect: .exact(.unsupportedDType("[('a', '<f4'), ('b', '<f4')]"))),
            NPYCase(label: "payload longer than shape", bytes: npyImage(dict(), payload: payload23 + [0, 0, 0, 0]), expect: .exact(.shapeMismatch(expected: 24, actual: 28))),
            NPYCase(label: "payload truncated", bytes: npyImage(dict(), payload: Array(payload23.dropLast(4))),
                    expect: .exact(.truncated(expected: 10 + dict().utf8.count + 24, actual: 10 + dict().utf8.count + 20))),
            NPYCase(label: "shape product overflows", bytes: npyImage(dict(shape: "(1099511627776, 1099511627776)"), payload: payload23),
                    expect: .kind("badShape", containing: "overflows")),
            NPYCase(label: "dimension above 2^40", bytes: npyImage(dict(shape: "(2199023255552, 1)"), payload: payload23),
                    expect: .kind("badShape", containing: "absurdly large")),
            NPYCase(label: "dimension beyond Int64", bytes: npyImage(dict(shape: "(99999999999999999999999, 3)"), payload: payload23),
                    expect: .kind("badShape", containing: "99999999999999999999999")),
            NPYCase(label: "negative dimension", bytes: npyImage(dict(shape: "(-1, 3)"), payload: payload23), expect: .kind("badShape", containing: "negative dimension -1")),
            NPYCase(label: "1-D shape", bytes: npyImage(dict(shape: "(6,)"), payload: payload23), expect: .kind("badShape", containing: "got 1-D shape [6]")),
            NPYCase(label: "4-D shape", bytes: npyImage(dict(shape: "(1, 1, 2, 3)"), payload: payload23), expect: .kind("badShape", containing: "got 4-D")),
            NPYCase(label: "0-D shape", bytes: npyImage(dict(shape: "()"), payload: f32Bytes([1])), expect: .kind("badShape", containing: "got 0-D")),
            NPYCase(label: "9 dimensions", bytes: npyImage(dict(shape: "(1, 1, 1, 1, 1, 1, 1, 2, 3)"), payload: payload23), expect: .kind("badShape", containing: "9 dimensions")),
            NPYCase(label: "zero rows", bytes: npyImage(dict(shape: "(0, 3)")), expect: .kind("badShape", containing: "zero-length axis 0")),
            NPYCase(label: "zero width", bytes: npyImage(dict(shape: "(2, 0)")), expect: .kind("badShape", containing: "zero-length axis 1")),
            NPYCase(label: "header is a list", bytes: npyImage("['descr', '<f4']\n", payload: payload23), expect: .kind("malformedHeader", containing: "expected a dict literal")),
            NPYCase(label: "missing shape", bytes: npyImage("{'descr': '<f4', 'fortran_order': False}\n", payload: payload23), expect: .kind("malformedHeader", containing: "missing key 'shape'")),
            NPYCase(label: "extra key", bytes: npyImage("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), 'x': 1}\n", payload: payload23),
                    expect: .kind("malformedHeader", containing: "unexpected key 'x'")),
            NPYCase(label: "duplicate key", bytes: npyImage("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)}\n", payload: payload23),
                    expect: .kind("malformedHeader", containing: "duplicate key 'descr'")),
            NPYCase(label: "unbalanced quotes", bytes: npyImage("{'descr': '<f4, 'fortran_order': False, 'shape': (2, 3)}", payload: payload23),
                    expect: .kind("malformedHeader", containing: "expected ',' or '}'")),
            NPYCase(label: "unterminated string", bytes: npyImage("{'descr': '<f4", payload: payload23), expect: .kind("malformedHeader", containing: "unterminated string")),
            NPYCase(label: "unterminated dict", bytes: npyImage("{'descr': '<f4', ", payload: payload23), expect: .kind("malformedHeader", containing: "unterminated dict")),
            NPYCase(label: "float dimension", bytes: npyImage(dict(shape: "(2.0, 3)"), payload: payload23), expect: .kind("malformedHeader", containing: "only plain integers are allowed, found '2.'")),
            NPYCase(label: "shape is a list", bytes: npyImage(dict(shape: "[2, 3]"), payload: payload23), expect: .kind("malformedHeader", containing: "'shape' must be a tuple")),
            NPYCase(label: "shape is a parenthesised int", bytes: npyImage(dict(shape: "(6)"), payload: payload23), expect: .kind("malformedHeader", containing: "'shape' must be a tuple")),
            NPYCase(label: "fortran_order is 0", bytes: npyImage(dict(fortran: "0"), payload: payload23), expect: .kind("malformedHeader", containing: "True or False")),
            NPYCase(label: "descr is an int", bytes: npyImage("{'descr': 4, 'fortran_order': False, 'shape': (2, 3)}\n", payload: payload23),
                    expect: .kind("malformedHeader", containing: "'descr' must be a string")),
            NPYCase(label: "trailing garbage", bytes: npyImage("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3)} x\n", payload: payload23),
                    expect: .kind("malformedHeader", containing: "after the header dict")),
            NPYCase(label: "empty header", bytes: npyImage("", payload: payload23), expect: .kind("malformedHeader", containing: "unexpected end of header")),
            NPYCase(label: "hostile nesting", bytes: npyImage(String(repeating: "(", count: 5000), payload: payload23), expect: .kind("malformedHeader", containing: "nesting deeper")),
            NPYCase(label: "function call", bytes: npyImage("{'descr': eval('1'), 'fortran_order': False, 'shape': (2, 3)}\n", payload: payload23),
                    expect: .kind("malformedHeader", containing: "unexpected name 'eval'")),
        ]

        @Test(arguments: malformed)
        func rejectsMalformed(_ c: NPYCase) {
            expectFormatError(c.expect, path: Self.path) { _ = try NPY.parse(c.bytes, path: Self.path) }
            // The Data entry point behaves identically.
            expectFormatError(c.expect, path: Self.path) { _ = try NPY.parse(Data(c.bytes), path: Self.path) }
        }

        /// Cutting a valid 152-byte file (header ends at 128) anywhere is reported
        /// as truncation with the size the next stage needed.
        @Test(arguments: [1, 3, 6, 7, 8, 9, 10, 11, 64, 127, 128, 140, 151])
        func truncatedAt(_ cut: Int) {
            let whole = decode64(Fixtures.npF4x2D)
            #expect(whole.count == 152)
            let needed = cut < 10 ? 10 : cut < 128 ? 128 : 152
            expectFormatError(.exact(.truncated(expected: needed, actual: cut)), path: Self.path) {
                _ = try NPY.parse(Array(whole.prefix(cut)), path: Self.path)
            }
        }

        @Test func descriptionsAreSentencesStartingWithThePath() {
            let error = expectFormatError(.exact(.pickledObject(descr: "|O")), path: "keys.npy") {
                _ = try NPY.parse(decode64(Fixtures.npObject), path: "keys.npy")
            }
            #expect(error?.description == "keys.npy: pickled object arrays are not supported (dtype '|O'); save with allow_pickle=False")
            #expect(error?.localizedDescription == error?.description)
        }

        @Test func readsNumpyFixtures() throws {
            let f4 = try NPY.parse(decode64(Fixtures.npF4x2D), path: "a/keys.npy")
            #expect(f4.name == "keys" && f4.shape == [2, 3] && f4.dtype == .f32)
            #expect(f4.floats() == [-1, -0.5, 0, 0.5, 1, 1.5])

            let f2 = try NPY.parse(decode64(Fixtures.npF2x3D), path: "values.npy")
            #expect(f2.shape == [2, 2, 3] && f2.dtype == .f16 && f2.rows == 4 && f2.dim == 3)
            let expected: [Float] = [1, -2.5, 65504, 0x1p-24, 0, -0.0, FloatBits.float(fromF16: 0x2E66), 3, 4, 5, 6, 7]
            #expect(f2.floats().map(\.bitPattern) == expected.map(\.bitPattern))

            let v2 = try NPY.parse(decode64(Fixtures.npV2F4), path: "v2.npy")
            #expect(v2.shape == [2, 2] && v2.dtype == .f32 && v2.floats() == [1.5, 2.5, 3.5, 4.5])
            let v3 = try NPY.parse(Data(decode64(Fixtures.npV3F2)), path: "v3.npy")
            #expect(v3.shape == [2, 2] && v3.dtype == .f16 && v3.floats() == [1.5, 2.5, 3.5, 4.5])
        }

        /// Our writer reproduces np.save byte for byte.
        @Test func encodeMatchesNumpy() throws {
            for fixture in [Fixtures.npF4x2D, Fixtures.npF2x3D] {
                let original = decode64(fixture)
                let tensor = try NPY.parse(original, path: "x.npy")
                #expect(try NPY.encode(tensor) == original)
            }
        }

        static let roundTrips: [(TensorDType, [Int])] = [(.f32, [2, 3]), (.f16, [2, 3]), (.f32, [2, 3, 4]), (.f16, [3, 1, 5]), (.f32, [1, 1])]

        @Test(arguments: roundTrips)
        func roundTrip(_ dtype: TensorDType, _ shape: [Int]) throws {
            let count = shape.reduce(1, *)
            let tensor = Tensor(name: "keys", shape: shape, dtype: dtype, floats: (0..<count).map { Float($0) * 0.25 - 1 })
            let encoded = try NPY.encode(tensor)
            let dataStart = encoded.count - tensor.data.count
            #expect(dataStart % 64 == 0 && encoded[dataStart - 1] == 0x0A)
            #expect(try NPY.parse(encoded, path: "x/keys.npy") == tensor)

            let dir = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let path = dir + "/keys.npy"
            try NPY.write(tensor, to: path)
            #expect(try NPY.read(path: path) == tensor)
            #expect(try Array(Data(contentsOf: URL(fileURLWithPath: path))) == encoded)
        }

        /// Header spellings numpy (or `ast.literal_eval`) accepts and we tolerate.
        @Test(arguments: [
            "{\"descr\": \"<f4\", \"fortran_order\": False, \"shape\": (2, 3)}",
            "{'shape': (2, 3), 'descr': '<f4', 'fortran_order': False}\n",
            "{ 'descr' :'<f4' ,'fortran_order':False,'shape':( 2 ,3 , ) , }   \n",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (2L, 3L), }\n",
            "{'descr': '=f4', 'fortran_order': False, 'shape': (2, 3), }\n",
            "{'descr': '|f4', 'fortran_order': False, 'shape': (2, 3), }\n",
            "{'descr': 'f4', 'fortran_order': False, 'shape': (+2, 3), }\n",
        ])
        func toleratesHeaderSpellings(_ header: String) throws {
            let tensor = try NPY.parse(npyImage(header, payload: Self.payload23), path: "x.npy")
            #expect(tensor.shape == [2, 3] && tensor.dtype == .f32 && tensor.floats() == [1, 2, 3, 4, 5, 6])
        }

        @Test func bf16HasNoNPYDType() {
            let tensor = Tensor(name: "b", shape: [1, 2], dtype: .bf16, floats: [1, 2])
            expectFormatError(.kind("unsupportedDType", containing: "bf16"), path: "<memory>") { _ = try NPY.encode(tensor) }
            expectFormatError(.kind("unsupportedDType", containing: "bf16"), path: "/tmp/never-written.npy") {
                try NPY.write(tensor, to: "/tmp/never-written.npy")
            }
            #expect(!FileManager.default.fileExists(atPath: "/tmp/never-written.npy"))
        }

        @Test func fileErrors() throws {
            let dir = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            expectFormatError(.kind("io", containing: "cannot open"), path: dir + "/missing.npy") { _ = try NPY.read(path: dir + "/missing.npy") }
            expectFormatError(.kind("io", containing: "directory"), path: dir) { _ = try NPY.read(path: dir) }

            // The file-based path reports the same problems as the in-memory one.
            let truncated = dir + "/truncated.npy"
            try Data(decode64(Fixtures.npF4x2D).dropLast(8)).write(to: URL(fileURLWithPath: truncated))
            expectFormatError(.exact(.truncated(expected: 152, actual: 144)), path: truncated) { _ = try NPY.read(path: truncated) }
            let absurd = dir + "/absurd.npy"
            try Data(npyImage(dict(), major: 2, payload: Self.payload23, declaredLength: 0x7FFF_FFFF)).write(to: URL(fileURLWithPath: absurd))
            expectFormatError(.exact(.headerTooLarge(length: 0x7FFF_FFFF, limit: 65_536)), path: absurd) { _ = try NPY.read(path: absurd) }
            let empty = dir + "/empty.npy"
            #expect(FileManager.default.createFile(atPath: empty, contents: Data()))
            expectFormatError(.exact(.emptyFile), path: empty) { _ = try NPY.read(path: empty) }
            expectFormatError(.kind("io", containing: "cannot create"), path: dir + "/no/such/dir/x.npy") {
                try NPY.write(Tensor(name: "x", shape: [1, 1], dtype: .f32, floats: [1]), to: dir + "/no/such/dir/x.npy")
            }
        }
    }
}

extension FormatsTests {
    // MARK: - Safetensors

    @Suite struct SafetensorsFormat {
        static let path = "dump/layer0.safetensors"

        static let malformed: [SafetensorsCase] = [
            SafetensorsCase("empty file", raw: [], .exact(.emptyFile)),
            SafetensorsCase("shorter than the length field", raw: [1, 0, 0, 0, 0], .exact(.truncated(expected: 8, actual: 5))),
            SafetensorsCase("header length larger than file", raw: safetensorsImage("{}", dataLength: 0, declaredLength: 4096),
                            .exact(.truncated(expected: 8 + 4096, actual: 10))),
            SafetensorsCase("absurd header length", raw: safetensorsImage("{}", dataLength: 0, declaredLength: 1 << 63),
                            .exact(.headerTooLarge(length: 1 << 63, limit: 100_000_000))),
            SafetensorsCase("header length just over 100 MB", raw: safetensorsImage("{}", dataLength: 0, declaredLength: 100_000_001),
                            .exact(.headerTooLarge(length: 100_000_001, limit: 100_000_000))),
            SafetensorsCase("non-JSON header", "hello world", data: 0, .kind("malformedHeader", containing: "invalid JSON")),
            SafetensorsCase("empty header", "", data: 0, .kind("malformedHeader", containing: "unexpected end of input")),
            SafetensorsCase("non-object JSON", "[1, 2]", data: 0, .kind("malformedHeader", containing: "expected a JSON object, found an array")),
            SafetensorsCase("trailing garbage", "{} {}", data: 0, .kind("malformedHeader", containing: "after the top-level value")),
            SafetensorsCase("invalid UTF-8", raw: [6, 0, 0, 0, 0, 0, 0, 0] + [0x7B, 0x22, 0xFF, 0x22, 0x3A, 0x31], .kind("malformedHeader", containing: "UTF-8")),
            SafetensorsCase("hostile nesting", String(repeating: "[", count: 100_000), data: 0, .kind("malformedHeader", containing: "nesting deeper")),
            SafetensorsCase("duplicate tensor key", "{\"a\":\(tensorEntry(offsets: "[0,8]")),\"a\":\(tensorEntry(offsets: "[0,8]"))}", data: 8,
                            .kind("malformedHeader", containing: "duplicate key \"a\"")),
            SafetensorsCase("entry not an object", "{\"a\": [1, 2]}", data: 0, .kind("malformedHeader", containing: "entry must be an object")),
            SafetensorsCase("missing dtype", "{\"a\":{\"shape\":[2],\"data_offsets\":[0,8]}}", data: 8, .kind("malformedHeader", containing: "missing field 'dtype'")),
            SafetensorsCase("missing shape", "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", data: 8, .kind("malformedHeader", containing: "missing field 'shape'")),
            SafetensorsCase("missing data_offsets", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", data: 8, .kind("malformedHeader", containing: "missing field 'data_offsets'")),
            SafetensorsCase("extra field", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", data: 8,
                            .kind("malformedHeader", containing: "unexpected field 'x'")),
            SafetensorsCase("dtype is a number", "{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", data: 8, .kind("malformedHeader", containing: "'dtype' must be a string")),
            SafetensorsCase("shape is a string", "{\"a\":\(tensorEntry("F32", "\"2\"", offsets: "[0,8]"))}", data: 8, .kind("malformedHeader", containing: "'shape' must be an array")),
            SafetensorsCase("non-integer dimension", "{\"a\":\(tensorEntry("F32", "[2.5]", offsets: "[0,8]"))}", data: 8, .kind("malformedHeader", containing: "non-integer number")),
            SafetensorsCase("boolean dimension", "{\"a\":\(tensorEntry("F32", "[true]", offsets: "[0,8]"))}", data: 8, .kind("malformedHeader", containing: "a boolean")),
            SafetensorsCase("negative dimension", "{\"a\":\(tensorEntry("F32", "[-2]", offsets: "[0,8]"))}", data: 8, .kind("badShape", containing: "negative dimension -2")),
            SafetensorsCase("huge dimension", "{\"a\":\(tensorEntry("F32", "[123456789012345678901234567890]", offsets: "[0,8]"))}", data: 8,
                            .kind("badShape", containing: "out of range")),
            SafetensorsCase("shape overflows", "{\"a\":\(tensorEntry("F32", "[4611686018427387904,4]", offsets: "[0,8]"))}", data: 8, .kind("badShape", containing: "overflows")),
            SafetensorsCase("three offsets", "{\"a\":\(tensorEntry(offsets: "[0,8,16]"))}", data: 8, .kind("malformedHeader", containing: "exactly 2 integers")),
            SafetensorsCase("fractional offset", "{\"a\":\(tensorEntry(offsets: "[0,8.0]"))}", data: 8, .kind("malformedHeader", containing: "'8.0'")),
            SafetensorsCase("unknown dtype", "{\"a\":\(tensorEntry("Q7", offsets: "[0,8]"))}", data: 8, .exact(.unsupportedDType("Q7"))),
            SafetensorsCase("metadata value not a string", "{\"__metadata__\":{\"n\":3}}", data: 0, .kind("malformedHeader", containing: "'n' is an integer")),
            SafetensorsCase("metadata not an object", "{\"__metadata__\":\"x\"}", data: 0, .kind("malformedHeader", containing: "__metadata__ must be an object")),
            SafetensorsCase("offsets out of bounds", "{\"a\":\(tensorEntry(offsets: "[0,8]"))}", data: 4, .exact(.offsetsOutOfBounds(begin: 0, end: 8, dataLength: 4))),
            SafetensorsCase("offsets reversed", "{\"a\":\(tensorEntry("F32", "[0]", offsets: "[8,0]"))}", data: 8, .exact(.offsetsOutOfBounds(begin: 8, end: 0, dataLength: 8))),
            SafetensorsCase("negative offset", "{\"a\":\(tensorEntry(offsets: "[-8,0]"))}", data: 8, .exact(.offsetsOutOfBounds(begin: -8, end: 0, dataLength: 8))),
            SafetensorsCase("shape larger than range", "{\"a\":\(tensorEntry("F32", "[3]", offsets: "[0,8]"))}", data: 8, .exact(.shapeMismatch(expected: 12, actual: 8))),
            SafetensorsCase("dtype narrower than range", "{\"a\":\(tensorEntry("F16", "[2]", offsets: "[0,8]"))}", data: 8, .exact(.shapeMismatch(expected: 4, actual: 8))),
            SafetensorsCase("overlapping ranges", "{\"b\":\(tensorEntry(offsets: "[4,12]")),\"a\":\(tensorEntry(offsets: "[0,8]"))}", data: 12,
                            .exact(.overlappingTensors("a", "b"))),
            SafetensorsCase("gap between tensors", "{\"a\":\(tensorEntry(offsets: "[0,8]")),\"b\":\(tensorEntry(offsets: "[12,20]"))}", data: 20,
                            .exact(.unreferencedBytes(begin: 8, end: 12))),
            SafetensorsCase("trailing data bytes", "{\"a\":\(tensorEntry(offsets: "[0,8]"))}", data: 12, .exact(.unreferencedBytes(begin: 8, end: 12))),
        ]

        @Test(arguments: malformed)
        func rejectsMalformed(_ c: SafetensorsCase) {
            expectFormatError(c.expect, path: Self.path) { _ = try Safetensors.parse(c.bytes, path: Self.path) }
        }

        /// The same table through the file-based reader.
        @Test func rejectsMalformedFiles() throws {
            let dir = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            for (i, c) in Self.malformed.enumerated() {
                let path = "\(dir)/\(i).safetensors"
                try Data(c.bytes).write(to: URL(fileURLWithPath: path))
                expectFormatError(c.expect, path: path) { _ = try Safetensors.read(path: path) }
            }
        }

        static let mixed: [Tensor] = [
            Tensor(name: "layers.0.k", shape: [2, 3], dtype: .f32, floats: [1, -2.5, 65504, 0x1p-24, 0, 7]),
            Tensor(name: "layers.0.v", shape: [2, 2, 3], dtype: .f16, floats: (0..<12).map { Float($0) - 5.5 }),
            Tensor(name: "layers.0.q", shape: [3, 1], dtype: .bf16, floats: [1, -2.5, 0.5]),
        ]
        static let metadata = ["model": "tiny-llm", "note": "quote \" and\nnewline", "ünïcode": "✓"]

        @Test func roundTripInMemory() throws {
            let encoded = try Safetensors.encode(tensors: Self.mixed, metadata: Self.metadata)
            let headerLength = Int(encoded[0]) | Int(encoded[1]) << 8
            #expect(headerLength % 8 == 0)
            let file = try Safetensors.parse(encoded, path: Self.path)
            #expect(file.names() == ["layers.0.k", "layers.0.q", "layers.0.v"])
            #expect(file.metadata == Self.metadata)
            // Data ordered by alignment: F32, then BF16, then F16.
            #expect(file.entries.map(\.name) == ["layers.0.k", "layers.0.q", "layers.0.v"])
            #expect(file.entry(named: "layers.0.v")?.dtype == "F16")
            for tensor in Self.mixed {
                #expect(try file.tensor(named: tensor.name) == tensor)
            }
        }

        @Test func roundTripThroughFileReadsLazily() throws {
            let dir = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: dir) }
            let path = dir + "/kv.safetensors"
            try Safetensors.write(tensors: Self.mixed, metadata: Self.metadata, to: path)
            #expect(try Array(Data(contentsOf: URL(fileURLWithPath: path))) == Safetensors.encode(tensors: Self.mixed, metadata: Self.metadata))
            let file = try Safetensors.read(path: path)
            #expect(file.metadata == Self.metadata)
            for tensor in Self.mixed {
                #expect(try file.tensor(named: tensor.name) == tensor)
            }
            // If the file is cut after its header was read, loading reports it.
            let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
            try handle.truncate(atOffset: 40)
            try handle.close()
            expectFormatError(.kind("io", containing: "changed size"), path: path) { _ = try file.tensor(named: "layers.0.k") }
        }

        @Test func readsReferenceFixtures() throws {
            let file = try Safetensors.parse(decode64(Fixtures.st), path: "ref.safetensors")
            #expect(file.names() == ["k", "v"] && file.metadata == ["model": "tiny", "layer": "0"])
            let k = try file.tensor(named: "k")
            #expect(k.shape == [2, 3] && k.dtype == .f32 && k.floats() == [0, 1, 2, 3, 4, 5])
            let v = try file.tensor(named: "v")
            #expect(v.shape == [2, 2] && v.dtype == .f16 && v.floats() == [1, -2.5, 65504, 0])
        }

        /// Our writer reproduces the reference implementation byte for byte.
        @Test func encodeMatchesReference() throws {
            for fixture in [Fixtures.st, Fixtures.stSingle] {
                let original = decode64(fixture)
                let file = try Safetensors.parse(original, path: "ref.safetensors")
                let tensors = try file.names().map { try file.tensor(named: $0) }
                #expect(try Safetensors.encode(tensors: tensors, metadata: file.metadata) == original)
            }
            #expect(try Safetensors.encode(tensors: []) == [8, 0, 0, 0, 0, 0, 0, 0, 0x7B, 0x7D, 32, 32, 32, 32, 32, 32])
        }

        @Test func tensorNotFoundListsNames() throws {
            let file = try Safetensors.parse(decode64(Fixtures.st), path: Self.path)
            let error = expectFormatError(.exact(.tensorNotFound(name: "q", available: ["k", "v"])), path: Self.path) {
                _ = try file.tensor(named: "q")
            }
            #expect(error?.description == "\(Self.path): no tensor named 'q'; available: 'k', 'v'")
        }

        @Test func listedButUnsupportedTensors() throws {
            let json = "{\"d\":\(tensorEntry("F64", "[1,2]", offsets: "[0,16]")),\"i\":\(tensorEntry("I64", "[2,1]", offsets: "[16,32]")),"
                + "\"flat\":\(tensorEntry("F32", "[4]", offsets: "[32,48]")),\"empty\":\(tensorEntry("F32", "[0,4]", offsets: "[48,48]")),"
                + "\"packed\":\(tensorEntry("F4", "[2,2]", offsets: "[48,50]"))}"
            let file = try Safetensors.parse(safetensorsImage(json, dataLength: 50), path: Self.path)
            #expect(file.names() == ["d", "empty", "flat", "i", "packed"])
            var error = expectFormatError(.exact(.unsupportedDType("F64")), path: Self.path) { _ = try file.tensor(named: "d") }
            #expect(error?.tensor == "d")
            error = expectFormatError(.exact(.unsupportedDType("I64")), path: Self.path) { _ = try file.tensor(named: "i") }
            #expect(error?.description.hasPrefix("\(Self.path): tensor 'i': unsupported dtype 'I64'") == true)
            expectFormatError(.kind("badShape", containing: "got 1-D"), path: Self.path) { _ = try file.tensor(named: "flat") }
            expectFormatError(.kind("badShape", containing: "zero-length"), path: Self.path) { _ = try file.tensor(named: "empty") }
            expectFormatError(.exact(.unsupportedDType("F4")), path: Self.path) { _ = try file.tensor(named: "packed") }
        }

        @Test func encoderRejectsBadNames() {
            let a = Tensor(name: "a", shape: [1, 1], dtype: .f32, floats: [1])
            expectFormatError(.exact(.duplicateTensor("a")), path: "<memory>") { _ = try Safetensors.encode(tensors: [a, a]) }
            let reserved = Tensor(name: "__metadata__", shape: [1, 1], dtype: .f32, floats: [1])
            expectFormatError(.kind("malformedHeader", containing: "reserved"), path: "<memory>") { _ = try Safetensors.encode(tensors: [reserved]) }
        }

        @Test func nullMetadataAndWhitespaceAreAccepted() throws {
            let json = " {\"__metadata__\": null, \"a\": \(tensorEntry("BF16", "[1, 2]", offsets: "[0, 4]"))}\n\t "
            let file = try Safetensors.parse(safetensorsImage(json, dataLength: 4), path: Self.path)
            #expect(file.metadata.isEmpty && file.names() == ["a"])
            #expect(try file.tensor(named: "a").floats() == [0, 0])
        }
    }
}
