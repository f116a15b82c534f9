/* The quantized step's per-group kernels on one core, warm (docs/BENCHMARKS.md, tenth session): the
 * picks (kvr_best_positions over 4 heads x 16K scores, one part of a 32K head; again with the scores rising along
 * the positions, twelfth session), the tail weights (the
 * maximum and kvr_exp_sub_groups over the same scores), the key scan (kvr_code_scores over 256 groups
 * of 64 positions at 256 channels, 4-bit codes in blocks, 4 heads: each group's query preparation and
 * dot products) and the value pass (kvr_code_values over the same groups for 1, 2 and 4 heads: what a
 * group costs whatever it reads, and per head). Scores are Gaussian with a few large ones (a sharp head's);
 * codes random.
 *
 * Build from the repository root:
 *   clang -O2 -I Sources/CKernels/include -I Sources/CKernels -o /tmp/quant_step_kernels \
 *       Tools/bench/quant_step_kernels.c Sources/CKernels/kv*.c -lm -lpthread
 *   /tmp/quant_step_kernels
 * Prints the best of 50 passes, in us. */
#include "kvkernels.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec * 1e-3;
}

static float gaussian(void) {
    const float u = (rand() + 1.0f) / ((float)RAND_MAX + 2.0f), v = rand() / (float)RAND_MAX;
    return sqrtf(-2 * logf(u)) * cosf(6.2831853f * v);
}

enum { D = 256, G = 64, GROUPS = 256, N = 16384, HEADS = 4, TAKE = 128, PASSES = 50 };

int main(void) {
    srand(1);
    float *scores = malloc(sizeof(float) * HEADS * N), *work = malloc(sizeof(float) * HEADS * N), sums[N / G];
    for (size_t i = 0; i < (size_t)HEADS * N; i++) scores[i] = 2 * gaussian();
    for (size_t h = 0; h < HEADS; h++) for (size_t j = 0; j < 5; j++) scores[h * N + (j * 7919 + 13) % N] = 20 + j;
    uint64_t *keys = malloc(sizeof(uint64_t) * N);
    int32_t out[TAKE];
    double best = 1e30;
    for (int r = 0; r < PASSES; r++) {
        const double t = now_us();
        for (size_t h = 0; h < HEADS; h++) kvr_best_positions(scores + h * N, N, TAKE, out, keys);
        const double e = now_us() - t;
        best = e < best ? e : best;
    }
    printf("picks, %d heads x %d scores, take %d: %.1f us\n", HEADS, N, TAKE, best);
    /* The same scores rising by 16 over the part (a head's recency): every sample of the floor a new best. */
    for (size_t i = 0; i < (size_t)HEADS * N; i++) work[i] = scores[i] + 16.0f * (float)(i % N) / N;
    best = 1e30;
    for (int r = 0; r < PASSES; r++) {
        const double t = now_us();
        for (size_t h = 0; h < HEADS; h++) kvr_best_positions(work + h * N, N, TAKE, out, keys);
        const double e = now_us() - t;
        best = e < best ? e : best;
    }
    printf("picks over rising scores: %.1f us\n", best);
    best = 1e30;
    for (int r = 0; r < PASSES; r++) {
        memcpy(work, scores, sizeof(float) * HEADS * N);
        const double t = now_us();
        for (size_t h = 0; h < HEADS; h++) kvr_exp_sub_groups(work + h * N, N / G, G, kvr_max(work + h * N, N), sums);
        const double e = now_us() - t;
        best = e < best ? e : best;
    }
    printf("tail weights (maximum and exp), %d heads x %d scores: %.1f us\n", HEADS, N, best);

    /* Group rows as CodeFormat lays them out for d 256, groups of 64, 4-bit keys and values in blocks, f16 steps. */
    const kvr_code_layout L = {.key_min = 0, .key_step = 512, .key_codes = 1024, .value_min = 9216, .value_step = 9728,
                               .value_mean = 10240, .value_codes = 10752, .row_bytes = 18944, .key_code_bytes = 128,
                               .value_code_bytes = 32, .padded = D, .group = G, .key_bits = 4, .value_bits = 4,
                               .wide_steps = 0, .key_blocks = 1, .value_blocks = 1};
    uint8_t *rows = malloc((size_t)GROUPS * L.row_bytes);
    for (size_t i = 0; i < (size_t)GROUPS * L.row_bytes; i++) rows[i] = (uint8_t)rand();
    for (size_t j = 0; j < GROUPS; j++) {  /* steps, mins and means as small f16 values (0.0625) */
        uint16_t *h = (uint16_t *)(rows + j * L.row_bytes + L.value_min);
        for (size_t c = 0; c < 3 * D; c++) h[c] = 0x2c00;
    }
    float *q = malloc(sizeof(float) * HEADS * D), *scan = malloc(sizeof(float) * HEADS * GROUPS * G), qscratch[3 * D];
    for (size_t i = 0; i < (size_t)HEADS * D; i++) q[i] = gaussian();
    for (size_t j = 0; j < GROUPS; j++) {  /* key mins and steps too */
        uint16_t *h = (uint16_t *)(rows + j * L.row_bytes);
        for (size_t c = 0; c < 2 * D; c++) h[c] = 0x2c00;
    }
    const void **pointers = malloc(sizeof(void *) * GROUPS);
    for (size_t j = 0; j < GROUPS; j++) pointers[j] = rows + j * L.row_bytes;
    int8_t q8[HEADS * D];
    int32_t dots[HEADS * G];
    best = 1e30;
    for (int r = 0; r < PASSES; r++) {
        const double t = now_us();
        kvr_code_scores(q, HEADS, D, pointers, GROUPS, &L, 0.0625f, scan, (size_t)GROUPS * G, q8, dots, qscratch);
        const double e = now_us() - t;
        best = e < best ? e : best;
    }
    printf("key scan, %d heads: %.2f us per group\n", HEADS, best / GROUPS);
    float *w = malloc(sizeof(float) * HEADS * GROUPS * G), acc[HEADS * D], scratch[4 * D];
    for (size_t i = 0; i < (size_t)HEADS * GROUPS * G; i++) w[i] = expf(-fabsf(gaussian()));
    for (size_t g = 1; g <= HEADS; g *= 2) {
        best = 1e30;
        for (int r = 0; r < PASSES; r++) {
            memset(acc, 0, sizeof acc);
            const double t = now_us();
            for (size_t j = 0; j < GROUPS; j++) {
                const void *row[1] = {rows + j * L.row_bytes};
                kvr_code_values(w + j * G, g, (size_t)GROUPS * G, row, 1, &L, D, acc, scratch,
                                j + 1 < GROUPS ? rows + (j + 1) * L.row_bytes : NULL);
            }
            const double e = now_us() - t;
            best = e < best ? e : best;
        }
        printf("value pass, %zu head%s: %.2f us per group\n", g, g > 1 ? "s" : "", best / GROUPS);
    }
    return 0;
}
