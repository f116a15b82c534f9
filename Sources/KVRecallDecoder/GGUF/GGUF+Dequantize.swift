// Dequantization of ggml blocks to f32, following ggml's reference `dequantize_row_*` (ggml-quants.c):
// the same block layouts and the same float operations in the same order, so results match bit for bit.

import CKernels
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Dequantizes `count` elements (a multiple of type.blockSize) from raw ggml blocks.
public func ggmlDequantize(_ type: GGMLType, from: UnsafeRawPointer, count: Int,
                           into: UnsafeMutablePointer<Float>) throws {
    guard type.canDequantize else {
        throw GGUFError(path: "ggml", message: "cannot dequantize type \(type.name)")
    }
    guard count >= 0, count % type.blockSize == 0 else {
        throw GGUFError(path: "ggml",
                        message: "element count \(count) is not a multiple of the \(type.name) block size \(type.blockSize)")
    }
    ggmlDequantizeUnchecked(type, from: from, count: count, into: into)
}

/// `ggmlDequantize` without the checks: `type.canDequantize` and `count % type.blockSize == 0` must hold.
func ggmlDequantizeUnchecked(_ type: GGMLType, from src: UnsafeRawPointer, count: Int,
                             into dst: UnsafeMutablePointer<Float>) {
    let nb = count / type.blockSize
    switch type {
    case .f32:
        #if _endian(little)
        memcpy(dst, src, count * 4)
        #else
        for i in 0..<count { dst[i] = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
        #endif
    case .f16: kvr_f16_to_f32(src.assumingMemoryBound(to: UInt16.self), dst, count)
    case .bf16: kvr_bf16_to_f32(src.assumingMemoryBound(to: UInt16.self), dst, count)
    case .q4_0: dequantQ4_0(src, nb, dst)
    case .q4_1: dequantQ4_1(src, nb, dst)
    case .q5_0: dequantQ5_0(src, nb, dst)
    case .q5_1: dequantQ5_1(src, nb, dst)
    case .q8_0: dequantQ8_0(src, nb, dst)
    case .q2_K: dequantQ2_K(src, nb, dst)
    case .q3_K: dequantQ3_K(src, nb, dst)
    case .q4_K: dequantQ45_K(src, nb, dst, fifthBit: false)
    case .q5_K: dequantQ45_K(src, nb, dst, fifthBit: true)
    case .q6_K: dequantQ6_K(src, nb, dst)
    case .q8_K: dequantQ8_K(src, nb, dst)
    case .iq4_nl: dequantIQ4_NL(src, nb, dst)
    case .iq4_xs: dequantIQ4_XS(src, nb, dst)
    case .tq2_0: dequantTQ2_0(src, nb, dst)
    default: preconditionFailure("ggmlDequantizeUnchecked: \(type.name) is not supported")
    }
}

// MARK: - Scalars

/// IEEE half (binary16) bits to Float, exactly (normals, subnormals, zeros, infinities, NaNs).
@inline(__always)
func ggmlHalfToFloat(_ h: UInt16) -> Float {
    let sign = UInt32(h & 0x8000) << 16
    let magnitude = UInt32(h & 0x7FFF)
    if magnitude >= 0x7C00 {                       // infinity or NaN: keep the payload
        return Float(bitPattern: sign | 0x7F80_0000 | ((magnitude & 0x3FF) << 13))
    }
    if magnitude >= 0x0400 {                       // normal: rebias the exponent (15 -> 127)
        return Float(bitPattern: sign | ((magnitude << 13) &+ (112 << 23)))
    }
    let f = Float(magnitude) * 0x1p-24             // subnormal or zero: magnitude * 2^-24, exact
    return sign != 0 ? -f : f
}

@inline(__always)
private func half(_ p: UnsafeRawPointer, _ offset: Int) -> Float {
    ggmlHalfToFloat(UInt16(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt16.self)))
}

@inline(__always)
private func bytes(_ p: UnsafeRawPointer, _ offset: Int) -> UnsafePointer<UInt8> {
    (p + offset).assumingMemoryBound(to: UInt8.self)
}

/// ggml's `get_scale_min_k4`: the j-th 6-bit (scale, min) pair of a Q4_K / Q5_K block's 12 scale bytes.
@inline(__always)
private func scaleMinK4(_ j: Int, _ q: UnsafePointer<UInt8>) -> (Float, Float) {
    if j < 4 {
        return (Float(q[j] & 63), Float(q[j + 4] & 63))
    }
    let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)
    let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4)
    return (Float(sc), Float(m))
}

/// IQ4_NL / IQ4_XS non-linear 4-bit levels (ggml's `kvalues_iq4nl`).
private let iq4nlValues: (Float, Float, Float, Float, Float, Float, Float, Float,
                          Float, Float, Float, Float, Float, Float, Float, Float) =
    (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)

