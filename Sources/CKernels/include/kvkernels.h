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
#include <string.h>

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

/* A (score, id) pair as one 64-bit key whose ascending order is best first: higher score first
 * (the float's bits made order-preserving, then inverted), ties to the lower id. Invertible. */
static inline uint64_t kvr_pair_key(float score, int32_t id) {
    uint32_t u;
    memcpy(&u, &score, 4);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
    return ((uint64_t)~u << 32) | (uint32_t)id;
}
static inline float kvr_pair_score(uint64_t key) {
    uint32_t u = ~(uint32_t)(key >> 32);
    u = (u & 0x80000000u) ? (u & 0x7FFFFFFFu) : ~u;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline int32_t kvr_pair_id(uint64_t key) { return (int32_t)(uint32_t)key; }

/* Integer scan of 8-bit codes against an 8-bit query (IVF SQ8 list codes, the query quantized once):
 * for row i < n, s_i = sum_j codes[i*d + j] * q[j] exactly in int32 (u8 x s8; exact for d <= 65536)
 * and score_i = fmaf(scale, (float)s_i, base). Rows with score_i >= threshold are kept as
 * kvr_pair_key(score_i, ids[i]) in out_keys (room for n), in row order; returns how many.
 * AVX-512 VNNI body (16 rows at a time), AVX2 and portable bodies; all give identical results. */
size_t kvr_scan_u8s8(const int8_t *q, const uint8_t *codes, const int32_t *ids, size_t n, size_t d,
                     float base, float scale, float threshold, uint64_t *out_keys);

/* Which body kvr_scan_u8s8 uses: 2 AVX-512 VNNI, 1 AVX2, 0 portable: the best the CPU has, at most
 * the cap set by kvr_cap_u8s8_path (2 by default; tests lower it to compare the bodies). */
int kvr_u8s8_path(void);
void kvr_cap_u8s8_path(int cap);

/* Moves the k smallest of n keys to the front (in no particular order), the k-th smallest at
 * index k - 1, and returns it (n <= k: the largest of all; n == 0 or k == 0: UINT64_MAX). On pair
 * keys: the k best pairs. Quickselect with a branchless partition, in place, O(n) expected. */
uint64_t kvr_select_u64(uint64_t *keys, size_t n, size_t k);

/* Hints the CPU to fetch the cache lines holding [p, p + bytes) (graph walks: the next neighbour's
 * row or list): every line from the one holding p, four per step (a prefetch never faults, so the
 * last step may name a line or three past the end; a row of 512 bytes at any offset is 9 lines). */
static inline void kvr_prefetch(const void *p, size_t bytes) {
    const char *c = (const char *)((uintptr_t)p & ~(uintptr_t)63);
    const char *end = (const char *)p + bytes;
    for (; c < end; c += 256) {
        __builtin_prefetch(c, 0, 3);
        __builtin_prefetch(c + 64, 0, 3);
        __builtin_prefetch(c + 128, 0, 3);
        __builtin_prefetch(c + 192, 0, 3);
    }
}

/* Inner products of g f32 queries (g x d, row-major) with n rows of d elements given by pointer
 * (a graph walk's unvisited neighbours, at random places of the map; rows may be unaligned):
 * out[r * g + h] = dot(queries + h * d, rows[r]). Each row is prefetched a few rows before it is
 * scored. The per-pair result is the same bit for bit whatever g, and for f32 the same as
 * kvr_dot_f32 (for f16/bf16 as kvr_scores_f16/bf16 of one row). */
void kvr_scores_gathered_f32(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out);
void kvr_scores_gathered_f16(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out);
void kvr_scores_gathered_bf16(const float *queries, size_t g, const void *const *rows, size_t n, size_t d, float *out);

/* Single inner product of two f32 vectors of length d. */
float kvr_dot_f32(const float *a, const float *b, size_t d);

/* Sorts n 64-bit keys ascending, in place, without allocating (quicksort, median of three, with
 * insertion sort below 24 keys; recursion on the smaller side, so O(log n) stack). For the
 * HNSW build's candidate lists (a few hundred keys each). */
void kvr_sort_u64(uint64_t *keys, size_t n);

/* ---- Exact attention of a GQA group (kvattend.c) ---- */

/* How rows are stored: the order of Swift's DType. */
enum { KVR_DTYPE_F32 = 0, KVR_DTYPE_F16 = 1, KVR_DTYPE_BF16 = 2 };

/* Scores of g queries (q: g x d, row-major f32) against n rows (rows[i]: d elements of dtype, any
 * alignment): out[h * stride + i] = scale * dot(q_h, row_i). Each row is read once for all g. */
void kvr_group_scores(const float *q, size_t g, size_t d, const void *const *rows, size_t n, int dtype,
                      float scale, float *out, size_t stride);

/* out[h * dv + c] += sum_i w[h * stride + i] * row_i[c] for h < g, c < dv: each row read once for all g. */
void kvr_group_accumulate(const float *w, size_t g, size_t stride, const void *const *rows, size_t n, size_t dv,
                          int dtype, float *out);

/* x[i] = exp(x[i] - m) for i < n (x[i] <= m; -inf gives 0), vectorised; returns the sum. */
float kvr_exp_sub(float *x, size_t n, float m);

/* kvr_exp_sub over `groups` runs of `group` values, each run's sum into sums[gi]; returns their sum. */
float kvr_exp_sub_groups(float *x, size_t groups, size_t group, float m, float *sums);

/* Reads bytes [p, p + bytes) and folds them into a word (so the reads cannot be skipped): the
 * memory floor an attention pass over the same bytes is measured against. */
uint64_t kvr_read_bytes(const void *p, size_t bytes);

/* ---- The quantized tier (kvcodes.c; the layout of a group row is Storage/CodeFormat.swift's) ---- */

typedef struct kvr_code_layout {
    size_t key_min, key_step, key_codes, value_min, value_step, value_mean, value_codes; /* byte offsets in a group row */
    size_t row_bytes, key_code_bytes, value_code_bytes; /* a position's key codes, a channel's value codes */
    size_t padded, group, key_bits, value_bits;
    size_t wide_steps; /* mins, steps and means: 1 f32, 0 f16 */
    size_t key_blocks; /* 4-bit key codes: 1 in blocks of 8 channels, each block's positions consecutive
                        * (4 bytes each: byte k holds channel 8b + k low and 8b + 4 + k high); 0 position by
                        * position (32 channels in 16 bytes: byte j holds channel j low and j + 16 high) */
    size_t value_blocks; /* 4-bit value codes: 1 in blocks of 8 positions, each block's channels consecutive
                          * (4 bytes each: byte k holds position 8b + k low and 8b + 4 + k high); 0 channel by
                          * channel (byte j of a channel holds position j low and j + group / 2 high) */
} kvr_code_layout;

/* Which bodies the quantized tier's scans (kvr_code_scores, kvr_code_values, and kvr_exp_sub_groups for
 * the tail weights) use: 2 AVX-512 VNNI,
 * 1 AVX2, 0 portable: the best the CPU has, at most the calling thread's cap set by kvr_cap_codes_path
 * (2 by default; tests lower it to compare the bodies, which give the same integers). kvr_has_vnni: 1 when the CPU
 * has AVX-512 F/BW/VL with VNNI. */
int kvr_codes_path(void);
void kvr_cap_codes_path(int cap);
int kvr_has_vnni(void);

/* Approximate scores of g <= 64 queries (g x d f32) against every position of `groups` group rows:
 * out[h * stride + gi * group + i] = scale * (q_h . decoded key i of group gi), the query times each
 * group's steps quantized to int8 (one scale per head and group). Scratch: q8 holds
 * ((g + 3) / 4 * 4) * padded bytes, dots g * group ints, scratch 3 * padded floats. */
void kvr_code_scores(const float *q, size_t g, size_t d, const void *const *rows, size_t groups,
                     const kvr_code_layout *layout, float scale, float *out, size_t stride, int8_t *q8, int32_t *dots,
                     float *scratch);

/* The weighted sums of decoded value codes for g heads: with w[h * stride + gi * group + i] >= 0 the
 * weight of position i of group gi (a head whose group weights are all 0 is skipped), out[h * padded
 * + c] += sum_i w * value_ic, for c < dv, g <= 64. The weights are quantized per head and group: to
 * u8 for 4-bit value codes, to int16 for 8-bit ones. scratch: 2 * padded floats. Each row's value part
 * is fetched while the row before it is read; `after` (NULL for none) is the row whose value part is
 * fetched during the last one: the caller's next row to read. */
void kvr_code_values(const float *w, size_t g, size_t stride, const void *const *rows, size_t groups,
                     const kvr_code_layout *layout, size_t dv, float *out, float *scratch, const void *after);

/* The largest of x[0, n) (-inf for n == 0 or all NaN; NaN values are passed over), vectorised. */
float kvr_max(const float *x, size_t n);

/* The best `take` of scores[0, n) (ties to the lower position; -inf never taken) as positions in
 * out (room for take), in no particular order; returns how many (min(take, finite count)). A floor
 * read off a sample (every stride-th score) keeps about twice `take` candidates for the final
 * selection; a sample that misjudged falls back to all. keys: room for n. */
size_t kvr_best_positions(const float *scores, size_t n, size_t take, int32_t *out, uint64_t *keys);

/* kvr_best_positions' floor: the (rank + 1)-th smallest pair key of the sample scores[0],
 * scores[stride], ... (the largest when the sample holds fewer); UINT64_MAX (no floor) for rank >= 64,
 * stride 0 or n 0. Exported for its tests: the picks are right whatever floor it gives, only slower
 * when it errs. */
uint64_t kvr_sample_floor_key(const float *scores, size_t n, size_t stride, size_t rank);

/* Starts fetching a group row's value part (steps, means and codes) into the caches: the value pass
 * calls it for the next group it will read while it works on this one. */
void kvr_prefetch_values(const void *row, const kvr_code_layout *layout);

/* A light group through its mean value: out[h * padded + c] += totals[h] * mean_c for c < dv.
 * scratch: padded floats. */
void kvr_code_means(const float *totals, size_t g, const void *row, const kvr_code_layout *layout, size_t dv, float *out,
                    float *scratch);

/* Coding a group (the append path): per column c < d of rows (n x d, row-major), lo[c] and hi[c]
 * the column's min and max over its non-NaN values (+inf and -inf when none) and sum[c] its sum. */
void kvr_column_ranges(const float *rows, size_t n, size_t d, float *lo, float *hi, float *sum);

/* codes[i * d + c] = clamp(round-to-even((rows[i * d + c] - mins[c]) / divisors[c]), 0, levels) for
 * i < n, c < d (levels <= 255; divisors > 0; NaN codes 0). */
void kvr_quantize_columns(const float *rows, size_t n, size_t d, const float *mins, const float *divisors,
                          float levels, uint8_t *codes);

/* Background threads (kvthread.c): the calling thread's kernel id; moving the calling thread to
 * the idle scheduling class (0 on success, else errno); moving thread `tid` back to the normal
 * class at `niceness` above the process's nice value (0 on success, else errno); whether the calling
 * thread made itself a background thread by either (1) or not (0); marking the calling thread as running
 * a background thread's work (or not), returning the previous mark; a spin-wait loop's pause. */
long kvr_thread_id(void);
int kvr_thread_enter_idle(void);
int kvr_thread_leave_idle(long tid, int niceness);
int kvr_thread_is_background(void);
int kvr_thread_set_background(int on);
void kvr_cpu_relax(void);

#ifdef __cplusplus
}
#endif
#endif
