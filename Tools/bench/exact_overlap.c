/* Does exact attention's arithmetic overlap its memory reads? One core, a head of f16 rows (d 256, four
 * query heads, as `bench attention` on the Gemma 3 capture), the two passes of AttentionKernel.attendPart
 * (kvr_group_scores over the keys, kvr_group_accumulate over the values, 256 row pointers per call):
 *   - read: kvr_read_bytes over the keys, then the values (what the floor kernel does), caches evicted first;
 *   - warm: each pass over rows that stay in the L2 (the arithmetic alone);
 *   - cold: each pass over every row, caches evicted first (a decode step's case).
 * If the passes overlapped their reads with their arithmetic, cold would be near max(read, warm); where it is
 * near read + warm, the core computes and waits in turn (docs/BENCHMARKS.md, thirteenth session).
 *
 * Build from the repository root:
 *   clang -O2 -I Sources/CKernels/include -I Sources/CKernels -o /tmp/exact_overlap \
 *       Tools/bench/exact_overlap.c Sources/CKernels/kvkernels.c -lm
 *   /tmp/exact_overlap [rows: 65536] [warm rows: 384]
 * Prints ns per position (one key row and one value row, four heads): medians of 11 interleaved rounds. */
#include "../../Sources/CKernels/kvattend.c"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { D = 256, HEADS = 4, CHUNK = 256, ROUNDS = 11 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static unsigned char *junk;
static const size_t junk_bytes = (size_t)128 << 20;  /* four times a 32 MB L3 */
static void evict(void) {
    for (size_t i = 0; i < junk_bytes; i += 64) junk[i]++;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static void scores_pass(const float *q, const void **rows, size_t n, float *s) {
    for (size_t st = 0; st < n; st += CHUNK)
        kvr_group_scores(q, HEADS, D, rows + st, n - st < CHUNK ? n - st : CHUNK, KVR_DTYPE_F16, 0.0625f, s + st, n);
}

static void values_pass(const float *w, const void **rows, size_t n, float *out) {
    for (size_t st = 0; st < n; st += CHUNK)
        kvr_group_accumulate(w + st, HEADS, n, rows + st, n - st < CHUNK ? n - st : CHUNK, D, KVR_DTYPE_F16, out);
}

int main(int argc, char **argv) {
    const size_t n = argc > 1 ? (size_t)atol(argv[1]) : 65536, warm_n = argc > 2 ? (size_t)atol(argv[2]) : 384;
    if (n < CHUNK || warm_n < 2 || warm_n > n) {
        fprintf(stderr, "usage: exact_overlap [rows >= %d] [warm rows, 2..rows]\n", CHUNK);
        return 2;
    }
    junk = malloc(junk_bytes);
    uint16_t *keys = aligned_alloc(4096, n * D * 2), *values = aligned_alloc(4096, n * D * 2);
    const void **krows = malloc(n * sizeof(void *)), **vrows = malloc(n * sizeof(void *));
    float *q = malloc(HEADS * D * sizeof(float)), *s = malloc(HEADS * n * sizeof(float)), *out = calloc(HEADS * D, sizeof(float));
    if (!junk || !keys || !values || !krows || !vrows || !q || !s || !out) {
        fprintf(stderr, "exact_overlap: out of memory\n");
        return 1;
    }
    memset(junk, 1, junk_bytes);
    srand(11);
    for (size_t i = 0; i < n * D; i++) {
        const _Float16 k = (_Float16)(rand() / (float)RAND_MAX - 0.5f), v = (_Float16)(rand() / (float)RAND_MAX - 0.5f);
        memcpy(keys + i, &k, 2);
        memcpy(values + i, &v, 2);
    }
    for (size_t i = 0; i < n; i++) { krows[i] = keys + i * D; vrows[i] = values + i * D; }
    for (size_t i = 0; i < HEADS * D; i++) q[i] = rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < HEADS * n; i++) s[i] = rand() / (float)RAND_MAX;  /* weights for the value pass */

    double read[ROUNDS], warm_s[ROUNDS], warm_v[ROUNDS], cold_s[ROUNDS], cold_v[ROUNDS];
    uint64_t sink = 0;
    for (int r = 0; r < ROUNDS; r++) {
        evict();
        double t = now();
        sink ^= kvr_read_bytes(keys, n * D * 2) ^ kvr_read_bytes(values, n * D * 2);
        read[r] = (now() - t) / (double)n;

        scores_pass(q, krows, warm_n, s);  /* brings the warm rows into the L2 */
        t = now();
        for (int k = 0; k < 8; k++) scores_pass(q, krows, warm_n, s);
        warm_s[r] = (now() - t) / (8.0 * (double)warm_n);
        values_pass(s, vrows, warm_n, out);
        t = now();
        for (int k = 0; k < 8; k++) values_pass(s, vrows, warm_n, out);
        warm_v[r] = (now() - t) / (8.0 * (double)warm_n);

        evict();
        t = now();
        scores_pass(q, krows, n, s);
        cold_s[r] = (now() - t) / (double)n;
        for (size_t i = 0; i < HEADS * n; i++) s[i] = 0.5f;  /* keep the weights finite whatever the scores */
        evict();
        t = now();
        values_pass(s, vrows, n, out);
        cold_v[r] = (now() - t) / (double)n;
    }
    double *all[5] = {read, warm_s, warm_v, cold_s, cold_v};
    for (int k = 0; k < 5; k++) qsort(all[k], ROUNDS, sizeof(double), by_value);
    const int m = ROUNDS / 2;
    printf("%zu rows x %d f16 (keys and values %zu MB each), %d heads, one core, ns per position (medians of %d):\n",
           n, D, n * D * 2 >> 20, HEADS, ROUNDS);
    printf("  read keys and values (the floor's kernel)   %6.1f\n", read[m] * 1e9);
    printf("  score pass: warm %6.1f, cold %6.1f\n", warm_s[m] * 1e9, cold_s[m] * 1e9);
    printf("  value pass: warm %6.1f, cold %6.1f\n", warm_v[m] * 1e9, cold_v[m] * 1e9);
    printf("  both passes: warm %.1f + read %.1f = %.1f; max %.1f; cold %.1f\n", (warm_s[m] + warm_v[m]) * 1e9, read[m] * 1e9,
           (warm_s[m] + warm_v[m] + read[m]) * 1e9, (warm_s[m] + warm_v[m] > read[m] ? warm_s[m] + warm_v[m] : read[m]) * 1e9,
           (cold_s[m] + cold_v[m]) * 1e9);
    return sink == 42 ? 3 : 0;
}
