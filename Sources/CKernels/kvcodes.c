/* The quantized tier's scans (Storage/CodeFormat.swift describes the group rows they read).
 *
 * Key scores: per group, each query head's q * step is quantized to int8 with one scale, so a
 * position's score is base + scale * (integer dot product of the int8 query with the codes), exact
 * in int32: 32 channels per vpmaddubsw, two positions and four heads at a time.
 * Values: per group and head, the tail weights are quantized with one scale (u8 for 4-bit codes,
 * int16 for 8-bit ones), and each channel's group of codes (channel-major) meets them in vpmaddubsw
 * (vpmaddwd): 64 positions per channel in two (four) instructions, eight channels reduced together. */
#include "kvkernels.h"
#include <math.h>
#include <string.h>

#include "kvarch.h"

/* Starts fetching [p, p + bytes) (the next group row, while this one is scanned). */
static inline void prefetch_bytes(const uint8_t *p, size_t bytes) {
    for (size_t off = 0; off < bytes; off += 64) KVR_PREFETCH(p + off);
}

/* Part `step` of `steps` of [p, p + bytes) fetched into the caches: a kernel fetches the next group's
 * row a few lines per step of its own loop, so that the fetches overlap its work instead of queueing
 * in one burst ahead of it (cold, on AMD Zen 4: the key scan 1.3x and the value pass 1.7x faster than
 * with the whole row requested at once; docs/BENCHMARKS.md). p may be NULL. */
static inline void prefetch_part(const uint8_t *p, size_t bytes, size_t step, size_t steps) {
    if (!p) return;
    const size_t lines = (bytes + 63) / 64, per = (lines + steps - 1) / steps;
    for (size_t l = step * per; l < (step + 1) * per && l < lines; l++) KVR_PREFETCH(p + 64 * l);
}

/* Mins, steps or means [0, n) of a group row as f32. */
static void read_steps(const uint8_t *base, size_t n, int wide, float *out) {
    if (wide) { memcpy(out, base, n * sizeof(float)); return; }
    kvr_f16_to_f32((const uint16_t *)base, out, n);
}

/* Key code of position i, channel c, in a group's key codes (either order of 4-bit codes). */
static inline unsigned key_code(const kvr_code_layout *L, const uint8_t *codes, size_t i, size_t c) {
    if (L->key_bits == 8) return codes[i * L->key_code_bytes + c];
    if (L->key_blocks) {
        uint8_t b = codes[(c / 8) * L->group * 4 + i * 4 + (c % 4)];
        return (c % 8) < 4 ? (b & 0x0F) : (b >> 4);
    }
    uint8_t b = codes[i * L->key_code_bytes + (c / 32) * 16 + (c % 16)];
    return (c % 32) < 16 ? (b & 0x0F) : (b >> 4);
}

/* Four bytes as one word: four int8 query channels or four u8 weights, the broadcast operand of the
 * block bodies. */
static inline int32_t word_at(const void *p) {
    int32_t w;
    memcpy(&w, p, 4);
    return w;
}

/* Value code of position i, channel c, in a group's value codes (either order of 4-bit codes). */
static inline unsigned value_code(const kvr_code_layout *L, const uint8_t *codes, size_t i, size_t c) {
    if (L->value_bits == 8) return codes[c * L->value_code_bytes + i];
    if (L->value_blocks) {
        uint8_t b = codes[(i / 8) * L->padded * 4 + c * 4 + (i % 4)];
        return (i % 8) < 4 ? (b & 0x0F) : (b >> 4);
    }
    const uint8_t *channel = codes + c * L->value_code_bytes;
    return i < L->group / 2 ? (channel[i] & 0x0F) : (channel[i - L->group / 2] >> 4);
}

/* Per head: the int8 query for one group's key steps (padded channels 0), its scale and base.
 * scratch: 3 * padded floats. */
static void prepare_portable(const float *q, size_t g, size_t d, const kvr_code_layout *L, const uint8_t *row,
                             int8_t *q8, float *scales, float *bases, float *scratch) {
    float *kmin = scratch, *kstep = scratch + L->padded;
    read_steps(row + L->key_min, d, (int)L->wide_steps, kmin);
    read_steps(row + L->key_step, d, (int)L->wide_steps, kstep);
    const float limit = L->key_bits == 8 ? 63.0f : 127.0f; /* u8 x s8 pairs must not saturate int16 */
    for (size_t h = 0; h < g; h++) {
        const float *qh = q + h * d;
        float base = 0, top = 0;
        for (size_t j = 0; j < d; j++) {
            base += qh[j] * kmin[j];
            float v = fabsf(qh[j] * kstep[j]);
            top = v > top ? v : top;
        }
        float inv = top > 0 ? limit / top : 0;
        int8_t *out = q8 + h * L->padded;
        for (size_t j = 0; j < d; j++) out[j] = (int8_t)lrintf(qh[j] * kstep[j] * inv);
        for (size_t j = d; j < L->padded; j++) out[j] = 0;
        scales[h] = top > 0 ? top / limit : 0;
        bases[h] = base;
    }
}

static void key_dots_portable(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes, int32_t *dots) {
    for (size_t i = 0; i < L->group; i++) {
        for (size_t h = 0; h < g; h++) {
            int32_t s = 0;
            for (size_t j = 0; j < L->padded; j++) s += (int32_t)q8[h * L->padded + j] * (int32_t)key_code(L, codes, i, j);
            dots[h * L->group + i] = s;
        }
    }
}

/* Value pass of one group for g heads: w holds the group's weights, w[h * stride + i]. */
static void group_values_portable(const float *w, size_t g, size_t stride, const kvr_code_layout *L, const uint8_t *row,
                                  size_t dv, float *out, float *scratch) {
    float *vmin = scratch, *vstep = scratch + L->padded;
    read_steps(row + L->value_min, dv, (int)L->wide_steps, vmin);
    read_steps(row + L->value_step, dv, (int)L->wide_steps, vstep);
    for (size_t h = 0; h < g; h++) {
        const float *wh = w + h * stride;
        float total = 0;
        for (size_t i = 0; i < L->group; i++) total += wh[i];
        if (total == 0) continue;
        for (size_t c = 0; c < dv; c++) {
            float s = 0;
            for (size_t i = 0; i < L->group; i++) s += wh[i] * (float)value_code(L, row + L->value_codes, i, c);
            out[h * L->padded + c] += vmin[c] * total + vstep[c] * s;
        }
    }
}

#if KVR_X86
FAST static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

FAST static inline float hmax_ps(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Eight int32 vectors reduced to one: lane j holds the sum of vector j's lanes. */
FAST static inline __m256i reduce8(__m256i a0, __m256i a1, __m256i a2, __m256i a3,
                                   __m256i a4, __m256i a5, __m256i a6, __m256i a7) {
    __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3);
    __m256i b2 = _mm256_hadd_epi32(a4, a5), b3 = _mm256_hadd_epi32(a6, a7);
    __m256i c0 = _mm256_hadd_epi32(b0, b1), c1 = _mm256_hadd_epi32(b2, b3);
    /* c0 lanes: [a0 a1 a2 a3 | a0 a1 a2 a3] halves; c1 likewise for a4..a7. */
    __m256i lo = _mm256_permute2x128_si256(c0, c1, 0x20), hi = _mm256_permute2x128_si256(c0, c1, 0x31);
    return _mm256_add_epi32(lo, hi);
}

