/* Decode-step kernels of the KVRecall decoder: a matrix-vector product read straight from
 * ggml Q8_0 blocks (the tied embedding / output matrix), so the largest matrix is read at
 * 8.5 bits per weight instead of 32 with results equal to its f32 dequantization up to
 * summation order. An AVX2/FMA/F16C body is picked at run time; a portable body otherwise.
 */
#ifndef KVDECODER_H
#define KVDECODER_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* out[r] = dot(x, row r) for r < rows, where row r is cols/32 consecutive Q8_0 blocks
 * (34 bytes each: an f16 scale d, then 32 int8 q; weight = d * q) starting at
 * blocks + r * (cols / 32) * 34. cols must be a multiple of 32. */
void kvd_q8_0_matvec(const void *blocks, size_t rows, size_t cols, const float *x, float *out);

#ifdef __cplusplus
}
#endif
#endif
