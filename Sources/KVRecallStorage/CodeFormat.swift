import CKernels
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

/// The quantized tier of a head: low-bit codes of its keys and values, beside the stored vectors,
/// for a scan that reads a fraction of the bytes (docs/ARCHITECTURE.md, "Quantized tier").
///
/// Positions are coded in groups of `group` (KIVI): keys per channel within a group (a channel's
/// min and step over the group's positions: key outliers live in channels), values per position
/// in runs of `valueChannels` channels. A group is coded once its last position is stored, in the
/// same transaction; the positions of an incomplete group are the most recent ones, which attention
/// keeps in its exact window.
///
/// One group is one row of the head's code stream:
///
///     key min [P] f32 | key step [P] f32 | key codes [group][P * keyBits / 8]
///     value min [group][P / valueChannels] f32 | value step [group][P / valueChannels] f32
///     value codes [group][P * valueBits / 8]
///
/// with P the dimension rounded up to 32 (padding channels hold code 0 and never count). 4-bit
/// codes pack 32 channels in 16 bytes: byte j holds channel j in its low nibble and j + 16 in its
/// high one, so a scan splits a 16-byte load into two runs of 16 channels in order.
public struct CodeFormat: Codable, Equatable, Sendable, CustomStringConvertible {
    /// Bits per key code and per value code: 4 or 8.
    public var keyBits: Int
    public var valueBits: Int
    /// Positions per group (key steps are per channel and group); divides the head's block size.
    public var group: Int
    /// Channels sharing one value min and step within a position; divides the padded dimension.
    public var valueChannels: Int
    /// Mins and steps as f32 (heads stored in f32 or bf16, whose values may pass f16's range) or
    /// as f16 (heads stored in f16: every value, so every min and step, fits).
    public var wideSteps: Bool

    public init(keyBits: Int = 4, valueBits: Int = 4, group: Int = 64, valueChannels: Int = 32, wideSteps: Bool = false) {
        self.keyBits = keyBits
        self.valueBits = valueBits
        self.group = group
        self.valueChannels = valueChannels
        self.wideSteps = wideSteps
    }

    /// The format for a head stored in `dtype`: f16 steps for an f16 head, f32 otherwise.
    public func fitted(to dtype: DType) -> CodeFormat {
        var format = self
        format.wideSteps = dtype != .f16
        return format
    }

    /// Bytes of one min or step.
    public var stepBytes: Int { wideSteps ? 4 : 2 }

    public var description: String {
        "keys \(keyBits)-bit per channel in groups of \(group) positions, values \(valueBits)-bit per position in runs of \(valueChannels) channels"
    }

    /// The error naming what is wrong with this format for a head, or nil.
    public func problem(dimension d: Int, blockSize: Int) -> String? {
        guard [4, 8].contains(keyBits), [4, 8].contains(valueBits) else { return "code bits must be 4 or 8 (got keys \(keyBits), values \(valueBits))" }
        guard group >= 1, blockSize % group == 0 else { return "the code group (\(group)) must divide the block size (\(blockSize))" }
        guard valueChannels >= 16, valueChannels % 16 == 0, padded(d) % valueChannels == 0 else {
            return "value channels per step (\(valueChannels)) must be a multiple of 16 dividing the padded dimension \(padded(d))"
        }
        return nil
    }

    /// The dimension rounded up to a whole number of 32-channel runs.
    public func padded(_ d: Int) -> Int { (d + 31) / 32 * 32 }

    /// Bytes of one position's key codes and value codes.
    public func keyCodeBytes(_ d: Int) -> Int { padded(d) * keyBits / 8 }
    public func valueCodeBytes(_ d: Int) -> Int { padded(d) * valueBits / 8 }
    /// Value steps per position.
    public func valueRuns(_ d: Int) -> Int { padded(d) / valueChannels }