/* 32 floats x[0..3] times inv, rounded to nearest even, as 32 bytes in order: int8 (saturating) or,
 * with `unsigned_bytes`, u8 (|x * inv| within the type's range). */
FAST static inline __m256i bytes32(const __m256 *x, __m256 inv, int unsigned_bytes) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  /* packs interleave 4-byte runs */
    const __m256i a = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x[0], inv)), _mm256_cvtps_epi32(_mm256_mul_ps(x[1], inv)));
    const __m256i b = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x[2], inv)), _mm256_cvtps_epi32(_mm256_mul_ps(x[3], inv)));
    return _mm256_permutevar8x32_epi32(unsigned_bytes ? _mm256_packus_epi16(a, b) : _mm256_packs_epi16(a, b), order);
}

/* prepare_portable, eight channels at a time (d a multiple of 8): the steps converted once per
 * group, four heads per pass over them (bases and ranges), then each head's int8 query written 32
 * channels per store. The same bytes as one head at a time. */
FAST static void prepare_fast(const float *q, size_t g, size_t d, const kvr_code_layout *L, const uint8_t *row,
                              int8_t *q8, float *scales, float *bases, float *scratch) {
    float *kmin = scratch, *kstep = scratch + L->padded;
    read_steps(row + L->key_min, d, (int)L->wide_steps, kmin);
    read_steps(row + L->key_step, d, (int)L->wide_steps, kstep);
    const float limit = L->key_bits == 8 ? 63.0f : 127.0f;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const size_t d32 = d & ~(size_t)31;
    for (size_t h0 = 0; h0 < g; h0 += 4) {
        const size_t hn = g - h0 < 4 ? g - h0 : 4;
        const float *qh[4];
        for (size_t t = 0; t < 4; t++) qh[t] = q + (h0 + (t < hn ? t : 0)) * d;  /* a short tile repeats its first head */
        __m256 b0 = _mm256_setzero_ps(), b1 = b0, b2 = b0, b3 = b0, m0 = b0, m1 = b0, m2 = b0, m3 = b0;
        for (size_t j = 0; j < d; j += 8) {
            const __m256 lo = _mm256_loadu_ps(kmin + j), st = _mm256_loadu_ps(kstep + j);
            __m256 x;
            x = _mm256_loadu_ps(qh[0] + j); b0 = _mm256_fmadd_ps(x, lo, b0); m0 = _mm256_max_ps(m0, _mm256_andnot_ps(sign, _mm256_mul_ps(x, st)));
            x = _mm256_loadu_ps(qh[1] + j); b1 = _mm256_fmadd_ps(x, lo, b1); m1 = _mm256_max_ps(m1, _mm256_andnot_ps(sign, _mm256_mul_ps(x, st)));
            x = _mm256_loadu_ps(qh[2] + j); b2 = _mm256_fmadd_ps(x, lo, b2); m2 = _mm256_max_ps(m2, _mm256_andnot_ps(sign, _mm256_mul_ps(x, st)));
            x = _mm256_loadu_ps(qh[3] + j); b3 = _mm256_fmadd_ps(x, lo, b3); m3 = _mm256_max_ps(m3, _mm256_andnot_ps(sign, _mm256_mul_ps(x, st)));
        }
        const __m256 bs[4] = {b0, b1, b2, b3}, ms[4] = {m0, m1, m2, m3};
        for (size_t t = 0; t < hn; t++) {
            const size_t h = h0 + t;
            const float top = hmax_ps(ms[t]);
            const __m256 inv = _mm256_set1_ps(top > 0 ? limit / top : 0);
            int8_t *out = q8 + h * L->padded;
            size_t j = 0;
            for (; j < d32; j += 32) {
                __m256 x[4];
                for (size_t k = 0; k < 4; k++) x[k] = _mm256_mul_ps(_mm256_loadu_ps(qh[t] + j + 8 * k), _mm256_loadu_ps(kstep + j + 8 * k));
                _mm256_storeu_si256((__m256i *)(out + j), bytes32(x, inv, 0));
            }
            for (; j < d; j += 8) {
                __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(qh[t] + j), _mm256_loadu_ps(kstep + j)), inv));
                __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
                _mm_storel_epi64((__m128i *)(out + j), _mm_packs_epi16(w, w));
            }
            for (j = d; j < L->padded; j++) out[j] = 0;
            scales[h] = top > 0 ? top / limit : 0;
            bases[h] = hsum_ps(bs[t]);
        }
    }
}

/* The maximum of x[0, 8 * (n / 8)) into *m; returns how many were read. */
FAST static size_t max_fast(const float *x, size_t n, float *m) {
    __m256 a = _mm256_set1_ps(-INFINITY), b = a;
    size_t i = 0;
    /* maxps returns its second operand when either is NaN: the running maximum goes second, so a NaN
     * score is passed over (as the scalar tail's comparison does). */
    for (; i + 16 <= n; i += 16) { a = _mm256_max_ps(_mm256_loadu_ps(x + i), a); b = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), b); }
    for (; i + 8 <= n; i += 8) a = _mm256_max_ps(_mm256_loadu_ps(x + i), a);
    *m = hmax_ps(_mm256_max_ps(a, b));
    return i;
}

/* o[i] = a * dots[i] + b, eight at a time; returns how many were written. */
FAST static size_t scale_dots(const int32_t *dots, size_t n, float a, float b, float *o) {
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(o + i, _mm256_fmadd_ps(va, _mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *)(dots + i))), vb));
    return i;
}

/* One 32-channel run of 4-bit key codes as 32 bytes in channel order. */
FAST static inline __m256i key_run_u4(const uint8_t *c, __m256i nibble) {
    __m128i b = _mm_loadu_si128((const __m128i *)c);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), nibble);
}

/* 4-bit keys with at most 256 channels (8 runs: the int16 sums stay below 15 * 127 * 2 * 8):
 * two positions and four heads (q8 padded to a multiple of 4 heads with zeros) at a time, the
 * int8 query runs loaded once for both positions, eight dot products reduced together. */
