/* Exact attention of a GQA group over rows read straight from the memory map, and the floor it is
 * measured against (a pass that only reads the same bytes).
 *
 * One pass over the keys scores every query head of the group (each key row is read once and
 * multiplied with the g queries), one pass over the values accumulates every head's weighted sum.
 * The caller splits positions into parts (one per core) and merges the parts by log-sum-exp
 * (flash-decoding's split-K). f16/bf16 rows are converted in registers. */
#include "kvkernels.h"
#include <math.h>
#include <string.h>

#include "kvarch.h"

/* ---- portable bodies ---- */

static inline float scalar_at(const void *row, size_t j, int dtype) {
    if (dtype == KVR_DTYPE_F32) return ((const float *)row)[j];
    uint16_t w = ((const uint16_t *)row)[j];
    float f;
    if (dtype == KVR_DTYPE_BF16) {
        uint32_t bits = (uint32_t)w << 16;
        memcpy(&f, &bits, 4);
        return f;
    }
    kvr_f16_to_f32(&w, &f, 1);
    return f;
}

static void group_scores_portable(const float *q, size_t g, size_t d, const void *const *rows, size_t n, int dtype,
                                  float scale, float *out, size_t stride) {
    for (size_t i = 0; i < n; i++) {
        for (size_t h = 0; h < g; h++) {
            float s = 0;
            for (size_t j = 0; j < d; j++) s += q[h * d + j] * scalar_at(rows[i], j, dtype);
            out[h * stride + i] = s * scale;
        }
    }
}

static void group_accumulate_portable(const float *w, size_t g, size_t stride, const void *const *rows, size_t n,
                                      size_t dv, int dtype, float *out) {
    for (size_t i = 0; i < n; i++) {
        for (size_t c = 0; c < dv; c++) {
            float v = scalar_at(rows[i], c, dtype);
            for (size_t h = 0; h < g; h++) out[h * dv + c] += w[h * stride + i] * v;
        }
    }
}

/* ---- AVX2 / FMA / F16C bodies ---- */
#if KVR_X86
FAST static inline __m256 load8_f32(const void *p, size_t j) { return _mm256_loadu_ps((const float *)p + j); }
FAST static inline __m256 load8_f16(const void *p, size_t j) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + j)));
}
FAST static inline __m256 load8_bf16(const void *p, size_t j) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + j)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

/* The four horizontal sums of a, b, c, e as one vector. */
FAST static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 e) {
    __m256 ab = _mm256_hadd_ps(a, b), ce = _mm256_hadd_ps(c, e);
    __m256 abce = _mm256_hadd_ps(ab, ce);
    return _mm_add_ps(_mm256_castps256_ps128(abce), _mm256_extractf128_ps(abce, 1));
}

