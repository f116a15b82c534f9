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

/* Per head: the int8 query for one group's key steps (padded channels 0), its scale and base. */
static void prepare_group(const float *q, size_t g, size_t d, const kvr_code_layout *L, const uint8_t *row,
                          int8_t *q8, float *scales, float *bases) {
    const float *kmin = (const float *)(row + L->key_min), *kstep = (const float *)(row + L->key_step);
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
                                   const uint8_t *row, size_t positions, size_t dv, float *out, float *offsets) {
    const float *vmin = (const float *)(row + L->value_min), *vstep = (const float *)(row + L->value_step);
    const uint8_t *codes = row + L->value_codes;
    const size_t runs = L->value_runs, vc = L->value_channels, p8 = L->padded;
    float a[64];
    for (size_t i = 0; i < positions; i++) {
        const uint8_t *c = codes + i * L->value_code_bytes;
        for (size_t r = 0; r < runs; r++) {
            const size_t first = r * vc;
            if (first >= dv) break;
            int any = 0;
            for (size_t h = 0; h < g; h++) {
                float wh = w[h * stride + i];
                a[h] = wh * vstep[i * runs + r];
                offsets[h * runs + r] += wh * vmin[i * runs + r];
                any |= wh != 0;
            }
            if (!any) continue;
            const size_t last = first + vc < p8 ? first + vc : p8;
            for (size_t j = first; j < last; j += 8) {
                __m256 x = value_codes8(c, j, (int)L->value_bits);
                for (size_t h = 0; h < g; h++) {
                    float *o = out + h * p8 + j;
                    _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(a[h]), x, _mm256_loadu_ps(o)));
                }
            }
        }
    }
}
#endif

void kvr_code_scores(const float *q, size_t g, size_t d, const void *const *rows, size_t groups,
                     const kvr_code_layout *L, float scale, float *out, size_t stride, int8_t *q8, int32_t *dots) {
    float scales[64], bases[64];
    for (size_t gi = 0; gi < groups; gi++) {
        const uint8_t *row = (const uint8_t *)rows[gi];
        prepare_group(q, g, d, L, row, q8, scales, bases);
        const uint8_t *codes = row + L->key_codes;
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
                     const kvr_code_layout *L, size_t dv, float *out, float *offsets) {
    for (size_t gi = 0; gi < groups; gi++) {
        const uint8_t *row = (const uint8_t *)rows[gi];
        const float *wg = w + gi * L->group;
#if KVR_X86
        if (kvr_has_fast_path()) { group_values_fast(wg, g, stride, L, row, L->group, dv, out, offsets); continue; }
#endif
        const float *vmin = (const float *)(row + L->value_min), *vstep = (const float *)(row + L->value_step);
        for (size_t i = 0; i < L->group; i++) {
            const uint8_t *c = row + L->value_codes + i * L->value_code_bytes;
            for (size_t h = 0; h < g; h++) {
                float wh = wg[h * stride + i];
                if (wh == 0) continue;
                for (size_t r = 0; r < L->value_runs; r++) {
                    offsets[h * L->value_runs + r] += wh * vmin[i * L->value_runs + r];
                    float a = wh * vstep[i * L->value_runs + r];
                    for (size_t j = r * L->value_channels; j < (r + 1) * L->value_channels && j < L->padded; j++)
                        out[h * L->padded + j] += a * (float)code_at(c, j, (int)L->value_bits);
                }
            }
        }
    }
}