FAST static void key_dots_u4(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes, int32_t *dots,
                             const uint8_t *next, size_t next_bytes) {
    const size_t runs = L->padded / 32, P = L->padded, G = L->group;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (size_t h0 = 0; h0 < g; h0 += 4) {
        const int8_t *q0 = q8 + h0 * P, *q1 = q0 + P, *q2 = q1 + P, *q3 = q2 + P;
        for (size_t i = 0; i < G; i += 2) {
            if (h0 == 0) prefetch_part(next, next_bytes, i / 2, G / 2);
            const uint8_t *c0 = codes + i * L->key_code_bytes, *c1 = c0 + L->key_code_bytes;
            __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
            for (size_t r = 0; r < runs; r++) {
                __m256i x0 = key_run_u4(c0 + r * 16, nibble), x1 = key_run_u4(c1 + r * 16, nibble), w;
                w = _mm256_loadu_si256((const __m256i *)(q0 + r * 32));
                a0 = _mm256_add_epi16(a0, _mm256_maddubs_epi16(x0, w)); b0 = _mm256_add_epi16(b0, _mm256_maddubs_epi16(x1, w));
                w = _mm256_loadu_si256((const __m256i *)(q1 + r * 32));
                a1 = _mm256_add_epi16(a1, _mm256_maddubs_epi16(x0, w)); b1 = _mm256_add_epi16(b1, _mm256_maddubs_epi16(x1, w));
                w = _mm256_loadu_si256((const __m256i *)(q2 + r * 32));
                a2 = _mm256_add_epi16(a2, _mm256_maddubs_epi16(x0, w)); b2 = _mm256_add_epi16(b2, _mm256_maddubs_epi16(x1, w));
                w = _mm256_loadu_si256((const __m256i *)(q3 + r * 32));
                a3 = _mm256_add_epi16(a3, _mm256_maddubs_epi16(x0, w)); b3 = _mm256_add_epi16(b3, _mm256_maddubs_epi16(x1, w));
            }
            __m256i s = reduce8(_mm256_madd_epi16(a0, ones), _mm256_madd_epi16(a1, ones), _mm256_madd_epi16(a2, ones),
                                _mm256_madd_epi16(a3, ones), _mm256_madd_epi16(b0, ones), _mm256_madd_epi16(b1, ones),
                                _mm256_madd_epi16(b2, ones), _mm256_madd_epi16(b3, ones));
            int32_t lanes[8];
            _mm256_storeu_si256((__m256i *)lanes, s);
            for (size_t t = 0; t < 4 && h0 + t < g; t++) {
                dots[(h0 + t) * G + i] = lanes[t];
                dots[(h0 + t) * G + i + 1] = lanes[4 + t];
            }
        }
    }
}

/* key_dots_u4 with AVX-512 VNNI (padded a multiple of 64, group of 4): a 64-channel chunk of a
 * position's codes (32 bytes) is broadcast to both halves of a vector, the upper half shifted by 4
 * and both masked, so its 128-bit lanes hold channels [0-15, 32-47, 16-31, 48-63] of the chunk; the
 * four heads' int8 queries are permuted to that order once per group. VPDPBUSD sums 4 products per
 * int32 lane (no int16 stage, so any d), 4 positions x 4 heads accumulate in 16 vectors, reduced
 * together. The same integers as key_dots_u4. */
VNNI static void key_dots_u4_vnni(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes, int32_t *dots,
                                  const uint8_t *next, size_t next_bytes) {
    const size_t P = L->padded, G = L->group, chunks = P / 64, stride = L->key_code_bytes;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    /* position p's lane 4p + t (head t) -> lane 4t + p, so each head's four positions are one 128-bit lane */
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    _Alignas(64) int8_t qp[4][256];
    for (size_t h0 = 0; h0 < g; h0 += 4) {
        for (size_t t = 0; t < 4; t++)
            for (size_t k = 0; k < chunks; k++) {
                const __m512i x = _mm512_loadu_si512((const void *)(q8 + (h0 + t) * P + 64 * k));
                _mm512_store_si512((void *)(qp[t] + 64 * k), _mm512_shuffle_i64x2(x, x, _MM_SHUFFLE(3, 1, 2, 0)));
            }
        for (size_t i = 0; i < G; i += 4) {
            if (h0 == 0) prefetch_part(next, next_bytes, i / 4, G / 4);
            __m512i acc[16];
            for (size_t a = 0; a < 16; a++) acc[a] = _mm512_setzero_si512();
            for (size_t k = 0; k < chunks; k++) {
                const __m512i w0 = _mm512_load_si512((const void *)(qp[0] + 64 * k)), w1 = _mm512_load_si512((const void *)(qp[1] + 64 * k));
                const __m512i w2 = _mm512_load_si512((const void *)(qp[2] + 64 * k)), w3 = _mm512_load_si512((const void *)(qp[3] + 64 * k));
                for (size_t p = 0; p < 4; p++) {
                    const __m256i b = _mm256_loadu_si256((const __m256i *)(codes + (i + p) * stride + 32 * k));
                    const __m512i x = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(b), shifts), nibble);
                    acc[4 * p] = _mm512_dpbusd_epi32(acc[4 * p], x, w0);
                    acc[4 * p + 1] = _mm512_dpbusd_epi32(acc[4 * p + 1], x, w1);
                    acc[4 * p + 2] = _mm512_dpbusd_epi32(acc[4 * p + 2], x, w2);
                    acc[4 * p + 3] = _mm512_dpbusd_epi32(acc[4 * p + 3], x, w3);
                }
            }
            const __m512i s = _mm512_permutexvar_epi32(order, kvr_reduce16_epi32(acc));
            for (size_t t = 0; t < 4 && h0 + t < g; t++) {
                const __m128i lane = t == 0 ? _mm512_castsi512_si128(s) : t == 1 ? _mm512_extracti32x4_epi32(s, 1)
                                   : t == 2 ? _mm512_extracti32x4_epi32(s, 2) : _mm512_extracti32x4_epi32(s, 3);
                _mm_storeu_si128((__m128i *)(dots + (h0 + t) * G + i), lane);
            }
        }
    }
}

/* 4-bit keys in channel blocks (key_blocks, group of 8k): eight positions per vector, each 32-bit lane
 * one position's 8 channels of a block (low nibbles channels 0-3, high 4-7), so a head's dot products
 * accumulate in the lanes with no reduction: per block, the codes split into two nibble vectors that
 * meet the head's two broadcast query words in vpmaddubsw (int16: four blocks at most, 4 * 2 * 2 * 15
 * * 128 < 32768), widened to int32 every four blocks. Any padded dimension. Four heads at a time (q8
 * padded with zero heads). The same integers as key_dots_portable. */
FAST static void key_dots_u4_blocks(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes,
                                    int32_t *dots, const uint8_t *next, size_t next_bytes) {
    const size_t P = L->padded, G = L->group, blocks = P / 8, stride = 4 * G;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (size_t h0 = 0; h0 < g; h0 += 4) {
        const int8_t *q0 = q8 + h0 * P, *q1 = q0 + P, *q2 = q1 + P, *q3 = q2 + P;
        for (size_t i = 0; i < G; i += 8) {
            __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
            for (size_t b0 = 0; b0 < blocks; b0 += 4) {
                if (h0 == 0) prefetch_part(next, next_bytes, (i / 8) * ((blocks + 3) / 4) + b0 / 4, (G / 8) * ((blocks + 3) / 4));
                __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
                for (size_t b = b0; b < b0 + 4 && b < blocks; b++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(codes + b * stride + 4 * i));
                    const __m256i lo = _mm256_and_si256(x, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
#define KVR_HEAD_BLOCK(a, q) a = _mm256_add_epi16(a, _mm256_add_epi16(                                        \
        _mm256_maddubs_epi16(lo, _mm256_set1_epi32(word_at(q + 8 * b))),                                   \
        _mm256_maddubs_epi16(hi, _mm256_set1_epi32(word_at(q + 8 * b + 4)))))
                    KVR_HEAD_BLOCK(a0, q0); KVR_HEAD_BLOCK(a1, q1); KVR_HEAD_BLOCK(a2, q2); KVR_HEAD_BLOCK(a3, q3);
#undef KVR_HEAD_BLOCK
                }
                s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(a0, ones)); s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(a1, ones));
                s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(a2, ones)); s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(a3, ones));
            }
            const __m256i s[4] = {s0, s1, s2, s3};
            for (size_t t = 0; t < 4 && h0 + t < g; t++) _mm256_storeu_si256((__m256i *)(dots + (h0 + t) * G + i), s[t]);
        }
    }
}

