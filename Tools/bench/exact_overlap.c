/* Does exact attention's arithmetic overlap its memory reads? One core, a head of f16 rows (d 256, four
 * query heads, as `bench attention` on the Gemma 3 capture), the two passes of AttentionKernel.attendPart
 * (kvr_group_scores over the keys, kvr_group_accumulate over the values, 256 row pointers per call):
 *   - read: kvr_read_bytes over the keys, then the values (what the floor kernel does), caches evicted first;
 *   - warm: each pass over rows that stay in the L2 (the arithmetic alone);
 *   - cold: each pass over every row, caches evicted first (a decode step's case).
 * If the passes overlapped their reads with their arithmetic, cold would be near max(read, warm); where it is
 * near read + warm, the core computes and waits in turn (docs/BENCHMARKS.md, thirteenth session).
 *
 * With a third argument 2, two threads run every measurement at once, each over its half of the rows (and
 * its own warm rows), as a decode step's two parts do; the figures are then ns per position of the whole
 * (wall time over all rows), so the floor's line is the two-core floor (fifteenth session).
 *
 * Build from the repository root:
 *   clang -O2 -I Sources/CKernels/include -I Sources/CKernels -o /tmp/exact_overlap \
 *       Tools/bench/exact_overlap.c Sources/CKernels/kvkernels.c Sources/CKernels/kvcodes.c -lm -lpthread
 *   /tmp/exact_overlap [rows: 65536] [warm rows: 384] [threads: 1 or 2]
 * Prints ns per position (one key row and one value row, four heads): medians of 11 interleaved rounds. */
#include "../../Sources/CKernels/kvattend.c"
#include "spin_pair.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { D = 256, HEADS = 4, CHUNK = 256, ROUNDS = 11, WARM_REPEATS = 32 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static unsigned char *junk;
static const size_t junk_bytes = (size_t)128 << 20;  /* four times a 32 MB L3 */
/* Touches part `t` of `parts` of the junk: run by every thread at once, so that each core's own L2 is
 * evicted too (Zen's L3 is a victim cache: a read on one core leaves the other's L2 as it was). */
