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
///     key min [P] S | key step [P] S | key codes (group x P x keyBits / 8 bytes)
///     value min [P] S | value step [P] S | value mean [P] S | value codes (P x group x valueBits / 8 bytes)
///
/// 4-bit codes are in blocks (`Order.blocks`, the default), laid out for a scan whose 32-bit lanes are
/// positions (keys) or channels (values), so a vector load meets a head's broadcast query or weight
/// words with no reduction and no transpose:
///   - keys [P / 8][group][4 bytes]: byte k of a position's word holds channel 8b + k in its low nibble
///     and 8b + 4 + k in its high one (1.6-2x faster key scans than position by position);
///   - values [group / 8][P][4 bytes]: byte k of a channel's word holds position 8b + k low and
///     8b + 4 + k high (a 1.2-1.4x faster value pass than channel by channel).
/// Heads coded before kept `Order.positions`: keys [group][P / 2] (a position's 32 channels in 16
/// bytes, byte j holding channel j low and j + 16 high) and values [P][group / 2] (byte j of a channel
/// holding position j low and j + group / 2 high); they are read as they are, and `kvrecall codes`
/// re-codes them. 8-bit codes are always keys position by position and values channel by channel.
public struct CodeFormat: Codable, Equatable, Sendable, CustomStringConvertible {
    /// How 4-bit codes are laid out in a group row.
    public enum Order: String, Codable, Sendable {
        /// Keys position by position and values channel by channel (the layout before blocks; still read).
        case positions
        /// Keys in blocks of 8 channels and values in blocks of 8 positions (the default).
        case blocks
    }

    /// Bits per key code and per value code: 4 or 8.
    public var keyBits: Int
    public var valueBits: Int
    /// Positions per group: even, and dividing the head's block size (64: the scan's fast path).
    public var group: Int
    /// Mins, steps and means as f32 (heads stored in f32 or bf16, whose values may pass f16's
    /// range) or as f16 (heads stored in f16: every value, so every min, step and mean, fits).
    public var wideSteps: Bool
    /// The layout of 4-bit codes (8-bit ones keep the position order whatever it says).
    public var order: Order

    public init(keyBits: Int = 4, valueBits: Int = 4, group: Int = 64, wideSteps: Bool = false,
                order: Order = .blocks) {
        self.keyBits = keyBits
        self.valueBits = valueBits
        self.group = group
        self.wideSteps = wideSteps
        self.order = order
    }

    private enum CodingKeys: String, CodingKey { case keyBits, valueBits, group, wideSteps, order }

    /// A record written before blocks names no order: its codes are in position order.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        keyBits = try c.decode(Int.self, forKey: .keyBits)
        valueBits = try c.decode(Int.self, forKey: .valueBits)
        group = try c.decode(Int.self, forKey: .group)
        wideSteps = try c.decode(Bool.self, forKey: .wideSteps)
        order = try c.decodeIfPresent(Order.self, forKey: .order) ?? .positions
    }

    /// Whether the key codes are 4-bit in blocks of channels (a group of a multiple of 8: the blocks'
    /// scan bodies read 8 or 32 positions at a time; other groups keep the position order's bodies).
    public var keyBlocks: Bool { keyBits == 4 && order == .blocks && group % 8 == 0 }
    /// Whether any codes are in blocks (a store holding them is format version 2).
    public var inBlocks: Bool { keyBlocks || valueBlocks }
    /// Whether the value codes are 4-bit in blocks of positions (a group of a multiple of 8).
    public var valueBlocks: Bool { valueBits == 4 && order == .blocks && group % 8 == 0 }

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
            + (order == .positions && (keyBits == 4 || valueBits == 4) ? " (in position order, the layout before blocks: `kvrecall codes` re-codes them)" : "")
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
        /// 4-bit key codes in blocks of channels, 4-bit value codes in blocks of positions (`Order.blocks`).
        public let keyBlocks: Bool, valueBlocks: Bool
    }

    public func layout(dimension d: Int) -> Layout {
        let p = padded(d), s = stepBytes, kb = p * keyBits / 8, vb = group * valueBits / 8
        let keyMin = 0, keyStep = keyMin + s * p, keyCodes = keyStep + s * p
        let valueMin = keyCodes + group * kb, valueStep = valueMin + s * p, valueMean = valueStep + s * p
        let valueCodes = valueMean + s * p
        return Layout(keyMin: keyMin, keyStep: keyStep, keyCodes: keyCodes, valueMin: valueMin, valueStep: valueStep,
                      valueMean: valueMean, valueCodes: valueCodes, rowBytes: valueCodes + p * vb, keyCodeBytes: kb,
                      valueCodeBytes: vb, padded: p, group: group, keyBlocks: keyBlocks, valueBlocks: valueBlocks)
    }

    /// Bytes per position of codes, steps and means.
    public func bytesPerPosition(dimension d: Int) -> Double { Double(layout(dimension: d).rowBytes) / Double(group) }
}