/* key_dots_u4_blocks with AVX-512 VNNI (group of 32k): sixteen positions per vector, two vectors (32
 * positions) and four heads at a time in 16 accumulators. The high nibbles are masked in place (16 times
 * their code) and their sums shifted down at the end: VPDPBUSD has no int16 stage, so no shift per block.
 * On Zen 4, 1.6-2.1x faster than key_dots_u4_vnni at 256-128 channels (Tools/bench/code_blocks.c). */
VNNI static void key_dots_u4_blocks_vnni(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes,
                                         int32_t *dots, const uint8_t *next, size_t next_bytes) {
    const size_t P = L->padded, G = L->group, blocks = P / 8, stride = 4 * G;
    const __m512i low = _mm512_set1_epi8(0x0F), high = _mm512_set1_epi8((char)0xF0);
    for (size_t h0 = 0; h0 < g; h0 += 4) {
        const int8_t *q[4] = {q8 + h0 * P, q8 + (h0 + 1) * P, q8 + (h0 + 2) * P, q8 + (h0 + 3) * P};
        for (size_t i = 0; i < G; i += 32) {
            __m512i a[16];  /* head t: low 2t, high 2t + 1 (positions i..i+15); the next 16 positions: + 8 */
            for (size_t k = 0; k < 16; k++) a[k] = _mm512_setzero_si512();
            for (size_t b = 0; b < blocks; b++) {
                if (h0 == 0) prefetch_part(next, next_bytes, (i / 32) * blocks + b, (G / 32) * blocks);
                const uint8_t *c = codes + b * stride + 4 * i;
                const __m512i x0 = _mm512_loadu_si512((const void *)c), x1 = _mm512_loadu_si512((const void *)(c + 64));
                const __m512i l0 = _mm512_and_si512(x0, low), h0v = _mm512_and_si512(x0, high);
                const __m512i l1 = _mm512_and_si512(x1, low), h1v = _mm512_and_si512(x1, high);
                for (size_t t = 0; t < 4; t++) {
                    const __m512i wl = _mm512_set1_epi32(word_at(q[t] + 8 * b)), wh = _mm512_set1_epi32(word_at(q[t] + 8 * b + 4));
                    a[2 * t] = _mm512_dpbusd_epi32(a[2 * t], l0, wl);
                    a[2 * t + 1] = _mm512_dpbusd_epi32(a[2 * t + 1], h0v, wh);
                    a[8 + 2 * t] = _mm512_dpbusd_epi32(a[8 + 2 * t], l1, wl);
                    a[8 + 2 * t + 1] = _mm512_dpbusd_epi32(a[8 + 2 * t + 1], h1v, wh);
                }
            }
            for (size_t t = 0; t < 4 && h0 + t < g; t++) {
                int32_t *o = dots + (h0 + t) * G + i;
                _mm512_storeu_si512((void *)o, _mm512_add_epi32(a[2 * t], _mm512_srai_epi32(a[2 * t + 1], 4)));
                _mm512_storeu_si512((void *)(o + 16), _mm512_add_epi32(a[8 + 2 * t], _mm512_srai_epi32(a[8 + 2 * t + 1], 4)));
            }
        }
    }
}

/* 8-bit key codes: 32 channels per load; the query is limited to +-63 so a pair never saturates. */
FAST static void key_dots_u8(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes, int32_t *dots) {
    const size_t runs = L->padded / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (size_t i = 0; i < L->group; i++) {
        const uint8_t *c = codes + i * L->key_code_bytes;
        for (size_t h = 0; h < g; h++) {
            __m256i acc = _mm256_setzero_si256();
            for (size_t r = 0; r < runs; r++) {
                __m256i x = _mm256_loadu_si256((const __m256i *)(c + r * 32));
                __m256i w = _mm256_loadu_si256((const __m256i *)(q8 + h * L->padded + r * 32));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(x, w), ones));
            }
            __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
            s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
            dots[h * L->group + i] = _mm_cvtsi128_si32(s);
        }
    }
}

/* A group row's value mins and steps as f32 into scratch (2 * padded floats), padding channels 0. */
static void value_steps(const uint8_t *row, const kvr_code_layout *L, size_t dv, float *scratch) {
    read_steps(row + L->value_min, dv, (int)L->wide_steps, scratch);
    read_steps(row + L->value_step, dv, (int)L->wide_steps, scratch + L->padded);
    for (size_t c = dv; c < L->padded; c++) { scratch[c] = 0; scratch[L->padded + c] = 0; }
}

/* The value pass of one group of 64 positions with 8-bit codes (4-bit ones: group_values_u4): per
 * head, the weights quantized to int16 (one scale: the largest weight maps to 32767, so a weight 1e-4
 * of it keeps 3 digits); then per pair of channels, each channel's 64 codes widened once and
 * multiplied with every head's weights (vpmaddwd, 16 positions per instruction), the eight dot
 * products reduced together. */
FAST static void group_values_u8(const float *w, size_t g, size_t stride, const kvr_code_layout *L, const uint8_t *row,
                                 size_t dv, float *out, float *scratch, const uint8_t *next, size_t next_bytes) {
    const size_t P = L->padded;
    const float *vmin = scratch, *vstep = scratch + P;
    value_steps(row, L, dv, scratch);
    const uint8_t *codes = row + L->value_codes;
    for (size_t h0 = 0; h0 < g; h0 += 4) {
        const size_t hn = g - h0 < 4 ? g - h0 : 4;
        __m256i w16[4][4];      /* head t, positions 16k..16k+15 */
        float scale[4] = {0, 0, 0, 0}, total[4] = {0, 0, 0, 0};
        int any = 0;
        for (size_t t = 0; t < 4; t++) {
            for (size_t k = 0; k < 4; k++) w16[t][k] = _mm256_setzero_si256();
            if (t >= hn) continue;
            const float *wh = w + (h0 + t) * stride;
            __m256 x[8];
            for (size_t k = 0; k < 8; k++) x[k] = _mm256_loadu_ps(wh + 8 * k);
            total[t] = hsum_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3])),
                                             _mm256_add_ps(_mm256_add_ps(x[4], x[5]), _mm256_add_ps(x[6], x[7]))));
            if (total[t] == 0) continue;
            any = 1;
            float top = hmax_ps(_mm256_max_ps(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])),
                                              _mm256_max_ps(_mm256_max_ps(x[4], x[5]), _mm256_max_ps(x[6], x[7]))));
            const __m256 inv = _mm256_set1_ps(32767.0f / top);
            scale[t] = top / 32767.0f;
            for (size_t k = 0; k < 4; k++) {
                __m256i p = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(x[2 * k], inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(x[2 * k + 1], inv)));
                w16[t][k] = _mm256_permute4x64_epi64(p, 0xD8);  /* packs interleaves the 128-bit lanes */
            }
        }
        if (!any) { if (h0 == 0) prefetch_part(next, next_bytes, 0, 1); continue; }
        for (size_t c = 0; c < dv; c += 2) {
            if (h0 == 0) prefetch_part(next, next_bytes, c / 2, (dv + 1) / 2);
            __m256i acc[8];
            for (size_t e = 0; e < 2; e++) {
                const size_t ch = c + e < dv ? c + e : c;  /* an odd last channel repeats (its result is not kept) */
                const uint8_t *cc = codes + ch * L->value_code_bytes;
                const __m256i lo = _mm256_loadu_si256((const __m256i *)cc), hi = _mm256_loadu_si256((const __m256i *)(cc + 32));
                const __m256i x0 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo)), x1 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1));
                const __m256i x2 = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi)), x3 = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1));
                for (size_t t = 0; t < 4; t++) {
                    __m256i s = _mm256_add_epi32(_mm256_madd_epi16(x0, w16[t][0]), _mm256_madd_epi16(x1, w16[t][1]));
                    acc[4 * e + t] = _mm256_add_epi32(s, _mm256_add_epi32(_mm256_madd_epi16(x2, w16[t][2]), _mm256_madd_epi16(x3, w16[t][3])));
                }
            }
            int32_t dots[8];
            _mm256_storeu_si256((__m256i *)dots, reduce8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]));
            for (size_t e = 0; e < 2 && c + e < dv; e++)
                for (size_t t = 0; t < hn; t++)
                    out[(h0 + t) * P + c + e] += vmin[c + e] * total[t] + vstep[c + e] * scale[t] * (float)dots[4 * e + t];
        }
    }
}