    /// Byte offsets of a group row's parts, and its size.
    public struct Layout: Sendable, Equatable {
        public let keyMin: Int, keyStep: Int, keyCodes: Int, valueMin: Int, valueStep: Int, valueCodes: Int, rowBytes: Int
        public let keyCodeBytes: Int, valueCodeBytes: Int, valueRuns: Int, padded: Int, group: Int
    }

    public func layout(dimension d: Int) -> Layout {
        let p = padded(d), kb = keyCodeBytes(d), vb = valueCodeBytes(d), runs = valueRuns(d), s = stepBytes
        let keyMin = 0, keyStep = keyMin + s * p, keyCodes = keyStep + s * p
        let valueMin = keyCodes + group * kb, valueStep = valueMin + s * group * runs, valueCodes = valueStep + s * group * runs
        return Layout(keyMin: keyMin, keyStep: keyStep, keyCodes: keyCodes, valueMin: valueMin, valueStep: valueStep,
                      valueCodes: valueCodes, rowBytes: valueCodes + group * vb, keyCodeBytes: kb, valueCodeBytes: vb,
                      valueRuns: runs, padded: p, group: group)
    }

    /// Bytes per position of codes and their steps, against `bytesPerVector` for one stored key
    /// plus one stored value (the tier's size relative to the vectors it stands for).
    public func bytesPerPosition(dimension d: Int) -> Double { Double(layout(dimension: d).rowBytes) / Double(group) }
}

extension CodeFormat {
    /// Codes one group: `keys` and `values` are `group x d` f32 rows (as stored: already rounded to
    /// the head's dtype); writes one row of `layout(dimension: d).rowBytes` bytes at `out`.
    public func encodeGroup(keys: UnsafePointer<Float>, values: UnsafePointer<Float>, dimension d: Int,
                            into out: UnsafeMutableRawPointer) {
        let l = layout(dimension: d)
        out.initializeMemory(as: UInt8.self, repeating: 0, count: l.rowBytes)
        // Mins and steps are rounded to their stored type first, and codes are chosen against the
        // rounded ones, so decoding reproduces what the codes were chosen for.
        var keyMin = [Float](repeating: 0, count: d), keyStep = [Float](repeating: 0, count: d)
        let keyLevels = Float((1 << keyBits) - 1)
        for c in 0..<d {
            var lo = Float.infinity, hi = -Float.infinity
            for i in 0..<group {
                lo = min(lo, keys[i * d + c])
                hi = max(hi, keys[i * d + c])
            }
            keyMin[c] = roundedStep(lo, down: true)
            keyStep[c] = hi > keyMin[c] ? roundedStep((hi - keyMin[c]) / keyLevels, down: false) : 0
        }
        writeSteps(keyMin, at: out + l.keyMin)
        writeSteps(keyStep, at: out + l.keyStep)
        for i in 0..<group {
            let row = (out + l.keyCodes + i * l.keyCodeBytes).assumingMemoryBound(to: UInt8.self)
            for c in 0..<d {
                let step = keyStep[c]
                let code = step > 0 ? min(keyLevels, max(0, ((keys[i * d + c] - keyMin[c]) / step).rounded())) : 0
                Self.put(UInt8(code), channel: c, bits: keyBits, in: row)
            }
        }
        var valueMin = [Float](repeating: 0, count: group * l.valueRuns), valueStep = valueMin
        let valueLevels = Float((1 << valueBits) - 1)
        for i in 0..<group {
            let row = (out + l.valueCodes + i * l.valueCodeBytes).assumingMemoryBound(to: UInt8.self)
            for r in 0..<l.valueRuns {
                let first = r * valueChannels, last = min(d, first + valueChannels)
                guard first < d else { break }
                var lo = Float.infinity, hi = -Float.infinity
                for c in first..<last {
                    lo = min(lo, values[i * d + c])
                    hi = max(hi, values[i * d + c])
                }
                lo = roundedStep(lo, down: true)
                let step = hi > lo ? roundedStep((hi - lo) / valueLevels, down: false) : 0
                valueMin[i * l.valueRuns + r] = lo
                valueStep[i * l.valueRuns + r] = step
                for c in first..<last {
                    let code = step > 0 ? min(valueLevels, max(0, ((values[i * d + c] - lo) / step).rounded())) : 0
                    Self.put(UInt8(code), channel: c, bits: valueBits, in: row)
                }
            }
        }
        writeSteps(valueMin, at: out + l.valueMin)
        writeSteps(valueStep, at: out + l.valueStep)
    }

