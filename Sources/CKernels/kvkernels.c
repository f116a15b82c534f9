#include "kvkernels.h"
#include <string.h>
#include <math.h>

#include "kvarch.h"

/* ---- portable scalar bodies ---- */

/* A float's bits and back (memcpy: no aliasing rules broken). */
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t mant = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: renormalise */
            int e = -1;
            do { e++; mant <<= 1; } while ((mant & 0x400u) == 0);
            mant &= 0x3FFu;
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | (mant << 13);
        }
    } else if (exp == 0x1F) {
        bits = sign | 0x7F800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    return f32_from_bits(bits);
}

static inline uint16_t float_to_half(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t absx = x & 0x7FFFFFFFu;
    if (absx > 0x7F800000u) return (uint16_t)(sign | 0x7E00u | ((absx >> 13) & 0x3FFu)); /* NaN */
    if (absx >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* overflow (incl. rounding) -> Inf */
    if (absx < 0x38800000u) {                                     /* result is subnormal or zero */
        if (absx < 0x33000000u) return (uint16_t)sign;            /* below half the smallest subnormal */
        uint32_t e = absx >> 23;
        uint32_t m = (absx & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - e;                                  /* value = m * 2^(e-150); unit 2^-24 */
        uint32_t halfm = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (halfm & 1u))) halfm++;
        return (uint16_t)(sign | halfm);
    }
    uint32_t rounded = absx + 0x0FFFu + ((absx >> 13) & 1u);      /* round to nearest even */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

static inline float bf16_to_float(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

static inline uint16_t float_to_bf16(float f) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((x >> 16) | 0x0040u); /* quiet NaN */
    x += 0x7FFFu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

/* Portable inner products of an f32 query with a row of T (f32, u8 codes): four running sums. */
#define DOT_PORTABLE(NAME, T)                                                      \
    static float NAME(const float *q, const T *p, size_t d) {                      \
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                      \
        size_t i = 0;                                                              \
        for (; i + 4 <= d; i += 4) {                                               \
            s0 += q[i] * p[i]; s1 += q[i + 1] * p[i + 1];                          \
            s2 += q[i + 2] * p[i + 2]; s3 += q[i + 3] * p[i + 3];                  \
        }                                                                          \
        for (; i < d; i++) s0 += q[i] * p[i];                                      \
        return (s0 + s1) + (s2 + s3);                                              \
    }
DOT_PORTABLE(dot_f32_portable, float)
DOT_PORTABLE(dot_u8_portable, uint8_t)

/* Rows a gathered scan prefetches ahead of the one it scores: a burst of a whole neighbour list's
 * rows stalls on the miss queue (at 128K keys 4-5% slower than 4 ahead; 2 and 8 in between). */
#define ROWS_AHEAD 4
/* Bytes of a row prefetched: its first four cache lines. The scoring reads the row in order, and
 * the hardware's stream prefetcher brings the rest; prefetching every line kept more misses in
 * flight than the load queue holds (HNSW, 128K keys, held-out keys: 7.4-7.8 us against 7.1-7.2
 * per query). */
#define PREFETCH_BYTES(B) ((B) < 256 ? (B) : 256)

/* Scores of g queries against n rows given by pointer, each row prefetched ROWS_AHEAD rows
 * before it is scored (a graph walk's unvisited neighbours, read at random from the map). The
 * common head dimensions get their own loops (DOT inlined with a constant d: unrolled, no tail
 * tests), and one query its own; the arithmetic is the same, so are the results. */
#define GATHER_LOOP(DOT, T, DIM)                                                   \
    for (size_t r = 0; r < n; r++) {                                               \
        if (r + ROWS_AHEAD < n) kvr_prefetch(rows[r + ROWS_AHEAD], PREFETCH_BYTES((DIM) * sizeof(T))); \
        const T *p = (const T *)rows[r];                                           \
        if (g == 1) out[r] = DOT(queries, p, DIM);                                 \
        else for (size_t h = 0; h < g; h++) out[r * g + h] = DOT(queries + h * (DIM), p, DIM); \
    }
#define SCORE_GATHERED(DOT, T)                                                     \
    for (size_t r = 0; r < n && r < ROWS_AHEAD; r++) kvr_prefetch(rows[r], PREFETCH_BYTES(d * sizeof(T))); \
    if (d == 128) { GATHER_LOOP(DOT, T, 128) }                                     \
    else if (d == 64) { GATHER_LOOP(DOT, T, 64) }                                  \
    else { GATHER_LOOP(DOT, T, d) }

/* ---- AVX2 / FMA / F16C bodies ---- */
#if KVR_X86
FAST static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    __m128 sh = _mm_movehdup_ps(lo);
    __m128 s = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, s);
    s = _mm_add_ss(s, sh);
    return _mm_cvtss_f32(s);
}