/* A group's tail weights per head quantized to u8 (one scale: the largest maps to 255), 32 positions
 * per vector: wq[j] for the j-th head whose weights are not all 0 (live[j]), with its scale and the
 * rounded weights' total; returns how many heads are live. */
FAST static inline size_t quantize_weights_u8(const float *w, size_t g, size_t stride, __m256i (*wq)[2], float *scale,
                                              float *total, size_t *live) {
    size_t n = 0;
    for (size_t h = 0; h < g; h++) {
        const float *wh = w + h * stride;
        __m256 x[8];
        for (size_t k = 0; k < 8; k++) x[k] = _mm256_loadu_ps(wh + 8 * k);
        const float t = hsum_ps(_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(x[0], x[1]), _mm256_add_ps(x[2], x[3])),
                                              _mm256_add_ps(_mm256_add_ps(x[4], x[5]), _mm256_add_ps(x[6], x[7]))));
        if (t == 0) continue;
        const float top = hmax_ps(_mm256_max_ps(_mm256_max_ps(_mm256_max_ps(x[0], x[1]), _mm256_max_ps(x[2], x[3])),
                                                _mm256_max_ps(_mm256_max_ps(x[4], x[5]), _mm256_max_ps(x[6], x[7]))));
        const __m256 inv = _mm256_set1_ps(255.0f / top);
        wq[n][0] = bytes32(x, inv, 1);
        wq[n][1] = bytes32(x + 4, inv, 1);
        /* The min term takes the rounded weights' total too: the rounding then errs by sum_i e_i v_i
         * (values about centred) rather than by sum_i e_i (v_i - min) (all of one sign). */
        const __m256i sums = _mm256_add_epi64(_mm256_sad_epu8(wq[n][0], _mm256_setzero_si256()),
                                              _mm256_sad_epu8(wq[n][1], _mm256_setzero_si256()));
        const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
        const float rounded = (float)(_mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1));
        if (rounded == 0) continue;
        scale[n] = top / 255.0f;
        total[n] = rounded * scale[n];
        live[n++] = h;
    }
    return n;
}

/* A 4-bit value pass's state for one group: the live heads' u8 weights (32 positions per vector), their
 * scales and rounded totals (quantize_weights_u8), the value mins and steps as f32 and the codes. */
typedef struct {
    __m256i wq[64][2];
    float scale[64], total[64];
    size_t live[64], n;
    const float *vmin, *vstep;
    const uint8_t *codes;
} values_u4;

/* The start of a 4-bit value pass: the group's value mins and steps into scratch, its weights quantized;
 * returns how many heads are live, 0 (nothing left to do) after fetching `next`. */
FAST static inline size_t begin_values_u4(const float *w, size_t g, size_t stride, const kvr_code_layout *L, const uint8_t *row,
                                          size_t dv, float *scratch, values_u4 *st, const uint8_t *next, size_t next_bytes) {
    value_steps(row, L, dv, scratch);
    st->vmin = scratch;
    st->vstep = scratch + L->padded;
    st->codes = row + L->value_codes;
    st->n = quantize_weights_u8(w, g, stride, st->wq, st->scale, st->total, st->live);
    if (st->n == 0) prefetch_part(next, next_bytes, 0, 1);
    return st->n;
}

/* o[c..c+7] += min * total + step * scale * dots: channels c..c+7 of live head j (o its output row)
 * from their integer dots. */
FAST static inline void apply_dots(float *o, size_t c, const values_u4 *st, size_t j, __m256 dots) {
    __m256 r = _mm256_fmadd_ps(_mm256_loadu_ps(st->vmin + c), _mm256_set1_ps(st->total[j]), _mm256_loadu_ps(o + c));
    r = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_loadu_ps(st->vstep + c), _mm256_set1_ps(st->scale[j])), dots, r);
    _mm256_storeu_ps(o + c, r);
}

/* The value pass of one group of 64 positions with 4-bit codes: per head, the weights quantized to
 * u8 (one scale: the largest maps to 255); eight channels' codes unpacked once to bytes (positions
 * 0..31, then 32..63); per head and channel two vpmaddubsw (32 positions each, no widening) and one
 * vpmaddwd, the eight channels reduced together and applied with vector FMAs. Padding channels
 * (min and step 0) add 0. About half the instructions of the int16 pass; the u8 weights keep 1/255 of
 * the group's largest (docs/BENCHMARKS.md, "A faster value pass" measures the error it adds). */
FAST static void group_values_u4(const float *w, size_t g, size_t stride, const kvr_code_layout *L, const uint8_t *row,
                                 size_t dv, float *out, float *scratch, const uint8_t *next, size_t next_bytes) {
    values_u4 st;
    if (!begin_values_u4(w, g, stride, L, row, dv, scratch, &st, next, next_bytes)) return;
    const size_t P = L->padded;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    _Alignas(32) uint8_t unpacked[8][64];
    for (size_t c = 0; c < P; c += 8) {
        prefetch_part(next, next_bytes, c / 8, P / 8);
        for (size_t e = 0; e < 8; e++) {
            const __m256i b = _mm256_loadu_si256((const __m256i *)(st.codes + (c + e) * L->value_code_bytes));
            _mm256_store_si256((__m256i *)unpacked[e], _mm256_and_si256(b, nibble));
            _mm256_store_si256((__m256i *)(unpacked[e] + 32), _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble));
        }
        for (size_t j = 0; j < st.n; j++) {
            __m256i acc[8];
            for (size_t e = 0; e < 8; e++) {
                const __m256i a = _mm256_maddubs_epi16(st.wq[j][0], _mm256_load_si256((const __m256i *)unpacked[e]));
                const __m256i b = _mm256_maddubs_epi16(st.wq[j][1], _mm256_load_si256((const __m256i *)(unpacked[e] + 32)));
                acc[e] = _mm256_madd_epi16(_mm256_add_epi16(a, b), ones);
            }
            apply_dots(out + st.live[j] * P, c, &st, j,
                       _mm256_cvtepi32_ps(reduce8(acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7])));
        }
    }
}

