/* The kernels' architecture switch (private to CKernels): on x86, bodies marked FAST are compiled
 * for AVX2/FMA/F16C and chosen at run time by kvr_has_fast_path(), bodies marked VNNI for AVX-512
 * with VNNI (kvr_has_vnni()); elsewhere only the portable bodies exist. */
#ifndef KVARCH_H
#define KVARCH_H

/* A software prefetch of the line at p into the L2 (prefetcht1), not the L1: on AMD Zen 4 a fetch
 * aimed at the L1 holds one of its few miss buffers, so rows fetched ahead queue behind each other;
 * aimed at the L2, many more are in flight. Cold (docs/BENCHMARKS.md): exact attention of a 32K head
 * 2.5-2.9 -> 1.5-1.9 ms, the quantized step about 15% faster, against non-temporal or L1 fetches. */
#define KVR_PREFETCH(p) __builtin_prefetch((p), 0, 2)
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVR_X86 1
#define FAST __attribute__((target("avx2,fma,f16c")))
/* Bodies for AVX-512 with VNNI (chosen at run time too: kvr_has_vnni()). */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

/* Sums of the 16 lanes of each of 16 vectors: out lane i = sum of v[i] (transpose-reduce tree). */
VNNI static inline __m512i kvr_reduce16_epi32(const __m512i *v) {
    __m512i p[8], t[4];
    for (int i = 0; i < 8; i++)   /* per 128-bit block: [v2i 0+2, v2i+1 0+2, v2i 1+3, v2i+1 1+3] */
        p[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)   /* per block: the block's sum for v4i .. v4i+3 */
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_epi64(p[2 * i], p[2 * i + 1]));
    __m512i u0 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_i32x4(t[0], t[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512i u1 = _mm512_add_epi32(_mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_i32x4(t[2], t[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#else
#define KVR_X86 0
#endif
#endif
