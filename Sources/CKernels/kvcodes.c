/* The quantized tier's scans (Storage/CodeFormat.swift describes the group rows they read).
 *
 * Key scores: per group, each query head's q ⊙ step is quantized to int8 with one scale, so a
 * position's score is base + scale * (integer dot product of the int8 query with the codes), exact
 * in int32: 32 channels per vpmaddubsw. Values: the weighted sum of the decoded value codes of a
 * group's positions for every head, each code row read once for the group. */
#include "kvkernels.h"
#include <math.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVR_X86 1
#define FAST __attribute__((target("avx2,fma,f16c")))
#else
#define KVR_X86 0
#endif

static inline unsigned code_at(const uint8_t *row, size_t c, int bits) {
    if (bits == 8) return row[c];
    uint8_t b = row[(c / 32) * 16 + (c % 16)];
    return (c % 32) < 16 ? (b & 0x0F) : (b >> 4);
}

/* Mins or steps [first, first + n) of a group row as f32. */
static void read_steps(const uint8_t *base, size_t first, size_t n, int wide, float *out) {
    if (wide) { memcpy(out, (const float *)base + first, n * sizeof(float)); return; }
    kvr_f16_to_f32((const uint16_t *)base + first, out, n);
}

/* Per head: the int8 query for one group's key steps (padded channels 0), its scale and base.
 * scratch: 2 * padded floats. */
static void prepare_group_portable(const float *q, size_t g, size_t d, const kvr_code_layout *L, const uint8_t *row,
                                   int8_t *q8, float *scales, float *bases, float *scratch) {
    float *kmin = scratch, *kstep = scratch + L->padded;
    read_steps(row + L->key_min, 0, d, (int)L->wide_steps, kmin);
    read_steps(row + L->key_step, 0, d, (int)L->wide_steps, kstep);
    const float limit = L->key_bits == 8 ? 63.0f : 127.0f; /* u8 x s8 pairs must not saturate int16 */
    for (size_t h = 0; h < g; h++) {
        const float *qh = q + h * d;
        float base = 0, top = 0;
        for (size_t j = 0; j < d; j++) {
            base += qh[j] * kmin[j];
            float v = fabsf(qh[j] * kstep[j]);
            top = v > top ? v : top;
        }
        float scale = top > 0 ? top / limit : 0, inv = top > 0 ? limit / top : 0;
        int8_t *out = q8 + h * L->padded;
        for (size_t j = 0; j < d; j++) out[j] = (int8_t)lrintf(qh[j] * kstep[j] * inv);
        for (size_t j = d; j < L->padded; j++) out[j] = 0;
        scales[h] = scale;
        bases[h] = base;
    }
}

static void group_dots_portable(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes,
                                size_t positions, int32_t *dots) {
    for (size_t i = 0; i < positions; i++) {
        const uint8_t *c = codes + i * L->key_code_bytes;
        for (size_t h = 0; h < g; h++) {
            int32_t s = 0;
            for (size_t j = 0; j < L->padded; j++) s += (int32_t)q8[h * L->padded + j] * (int32_t)code_at(c, j, (int)L->key_bits);
            dots[h * positions + i] = s;
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

/* prepare_group_portable, eight channels at a time (d a multiple of 8). */
FAST static void prepare_group_fast(const float *q, size_t g, size_t d, const kvr_code_layout *L, const uint8_t *row,
                                    int8_t *q8, float *scales, float *bases, float *scratch) {
    float *kmin = scratch, *kstep = scratch + L->padded;
    read_steps(row + L->key_min, 0, d, (int)L->wide_steps, kmin);
    read_steps(row + L->key_step, 0, d, (int)L->wide_steps, kstep);
    const float limit = L->key_bits == 8 ? 63.0f : 127.0f;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (size_t h = 0; h < g; h++) {
        const float *qh = q + h * d;
        float *qs = scratch + 2 * L->padded;  /* q * step, reused for the rounding pass */
        __m256 b = _mm256_setzero_ps(), top = _mm256_setzero_ps();
        for (size_t j = 0; j < d; j += 8) {
            __m256 x = _mm256_loadu_ps(qh + j);
            b = _mm256_fmadd_ps(x, _mm256_loadu_ps(kmin + j), b);
            __m256 v = _mm256_mul_ps(x, _mm256_loadu_ps(kstep + j));
            _mm256_storeu_ps(qs + j, v);
            top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v));
        }
        float t = hmax_ps(top);
        float scale = t > 0 ? t / limit : 0;
        __m256 inv = _mm256_set1_ps(t > 0 ? limit / t : 0);
        int8_t *out = q8 + h * L->padded;
        for (size_t j = 0; j < d; j += 8) {
            __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(qs + j), inv));  /* round to nearest even */
            __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
            _mm_storel_epi64((__m128i *)(out + j), _mm_packs_epi16(w, w));
        }
        for (size_t j = d; j < L->padded; j++) out[j] = 0;
        scales[h] = scale;
        bases[h] = hsum_ps(b);
    }
}