/* Eight channels' code rows (32 bytes each, at codes + (c + e) * stride) as eight vectors of their 4-byte
 * words: out[k] lane e = word k of row e (group_values_u4_vnni's transpose). */
VNNI static inline void words_8x8(const uint8_t *codes, size_t stride, __m256i *out) {
    __m256i r[8], s[8], t[8];
    for (size_t e = 0; e < 8; e++) r[e] = _mm256_loadu_si256((const __m256i *)(codes + e * stride));
    for (size_t e = 0; e < 8; e += 2) { s[e] = _mm256_unpacklo_epi32(r[e], r[e + 1]); s[e + 1] = _mm256_unpackhi_epi32(r[e], r[e + 1]); }
    for (size_t e = 0; e < 8; e += 4) {
        t[e] = _mm256_unpacklo_epi64(s[e], s[e + 2]); t[e + 1] = _mm256_unpackhi_epi64(s[e], s[e + 2]);
        t[e + 2] = _mm256_unpacklo_epi64(s[e + 1], s[e + 3]); t[e + 3] = _mm256_unpackhi_epi64(s[e + 1], s[e + 3]);
    }
    for (size_t k = 0; k < 4; k++) {
        out[k] = _mm256_permute2x128_si256(t[k], t[k + 4], 0x20);
        out[k + 4] = _mm256_permute2x128_si256(t[k], t[k + 4], 0x31);
    }
}

/* group_values_u4 with AVX-512 VNNI and no horizontal sums, sixteen channels per step: their code rows
 * (32 bytes each) transposed as 4-byte words (two 8 x 8 transposes joined), so that word k of every row
 * (positions 4k..4k+3 in its low nibbles, 32+4k.. in its high ones) sits in one 512-bit vector with a
 * lane per channel; VPDPBUSD with the head's four u8 weights of those positions broadcast then
 * accumulates each channel in its own lane. Four heads at a time, two chains each. The same integers as
 * group_values_u4; 1.27x faster than the same in 256-bit vectors (eight channels per step) on Zen 4. */
VNNI static void group_values_u4_vnni(const float *w, size_t g, size_t stride, const kvr_code_layout *L, const uint8_t *row,
                                      size_t dv, float *out, float *scratch, const uint8_t *next, size_t next_bytes) {
    values_u4 st;
    if (!begin_values_u4(w, g, stride, L, row, dv, scratch, &st, next, next_bytes)) return;
    const size_t P = L->padded, S = L->value_code_bytes;  /* padded: a multiple of 32 */
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (size_t c = 0; c < P; c += 16) {
        prefetch_part(next, next_bytes, c / 16, P / 16);
        __m256i a8[8], b8[8];
        words_8x8(st.codes + c * S, S, a8);
        words_8x8(st.codes + (c + 8) * S, S, b8);
        __m512i lo[8], hi[8];
        for (size_t k = 0; k < 8; k++) {
            const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(a8[k]), b8[k], 1);
            lo[k] = _mm512_and_si512(x, nibble);
            hi[k] = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble);
        }
        for (size_t j0 = 0; j0 < st.n; j0 += 4) {
            const size_t jn = st.n - j0 < 4 ? st.n - j0 : 4;
            __m512i a[4][2];
            for (size_t u = 0; u < 4; u++) a[u][0] = a[u][1] = _mm512_setzero_si512();
            for (size_t k = 0; k < 8; k++)
                for (size_t u = 0; u < jn; u++) {
                    const int32_t *w0 = (const int32_t *)&st.wq[j0 + u][0], *w1 = (const int32_t *)&st.wq[j0 + u][1];
                    a[u][0] = _mm512_dpbusd_epi32(a[u][0], _mm512_set1_epi32(w0[k]), lo[k]);
                    a[u][1] = _mm512_dpbusd_epi32(a[u][1], _mm512_set1_epi32(w1[k]), hi[k]);
                }
            for (size_t u = 0; u < jn; u++) {
                const __m512i sum = _mm512_add_epi32(a[u][0], a[u][1]);
                apply_dots(out + st.live[j0 + u] * P, c, &st, j0 + u, _mm256_cvtepi32_ps(_mm512_castsi512_si256(sum)));
                apply_dots(out + st.live[j0 + u] * P, c + 8, &st, j0 + u, _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(sum, 1)));
            }
        }
    }
}

/* The 4-bit value pass with codes in position blocks (value_blocks, group of 64): one load holds a block
 * of 8 positions for 8 (AVX2) or 16 (VNNI) channels, a channel per 32-bit lane, so the codes meet a
 * head's broadcast u8 weight words with no transpose: AVX2 vpmaddubsw (int16 for two blocks at most:
 * 2 * 2 * 2 * 255 * 15 < 32768, then widened); VNNI VPDPBUSD, four heads at a time, low and high nibbles
 * in separate accumulators (two chains per head). The same integers as group_values_u4. */
FAST static void group_values_u4_blocks(const float *w, size_t g, size_t stride, const kvr_code_layout *L, const uint8_t *row,
                                        size_t dv, float *out, float *scratch, const uint8_t *next, size_t next_bytes) {
    values_u4 st;
    if (!begin_values_u4(w, g, stride, L, row, dv, scratch, &st, next, next_bytes)) return;
    const size_t P = L->padded, blocks = L->group / 8;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (size_t c = 0; c < P; c += 8) {
        prefetch_part(next, next_bytes, c / 8, P / 8);
        for (size_t j0 = 0; j0 < st.n; j0 += 4) {
            const size_t jn = st.n - j0 < 4 ? st.n - j0 : 4;
            __m256i acc[4];
            for (size_t u = 0; u < 4; u++) acc[u] = _mm256_setzero_si256();
            for (size_t b0 = 0; b0 < blocks; b0 += 2) {
                __m256i s16[4];
                for (size_t u = 0; u < 4; u++) s16[u] = _mm256_setzero_si256();
                for (size_t b = b0; b < b0 + 2; b++) {
                    const __m256i x = _mm256_loadu_si256((const __m256i *)(st.codes + b * P * 4 + c * 4));
                    const __m256i lo = _mm256_and_si256(x, nibble), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nibble);
                    for (size_t u = 0; u < jn; u++) {
                        const __m256i *wq = st.wq[j0 + u];
                        s16[u] = _mm256_add_epi16(s16[u], _mm256_add_epi16(
                            _mm256_maddubs_epi16(_mm256_set1_epi32(word_at((const uint8_t *)wq + 8 * b)), lo),
                            _mm256_maddubs_epi16(_mm256_set1_epi32(word_at((const uint8_t *)wq + 8 * b + 4)), hi)));
                    }
                }
                for (size_t u = 0; u < jn; u++) acc[u] = _mm256_add_epi32(acc[u], _mm256_madd_epi16(s16[u], ones));
            }
            for (size_t u = 0; u < jn; u++) apply_dots(out + st.live[j0 + u] * P, c, &st, j0 + u, _mm256_cvtepi32_ps(acc[u]));
        }
    }
}