// MARK: - 32-element blocks

private func dequantQ4_0(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 18
        let d = half(b, 0)
        let q = bytes(b, 2)
        let y = dst + i * 32
        for j in 0..<16 {
            y[j] = Float(Int32(q[j] & 0x0F) - 8) * d
            y[j + 16] = Float(Int32(q[j] >> 4) - 8) * d
        }
    }
}

private func dequantQ4_1(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 20
        let d = half(b, 0), m = half(b, 2)
        let q = bytes(b, 4)
        let y = dst + i * 32
        for j in 0..<16 {
            y[j] = Float(q[j] & 0x0F) * d + m
            y[j + 16] = Float(q[j] >> 4) * d + m
        }
    }
}

private func dequantQ5_0(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 22
        let d = half(b, 0)
        let qh = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 2, as: UInt32.self))
        let q = bytes(b, 6)
        let y = dst + i * 32
        for j in 0..<16 {
            let h0 = ((qh >> UInt32(j)) << 4) & 0x10
            let h1 = (qh >> UInt32(j + 12)) & 0x10
            y[j] = Float(Int32(UInt32(q[j] & 0x0F) | h0) - 16) * d
            y[j + 16] = Float(Int32(UInt32(q[j] >> 4) | h1) - 16) * d
        }
    }
}

private func dequantQ5_1(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 24
        let d = half(b, 0), m = half(b, 2)
        let qh = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        let q = bytes(b, 8)
        let y = dst + i * 32
        for j in 0..<16 {
            let h0 = ((qh >> UInt32(j)) << 4) & 0x10
            let h1 = (qh >> UInt32(j + 12)) & 0x10
            y[j] = Float(UInt32(q[j] & 0x0F) | h0) * d + m
            y[j + 16] = Float(UInt32(q[j] >> 4) | h1) * d + m
        }
    }
}

private func dequantQ8_0(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 34
        let d = half(b, 0)
        let q = (b + 2).assumingMemoryBound(to: Int8.self)
        let y = dst + i * 32
        for j in 0..<32 { y[j] = Float(q[j]) * d }
    }
}

private func dequantIQ4_NL(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    withUnsafeBytes(of: iq4nlValues) { raw in
        let kv = raw.bindMemory(to: Float.self).baseAddress!
        for i in 0..<nb {
            let b = src + i * 18
            let d = half(b, 0)
            let q = bytes(b, 2)
            let y = dst + i * 32
            for j in 0..<16 {
                y[j] = d * kv[Int(q[j] & 0x0F)]
                y[j + 16] = d * kv[Int(q[j] >> 4)]
            }
        }
    }
}

// MARK: - 256-element super-blocks (K-quants)

private func dequantQ2_K(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 84
        let scales = bytes(b, 0)
        var q = bytes(b, 16)
        let d = half(b, 80), dmin = half(b, 82)
        var y = dst + i * 256
        var s = 0
        for _ in 0..<2 {
            var shift: UInt8 = 0
            for _ in 0..<4 {
                for half16 in 0..<2 {
                    let sc = scales[s]; s += 1
                    let dl = d * Float(sc & 0xF), ml = dmin * Float(sc >> 4)
                    let qq = q + 16 * half16
                    for l in 0..<16 { y[l] = dl * Float((qq[l] >> shift) & 3) - ml }
                    y += 16
                }
                shift += 2
            }
            q += 32
        }
    }
}

private func dequantQ3_K(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    let kmask1: UInt32 = 0x0303_0303, kmask2: UInt32 = 0x0f0f_0f0f
    for i in 0..<nb {
        let b = src + i * 110
        let hm = bytes(b, 0)
        var q = bytes(b, 32)
        let d = half(b, 108)
        // Unpack the 16 6-bit scales from 12 bytes, as ggml does with its aux words.
        let a0 = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 96, as: UInt32.self))
        let a1 = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 100, as: UInt32.self))
        let tmp = UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 104, as: UInt32.self))
        let words: (UInt32, UInt32, UInt32, UInt32) = (
            (a0 & kmask2) | (((tmp >> 0) & kmask1) << 4),
            (a1 & kmask2) | (((tmp >> 2) & kmask1) << 4),
            ((a0 >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4),
            ((a1 >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4))
        withUnsafeBytes(of: words) { raw in
            let w = raw.bindMemory(to: UInt32.self)
            var y = dst + i * 256
            var s = 0
            var m: UInt8 = 1
            for _ in 0..<2 {
                var shift: UInt8 = 0
                for _ in 0..<4 {
                    for half16 in 0..<2 {
                        let scale = Int32(Int8(truncatingIfNeeded: w[s >> 2] >> UInt32(8 * (s & 3))))
                        s += 1
                        let dl = d * Float(scale - 32)
                        let qq = q + 16 * half16, hh = hm + 16 * half16
                        for l in 0..<16 {
                            let v = Int32((qq[l] >> shift) & 3) - ((hh[l] & m) != 0 ? 0 : 4)
                            y[l] = dl * Float(v)
                        }
                        y += 16
                    }
                    shift += 2
                    m <<= 1
                }
                q += 32
            }
        }
    }
}

