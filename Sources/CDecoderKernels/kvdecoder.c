#include "kvdecoder.h"

#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVD_X86 1
#define FAST __attribute__((target("avx2,fma,f16c")))
#endif

enum { QK = 32, BLOCK_BYTES = 34 };

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else {  /* subnormal: normalise */
            int e = -1;
            do { mant <<= 1; e++; } while (!(mant & 0x400));
            bits = sign | ((uint32_t)(127 - 15 - e) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void matvec_portable(const uint8_t *b, size_t rows, size_t cols, const float *x, float *out) {
    size_t nb = cols / QK;
    for (size_t r = 0; r < rows; r++) {
        float total = 0;
        for (size_t k = 0; k < nb; k++) {
            const uint8_t *block = b + (r * nb + k) * BLOCK_BYTES;
            uint16_t dh;
            memcpy(&dh, block, 2);
            const int8_t *q = (const int8_t *)(block + 2);
            const float *xs = x + k * QK;
            float s = 0;
            for (int i = 0; i < QK; i++) s += (float)q[i] * xs[i];
            total += s * half_to_float(dh);
        }
        out[r] = total;
    }
}

#ifdef KVD_X86
FAST static void matvec_avx2(const uint8_t *b, size_t rows, size_t cols, const float *x, float *out) {
    size_t nb = cols / QK;
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *row = b + r * nb * BLOCK_BYTES;
        __m256 acc = _mm256_setzero_ps();
        for (size_t k = 0; k < nb; k++) {
            const uint8_t *block = row + k * BLOCK_BYTES;
            uint16_t dh;
            memcpy(&dh, block, 2);
            __m256 d = _mm256_set1_ps(_cvtsh_ss(dh));
            __m128i lo = _mm_loadu_si128((const __m128i *)(block + 2));
            __m128i hi = _mm_loadu_si128((const __m128i *)(block + 18));
            const float *xs = x + k * QK;
            __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
            __m256 q1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
            __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
            __m256 q3 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
            __m256 s = _mm256_mul_ps(q0, _mm256_loadu_ps(xs));
            s = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xs + 8), s);
            s = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xs + 16), s);
            s = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xs + 24), s);
            acc = _mm256_fmadd_ps(s, d, acc);
        }
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 0x55));
        out[r] = _mm_cvtss_f32(h);
    }
}

static int has_fast_path(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached;
}
#endif

void kvd_q8_0_matvec(const void *blocks, size_t rows, size_t cols, const float *x, float *out) {
#ifdef KVD_X86
    if (has_fast_path()) {
        matvec_avx2((const uint8_t *)blocks, rows, cols, x, out);
        return;
    }
#endif
    matvec_portable((const uint8_t *)blocks, rows, cols, x, out);
}