FAST static inline __m256 load_f16x8(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

FAST static inline __m256 load_bf16x8(const uint16_t *p) {
    __m128i h = _mm_loadu_si128((const __m128i *)p);
    __m256i w = _mm256_cvtepu16_epi32(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

FAST static void f16_to_f32_fast(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_f16x8(src + i));
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

FAST static void bf16_to_f32_fast(const uint16_t *src, float *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load_bf16x8(src + i));
    for (; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

FAST static void f32_to_f16_fast(const float *src, uint16_t *dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
    for (; i < n; i++) dst[i] = float_to_half(src[i]);
}

/* One inner product of an f32 query with a row of T, converted in registers (LOAD8: 8 elements as
 * f32, TOF32: one). Four independent 8-lane accumulators over 32-element steps stream the row's
 * cache lines in order; measured here at d=128 about 2x faster for f32 and 15% faster for f16
 * than scoring four rows at once (kernel notes in docs/BENCHMARKS.md). */
#define DOT_AVX2_BODY(LOAD8, TOF32)                                                \
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();                     \
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();                     \
    size_t i = 0;                                                                  \
    for (; i + 32 <= d; i += 32) {                                                 \
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), LOAD8(p + i), a0);            \
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), LOAD8(p + i + 8), a1);    \
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 16), LOAD8(p + i + 16), a2);  \
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 24), LOAD8(p + i + 24), a3);  \
    }                                                                              \
    DOT_TAIL(LOAD8, TOF32)

/* The 8-element steps, the horizontal sum and the scalar tail, shared by both bodies. */
#define DOT_TAIL(LOAD8, TOF32)                                                     \
    for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), LOAD8(p + i), a0); \
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));  \
    for (; i < d; i++) s += q[i] * TOF32(p[i]);                                    \
    return s;

FAST static inline __m256 load_f32x8(const float *p) { return _mm256_loadu_ps(p); }
static inline float f32_to_float(float x) { return x; }

FAST static inline float dot_f32_avx2(const float *q, const float *p, size_t d) { DOT_AVX2_BODY(load_f32x8, f32_to_float) }
FAST static inline float dot_f16_avx2(const float *q, const uint16_t *p, size_t d) { DOT_AVX2_BODY(load_f16x8, half_to_float) }
FAST static inline float dot_bf16_avx2(const float *q, const uint16_t *p, size_t d) { DOT_AVX2_BODY(load_bf16x8, bf16_to_float) }

/* u8 codes: zero-extend 8 bytes to 8 int32 lanes, convert. */
FAST static inline __m256 load_u8x8(const uint8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline float u8_to_float(uint8_t x) { return (float)x; }
FAST static inline float dot_u8_avx2(const float *q, const uint8_t *p, size_t d) { DOT_AVX2_BODY(load_u8x8, u8_to_float) }

FAST static void scores_f32_fast(const float *q, const float *rows, size_t n, size_t d, float *out) {
    for (size_t r = 0; r < n; r++) out[r] = dot_f32_avx2(q, rows + r * d, d);
}

FAST static void scores_f16_fast(const float *q, const uint16_t *rows, size_t n, size_t d, float *out) {
    for (size_t r = 0; r < n; r++) out[r] = dot_f16_avx2(q, rows + r * d, d);
}

FAST static void scores_bf16_fast(const float *q, const uint16_t *rows, size_t n, size_t d, float *out) {
    for (size_t r = 0; r < n; r++) out[r] = dot_bf16_avx2(q, rows + r * d, d);
}

FAST static void scores_u8_fast(const float *q, const uint8_t *rows, size_t n, size_t d, float *out) {
    for (size_t r = 0; r < n; r++) out[r] = dot_u8_avx2(q, rows + r * d, d);
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))
/* AVX-512 body of the u8 scan: 16 codes per step (zero-extend, convert, FMA), two accumulators. */
AVX512 static void scores_u8_avx512(const float *q, const uint8_t *rows, size_t n, size_t d, float *out) {
    for (size_t r = 0; r < n; r++) {
        const uint8_t *p = rows + r * d;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        size_t i = 0;
        for (; i + 32 <= d; i += 32) {
            __m512 c0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i))));
            __m512 c1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i + 16))));
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), c0, a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i + 16), c1, a1);
        }
        for (; i + 16 <= d; i += 16) {
            __m512 c0 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p + i))));
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + i), c0, a0);
        }
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
        for (; i < d; i++) s += q[i] * (float)p[i];
        out[r] = s;
    }
}

