import CKernels
import KVRecallSupport
import KVRecallKernels
import KVRecallFormats

/// The quantized tier of a head: low-bit codes of its keys and values, beside the stored vectors,
/// for a scan that reads a fraction of the bytes (docs/ARCHITECTURE.md, "Quantized tier").
///
/// Positions are coded in groups of `group` (KIVI's per-channel key quantization, applied to the
/// values too: docs/QUANT_STUDY.md measured it as accurate as per-position value codes at fewer
/// bytes): every channel of a group has a min and a step for its keys and for its values, and the
/// group keeps its mean value (a light group of a decode step's tail is attended through it). A
/// group is coded once its last position is stored, in the same transaction; the positions of an
/// incomplete group are the most recent ones, which attention keeps in its exact window.
///
/// One group is one row of the head's code stream (S: f16, or f32 with `wideSteps`; P: the
/// dimension rounded up to 32, padding channels code 0 and never count):
///
///     key min [P] S | key step [P] S | key codes [group][P * keyBits / 8]      (position-major)
///     value min [P] S | value step [P] S | value mean [P] S
///     value codes [P][group * valueBits / 8]                                  (channel-major)
///
/// Key codes of a position pack 32 channels in 16 bytes (4 bits): byte j holds channel j in its low
/// nibble and j + 16 in its high one, so a scan splits a 16-byte load into 32 channels in order.
/// Value codes of a channel pack the group's positions the same way: byte j holds position j low
/// and j + group / 2 high, so the value pass reads a channel's group in one load and multiplies it
/// with the group's weights as bytes.
public struct CodeFormat: Codable, Equatable, Sendable, CustomStringConvertible {
    /// Bits per key code and per value code: 4 or 8.
    public var keyBits: Int
    public var valueBits: Int
    /// Positions per group: even, and dividing the head's block size (64: the scan's fast path).
    public var group: Int
    /// Mins, steps and means as f32 (heads stored in f32 or bf16, whose values may pass f16's
    /// range) or as f16 (heads stored in f16: every value, so every min, step and mean, fits).
    public var wideSteps: Bool

    public init(keyBits: Int = 4, valueBits: Int = 4, group: Int = 64, wideSteps: Bool = false) {
        self.keyBits = keyBits
        self.valueBits = valueBits
        self.group = group
        self.wideSteps = wideSteps
    }

    /// The format for a head stored in `dtype`: f16 steps for an f16 head, f32 otherwise.
    public func fitted(to dtype: DType) -> CodeFormat {
        var format = self
        format.wideSteps = dtype != .f16
        return format
    }

    /// Bytes of one min, step or mean.
    public var stepBytes: Int { wideSteps ? 4 : 2 }

    public var description: String {
        "keys and values \(keyBits)- and \(valueBits)-bit per channel in groups of \(group) positions"
    }

    /// The error naming what is wrong with this format for a head, or nil.
    public func problem(dimension d: Int, blockSize: Int) -> String? {
        guard [4, 8].contains(keyBits), [4, 8].contains(valueBits) else { return "code bits must be 4 or 8 (got keys \(keyBits), values \(valueBits))" }
        guard group >= 2, group % 2 == 0, blockSize % group == 0 else {
            return "the code group (\(group)) must be even and divide the block size (\(blockSize))"
        }
        return nil
    }

    /// The dimension rounded up to a whole number of 32-channel runs.
    public func padded(_ d: Int) -> Int { (d + 31) / 32 * 32 }

    /// Byte offsets of a group row's parts, and its size.
    public struct Layout: Sendable, Equatable {
        public let keyMin: Int, keyStep: Int, keyCodes: Int, valueMin: Int, valueStep: Int, valueMean: Int, valueCodes: Int
        public let rowBytes: Int
        /// Bytes of one position's key codes, and of one channel's value codes.
        public let keyCodeBytes: Int, valueCodeBytes: Int
        public let padded: Int, group: Int
    }

    public func layout(dimension d: Int) -> Layout {
        let p = padded(d), s = stepBytes, kb = p * keyBits / 8, vb = group * valueBits / 8
        let keyMin = 0, keyStep = keyMin + s * p, keyCodes = keyStep + s * p
        let valueMin = keyCodes + group * kb, valueStep = valueMin + s * p, valueMean = valueStep + s * p
        let valueCodes = valueMean + s * p
        return Layout(keyMin: keyMin, keyStep: keyStep, keyCodes: keyCodes, valueMin: valueMin, valueStep: valueStep,
                      valueMean: valueMean, valueCodes: valueCodes, rowBytes: valueCodes + p * vb, keyCodeBytes: kb,
                      valueCodeBytes: vb, padded: p, group: group)
    }

    /// Bytes per position of codes, steps and means.
    public func bytesPerPosition(dimension d: Int) -> Double { Double(layout(dimension: d).rowBytes) / Double(group) }
}