extension CodeFormat {
    /// Codes one group: `keys` and `values` are `group x d` f32 rows (as stored: already rounded to
    /// the head's dtype); writes one row of `layout(dimension: d).rowBytes` bytes at `out`.
    /// Runs inside an append's write transaction once per completed group: the passes over the
    /// rows are vectorised kernels and nothing is allocated per channel.
    public func encodeGroup(keys: UnsafePointer<Float>, values: UnsafePointer<Float>, dimension d: Int,
                            into out: UnsafeMutableRawPointer) {
        let l = layout(dimension: d)
        out.initializeMemory(as: UInt8.self, repeating: 0, count: l.rowBytes)
        // Scratch: `Columns` (6 d floats), then a code per position and channel.
        let scratch = UnsafeMutableRawPointer.allocate(byteCount: 6 * d * 4 + group * d, alignment: 64)
        defer { scratch.deallocate() }
        let columns = Columns(base: scratch.assumingMemoryBound(to: Float.self), d: d)
        let codes = (scratch + 6 * d * 4).assumingMemoryBound(to: UInt8.self)

        encodeChannels(keys, dimension: d, bits: keyBits, columns, codes: codes)
        writeSteps(columns.mins, count: d, at: out + l.keyMin)
        writeSteps(columns.steps, count: d, at: out + l.keyStep)
        let keyCodes = (out + l.keyCodes).assumingMemoryBound(to: UInt8.self)
        for i in 0..<group {
            let row = codes + i * d, position = keyCodes + i * l.keyCodeBytes
            if keyBlocks {
                // Block c / 8, position i's word, byte c % 4: channel 8b + k (low nibble) and 8b + 4 + k (high).
                for c in 0..<d { keyCodes[(c / 8) * group * 4 + i * 4 + c % 4] |= c % 8 < 4 ? row[c] : row[c] << 4 }
            } else if keyBits == 8 {
                position.update(from: row, count: d)
            } else {
                // Byte j of a 32-channel run holds channel j (low nibble) and j + 16 (high).
                for c in 0..<d { position[(c / 32) * 16 + (c % 16)] |= c % 32 < 16 ? row[c] : row[c] << 4 }
            }
        }

        encodeChannels(values, dimension: d, bits: valueBits, columns, codes: codes)
        writeSteps(columns.mins, count: d, at: out + l.valueMin)
        writeSteps(columns.steps, count: d, at: out + l.valueStep)
        let half = group / 2, valueCodes = (out + l.valueCodes).assumingMemoryBound(to: UInt8.self)
        if valueBlocks {
            for i in 0..<group {
                // Block i / 8, channel c's word, byte i % 4: position 8b + k (low nibble) and 8b + 4 + k (high).
                let row = codes + i * d
                for c in 0..<d { valueCodes[(i / 8) * l.padded * 4 + c * 4 + i % 4] |= i % 8 < 4 ? row[c] : row[c] << 4 }
            }
        } else {
            for c in 0..<d {
                let channel = valueCodes + c * l.valueCodeBytes
                if valueBits == 8 {
                    for i in 0..<group { channel[i] = codes[i * d + c] }
                } else {
                    // Byte j of a channel holds position j (low nibble) and j + group / 2 (high).
                    for j in 0..<half { channel[j] = codes[j * d + c] | codes[(j + half) * d + c] << 4 }
                }
            }
        }
        let mean = columns.sums, scale = 1 / Float(group)
        for c in 0..<d { mean[c] *= scale }
        writeSteps(mean, count: d, at: out + l.valueMean)
    }

    /// Per-channel scratch of `encodeGroup`: five runs of `d` floats, and a sixth after the
    /// divisors, which serve as `roundSteps`' scratch (1.5 d floats) until they are written.
    private struct Columns {
        let mins, highs, sums, steps, divisors: UnsafeMutablePointer<Float>
        init(base: UnsafeMutablePointer<Float>, d: Int) {
            mins = base; highs = base + d; sums = base + 2 * d; steps = base + 3 * d; divisors = base + 4 * d
        }
    }