FAST static void gathered_f32_avx2(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    SCORE_GATHERED(dot_f32_avx2, float)
}
FAST static void gathered_f16_avx2(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    SCORE_GATHERED(dot_f16_avx2, uint16_t)
}
FAST static void gathered_bf16_avx2(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    SCORE_GATHERED(dot_bf16_avx2, uint16_t)
}

static int detect_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

static int detect_fast(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
static int detect_fast(void) { return 0; }
static int detect_avx512(void) { return 0; }
#endif

static int avx512_state = -1;

/* 1 when the AVX-512 bodies are in use (the u8 scan). */
static int has_avx512(void) {
    int s = __atomic_load_n(&avx512_state, __ATOMIC_RELAXED);
    if (s < 0) {
        s = detect_avx512();
        __atomic_store_n(&avx512_state, s, __ATOMIC_RELAXED);
    }
    return s;
}

static int fast_state = -1;

int kvr_has_fast_path(void) {
    int s = __atomic_load_n(&fast_state, __ATOMIC_RELAXED);
    if (s < 0) {
        s = detect_fast();
        __atomic_store_n(&fast_state, s, __ATOMIC_RELAXED);
    }
    return s;
}

void kvr_f16_to_f32(const uint16_t *src, float *dst, size_t n) {
#if KVR_X86
    if (kvr_has_fast_path()) { f16_to_f32_fast(src, dst, n); return; }
#endif
    for (size_t i = 0; i < n; i++) dst[i] = half_to_float(src[i]);
}

void kvr_bf16_to_f32(const uint16_t *src, float *dst, size_t n) {
#if KVR_X86
    if (kvr_has_fast_path()) { bf16_to_f32_fast(src, dst, n); return; }
#endif
    for (size_t i = 0; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

void kvr_f32_to_f16(const float *src, uint16_t *dst, size_t n) {
#if KVR_X86
    if (kvr_has_fast_path()) { f32_to_f16_fast(src, dst, n); return; }
#endif
    for (size_t i = 0; i < n; i++) dst[i] = float_to_half(src[i]);
}

void kvr_f32_to_bf16(const float *src, uint16_t *dst, size_t n) {
    for (size_t i = 0; i < n; i++) dst[i] = float_to_bf16(src[i]);
}

float kvr_dot_f32(const float *a, const float *b, size_t d) {
#if KVR_X86
    if (kvr_has_fast_path()) return dot_f32_avx2(a, b, d);
#endif
    return dot_f32_portable(a, b, d);
}

/* Portable inner products of an f32 query with a reduced-precision row: one running sum. */
#define DOT_PORTABLE_CONVERTED(NAME, TOF32)                                        \
    static inline float NAME(const float *q, const uint16_t *p, size_t d) {        \
        float s = 0;                                                               \
        for (size_t i = 0; i < d; i++) s += q[i] * TOF32(p[i]);                    \
        return s;                                                                  \
    }
DOT_PORTABLE_CONVERTED(dot_f16_portable, half_to_float)
DOT_PORTABLE_CONVERTED(dot_bf16_portable, bf16_to_float)

void kvr_scores_f32(const float *q, const float *rows, size_t n, size_t d, float *out) {
#if KVR_X86
    if (kvr_has_fast_path()) { scores_f32_fast(q, rows, n, d, out); return; }
#endif
    for (size_t r = 0; r < n; r++) out[r] = dot_f32_portable(q, rows + r * d, d);
}

void kvr_scores_f16(const float *q, const uint16_t *rows, size_t n, size_t d, float *out) {
#if KVR_X86
    if (kvr_has_fast_path()) { scores_f16_fast(q, rows, n, d, out); return; }
#endif
    for (size_t r = 0; r < n; r++) out[r] = dot_f16_portable(q, rows + r * d, d);
}

void kvr_scores_bf16(const float *q, const uint16_t *rows, size_t n, size_t d, float *out) {
#if KVR_X86
    if (kvr_has_fast_path()) { scores_bf16_fast(q, rows, n, d, out); return; }
#endif
    for (size_t r = 0; r < n; r++) out[r] = dot_bf16_portable(q, rows + r * d, d);
}

static void gathered_f32_portable(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    SCORE_GATHERED(dot_f32_portable, float)
}
static void gathered_f16_portable(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    SCORE_GATHERED(dot_f16_portable, uint16_t)
}
static void gathered_bf16_portable(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    SCORE_GATHERED(dot_bf16_portable, uint16_t)
}

#if KVR_X86
#define GATHERED_DISPATCH(T)                                                                       \
    if (kvr_has_fast_path()) { gathered_##T##_avx2(queries, g, rows, n, d, out); return; }         \
    gathered_##T##_portable(queries, g, rows, n, d, out);
#else
#define GATHERED_DISPATCH(T) gathered_##T##_portable(queries, g, rows, n, d, out);
#endif

void kvr_scores_gathered_f32(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    GATHERED_DISPATCH(f32)
}
void kvr_scores_gathered_f16(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    GATHERED_DISPATCH(f16)
}
void kvr_scores_gathered_bf16(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out) {
    GATHERED_DISPATCH(bf16)
}

void kvr_scores_u8(const float *q, const uint8_t *codes, size_t n, size_t d, float *out) {
#if KVR_X86
    if (has_avx512()) { scores_u8_avx512(q, codes, n, d, out); return; }
    if (kvr_has_fast_path()) { scores_u8_fast(q, codes, n, d, out); return; }
#endif
    for (size_t r = 0; r < n; r++) out[r] = dot_u8_portable(q, codes + r * d, d);
}

/* ---- integer scan of 8-bit codes (u8 codes x s8 query, exact int32 sums) ---- */

static size_t scan_u8s8_portable(const int8_t *q, const uint8_t *codes, const int32_t *ids, size_t n, size_t d,
                                 float base, float scale, float threshold, uint64_t *out_keys) {
    size_t kept = 0;
    for (size_t r = 0; r < n; r++) {
        const uint8_t *row = codes + r * d;
        int32_t s = 0;
        for (size_t j = 0; j < d; j++) s += (int32_t)row[j] * (int32_t)q[j];
        float score = fmaf(scale, (float)s, base);
        if (score >= threshold) out_keys[kept++] = kvr_pair_key(score, ids[r]);
    }
    return kept;
}

#if KVR_X86
/* AVX2: widen 16 codes and 16 query bytes to int16, multiply-add pairs to int32 (exact). */
FAST static size_t scan_u8s8_avx2(const int8_t *q, const uint8_t *codes, const int32_t *ids, size_t n, size_t d,
                                  float base, float scale, float threshold, uint64_t *out_keys) {
    size_t kept = 0;
    for (size_t r = 0; r < n; r++) {
        const uint8_t *row = codes + r * d;
        __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
        size_t j = 0;
        for (; j + 32 <= d; j += 32) {
            __m256i c0 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + j)));
            __m256i c1 = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(row + j + 16)));
            __m256i q0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j)));
            __m256i q1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + j + 16)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(c0, q0));
            a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(c1, q1));
        }
        __m256i a = _mm256_add_epi32(a0, a1);
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
        int32_t s = _mm_cvtsi128_si32(h);
        for (; j < d; j++) s += (int32_t)row[j] * (int32_t)q[j];
        float score = fmaf(scale, (float)s, base);
        if (score >= threshold) out_keys[kept++] = kvr_pair_key(score, ids[r]);
    }
    return kept;
}