static void evict_part(size_t t, size_t parts) {
    for (size_t i = junk_bytes * t / parts; i < junk_bytes * (t + 1) / parts; i += 64) junk[i]++;
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

/* One measured operation over a thread's share of the rows. */
enum op { EVICT, READ, WARM_SCORES, WARM_VALUES, COLD_SCORES, SOFTMAX, COLD_VALUES };
struct share {
    _Alignas(64) enum op op;  /* a cache line of its own per share */
    size_t index, shares;
    const void **krows, **vrows;
    const uint16_t *keys, *values;
    size_t n, warm_n;
    const float *q;
    float *s, *out;
    uint64_t sink;
};

static void run_share(void *arg) {
    struct share *t = arg;
    switch (t->op) {
    case EVICT: evict_part(t->index, t->shares); break;
    case READ: t->sink ^= kvr_read_bytes(t->keys, t->n * D * 2) ^ kvr_read_bytes(t->values, t->n * D * 2); break;
    case WARM_SCORES: for (int k = 0; k < WARM_REPEATS; k++) scores_pass(t->q, t->krows, t->warm_n, t->s); break;
    case WARM_VALUES: for (int k = 0; k < WARM_REPEATS; k++) values_pass(t->s, t->vrows, t->warm_n, t->out); break;
    case COLD_SCORES: scores_pass(t->q, t->krows, t->n, t->s); break;
    case SOFTMAX:  /* between the passes, as AttentionKernel.attendPart: each head's maximum, then its weights */
        for (size_t h = 0; h < HEADS; h++) t->sink += (uint64_t)kvr_exp_sub(t->s + h * t->n, t->n, kvr_max(t->s + h * t->n, t->n));
        break;
    case COLD_VALUES: values_pass(t->s, t->vrows, t->n, t->out); break;
    }
}

/* Runs `op` on every share at once (the second on the spinning helper) and returns the wall time. */
static double run_all(struct share *shares, int threads, enum op op) {
    for (int t = 0; t < threads; t++) shares[t].op = op;
    const double t0 = now();
    if (threads > 1) spin_pair_run(run_share, &shares[0], &shares[1]);
    else run_share(&shares[0]);
    return now() - t0;
}

int main(int argc, char **argv) {
    const size_t n = argc > 1 ? (size_t)atol(argv[1]) : 65536, warm_n = argc > 2 ? (size_t)atol(argv[2]) : 384;
    const int threads = argc > 3 ? atoi(argv[3]) : 1;
    if (threads < 1 || threads > 2 || n < (size_t)threads * CHUNK || warm_n < 2 || warm_n > n / (size_t)threads) {
        fprintf(stderr, "usage: exact_overlap [rows >= 256 per thread] [warm rows, 2..rows per thread] [threads: 1 or 2]\n");
        return 2;
    }
    junk = malloc(junk_bytes);
    const size_t bytes = (n * D * 2 + 4095) & ~(size_t)4095;  /* aligned_alloc wants a multiple of the alignment */
    uint16_t *keys = aligned_alloc(4096, bytes), *values = aligned_alloc(4096, bytes);
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

    /* Each thread's share: its half of the rows, its own scores (HEADS rows of its row count) and sums. */
    struct share shares[2];
    float *out2 = calloc(HEADS * D, sizeof(float)), *s2 = threads > 1 ? malloc(HEADS * n * sizeof(float)) : s;
    if (!out2 || !s2) { fprintf(stderr, "exact_overlap: out of memory\n"); return 1; }
    for (int t = 0; t < threads; t++) {
        const size_t first = n * t / threads, count = n * (t + 1) / threads - first;
        shares[t] = (struct share){.index = (size_t)t, .shares = (size_t)threads, .krows = krows + first, .vrows = vrows + first, .keys = keys + first * D,
                                   .values = values + first * D, .n = count, .warm_n = warm_n, .q = q,
                                   .s = t ? s2 : s, .out = t ? out2 : out};
    }

    if (threads > 1 && spin_pair_start() != 0) {
        fprintf(stderr, "exact_overlap: cannot start a thread\n");
        return 1;
    }

    double read[ROUNDS], warm_s[ROUNDS], warm_v[ROUNDS], cold_s[ROUNDS], soft[ROUNDS], cold_v[ROUNDS];
    uint64_t sink = 0;
    const double warm_rows = (double)WARM_REPEATS * (double)warm_n * threads;
    for (int r = 0; r < ROUNDS; r++) {
        run_all(shares, threads, EVICT);
        read[r] = run_all(shares, threads, READ) / (double)n;

        run_all(shares, threads, WARM_SCORES);  /* brings the warm rows into the L2 */
        warm_s[r] = run_all(shares, threads, WARM_SCORES) / warm_rows;
        run_all(shares, threads, WARM_VALUES);
        warm_v[r] = run_all(shares, threads, WARM_VALUES) / warm_rows;

        run_all(shares, threads, EVICT);
        cold_s[r] = run_all(shares, threads, COLD_SCORES) / (double)n;
        soft[r] = run_all(shares, threads, SOFTMAX) / (double)n;
        for (size_t i = 0; i < HEADS * n; i++) s[i] = s2[i] = 0.5f;  /* finite weights whatever the scores (s2 is s on one thread) */
        run_all(shares, threads, EVICT);
        cold_v[r] = run_all(shares, threads, COLD_VALUES) / (double)n;
    }
    if (threads > 1) spin_pair_stop();
    for (int t = 0; t < threads; t++) sink ^= shares[t].sink;
    double *all[6] = {read, warm_s, warm_v, cold_s, soft, cold_v};
    for (int k = 0; k < 6; k++) qsort(all[k], ROUNDS, sizeof(double), by_value);
    const int m = ROUNDS / 2;
    printf("%zu rows x %d f16 (keys and values %zu MB each), %d heads, %s, ns per position (medians of %d):\n",
           n, D, n * D * 2 >> 20, HEADS, threads > 1 ? "two threads, half the rows each" : "one core", ROUNDS);
    printf("  read keys and values (the floor's kernel)   %6.1f\n", read[m] * 1e9);
    printf("  score pass: warm %6.1f, cold %6.1f\n", warm_s[m] * 1e9, cold_s[m] * 1e9);
    printf("  softmax between them (maxima, exponentials): %.1f\n", soft[m] * 1e9);
    printf("  value pass: warm %6.1f, cold %6.1f\n", warm_v[m] * 1e9, cold_v[m] * 1e9);
    printf("  both passes: warm %.1f + read %.1f = %.1f; max %.1f; cold %.1f\n", (warm_s[m] + warm_v[m]) * 1e9, read[m] * 1e9,
           (warm_s[m] + warm_v[m] + read[m]) * 1e9, (warm_s[m] + warm_v[m] > read[m] ? warm_s[m] + warm_v[m] : read[m]) * 1e9,
           (cold_s[m] + cold_v[m]) * 1e9);
    return sink == 42 ? 3 : 0;
}