extension CodeFormat {
    /// Codes one group: `keys` and `values` are `group x d` f32 rows (as stored: already rounded to
    /// the head's dtype); writes one row of `layout(dimension: d).rowBytes` bytes at `out`.
    public func encodeGroup(keys: UnsafePointer<Float>, values: UnsafePointer<Float>, dimension d: Int,
                            into out: UnsafeMutableRawPointer) {
        let l = layout(dimension: d)
        out.initializeMemory(as: UInt8.self, repeating: 0, count: l.rowBytes)
        encodeChannels(keys, dimension: d, bits: keyBits, min: out + l.keyMin, step: out + l.keyStep) { i, c, code in
            Self.put(code, at: c, bits: keyBits, in: (out + l.keyCodes + i * l.keyCodeBytes).assumingMemoryBound(to: UInt8.self))
        }
        encodeChannels(values, dimension: d, bits: valueBits, min: out + l.valueMin, step: out + l.valueStep) { i, c, code in
            let channel = (out + l.valueCodes + c * l.valueCodeBytes).assumingMemoryBound(to: UInt8.self)
            if valueBits == 8 { channel[i] = code } else if i < group / 2 { channel[i] |= code } else { channel[i - group / 2] |= code << 4 }
        }
        var mean = [Float](repeating: 0, count: d)
        for i in 0..<group { for c in 0..<d { mean[c] += values[i * d + c] } }
        for c in 0..<d { mean[c] /= Float(group) }
        writeSteps(mean, at: out + l.valueMean)
    }

    /// Per channel of `rows` (`group x d`): the group's min (rounded down) and step (rounded up) in
    /// the stored type, written at `min` and `step`, and each position's code handed to `put`
    /// (position, channel, code), chosen against the stored min and step so decoding reproduces it.
    private func encodeChannels(_ rows: UnsafePointer<Float>, dimension d: Int, bits: Int, min minOut: UnsafeMutableRawPointer,
                                step stepOut: UnsafeMutableRawPointer, put: (Int, Int, UInt8) -> Void) {
        let levels = Float((1 << bits) - 1)
        var mins = [Float](repeating: 0, count: d), steps = [Float](repeating: 0, count: d)
        for c in 0..<d {
            var lo = Float.infinity, hi = -Float.infinity
            for i in 0..<group {
                lo = Swift.min(lo, rows[i * d + c])
                hi = Swift.max(hi, rows[i * d + c])
            }
            mins[c] = roundedStep(lo, down: true)
            steps[c] = hi > mins[c] ? roundedStep((hi - mins[c]) / levels, down: false) : 0
            for i in 0..<group {
                let code = steps[c] > 0 ? Swift.min(levels, Swift.max(0, ((rows[i * d + c] - mins[c]) / steps[c]).rounded())) : 0
                put(i, c, UInt8(code))
            }
        }
        writeSteps(mins, at: minOut)
        writeSteps(steps, at: stepOut)
    }

    /// `x` as the stored type will hold it: a min rounded down and a step rounded up to a
    /// neighbouring f16 (so the codes' range still covers the group), or `x` itself with `wideSteps`.
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

    /// Stores mins, steps or means in the stored type.
    func writeSteps(_ values: [Float], at out: UnsafeMutableRawPointer) {
        values.withUnsafeBufferPointer { v in
            if wideSteps {
                out.copyMemory(from: v.baseAddress!, byteCount: v.count * 4)
            } else {
                kvr_f32_to_f16(v.baseAddress!, out.assumingMemoryBound(to: UInt16.self), v.count)
            }
        }
    }

    /// Min, step or mean `i` read back as f32.
    @inline(__always)
    public func step(_ base: UnsafeRawPointer, _ i: Int) -> Float {
        if wideSteps { return base.load(fromByteOffset: 4 * i, as: Float.self) }
        var half = base.load(fromByteOffset: 2 * i, as: UInt16.self), out: Float = 0
        kvr_f16_to_f32(&half, &out, 1)
        return out
    }

    /// Writes the key code of channel `c` into a position's key code bytes (4-bit: byte j of a
    /// 32-channel run holds channels j and j + 16).
    @inline(__always)
    static func put(_ code: UInt8, at c: Int, bits: Int, in row: UnsafeMutablePointer<UInt8>) {
        if bits == 8 { row[c] = code; return }
        let j = c % 32
        row[(c / 32) * 16 + j % 16] |= j < 16 ? code : code << 4
    }

    /// Position `i` of a group row decoded back to f32 (`d` floats each; tests and diagnostics).
    public func decode(row: UnsafeRawPointer, position i: Int, dimension d: Int,
                       key: UnsafeMutablePointer<Float>, value: UnsafeMutablePointer<Float>) {
        let l = layout(dimension: d)
        let keyCodes = (row + l.keyCodes + i * l.keyCodeBytes).assumingMemoryBound(to: UInt8.self)
        for c in 0..<d {
            let code: UInt8
            if keyBits == 8 { code = keyCodes[c] } else {
                let byte = keyCodes[(c / 32) * 16 + (c % 32) % 16]
                code = c % 32 < 16 ? byte & 0x0F : byte >> 4
            }
            key[c] = step(row + l.keyMin, c) + step(row + l.keyStep, c) * Float(code)
        }
        for c in 0..<d {
            let channel = (row + l.valueCodes + c * l.valueCodeBytes).assumingMemoryBound(to: UInt8.self)
            let code: UInt8 = valueBits == 8 ? channel[i] : i < group / 2 ? channel[i] & 0x0F : channel[i - group / 2] >> 4
            value[c] = step(row + l.valueMin, c) + step(row + l.valueStep, c) * Float(code)
        }
    }
}