/* 4-bit codes: a 16-byte load holds 32 channels (byte j: channel j low, j + 16 high); both halves
 * go into one 256-bit register in channel order and meet the int8 query in vpmaddubsw. The int16
 * sums stay below 15 * 127 * 2 * 8 per 8 runs, so they widen to int32 every 8 runs. */
FAST static void group_dots_u4(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes,
                               size_t positions, int32_t *dots) {
    const size_t runs = L->padded / 32;
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (size_t i = 0; i < positions; i++) {
        const uint8_t *c = codes + i * L->key_code_bytes;
        for (size_t h0 = 0; h0 < g; h0 += 4) {
            const size_t hn = g - h0 < 4 ? g - h0 : 4;
            __m256i wide[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
            for (size_t r0 = 0; r0 < runs; r0 += 8) {
                const size_t r1 = r0 + 8 < runs ? r0 + 8 : runs;
                __m256i narrow[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
                for (size_t r = r0; r < r1; r++) {
                    __m128i b = _mm_loadu_si128((const __m128i *)(c + r * 16));
                    __m256i both = _mm256_set_m128i(_mm_srli_epi16(b, 4), b);
                    __m256i x = _mm256_and_si256(both, nibble);
                    for (size_t t = 0; t < hn; t++) {
                        __m256i w = _mm256_loadu_si256((const __m256i *)(q8 + (h0 + t) * L->padded + r * 32));
                        narrow[t] = _mm256_add_epi16(narrow[t], _mm256_maddubs_epi16(x, w));
                    }
                }
                for (size_t t = 0; t < hn; t++) wide[t] = _mm256_add_epi32(wide[t], _mm256_madd_epi16(narrow[t], ones));
            }
            for (size_t t = 0; t < hn; t++) {
                __m128i s = _mm_add_epi32(_mm256_castsi256_si128(wide[t]), _mm256_extracti128_si256(wide[t], 1));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
                s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
                dots[(h0 + t) * positions + i] = _mm_cvtsi128_si32(s);
            }
        }
    }
}

/* 8-bit codes: 32 channels per load; the query is limited to +-63 so a pair never saturates. */
FAST static void group_dots_u8(const int8_t *q8, size_t g, const kvr_code_layout *L, const uint8_t *codes,
                               size_t positions, int32_t *dots) {
    const size_t runs = L->padded / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (size_t i = 0; i < positions; i++) {
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
            dots[h * positions + i] = _mm_cvtsi128_si32(s);
        }
    }
}

/* Value codes of one position, 8 channels at a time as floats. */
FAST static inline __m256 value_codes8(const uint8_t *c, size_t j, int bits) {
    if (bits == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(c + j))));
    /* channels j..j+7 of a 32-channel run: bytes (run*16 + j%16 ...), low nibbles for j%32 < 16. */
    __m128i b = _mm_loadl_epi64((const __m128i *)(c + (j / 32) * 16 + (j % 16)));
    if (j % 32 >= 16) b = _mm_srli_epi16(b, 4);
    b = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
}