FAST static inline float hsum1(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Rows read ahead: the rows of a head are contiguous within a block but a pass over them is too
 * slow for the hardware prefetcher to hide memory latency behind the arithmetic alone. About 4 KB
 * ahead (8 rows of 256 f16 dimensions; at 128 dimensions 8 rows arrived late: exact 2.6x the floor). */
static inline size_t rows_ahead(size_t row_bytes) {
    size_t rows = 4096 / (row_bytes ? row_bytes : 1);
    return rows < 8 ? 8 : rows > 32 ? 32 : rows;
}
static inline void prefetch_row(const void *p, size_t bytes) {
    const char *c = (const char *)p;
    for (size_t off = 0; off < bytes; off += 64) KVR_PREFETCH(c + off);
}

/* Scores of four query heads against two rows at a time (8 accumulators in registers), then one
 * head against single rows for what is left. d need not be a multiple of 8 (scalar tail). */
#define DEFINE_GROUP_SCORES(NAME, LOAD)                                                                      \
FAST static void NAME(const float *q, size_t g, size_t d, const void *const *rows, size_t n, int dtype,      \
                      float scale, float *out, size_t stride) {                                              \
    const size_t d8 = d & ~(size_t)7, rb = d * (dtype == KVR_DTYPE_F32 ? 4 : 2), PF = rows_ahead(rb);       \
    size_t h = 0;                                                                                            \
    for (; h + 4 <= g; h += 4) {                                                                             \
        const float *q0 = q + h * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;                               \
        size_t i = 0;                                                                                        \
        for (; i + 2 <= n; i += 2) {                                                                         \
            const void *r0 = rows[i], *r1 = rows[i + 1];                                                     \
            if (i + PF + 1 < n) { prefetch_row(rows[i + PF], rb); prefetch_row(rows[i + PF + 1], rb); }      \
            __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00;                               \
            __m256 a10 = a00, a11 = a00, a12 = a00, a13 = a00;                                               \
            for (size_t j = 0; j < d8; j += 8) {                                                             \
                __m256 x0 = LOAD(r0, j), x1 = LOAD(r1, j), w;                                                \
                w = _mm256_loadu_ps(q0 + j); a00 = _mm256_fmadd_ps(w, x0, a00); a10 = _mm256_fmadd_ps(w, x1, a10); \
                w = _mm256_loadu_ps(q1 + j); a01 = _mm256_fmadd_ps(w, x0, a01); a11 = _mm256_fmadd_ps(w, x1, a11); \
                w = _mm256_loadu_ps(q2 + j); a02 = _mm256_fmadd_ps(w, x0, a02); a12 = _mm256_fmadd_ps(w, x1, a12); \
                w = _mm256_loadu_ps(q3 + j); a03 = _mm256_fmadd_ps(w, x0, a03); a13 = _mm256_fmadd_ps(w, x1, a13); \
            }                                                                                                \
            float s0[4], s1[4];                                                                              \
            _mm_storeu_ps(s0, hsum4(a00, a01, a02, a03));                                                    \
            _mm_storeu_ps(s1, hsum4(a10, a11, a12, a13));                                                    \
            for (size_t j = d8; j < d; j++) {                                                                \
                float x0 = scalar_at(r0, j, dtype), x1 = scalar_at(r1, j, dtype);                            \
                s0[0] += q0[j] * x0; s0[1] += q1[j] * x0; s0[2] += q2[j] * x0; s0[3] += q3[j] * x0;         \
                s1[0] += q0[j] * x1; s1[1] += q1[j] * x1; s1[2] += q2[j] * x1; s1[3] += q3[j] * x1;         \
            }                                                                                                \
            for (size_t t = 0; t < 4; t++) {                                                                 \
                out[(h + t) * stride + i] = s0[t] * scale;                                                   \
                out[(h + t) * stride + i + 1] = s1[t] * scale;                                               \
            }                                                                                                \
        }                                                                                                    \
        for (; i < n; i++) {                                                                                 \
            for (size_t t = 0; t < 4; t++) {                                                                 \
                const float *qt = q + (h + t) * d;                                                           \
                __m256 a = _mm256_setzero_ps();                                                              \
                for (size_t j = 0; j < d8; j += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qt + j), LOAD(rows[i], j), a); \
                float s = hsum1(a);                                                                          \
                for (size_t j = d8; j < d; j++) s += qt[j] * scalar_at(rows[i], j, dtype);                   \
                out[(h + t) * stride + i] = s * scale;                                                       \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    for (; h < g; h++) {                                                                                     \
        const float *qh = q + h * d;                                                                         \
        size_t i = 0;                                                                                        \
        for (; i + 4 <= n; i += 4) {                                                                         \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                      \
            for (size_t j = 0; j < d8; j += 8) {                                                             \
                __m256 w = _mm256_loadu_ps(qh + j);                                                          \
                a0 = _mm256_fmadd_ps(w, LOAD(rows[i], j), a0);                                               \
                a1 = _mm256_fmadd_ps(w, LOAD(rows[i + 1], j), a1);                                           \
                a2 = _mm256_fmadd_ps(w, LOAD(rows[i + 2], j), a2);                                           \
                a3 = _mm256_fmadd_ps(w, LOAD(rows[i + 3], j), a3);                                           \
            }                                                                                                \
            float s[4];                                                                                      \
            _mm_storeu_ps(s, hsum4(a0, a1, a2, a3));                                                         \
            for (size_t t = 0; t < 4; t++) {                                                                 \
                for (size_t j = d8; j < d; j++) s[t] += qh[j] * scalar_at(rows[i + t], j, dtype);            \
                out[h * stride + i + t] = s[t] * scale;                                                      \
            }                                                                                                \
        }                                                                                                    \
        for (; i < n; i++) {                                                                                 \
            __m256 a = _mm256_setzero_ps();                                                                  \
            for (size_t j = 0; j < d8; j += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + j), LOAD(rows[i], j), a); \
            float s = hsum1(a);                                                                              \
            for (size_t j = d8; j < d; j++) s += qh[j] * scalar_at(rows[i], j, dtype);                       \
            out[h * stride + i] = s * scale;                                                                 \
        }                                                                                                    \
    }                                                                                                        \
}

DEFINE_GROUP_SCORES(group_scores_f32, load8_f32)
DEFINE_GROUP_SCORES(group_scores_f16, load8_f16)
DEFINE_GROUP_SCORES(group_scores_bf16, load8_bf16)

/* Rows per run of the value pass, measured: on AMD Zen 3, cold, exact attention of a 32K x 256 f16 head
 * takes 0.93x its time with runs of 32 (45 paired runs; docs/BENCHMARKS.md, fourteenth session); runs of 8
 * were no faster cold and slower warm, runs of 64 slower. */
#define KVR_VALUE_RUN 16

/* out[h][c] += sum_i w[h][i] v_i[c]: rows in runs of KVR_VALUE_RUN (they stay in L1 while the dimensions
 * are swept 16 at a time), four heads' 2 x 8 accumulators in registers. */
#define DEFINE_GROUP_ACCUMULATE(NAME, LOAD)                                                                  \
FAST static void NAME(const float *w, size_t g, size_t stride, const void *const *rows, size_t n, size_t dv, \
                      int dtype, float *out) {                                                               \
    const size_t d16 = dv & ~(size_t)15, rb = dv * (dtype == KVR_DTYPE_F32 ? 4 : 2), R = KVR_VALUE_RUN;      \
    /* the next run's rows are prefetched over the run's sweeps of 16 dimensions: `ahead` per sweep */       \
    const size_t sweeps = d16 / 16 ? d16 / 16 : 1, ahead = (R + sweeps - 1) / sweeps;                       \
    for (size_t start = 0; start < n; start += R) {                                                          \
        const size_t end = start + R < n ? start + R : n, next = end + R < n ? end + R : n;  /* the next run */ \
        size_t h = 0;                                                                                        \
        for (; h + 4 <= g; h += 4) {                                                                         \
            const float *w0 = w + h * stride, *w1 = w0 + stride, *w2 = w1 + stride, *w3 = w2 + stride;      \
            float *o0 = out + h * dv, *o1 = o0 + dv, *o2 = o1 + dv, *o3 = o2 + dv;                           \
            for (size_t c = 0; c < d16; c += 16) {                                                           \
                /* the next run's rows, spread so that they arrive before they are read            */   \
                for (size_t i = end + ahead * (c / 16); i < end + ahead * (c / 16) + ahead && i < next; i++) prefetch_row(rows[i], rb); \
                __m256 a00 = _mm256_loadu_ps(o0 + c), a01 = _mm256_loadu_ps(o0 + c + 8);                     \
                __m256 a10 = _mm256_loadu_ps(o1 + c), a11 = _mm256_loadu_ps(o1 + c + 8);                     \
                __m256 a20 = _mm256_loadu_ps(o2 + c), a21 = _mm256_loadu_ps(o2 + c + 8);                     \
                __m256 a30 = _mm256_loadu_ps(o3 + c), a31 = _mm256_loadu_ps(o3 + c + 8);                     \
                for (size_t i = start; i < end; i++) {                                                       \
                    __m256 v0 = LOAD(rows[i], c), v1 = LOAD(rows[i], c + 8), b;                              \
                    b = _mm256_broadcast_ss(w0 + i); a00 = _mm256_fmadd_ps(b, v0, a00); a01 = _mm256_fmadd_ps(b, v1, a01); \
                    b = _mm256_broadcast_ss(w1 + i); a10 = _mm256_fmadd_ps(b, v0, a10); a11 = _mm256_fmadd_ps(b, v1, a11); \
                    b = _mm256_broadcast_ss(w2 + i); a20 = _mm256_fmadd_ps(b, v0, a20); a21 = _mm256_fmadd_ps(b, v1, a21); \
                    b = _mm256_broadcast_ss(w3 + i); a30 = _mm256_fmadd_ps(b, v0, a30); a31 = _mm256_fmadd_ps(b, v1, a31); \
                }                                                                                            \
                _mm256_storeu_ps(o0 + c, a00); _mm256_storeu_ps(o0 + c + 8, a01);                            \
                _mm256_storeu_ps(o1 + c, a10); _mm256_storeu_ps(o1 + c + 8, a11);                            \
                _mm256_storeu_ps(o2 + c, a20); _mm256_storeu_ps(o2 + c + 8, a21);                            \
                _mm256_storeu_ps(o3 + c, a30); _mm256_storeu_ps(o3 + c + 8, a31);                            \
            }                                                                                                \
        }                                                                                                    \
        for (; h < g; h++) {                                                                                 \
            const float *wh = w + h * stride;                                                                \
            float *oh = out + h * dv;                                                                        \
            for (size_t c = 0; c < d16; c += 16) {                                                           \
                if (h + 1 == g)                                                                              \
                    for (size_t i = end + ahead * (c / 16); i < end + ahead * (c / 16) + ahead && i < next; i++) prefetch_row(rows[i], rb); \
                __m256 a0 = _mm256_loadu_ps(oh + c), a1 = _mm256_loadu_ps(oh + c + 8);                       \
                for (size_t i = start; i < end; i++) {                                                       \
                    __m256 b = _mm256_broadcast_ss(wh + i);                                                  \
                    a0 = _mm256_fmadd_ps(b, LOAD(rows[i], c), a0);                                           \
                    a1 = _mm256_fmadd_ps(b, LOAD(rows[i], c + 8), a1);                                       \
                }                                                                                            \
                _mm256_storeu_ps(oh + c, a0); _mm256_storeu_ps(oh + c + 8, a1);                              \
            }                                                                                                \
        }                                                                                                    \
        if (d16 < dv) {                                                                                      \
            for (size_t i = start; i < end; i++)                                                             \
                for (size_t c = d16; c < dv; c++) {                                                          \
                    float v = scalar_at(rows[i], c, dtype);                                                  \
                    for (size_t t = 0; t < g; t++) out[t * dv + c] += w[t * stride + i] * v;                 \
                }                                                                                            \
        }                                                                                                    \
    }                                                                                                        \
}

DEFINE_GROUP_ACCUMULATE(group_accumulate_f32, load8_f32)
DEFINE_GROUP_ACCUMULATE(group_accumulate_f16, load8_f16)
DEFINE_GROUP_ACCUMULATE(group_accumulate_bf16, load8_bf16)

/* exp(x) for x <= 0 (softmax weights after subtracting the maximum), Cephes' range reduction and
 * polynomial: relative error about 2e-7; -inf gives 0, and so does anything below -87. The constants
 * are shared by the 256- and 512-bit bodies, which give the same value in every lane. */
#define KVR_EXP_LOW (-87.3365f)
#define KVR_EXP_LOG2E 1.44269504088896341f
#define KVR_EXP_LN2_HI 0.693359375f
#define KVR_EXP_LN2_LO (-2.12194440e-4f)
#define KVR_EXP_P0 1.9875691500e-4f
#define KVR_EXP_P1 1.3981999507e-3f
#define KVR_EXP_P2 8.3334519073e-3f
#define KVR_EXP_P3 4.1665795894e-2f
#define KVR_EXP_P4 1.6666665459e-1f
#define KVR_EXP_P5 5.0000001201e-1f

FAST static inline __m256 exp_nonpositive(__m256 x) {
    const __m256 lo = _mm256_set1_ps(KVR_EXP_LOW);
    __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(x, lo);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(KVR_EXP_LOG2E)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(KVR_EXP_LN2_HI), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(KVR_EXP_LN2_LO), x);
    __m256 y = _mm256_set1_ps(KVR_EXP_P0);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(KVR_EXP_P1));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(KVR_EXP_P2));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(KVR_EXP_P3));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(KVR_EXP_P4));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(KVR_EXP_P5));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    y = _mm256_mul_ps(y, _mm256_castsi256_ps(e));
    return _mm256_andnot_ps(below, y);
}