/* AVX-512 VNNI: 16 rows at a time, 64 code bytes x 64 query bytes per VPDPBUSD into each row's
 * accumulator (the tail of d masked), the 16 accumulators reduced together, scores formed and
 * filtered 16 at a time, kept rows compress-stored. Rows past n in the last group read nothing. */
VNNI static size_t scan_u8s8_vnni(const int8_t *q, const uint8_t *codes, const int32_t *ids, size_t n, size_t d,
                                  float base, float scale, float threshold, uint64_t *out_keys) {
    size_t kept = 0;
    const size_t full = d / 64, tail = d % 64;
    const __mmask64 tmask = tail ? (~0ULL >> (64 - tail)) : 0;
    const __m512 vscale = _mm512_set1_ps(scale), vbase = _mm512_set1_ps(base), vthr = _mm512_set1_ps(threshold);
    for (size_t r0 = 0; r0 < n; r0 += 16) {
        const size_t rows = n - r0 < 16 ? n - r0 : 16;
        const uint8_t *g = codes + r0 * d;
        /* The next group's codes: lists are short runs, so the hardware prefetcher starts late. */
        if (r0 + 16 < n) {
            const uint8_t *next = g + 16 * d, *end = codes + n * d;
            for (size_t off = 0; off < 16 * d && next + off < end; off += 64) _mm_prefetch((const char *)(next + off), _MM_HINT_T0);
        }
        __m512i acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_si512();
        if (rows == 16) {
            for (size_t c = 0; c < full; c++) {
                __m512i qv = _mm512_loadu_si512((const void *)(q + c * 64));
                for (int i = 0; i < 16; i++)
                    acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_loadu_si512((const void *)(g + i * d + c * 64)), qv);
            }
            if (tail) {
                __m512i qv = _mm512_maskz_loadu_epi8(tmask, q + full * 64);
                for (int i = 0; i < 16; i++)
                    acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_maskz_loadu_epi8(tmask, g + i * d + full * 64), qv);
            }
        } else {
            for (size_t c = 0; c <= full; c++) {
                __mmask64 m = c < full ? ~0ULL : tmask;
                if (!m) break;
                __m512i qv = _mm512_maskz_loadu_epi8(m, q + c * 64);
                for (size_t i = 0; i < rows; i++)
                    acc[i] = _mm512_dpbusd_epi32(acc[i], _mm512_maskz_loadu_epi8(m, g + i * d + c * 64), qv);
            }
        }
        __m512i sums = kvr_reduce16_epi32(acc);
        __m512 sc = _mm512_fmadd_ps(vscale, _mm512_cvtepi32_ps(sums), vbase);
        __mmask16 valid = (__mmask16)(rows == 16 ? 0xFFFF : ((1u << rows) - 1u));
        __mmask16 keep = _mm512_mask_cmp_ps_mask(valid, sc, vthr, _CMP_GE_OQ);
        if (keep) {
            /* Pair keys (as kvr_pair_key) in two halves of 8, each compressed in registers, then
             * a masked store: a compress straight to memory is microcoded on AMD Zen 4 (measured:
             * a fifth of the scan's time). */
            __m512i u = _mm512_castps_si512(sc);
            const __m512i top = _mm512_set1_epi32((int)0x80000000u);
            __mmask16 neg = _mm512_test_epi32_mask(u, top);
            u = _mm512_mask_xor_epi32(_mm512_or_si512(u, top), neg, u, _mm512_set1_epi32(-1));
            u = _mm512_xor_si512(u, _mm512_set1_epi32(-1));
            __m512i idv = _mm512_maskz_loadu_epi32(valid, ids + r0);
            __m512i k0 = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_castsi512_si256(u)), 32),
                                         _mm512_cvtepu32_epi64(_mm512_castsi512_si256(idv)));
            __m512i k1 = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(u, 1)), 32),
                                         _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(idv, 1)));
            const __mmask8 m0 = (__mmask8)(keep & 0xFF), m1 = (__mmask8)(keep >> 8);
            const unsigned g0 = (unsigned)__builtin_popcount(m0), got = g0 + (unsigned)__builtin_popcount(m1);
            _mm512_mask_storeu_epi64(out_keys + kept, (__mmask8)((1u << g0) - 1u), _mm512_maskz_compress_epi64(m0, k0));
            _mm512_mask_storeu_epi64(out_keys + kept + g0, (__mmask8)((1u << (got - g0)) - 1u), _mm512_maskz_compress_epi64(m1, k1));
            kept += got;
        }
    }
    return kept;
}

