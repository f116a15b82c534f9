// GGUF metadata values, ggml tensor types and the reader's error.

/// A problem with a GGUF file: the file's path and what is wrong with it.
public struct GGUFError: Error, CustomStringConvertible, Equatable {
    public let path: String
    public let message: String

    public init(path: String, message: String) {
        self.path = path
        self.message = message
    }

    public var description: String { "\(path): \(message)" }
}

/// ggml tensor element types, with ggml's ids (`enum ggml_type`). Ids 4, 5 and 31...33, 36...38 are removed types.
public enum GGMLType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9
    case q2_K = 10, q3_K = 11, q4_K = 12, q5_K = 13, q6_K = 14, q8_K = 15
    case iq2_xxs = 16, iq2_xs = 17, iq3_xxs = 18, iq1_s = 19, iq4_nl = 20, iq3_s = 21, iq2_s = 22, iq4_xs = 23
    case i8 = 24, i16 = 25, i32 = 26, i64 = 27, f64 = 28, iq1_m = 29, bf16 = 30
    case tq1_0 = 34, tq2_0 = 35, mxfp4 = 39, nvfp4 = 40, q1_0 = 41, q2_0 = 42

    /// Elements per block.
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16, .f64, .i8, .i16, .i32, .i64: return 1
        case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q8_1, .iq4_nl, .mxfp4: return 32
        case .nvfp4, .q2_0: return 64
        case .q1_0: return 128
        case .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K, .iq2_xxs, .iq2_xs, .iq3_xxs, .iq1_s, .iq3_s, .iq2_s,
             .iq4_xs, .iq1_m, .tq1_0, .tq2_0:
            return 256
        }
    }

    /// Bytes per block (ggml's `type_size`).
    public var bytesPerBlock: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        case .f64, .i64: return 8
        case .i8: return 1
        case .i16: return 2
        case .i32: return 4
        case .q4_0: return 18      // f16 d, 16 nibble bytes
        case .q4_1: return 20      // f16 d, f16 m, 16
        case .q5_0: return 22      // f16 d, 4 qh, 16
        case .q5_1: return 24      // f16 d, f16 m, 4 qh, 16
        case .q8_0: return 34      // f16 d, 32 int8
        case .q8_1: return 36      // f16 d, f16 s, 32 int8
        case .q2_K: return 84      // 16 scales, 64 qs, f16 d, f16 dmin
        case .q3_K: return 110     // 32 hmask, 64 qs, 12 scales, f16 d
        case .q4_K: return 144     // f16 d, f16 dmin, 12 scales, 128 qs
        case .q5_K: return 176     // f16 d, f16 dmin, 12 scales, 32 qh, 128 qs
        case .q6_K: return 210     // 128 ql, 64 qh, 16 int8 scales, f16 d
        case .q8_K: return 292     // f32 d, 256 int8, 16 int16 bsums
        case .iq2_xxs: return 66
        case .iq2_xs: return 74
        case .iq3_xxs: return 98
        case .iq1_s: return 50
        case .iq4_nl: return 18    // f16 d, 16
        case .iq3_s: return 110
        case .iq2_s: return 82
        case .iq4_xs: return 136   // f16 d, u16 scales_h, 4 scales_l, 128 qs
        case .iq1_m: return 56
        case .tq1_0: return 54
        case .tq2_0: return 66     // 64 qs, f16 d
        case .mxfp4: return 17
        case .nvfp4: return 36
        case .q1_0: return 18
        case .q2_0: return 18
        }
    }

    /// Whether `ggmlDequantize` handles this type.
    public var canDequantize: Bool {
        switch self {
        case .f32, .f16, .bf16, .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K,
             .iq4_nl, .iq4_xs, .tq2_0:
            return true
        default:
            return false
        }
    }

    /// ggml's type name in upper case, as llama.cpp prints it ("Q4_K", "F32").
    public var name: String { description }

    public var description: String {
        switch self {
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        case .f64: return "F64"
        case .i8: return "I8"
        case .i16: return "I16"
        case .i32: return "I32"
        case .i64: return "I64"
        case .q4_0: return "Q4_0"
        case .q4_1: return "Q4_1"
        case .q5_0: return "Q5_0"
        case .q5_1: return "Q5_1"
        case .q8_0: return "Q8_0"
        case .q8_1: return "Q8_1"
        case .q2_K: return "Q2_K"
        case .q3_K: return "Q3_K"
        case .q4_K: return "Q4_K"
        case .q5_K: return "Q5_K"
        case .q6_K: return "Q6_K"
        case .q8_K: return "Q8_K"
        case .iq2_xxs: return "IQ2_XXS"
        case .iq2_xs: return "IQ2_XS"
        case .iq3_xxs: return "IQ3_XXS"
        case .iq1_s: return "IQ1_S"
        case .iq4_nl: return "IQ4_NL"
        case .iq3_s: return "IQ3_S"
        case .iq2_s: return "IQ2_S"
        case .iq4_xs: return "IQ4_XS"
        case .iq1_m: return "IQ1_M"
        case .tq1_0: return "TQ1_0"
        case .tq2_0: return "TQ2_0"
        case .mxfp4: return "MXFP4"
        case .nvfp4: return "NVFP4"
        case .q1_0: return "Q1_0"
        case .q2_0: return "Q2_0"
        }
    }
}

/// A GGUF metadata value. The type ids in the file are the case order: uint8 = 0 ... float64 = 12.
public indirect enum GGUFValue: Equatable, Sendable {
    case uint8(UInt8)
    case int8(Int8)
    case uint16(UInt16)
    case int16(Int16)
    case uint32(UInt32)
    case int32(Int32)
    case float32(Float)
    case bool(Bool)
    case string(String)
    case array([GGUFValue])
    case uint64(UInt64)
    case int64(Int64)
    case float64(Double)

    /// The value of any integer case (nil if it does not fit an Int), or nil.
    public var intValue: Int? {
        switch self {
        case .uint8(let v): return Int(v)
        case .int8(let v): return Int(v)
        case .uint16(let v): return Int(v)
        case .int16(let v): return Int(v)
        case .uint32(let v): return Int(v)
        case .int32(let v): return Int(v)
        case .uint64(let v): return Int(exactly: v)
        case .int64(let v): return Int(v)
        default: return nil
        }
    }

    /// The value of any numeric case as a Double, or nil.
    public var doubleValue: Double? {
        switch self {
        case .float32(let v): return Double(v)
        case .float64(let v): return v
        case .uint64(let v): return Double(v)
        default: return intValue.map(Double.init)
        }
    }

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var arrayValue: [GGUFValue]? {
        if case .array(let a) = self { return a }
        return nil
    }

    public var boolValue: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    /// The GGUF value type id of this case (0...12).
    public var typeID: UInt32 {
        switch self {
        case .uint8: return 0
        case .int8: return 1
        case .uint16: return 2
        case .int16: return 3
        case .uint32: return 4
        case .int32: return 5
        case .float32: return 6
        case .bool: return 7
        case .string: return 8
        case .array: return 9
        case .uint64: return 10
        case .int64: return 11
        case .float64: return 12
        }
    }
}