FAST static float exp_sub_fast(float *x, size_t n, float m) {
    __m256 mv = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float s = hsum1(acc);
    for (; i < n; i++) { x[i] = expf(x[i] - m); s += x[i]; }
    return s;
}

/* exp_nonpositive in 512-bit vectors: the same operations, so the same value in every lane. */
VNNI static inline __m512 exp_nonpositive16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(KVR_EXP_LOW);
    const __mmask16 below = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(KVR_EXP_LOG2E)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(KVR_EXP_LN2_HI), x);
    x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(KVR_EXP_LN2_LO), x);
    __m512 y = _mm512_set1_ps(KVR_EXP_P0);
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(KVR_EXP_P1));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(KVR_EXP_P2));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(KVR_EXP_P3));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(KVR_EXP_P4));
    y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(KVR_EXP_P5));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23);
    y = _mm512_mul_ps(y, _mm512_castsi512_ps(e));
    return _mm512_maskz_mov_ps((__mmask16)~below, y);
}

/* kvr_exp_sub_groups for groups of a multiple of 16 values, 16 lanes at a time and no call per group
 * (the tail weights of a quantized step: 128K exps per 32K head of four query heads). */
VNNI static float exp_sub_groups_vnni(float *x, size_t groups, size_t group, float m, float *sums) {
    const __m512 mv = _mm512_set1_ps(m);
    float total = 0;
    for (size_t gi = 0; gi < groups; gi++) {
        float *xg = x + gi * group;
        __m512 acc = _mm512_setzero_ps();
        for (size_t i = 0; i < group; i += 16) {
            const __m512 e = exp_nonpositive16(_mm512_sub_ps(_mm512_loadu_ps(xg + i), mv));
            _mm512_storeu_ps(xg + i, e);
            acc = _mm512_add_ps(acc, e);
        }
        sums[gi] = _mm512_reduce_add_ps(acc);
        total += sums[gi];
    }
    return total;
}