static int detect_vnni(void) {
    __builtin_cpu_init();
    return detect_avx512() && __builtin_cpu_supports("avx512vnni");
}
#else
static int detect_vnni(void) { return 0; }
#endif

static int vnni_state = -1, u8s8_cap = 2;

int kvr_has_vnni(void) {
    int s = __atomic_load_n(&vnni_state, __ATOMIC_RELAXED);
    if (s < 0) {
        s = detect_vnni();
        __atomic_store_n(&vnni_state, s, __ATOMIC_RELAXED);
    }
    return s;
}

/* 2 AVX-512 VNNI, 1 AVX2, 0 portable: the best bodies this CPU has. */
static int best_path(void) { return kvr_has_vnni() ? 2 : (kvr_has_fast_path() ? 1 : 0); }

int kvr_u8s8_path(void) {
    int best = best_path(), cap = __atomic_load_n(&u8s8_cap, __ATOMIC_RELAXED);
    return best < cap ? best : cap;
}

/* Per thread, so a test comparing the quantized scans' bodies does not change what other threads run. */
static _Thread_local int codes_cap = 2;

int kvr_codes_path(void) {
    int best = best_path();
    return best < codes_cap ? best : codes_cap;
}

void kvr_cap_codes_path(int cap) { codes_cap = cap < 0 ? 0 : cap; }