/// Q4_K and Q5_K: super-blocks of 256 weights in 8 sub-blocks of 32, each with a 6-bit scale and
/// min; 4-bit low parts, and for Q5_K a fifth bit per weight (32 bytes `qh`, before the low parts).
private func dequantQ45_K(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>, fifthBit: Bool) {
    let blockBytes = fifthBit ? 176 : 144
    let high: UInt8 = fifthBit ? 16 : 0
    for i in 0..<nb {
        let b = src + i * blockBytes
        let d = half(b, 0), dmin = half(b, 2)
        let scales = bytes(b, 4)
        let qh = bytes(b, 16)  // Q4_K: the low parts, read but weighted 0
        var ql = bytes(b, fifthBit ? 48 : 16)
        var y = dst + i * 256
        var u1: UInt8 = 1, u2: UInt8 = 2
        for j in 0..<4 {
            let (sc1, m1) = scaleMinK4(2 * j, scales)
            let (sc2, m2) = scaleMinK4(2 * j + 1, scales)
            let d1 = d * sc1, o1 = dmin * m1
            let d2 = d * sc2, o2 = dmin * m2
            for l in 0..<32 { y[l] = d1 * Float((ql[l] & 0x0F) + ((qh[l] & u1) != 0 ? high : 0)) - o1 }
            for l in 0..<32 { y[l + 32] = d2 * Float((ql[l] >> 4) + ((qh[l] & u2) != 0 ? high : 0)) - o2 }
            ql += 32
            y += 64
            u1 <<= 2
            u2 <<= 2
        }
    }
}

private func dequantQ6_K(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 210
        var ql = bytes(b, 0)
        var qh = bytes(b, 128)
        var sc = (b + 192).assumingMemoryBound(to: Int8.self)
        let d = half(b, 208)
        var y = dst + i * 256
        for _ in 0..<2 {
            // ggml evaluates d * sc[k] * q as (d * sc[k]) * q.
            for l in 0..<32 {
                let s = l / 16
                let q1 = Int32((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32
                let q2 = Int32((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32
                let q3 = Int32((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32
                let q4 = Int32((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32
                y[l] = d * Float(sc[s]) * Float(q1)
                y[l + 32] = d * Float(sc[s + 2]) * Float(q2)
                y[l + 64] = d * Float(sc[s + 4]) * Float(q3)
                y[l + 96] = d * Float(sc[s + 6]) * Float(q4)
            }
            y += 128
            ql += 64
            qh += 32
            sc += 8
        }
    }
}

private func dequantQ8_K(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 292
        let d = Float(bitPattern: UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 0, as: UInt32.self)))
        let q = (b + 4).assumingMemoryBound(to: Int8.self)
        let y = dst + i * 256
        for j in 0..<256 { y[j] = d * Float(q[j]) }
    }
}

private func dequantIQ4_XS(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    withUnsafeBytes(of: iq4nlValues) { raw in
        let kv = raw.bindMemory(to: Float.self).baseAddress!
        for i in 0..<nb {
            let b = src + i * 136
            let d = half(b, 0)
            let scalesH = UInt32(UInt16(littleEndian: b.loadUnaligned(fromByteOffset: 2, as: UInt16.self)))
            let scalesL = bytes(b, 4)
            var q = bytes(b, 8)
            var y = dst + i * 256
            for ib in 0..<8 {
                let low = UInt32((scalesL[ib / 2] >> UInt8(4 * (ib % 2))) & 0xF)
                let high = ((scalesH >> UInt32(2 * ib)) & 3) << 4
                let dl = d * Float(Int32(low | high) - 32)
                for j in 0..<16 {
                    y[j] = dl * kv[Int(q[j] & 0xF)]
                    y[j + 16] = dl * kv[Int(q[j] >> 4)]
                }
                y += 32
                q += 16
            }
        }
    }
}

private func dequantTQ2_0(_ src: UnsafeRawPointer, _ nb: Int, _ dst: UnsafeMutablePointer<Float>) {
    for i in 0..<nb {
        let b = src + i * 66
        let qs = bytes(b, 0)
        let d = half(b, 64)
        var y = dst + i * 256
        for j in stride(from: 0, to: 64, by: 32) {
            for l in 0..<4 {
                let shift = UInt8(2 * l)
                for m in 0..<32 { y[m] = Float(Int32((qs[j + m] >> shift) & 3) - 1) * d }
                y += 32
            }
        }
    }
}