FAST static uint64_t read_bytes_fast(const void *p, size_t bytes) {
    const char *c = (const char *)p;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; i + 128 <= bytes; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(c + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(c + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(c + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(c + i + 96)));
    }
    __m256i a = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    uint64_t out[4];
    _mm256_storeu_si256((__m256i *)out, a);
    uint64_t s = out[0] ^ out[1] ^ out[2] ^ out[3];
    for (; i < bytes; i++) s ^= (uint64_t)(unsigned char)c[i];
    return s;
}
#endif

void kvr_group_scores(const float *q, size_t g, size_t d, const void *const *rows, size_t n, int dtype,
                      float scale, float *out, size_t stride) {
#if KVR_X86
    if (kvr_has_fast_path()) {
        switch (dtype) {
        case KVR_DTYPE_F32: group_scores_f32(q, g, d, rows, n, dtype, scale, out, stride); return;
        case KVR_DTYPE_F16: group_scores_f16(q, g, d, rows, n, dtype, scale, out, stride); return;
        default: group_scores_bf16(q, g, d, rows, n, dtype, scale, out, stride); return;
        }
    }
#endif
    group_scores_portable(q, g, d, rows, n, dtype, scale, out, stride);
}

void kvr_group_accumulate(const float *w, size_t g, size_t stride, const void *const *rows, size_t n, size_t dv,
                          int dtype, float *out) {
#if KVR_X86
    if (kvr_has_fast_path()) {
        switch (dtype) {
        case KVR_DTYPE_F32: group_accumulate_f32(w, g, stride, rows, n, dv, dtype, out); return;
        case KVR_DTYPE_F16: group_accumulate_f16(w, g, stride, rows, n, dv, dtype, out); return;
        default: group_accumulate_bf16(w, g, stride, rows, n, dv, dtype, out); return;
        }
    }
#endif
    group_accumulate_portable(w, g, stride, rows, n, dv, dtype, out);
}

float kvr_exp_sub_groups(float *x, size_t groups, size_t group, float m, float *sums) {
#if KVR_X86
    if (group % 16 == 0 && kvr_codes_path() == 2) return exp_sub_groups_vnni(x, groups, group, m, sums);
#endif
    float total = 0;
    for (size_t gi = 0; gi < groups; gi++) {
        sums[gi] = kvr_exp_sub(x + gi * group, group, m);
        total += sums[gi];
    }
    return total;
}

float kvr_exp_sub(float *x, size_t n, float m) {
#if KVR_X86
    if (kvr_has_fast_path()) return exp_sub_fast(x, n, m);
#endif
    float s = 0;
    for (size_t i = 0; i < n; i++) { x[i] = expf(x[i] - m); s += x[i]; }
    return s;
}

uint64_t kvr_read_bytes(const void *p, size_t bytes) {
#if KVR_X86
    if (kvr_has_fast_path()) return read_bytes_fast(p, bytes);
#endif
    const unsigned char *c = (const unsigned char *)p;
    uint64_t s = 0;
    for (size_t i = 0; i < bytes; i++) s ^= c[i];
    return s;
}