void kvr_cap_u8s8_path(int cap) { __atomic_store_n(&u8s8_cap, cap < 0 ? 0 : cap, __ATOMIC_RELAXED); }

size_t kvr_scan_u8s8(const int8_t *q, const uint8_t *codes, const int32_t *ids, size_t n, size_t d,
                     float base, float scale, float threshold, uint64_t *out_keys) {
#if KVR_X86
    switch (kvr_u8s8_path()) {
    case 2: return scan_u8s8_vnni(q, codes, ids, n, d, base, scale, threshold, out_keys);
    case 1: return scan_u8s8_avx2(q, codes, ids, n, d, base, scale, threshold, out_keys);
    default: break;
    }
#endif
    return scan_u8s8_portable(q, codes, ids, n, d, base, scale, threshold, out_keys);
}

static void insertion_sort_u64(uint64_t *a, size_t n) {
    for (size_t i = 1; i < n; i++) {
        uint64_t x = a[i];
        size_t j = i;
        while (j > 0 && a[j - 1] > x) { a[j] = a[j - 1]; j--; }
        a[j] = x;
    }
}

/* ---- selection of the k smallest keys ---- */

uint64_t kvr_select_u64(uint64_t *a, size_t n, size_t k) {
    if (n == 0 || k == 0) return UINT64_MAX;
    if (n <= k) {
        uint64_t w = a[0];
        for (size_t i = 1; i < n; i++) w = a[i] > w ? a[i] : w;
        return w;
    }
    const size_t t = k - 1;
    size_t lo = 0, hi = n;            /* [lo, hi) holds index t; left of lo <= it <= right of hi */
    while (hi - lo > 16) {
        /* Median of three to a[hi - 1] as the pivot. */
        size_t mid = lo + (hi - lo) / 2, last = hi - 1, p;
        uint64_t x = a[lo], y = a[mid], z = a[last];
        p = x < y ? (y < z ? mid : (x < z ? last : lo)) : (x < z ? lo : (y < z ? last : mid));
        uint64_t pivot = a[p];
        a[p] = a[last]; a[last] = pivot;
        /* Branchless Lomuto: [lo, j) < pivot <= [j, i). */
        size_t j = lo;
        for (size_t i = lo; i < last; i++) {
            uint64_t v = a[i];
            size_t less = v < pivot;
            a[i] = a[j];
            a[j] = v;
            j += less;
        }
        a[last] = a[j]; a[j] = pivot;
        if (t == j) return pivot;
        if (t < j) hi = j; else lo = j + 1;
    }
    insertion_sort_u64(a + lo, hi - lo);
    return a[t];
}

void kvr_sort_u64(uint64_t *a, size_t n) {
    while (n > 24) {
        /* Median of three to a[0], then Hoare partition around it. */
        size_t mid = n / 2;
        uint64_t x = a[0], y = a[mid], z = a[n - 1], t;
        uint64_t pivot = x < y ? (y < z ? y : (x < z ? z : x)) : (x < z ? x : (y < z ? z : y));
        size_t i = 0, j = n - 1;
        for (;;) {
            while (a[i] < pivot) i++;
            while (a[j] > pivot) j--;
            if (i >= j) break;
            t = a[i]; a[i] = a[j]; a[j] = t;
            i++; j--;
        }
        /* [0, j] <= pivot <= [j + 1, n): recurse on the smaller side, loop on the larger. */
        size_t left = j + 1, right = n - left;
        if (left < right) { kvr_sort_u64(a, left); a += left; n = right; }
        else { kvr_sort_u64(a + left, right); n = left; }
    }
    insertion_sort_u64(a, n);
}