VNNI static void group_values_u4_blocks_vnni(const float *w, size_t g, size_t stride, const kvr_code_layout *L, const uint8_t *row,
                                             size_t dv, float *out, float *scratch, const uint8_t *next, size_t next_bytes) {
    values_u4 st;
    if (!begin_values_u4(w, g, stride, L, row, dv, scratch, &st, next, next_bytes)) return;
    const size_t P = L->padded, blocks = L->group / 8;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    for (size_t c = 0; c < P; c += 16) {
        prefetch_part(next, next_bytes, c / 16, P / 16);
        for (size_t j0 = 0; j0 < st.n; j0 += 4) {
            const size_t jn = st.n - j0 < 4 ? st.n - j0 : 4;
            __m512i lo_acc[4], hi_acc[4];
            for (size_t u = 0; u < 4; u++) lo_acc[u] = hi_acc[u] = _mm512_setzero_si512();
            for (size_t b = 0; b < blocks; b++) {
                const __m512i x = _mm512_loadu_si512((const void *)(st.codes + b * P * 4 + c * 4));
                const __m512i lo = _mm512_and_si512(x, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(x, 4), nibble);
                for (size_t u = 0; u < jn; u++) {
                    const __m256i *wq = st.wq[j0 + u];
                    lo_acc[u] = _mm512_dpbusd_epi32(lo_acc[u], _mm512_set1_epi32(word_at((const uint8_t *)wq + 8 * b)), lo);
                    hi_acc[u] = _mm512_dpbusd_epi32(hi_acc[u], _mm512_set1_epi32(word_at((const uint8_t *)wq + 8 * b + 4)), hi);
                }
            }
            for (size_t u = 0; u < jn; u++) {
                const __m512i sum = _mm512_add_epi32(lo_acc[u], hi_acc[u]);
                apply_dots(out + st.live[j0 + u] * P, c, &st, j0 + u, _mm256_cvtepi32_ps(_mm512_castsi512_si256(sum)));
                apply_dots(out + st.live[j0 + u] * P, c + 8, &st, j0 + u, _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(sum, 1)));
            }
        }
    }
}

#endif

void kvr_code_scores(const float *q, size_t g, size_t d, const void *const *rows, size_t groups,
                     const kvr_code_layout *L, float scale, float *out, size_t stride, int8_t *q8, int32_t *dots,
                     float *scratch) {
    float scales[64], bases[64];
    const size_t g4 = (g + 3) & ~(size_t)3;
    int u4 = 0;  /* a 4-bit key body, which fetches the next group itself */
#if KVR_X86
    const int path = kvr_codes_path(), fast = path >= 1;
    const int blocks4 = L->key_bits == 4 && L->key_blocks;
    const int b4v = blocks4 && path == 2 && L->group % 32 == 0, b4 = blocks4 && fast && L->group % 8 == 0;
    const int u4v = !blocks4 && path == 2 && L->key_bits == 4 && L->padded % 64 == 0 && L->padded <= 256 && L->group % 4 == 0;
    u4 = b4v || b4 || u4v || (!blocks4 && fast && L->key_bits == 4 && L->padded <= 256 && L->group % 2 == 0);
    if (u4) memset(q8 + g * L->padded, 0, (g4 - g) * L->padded);  /* the fourth-head tiles' padding */
#endif
    for (size_t gi = 0; gi < groups; gi++) {
        const uint8_t *row = (const uint8_t *)rows[gi];
        const uint8_t *codes = row + L->key_codes;
        const uint8_t *next = gi + 1 < groups ? (const uint8_t *)rows[gi + 1] : NULL;  /* its keys are fetched during this one */
        if (!u4 && next) prefetch_bytes(next, L->value_min);
#if KVR_X86
        if (fast && d % 8 == 0) prepare_fast(q, g, d, L, row, q8, scales, bases, scratch);
        else
#endif
            prepare_portable(q, g, d, L, row, q8, scales, bases, scratch);
#if KVR_X86
        if (b4v) key_dots_u4_blocks_vnni(q8, g, L, codes, dots, next, L->value_min);
        else if (b4) key_dots_u4_blocks(q8, g, L, codes, dots, next, L->value_min);
        else if (u4v) key_dots_u4_vnni(q8, g, L, codes, dots, next, L->value_min);
        else if (u4) key_dots_u4(q8, g, L, codes, dots, next, L->value_min);
        else if (fast && L->key_bits == 8) key_dots_u8(q8, g, L, codes, dots);
        else
#endif
            key_dots_portable(q8, g, L, codes, dots);
        for (size_t h = 0; h < g; h++) {
            const float a = scales[h] * scale, b = bases[h] * scale;
            float *o = out + h * stride + gi * L->group;
            const int32_t *dh = dots + h * L->group;
            size_t i = 0;
#if KVR_X86
            if (fast) i = scale_dots(dh, L->group, a, b, o);
#endif
            for (; i < L->group; i++) o[i] = a * (float)dh[i] + b;
        }
    }
}

void kvr_code_values(const float *w, size_t g, size_t stride, const void *const *rows, size_t groups,
                     const kvr_code_layout *L, size_t dv, float *out, float *scratch, const void *after) {
#if KVR_X86
    const int path = kvr_codes_path();
#endif
    const size_t part = L->row_bytes - L->value_min;
    for (size_t gi = 0; gi < groups; gi++) {
        const uint8_t *row = (const uint8_t *)rows[gi];
        const float *wg = w + gi * L->group;
        const void *following = gi + 1 < groups ? rows[gi + 1] : after;
        const uint8_t *next = following ? (const uint8_t *)following + L->value_min : NULL;  /* fetched during this group */
#if KVR_X86
        if (L->value_blocks && L->value_bits == 4) {
            if (path == 2 && L->group == 64) { group_values_u4_blocks_vnni(wg, g, stride, L, row, dv, out, scratch, next, part); continue; }
            if (path >= 1 && L->group == 64) { group_values_u4_blocks(wg, g, stride, L, row, dv, out, scratch, next, part); continue; }
        } else {
            if (path == 2 && L->group == 64 && L->value_bits == 4) { group_values_u4_vnni(wg, g, stride, L, row, dv, out, scratch, next, part); continue; }
            if (path >= 1 && L->group == 64 && L->value_bits == 4) { group_values_u4(wg, g, stride, L, row, dv, out, scratch, next, part); continue; }
        }
        if (path >= 1 && L->group == 64 && L->value_bits == 8) { group_values_u8(wg, g, stride, L, row, dv, out, scratch, next, part); continue; }
#endif
        if (next) prefetch_bytes(next, part);
        group_values_portable(wg, g, stride, L, row, dv, out, scratch);
    }
}

#if KVR_X86
/* o[c] += t * x[c] for c < 8 * (n / 8); returns how many were done. */
FAST static size_t add_scaled(float *o, const float *x, size_t n, float t) {
    const __m256 vt = _mm256_set1_ps(t);
    size_t c = 0;
    for (; c + 8 <= n; c += 8) _mm256_storeu_ps(o + c, _mm256_fmadd_ps(vt, _mm256_loadu_ps(x + c), _mm256_loadu_ps(o + c)));
    return c;
}
#endif

void kvr_prefetch_values(const void *row, const kvr_code_layout *L) {
    prefetch_bytes((const uint8_t *)row + L->value_min, L->row_bytes - L->value_min);
}

void kvr_code_means(const float *totals, size_t g, const void *row, const kvr_code_layout *L, size_t dv, float *out,
                    float *scratch) {
    read_steps((const uint8_t *)row + L->value_mean, dv, (int)L->wide_steps, scratch);
    for (size_t h = 0; h < g; h++) {
        const float t = totals[h];
        if (t == 0) continue;
        float *oh = out + h * L->padded;
        size_t c = 0;
#if KVR_X86
        if (kvr_has_fast_path()) c = add_scaled(oh, scratch, dv, t);
#endif
        for (; c < dv; c++) oh[c] += t * scratch[c];
    }
}