FAST static void group_values_fast(const float *w, size_t g, size_t stride, const kvr_code_layout *L,
                                   const uint8_t *row, size_t positions, size_t dv, float *out, float *offsets, float *scratch) {
    const size_t runs = L->value_runs, vc = L->value_channels, p8 = L->padded;
    float *vmin = scratch, *vstep = scratch + positions * runs, *a = scratch + 2 * positions * runs; /* a: [h][i][r] */
    read_steps(row + L->value_min, 0, positions * runs, (int)L->wide_steps, vmin);
    read_steps(row + L->value_step, 0, positions * runs, (int)L->wide_steps, vstep);
    for (size_t h = 0; h < g; h++)
        for (size_t i = 0; i < positions; i++) {
            const float wh = w[h * stride + i];
            for (size_t r = 0; r < runs; r++) {
                a[(h * positions + i) * runs + r] = wh * vstep[i * runs + r];
                offsets[h * runs + r] += wh * vmin[i * runs + r];
            }
        }
    const uint8_t *codes = row + L->value_codes;
    /* Channels 16 at a time; each head's two accumulators stay in registers over the group's positions. */
    for (size_t h0 = 0; h0 < g; h0 += 4) {
        const size_t hn = g - h0 < 4 ? g - h0 : 4;
        for (size_t j = 0; j < p8 && j < dv + 15; j += 16) {
            const size_t r = j / vc;
            __m256 acc[4][2];
            for (size_t t = 0; t < 4; t++) { acc[t][0] = _mm256_setzero_ps(); acc[t][1] = _mm256_setzero_ps(); }
            for (size_t i = 0; i < positions; i++) {
                const uint8_t *c = codes + i * L->value_code_bytes;
                __m256 x0 = value_codes8(c, j, (int)L->value_bits), x1 = value_codes8(c, j + 8, (int)L->value_bits);
                for (size_t t = 0; t < hn; t++) {
                    __m256 b = _mm256_broadcast_ss(a + ((h0 + t) * positions + i) * runs + r);
                    acc[t][0] = _mm256_fmadd_ps(b, x0, acc[t][0]);
                    acc[t][1] = _mm256_fmadd_ps(b, x1, acc[t][1]);
                }
            }
            for (size_t t = 0; t < hn; t++) {
                float *o = out + (h0 + t) * p8 + j;
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), acc[t][0]));
                _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_loadu_ps(o + 8), acc[t][1]));
            }
        }
    }
}
#endif

void kvr_code_scores(const float *q, size_t g, size_t d, const void *const *rows, size_t groups,
                     const kvr_code_layout *L, float scale, float *out, size_t stride, int8_t *q8, int32_t *dots,
                     float *scratch) {
    float scales[64], bases[64];
    for (size_t gi = 0; gi < groups; gi++) {
        const uint8_t *row = (const uint8_t *)rows[gi];
        const uint8_t *codes = row + L->key_codes;
#if KVR_X86
        if (kvr_has_fast_path() && d % 8 == 0) prepare_group_fast(q, g, d, L, row, q8, scales, bases, scratch);
        else
#endif
            prepare_group_portable(q, g, d, L, row, q8, scales, bases, scratch);
#if KVR_X86
        if (kvr_has_fast_path() && L->key_bits == 4) group_dots_u4(q8, g, L, codes, L->group, dots);
        else if (kvr_has_fast_path()) group_dots_u8(q8, g, L, codes, L->group, dots);
        else
#endif
            group_dots_portable(q8, g, L, codes, L->group, dots);
        for (size_t h = 0; h < g; h++)
            for (size_t i = 0; i < L->group; i++)
                out[h * stride + gi * L->group + i] = (bases[h] + scales[h] * (float)dots[h * L->group + i]) * scale;
    }
}

void kvr_code_values(const float *w, size_t g, size_t stride, const void *const *rows, size_t groups,
                     const kvr_code_layout *L, size_t dv, float *out, float *offsets, float *scratch) {
    const size_t runs = L->value_runs, n = L->group;
    for (size_t gi = 0; gi < groups; gi++) {
        const uint8_t *row = (const uint8_t *)rows[gi];
        const float *wg = w + gi * n;
#if KVR_X86
        if (kvr_has_fast_path()) { group_values_fast(wg, g, stride, L, row, n, dv, out, offsets, scratch); continue; }
#endif
        float *vmin = scratch, *vstep = scratch + n * runs;
        read_steps(row + L->value_min, 0, n * runs, (int)L->wide_steps, vmin);
        read_steps(row + L->value_step, 0, n * runs, (int)L->wide_steps, vstep);
        for (size_t i = 0; i < n; i++) {
            const uint8_t *c = row + L->value_codes + i * L->value_code_bytes;
            for (size_t h = 0; h < g; h++) {
                float wh = wg[h * stride + i];
                if (wh == 0) continue;
                for (size_t r = 0; r < runs; r++) {
                    offsets[h * runs + r] += wh * vmin[i * runs + r];
                    float a = wh * vstep[i * runs + r];
                    for (size_t j = r * L->value_channels; j < (r + 1) * L->value_channels && j < L->padded; j++)
                        out[h * L->padded + j] += a * (float)code_at(c, j, (int)L->value_bits);
                }
            }
        }
    }
}