    /// Per channel of `rows` (`group x d`): the group's min (rounded down), step (rounded up) and
    /// sum, the min and step in the stored type, and each position's code into `codes` (`group x d`),
    /// chosen against the stored min and step so decoding reproduces it. A channel constant over the
    /// group has step 0 and codes 0 (its min is its value).
    private func encodeChannels(_ rows: UnsafePointer<Float>, dimension d: Int, bits: Int, _ columns: Columns,
                                codes: UnsafeMutablePointer<UInt8>) {
        let levels = Float((1 << bits) - 1)
        kvr_column_ranges(rows, group, d, columns.mins, columns.highs, columns.sums)
        roundSteps(columns.mins, count: d, down: true, scratch: UnsafeMutableRawPointer(columns.divisors))
        for c in 0..<d {
            let low = columns.mins[c], high = columns.highs[c]
            columns.steps[c] = high > low ? (high - low) / levels : 0
        }
        roundSteps(columns.steps, count: d, down: false, scratch: UnsafeMutableRawPointer(columns.divisors))
        // A channel whose step is 0 is constant (every value is its min): code 0.
        for c in 0..<d { columns.divisors[c] = columns.steps[c] > 0 ? columns.steps[c] : 1 }
        kvr_quantize_columns(rows, group, d, columns.mins, columns.divisors, levels, codes)
    }

    /// `x[0 ..< count]` in place as the stored type will hold them: mins rounded down and steps
    /// rounded up to a neighbouring f16 (so the codes' range still covers the group), or unchanged
    /// with `wideSteps`; three vectorised conversions (`scratch`: room for `count` floats and halves).
    func roundSteps(_ x: UnsafeMutablePointer<Float>, count: Int, down: Bool, scratch: UnsafeMutableRawPointer) {
        guard !wideSteps, count > 0 else { return }
        let back = scratch.assumingMemoryBound(to: Float.self), halves = (scratch + 4 * count).assumingMemoryBound(to: UInt16.self)
        kvr_f32_to_f16(x, halves, count)
        kvr_f16_to_f32(halves, back, count)
        for i in 0..<count {
            let value = x[i]
            if down && back[i] > value { halves[i] = value < 0 ? halves[i] &+ 1 : halves[i] &- 1 }  // one f16 step towards -inf
            if !down && back[i] < value { halves[i] = value < 0 ? halves[i] &- 1 : halves[i] &+ 1 }  // towards +inf
        }
        kvr_f16_to_f32(halves, x, count)
    }

    /// Stores `count` mins, steps or means in the stored type.
    func writeSteps(_ values: UnsafePointer<Float>, count: Int, at out: UnsafeMutableRawPointer) {
        if wideSteps {
            out.copyMemory(from: values, byteCount: count * 4)
        } else {
            kvr_f32_to_f16(values, out.assumingMemoryBound(to: UInt16.self), count)
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

    /// Position `i` of a group row decoded back to f32 (`d` floats each; tests and diagnostics).
    public func decode(row: UnsafeRawPointer, position i: Int, dimension d: Int,
                       key: UnsafeMutablePointer<Float>, value: UnsafeMutablePointer<Float>) {
        let l = layout(dimension: d)
        let keyCodes = (row + l.keyCodes).assumingMemoryBound(to: UInt8.self)
        for c in 0..<d {
            let code: UInt8
            if keyBits == 8 { code = keyCodes[i * l.keyCodeBytes + c] } else if keyBlocks {
                let byte = keyCodes[(c / 8) * group * 4 + i * 4 + c % 4]
                code = c % 8 < 4 ? byte & 0x0F : byte >> 4
            } else {
                let byte = keyCodes[i * l.keyCodeBytes + (c / 32) * 16 + (c % 32) % 16]
                code = c % 32 < 16 ? byte & 0x0F : byte >> 4
            }
            key[c] = step(row + l.keyMin, c) + step(row + l.keyStep, c) * Float(code)
        }
        let valueCodes = (row + l.valueCodes).assumingMemoryBound(to: UInt8.self)
        for c in 0..<d {
            let channel = valueCodes + c * l.valueCodeBytes, code: UInt8
            if valueBlocks {
                let byte = valueCodes[(i / 8) * l.padded * 4 + c * 4 + i % 4]
                code = i % 8 < 4 ? byte & 0x0F : byte >> 4
            } else {
                code = valueBits == 8 ? channel[i] : i < group / 2 ? channel[i] & 0x0F : channel[i - group / 2] >> 4
            }
            value[c] = step(row + l.valueMin, c) + step(row + l.valueStep, c) * Float(code)
        }
    }
}