float kvr_max(const float *x, size_t n) {
    size_t i = 0;
    float m = -INFINITY;
#if KVR_X86
    if (kvr_has_fast_path() && n >= 8) i = max_fast(x, n, &m);
#endif
    for (; i < n; i++) m = x[i] > m ? x[i] : m;
    return m;
}

#if KVR_X86
/* Pair keys of the scores >= floor (and finite-above -inf) among x[0, 8 * (n / 8)) into keys;
 * returns how many were written, *read how many scores were looked at. */
FAST static size_t collect_fast(const float *x, size_t n, float floor, uint64_t *keys, size_t *read) {
    const __m256 f = _mm256_set1_ps(floor), low = _mm256_set1_ps(-INFINITY);
    size_t i = 0, m = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        int mask = _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, f, _CMP_GE_OQ), _mm256_cmp_ps(v, low, _CMP_GT_OQ)));
        while (mask) {
            int b = __builtin_ctz(mask);
            keys[m++] = kvr_pair_key(x[i + b], (int32_t)(i + b));
            mask &= mask - 1;
        }
    }
    *read = i;
    return m;
}
#endif

static size_t collect_pairs(const float *x, size_t n, float floor, uint64_t *keys) {
    size_t i = 0, m = 0;
#if KVR_X86
    if (kvr_has_fast_path()) m = collect_fast(x, n, floor, keys, &i);
#endif
    for (; i < n; i++)
        if (x[i] >= floor && x[i] > -INFINITY) keys[m++] = kvr_pair_key(x[i], (int32_t)i);
    return m;
}

/* The (rank + 1)-th smallest pair key of the sample scores[0], scores[stride], ... (rank < 64 and
 * fewer than the samples): the best rank + 1 kept in a max-heap as they come, most samples rejected
 * by one comparison with its root (a selection over the whole sample took twice as long). A heap,
 * not a sorted run: scores that rise along the positions (a head's recency) make nearly every sample
 * a new best, and a sorted run shifted all of its keys for each. */
uint64_t kvr_sample_floor_key(const float *scores, size_t n, size_t stride, size_t rank) {
    if (rank >= 64 || stride == 0 || n == 0) return UINT64_MAX;  /* no floor: every score passes */
    uint64_t heap[64];
    size_t m = 0;
    const size_t keep = rank + 1;
    for (size_t i = 0; i < n; i += stride) {
        const uint64_t key = kvr_pair_key(scores[i], (int32_t)i);
        if (m < keep) {  /* sift up */
            size_t j = m++;
            while (j > 0 && heap[(j - 1) / 2] < key) { heap[j] = heap[(j - 1) / 2]; j = (j - 1) / 2; }
            heap[j] = key;
            continue;
        }
        if (key >= heap[0]) continue;
        size_t j = 0;  /* the root replaced: sift down */
        while (2 * j + 1 < m) {
            size_t c = 2 * j + 1;
            if (c + 1 < m && heap[c + 1] > heap[c]) c++;
            if (heap[c] <= key) break;
            heap[j] = heap[c];
            j = c;
        }
        heap[j] = key;
    }
    return heap[0];
}

size_t kvr_best_positions(const float *scores, size_t n, size_t take, int32_t *out, uint64_t *keys) {
    if (take == 0 || n == 0) return 0;
    /* The sample's best `2 take / stride + 8` are each worth about `stride` scores. */
    const size_t stride = n / 1024 > 1 ? n / 1024 : 1;
    float floor = -INFINITY;
    if (stride > 1) {
        size_t samples = (n + stride - 1) / stride, rank = 2 * take / stride + 8;
        if (rank < samples && rank < 64) {
            floor = kvr_pair_score(kvr_sample_floor_key(scores, n, stride, rank));
        } else if (rank < samples) {
            samples = 0;
            for (size_t i = 0; i < n; i += stride) keys[samples++] = kvr_pair_key(scores[i], (int32_t)i);
            floor = kvr_pair_score(kvr_select_u64(keys, samples, rank + 1));
        }
    }
    size_t m = collect_pairs(scores, n, floor, keys);
    if (m < take && floor > -INFINITY) m = collect_pairs(scores, n, -INFINITY, keys);
    size_t k = take < m ? take : m;
    if (k < m) kvr_select_u64(keys, m, k);
    for (size_t i = 0; i < k; i++) out[i] = kvr_pair_id(keys[i]);
    return k;
}

/* ---- Coding a group (the append path) ---- */

void kvr_column_ranges(const float *rows, size_t n, size_t d, float *lo, float *hi, float *sum) {
    /* NaN (a head ingested with non-finite values allowed) never wins a comparison: it is left out
     * of the range, and a column of nothing but NaN keeps lo = +inf > hi = -inf. */
    for (size_t c = 0; c < d; c++) { lo[c] = INFINITY; hi[c] = -INFINITY; sum[c] = 0; }
    for (size_t i = 0; i < n; i++) {
        const float *row = rows + i * d;
        for (size_t c = 0; c < d; c++) {
            float x = row[c];
            lo[c] = x < lo[c] ? x : lo[c];
            hi[c] = x > hi[c] ? x : hi[c];
            sum[c] += x;
        }
    }
}

/* One code: NaN (and anything below the min) codes 0, as the vector body's max does. */
static inline uint8_t quantize_one(float x, float min, float divisor, float levels) {
    float q = rintf((x - min) / divisor);
    return (uint8_t)(!(q >= 0) ? 0 : q > levels ? levels : q);
}

#if KVR_X86
FAST static void quantize_columns_fast(const float *rows, size_t n, size_t d, const float *mins, const float *divisors,
                                       float levels, uint8_t *codes) {
    const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(levels);
    for (size_t i = 0; i < n; i++) {
        const float *row = rows + i * d;
        uint8_t *out = codes + i * d;
        size_t c = 0;
        for (; c + 8 <= d; c += 8) {
            __m256 q = _mm256_div_ps(_mm256_sub_ps(_mm256_loadu_ps(row + c), _mm256_loadu_ps(mins + c)), _mm256_loadu_ps(divisors + c));
            q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm256_min_ps(_mm256_max_ps(q, zero), top);
            __m256i v = _mm256_cvtps_epi32(q);                      /* 0..255 in eight int32 */
            __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
            _mm_storel_epi64((__m128i *)(out + c), _mm_packus_epi16(w, w));
        }
        for (; c < d; c++) out[c] = quantize_one(row[c], mins[c], divisors[c], levels);
    }
}
#endif

void kvr_quantize_columns(const float *rows, size_t n, size_t d, const float *mins, const float *divisors,
                          float levels, uint8_t *codes) {
#if KVR_X86
    if (kvr_has_fast_path()) { quantize_columns_fast(rows, n, d, mins, divisors, levels, codes); return; }
#endif
    for (size_t i = 0; i < n; i++) {
        const float *row = rows + i * d;
        uint8_t *out = codes + i * d;
        for (size_t c = 0; c < d; c++) out[c] = quantize_one(row[c], mins[c], divisors[c], levels);
    }
}