    /// `x` as the stored type will hold it: a min rounded down and a step rounded up to a
    /// neighbouring f16 (so the codes' range still covers the group), or `x` itself with `wideSteps`.
    /// (f16 through the C kernels: Swift's Float16 is not used on x86 Linux here.)
    func roundedStep(_ x: Float, down: Bool) -> Float {
        guard !wideSteps else { return x }
        var value = x, half: UInt16 = 0, back: Float = 0
        kvr_f32_to_f16(&value, &half, 1)
        kvr_f16_to_f32(&half, &back, 1)
        if down && back > x { half = x < 0 ? half &+ 1 : half &- 1 }  // one f16 step towards -inf
        if !down && back < x { half = x < 0 ? half &- 1 : half &+ 1 }  // one f16 step towards +inf
        kvr_f16_to_f32(&half, &back, 1)
        return back
    }

    /// Stores mins or steps in the stored type.
    func writeSteps(_ values: [Float], at out: UnsafeMutableRawPointer) {
        values.withUnsafeBufferPointer { v in
            if wideSteps {
                out.copyMemory(from: v.baseAddress!, byteCount: v.count * 4)
            } else {
                kvr_f32_to_f16(v.baseAddress!, out.assumingMemoryBound(to: UInt16.self), v.count)
            }
        }
    }

    /// Min or step `i` read back as f32.
    @inline(__always)
    func step(_ base: UnsafeRawPointer, _ i: Int) -> Float {
        if wideSteps { return base.load(fromByteOffset: 4 * i, as: Float.self) }
        var half = base.load(fromByteOffset: 2 * i, as: UInt16.self), out: Float = 0
        kvr_f16_to_f32(&half, &out, 1)
        return out
    }

    /// Writes `code` for `channel` into a position's code bytes (4-bit: byte j of a 32-channel run
    /// holds channels j and j + 16).
    @inline(__always)
    static func put(_ code: UInt8, channel c: Int, bits: Int, in row: UnsafeMutablePointer<UInt8>) {
        if bits == 8 { row[c] = code; return }
        let run = c / 32, j = c % 32
        let byte = run * 16 + j % 16
        row[byte] |= j < 16 ? code : code << 4
    }

    /// The code of `channel` in a position's code bytes.
    @inline(__always)
    public static func code(channel c: Int, bits: Int, in row: UnsafePointer<UInt8>) -> UInt8 {
        if bits == 8 { return row[c] }
        let run = c / 32, j = c % 32
        let byte = row[run * 16 + j % 16]
        return j < 16 ? byte & 0x0F : byte >> 4
    }

    /// Position `i` of a group row decoded back to f32 (`d` floats each; tests and diagnostics).
    public func decode(row: UnsafeRawPointer, position i: Int, dimension d: Int,
                       key: UnsafeMutablePointer<Float>, value: UnsafeMutablePointer<Float>) {
        let l = layout(dimension: d)
        let keyCodes = (row + l.keyCodes + i * l.keyCodeBytes).assumingMemoryBound(to: UInt8.self)
        for c in 0..<d {
            key[c] = step(row + l.keyMin, c) + step(row + l.keyStep, c) * Float(Self.code(channel: c, bits: keyBits, in: keyCodes))
        }
        let valueCodes = (row + l.valueCodes + i * l.valueCodeBytes).assumingMemoryBound(to: UInt8.self)
        for c in 0..<d {
            let r = i * l.valueRuns + c / valueChannels
            value[c] = step(row + l.valueMin, r) + step(row + l.valueStep, r) * Float(Self.code(channel: c, bits: valueBits, in: valueCodes))
        }
    }
}
