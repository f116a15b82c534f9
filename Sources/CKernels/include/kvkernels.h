/* Vectorised reduced-precision kernels for KVRecall.
 *
 * Every function picks an AVX2/FMA/F16C body at run time when the CPU has it and a
 * portable body otherwise; both give the same f32 results up to summation order.
 * Row pointers may be unaligned (vectors are read straight from LMDB's memory map).
 */
#ifndef KVKERNELS_H
#define KVKERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* 1 when the vectorised bodies are in use (AVX2 + FMA + F16C present). */
int kvr_has_fast_path(void);

/* dst[i] = float(src[i]) for i < n. */
void kvr_f16_to_f32(const uint16_t *src, float *dst, size_t n);
void kvr_bf16_to_f32(const uint16_t *src, float *dst, size_t n);

/* dst[i] = round-to-nearest-even(src[i]); NaN stays NaN, overflow goes to +-Inf. */
void kvr_f32_to_f16(const float *src, uint16_t *dst, size_t n);
void kvr_f32_to_bf16(const float *src, uint16_t *dst, size_t n);

/* Inner products of one f32 query q[d] with n contiguous rows of width d:
 * out[i] = dot(q, rows + i*d), i < n. */
void kvr_scores_f32(const float *q, const float *rows, size_t n, size_t d, float *out);
void kvr_scores_f16(const float *q, const uint16_t *rows, size_t n, size_t d, float *out);
void kvr_scores_bf16(const float *q, const uint16_t *rows, size_t n, size_t d, float *out);

/* 8-bit codes (scalar quantization): out[i] = sum_j q[j] * codes[i*d + j], i < n. The caller
 * folds the per-dimension step into q and adds the offset term itself (IVF list codes). */
void kvr_scores_u8(const float *q, const uint8_t *codes, size_t n, size_t d, float *out);

/* Hints the CPU to fetch the cache lines of [p, p + bytes) (graph walks: the next neighbour's row). */
static inline void kvr_prefetch(const void *p, size_t bytes) {
    const char *c = (const char *)p;
    for (size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
}

/* Single inner product of two f32 vectors of length d. */
float kvr_dot_f32(const float *a, const float *b, size_t d);

/* Sorts n 64-bit keys ascending, in place, without allocating (quicksort, median of three, with
 * insertion sort below 24 keys; recursion on the smaller side, so O(log n) stack). For the
 * HNSW build's candidate lists (a few hundred keys each). */
void kvr_sort_u64(uint64_t *keys, size_t n);

#ifdef __cplusplus
}
#endif
#endif
