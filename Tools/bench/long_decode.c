/* Tools/bench/long_decode.c: long generations through the C ABI (issue 25).
 *
 * A session of 2 layers, 2 KV heads x 4 query heads, d 64, f32, the default configuration but the
 * method, is filled with a prompt of P structured tokens (keys of drifting topic clusters around a
 * shared offset, a few loud channels; one prefill query per position and KV head, aimed at a
 * random earlier key), built, then decoded S steps: each step appends one token per layer and
 * attends 4 query heads per KV head, each aimed at its own random key outside the window
 * (anywhere before it, appended ones included). Every output is compared with exact attention
 * computed here over all keys: ||o - o_exact|| / ||o_exact||, mean and max over steps, layers and
 * query heads; "perfect" is the same error of exact attention over sinks + window + each query
 * head's exact top-k (k 100), what a perfect index would give at the default k. The queries of a
 * position depend on it alone, so "last 30 steps" of PROMPT + STEPS compares with a run whose prompt
 * is PROMPT + STEPS - 30: the same keys and queries, the keys appended in one case, prompt in the other.
 *
 * Usage: long_decode PROMPT STEPS METHOD[,METHOD...] [REFRESH]
 *   REFRESH (optional): config.refresh_fraction, or "none" (never refresh); default: the library's.
 * LONG_DECODE_BUDGET=0 keeps k fixed at 100 (the adaptive budget otherwise raises it towards 10% of
 * the keys, where index methods select by an exact scan and so all give the same figures).
 * Prints one line per method: prompt, steps, mean and max error, perfect top-k's, attend ms per
 * step (median, p99 over steps, both layers), refreshes installed (from the session's report).
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include "kvrecall.h"

enum { TAIL = 30, LAYERS = 2, KV = 2, G = 4, D = 64, CLUSTERS = 32, SINKS = 4, WINDOW = 64, TOPK = 100 };

static uint64_t rng_state;
/* Query length over sqrt(d) (LONG_DECODE_SHARPNESS, default 0.35): how far above the rest its target and
 * the target's topic score, so how much of the mass the top-100 holds. */
static float sharpness = 0.35f;
static double uniform(void) {
    rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}
static float gauss(void) {
    double u = uniform() + 1e-12, v = uniform();
    return (float)(sqrt(-2 * log(u)) * cos(6.283185307179586 * v));
}
static double now_ms(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static void check(int rc, const char *what) {
    if (rc != KVRECALL_OK) { fprintf(stderr, "%s failed (%d): %s\n", what, rc, kvrecall_last_error()); exit(1); }
}

/* One head's data: keys, values [N][D], its key offset and query offset direction. */
typedef struct { float *keys, *values, mu[D], w[D]; } Head;

static void make_head(Head *h, int n, uint64_t seed) {
    rng_state = seed * 2654435761u + 12345;
    float centres[CLUSTERS][D];
    for (int c = 0; c < CLUSTERS; c++) for (int i = 0; i < D; i++) centres[c][i] = 2 * gauss();
    for (int i = 0; i < D; i++) { h->mu[i] = 3 * gauss(); h->w[i] = gauss(); }
    h->keys = malloc(sizeof(float) * n * D);
    h->values = malloc(sizeof(float) * n * D);
    int topic = 0;
    for (int t = 0; t < n; t++) {
        if (uniform() < 0.1) topic = (int)(uniform() * CLUSTERS);
        for (int i = 0; i < D; i++) {
            float loud = i < 2 ? 4.0f : 1.0f;
            h->keys[t * D + i] = loud * (h->mu[i] + centres[topic][i] + 0.7f * gauss());
            h->values[t * D + i] = gauss();
        }
    }
}

/* A query aimed at key j of head h. */
static void aim(const Head *h, int j, float *q) {
    float u[D], norm = 0;
    for (int i = 0; i < D; i++) { u[i] = h->keys[j * D + i] - (i < 2 ? 4.0f : 1.0f) * h->mu[i]; norm += u[i] * u[i]; }
    norm = sqrtf(norm) + 1e-6f;
    for (int i = 0; i < D; i++) q[i] = sharpness * 8.0f * u[i] / norm + 0.5f * h->w[i] / 8.0f + 0.3f * gauss();
}

/* Exact attention of q over rows `rows` (NULL: all n) of h; output into out. */
static void attend_rows(const Head *h, int n, const float *q, const int *rows, int count, float *out) {
    const float scale = 1.0f / sqrtf((float)D);
    double *s = malloc(sizeof(double) * (rows ? count : n));
    int m = rows ? count : n;
    double mx = -1e300;
    for (int r = 0; r < m; r++) {
        int t = rows ? rows[r] : r;
        double dot = 0;
        for (int i = 0; i < D; i++) dot += q[i] * h->keys[t * D + i];
        s[r] = dot * scale;
        if (s[r] > mx) mx = s[r];
    }
    double acc[D] = {0}, z = 0;
    for (int r = 0; r < m; r++) {
        int t = rows ? rows[r] : r;
        double p = exp(s[r] - mx);
        z += p;
        for (int i = 0; i < D; i++) acc[i] += p * h->values[t * D + i];
    }
    for (int i = 0; i < D; i++) out[i] = (float)(acc[i] / z);
    free(s);
}

/* Positions of sinks + window + exact top-k of the rest, for q over n keys. */
static int perfect_rows(const Head *h, int n, const float *q, int *rows) {
    int count = 0;
    int lo = SINKS, hi = n - WINDOW;  /* the middle: [lo, hi) */
    for (int t = 0; t < n; t++) if (t < lo || t >= hi) rows[count++] = t;
    if (hi <= lo) return count;
    int m = hi - lo;
    double *s = malloc(sizeof(double) * m);
    for (int t = lo; t < hi; t++) {
        double dot = 0;
        for (int i = 0; i < D; i++) dot += q[i] * h->keys[t * D + i];
        s[t - lo] = dot;
    }
    int k = m < TOPK ? m : TOPK;
    /* k largest by repeated selection over a copy (k and m are small). */
    double *copy = malloc(sizeof(double) * m);
    memcpy(copy, s, sizeof(double) * m);
    qsort(copy, m, sizeof(double), cmp_double);
    double cut = copy[m - k];
    for (int t = lo; t < hi && k > 0; t++) if (s[t - lo] >= cut) { rows[count++] = t; k--; }
    free(copy); free(s);
    return count;
}

static double rel_error(const float *o, const float *ref) {
    double num = 0, den = 0;
    for (int i = 0; i < D; i++) { double e = o[i] - ref[i]; num += e * e; den += (double)ref[i] * ref[i]; }
    return sqrt(num / (den + 1e-30));
}

static double refresh = 0;

static int run(int prompt, int steps, int method, const char *name) {
    int n = prompt + steps;
    Head heads[LAYERS][KV];
    for (int l = 0; l < LAYERS; l++) for (int k = 0; k < KV; k++) make_head(&heads[l][k], n, 1000 + l * 10 + k);
    kvrecall_config config;
    kvrecall_config_default(&config, LAYERS, KV, G, D);
    config.dtype = KVRECALL_F32;
    config.method = method;
    config.refresh_fraction = refresh;
    if (getenv("LONG_DECODE_BUDGET")) config.budget_mass = (float)atof(getenv("LONG_DECODE_BUDGET"));  /* 0: a fixed k */
    kvrecall_session *s = NULL;
    check(kvrecall_session_open(&config, NULL, &s), "open");
    rng_state = 777;
    float *kbuf = malloc(sizeof(float) * KV * prompt * D), *vbuf = malloc(sizeof(float) * KV * prompt * D);
    float *pq = malloc(sizeof(float) * KV * prompt * D);
    for (int l = 0; l < LAYERS; l++) {
        for (int k = 0; k < KV; k++) {
            memcpy(kbuf + (size_t)k * prompt * D, heads[l][k].keys, sizeof(float) * prompt * D);
            memcpy(vbuf + (size_t)k * prompt * D, heads[l][k].values, sizeof(float) * prompt * D);
            for (int t = 0; t < prompt; t++) aim(&heads[l][k], t == 0 ? 0 : (int)(uniform() * t), pq + ((size_t)k * prompt + t) * D);
        }
        check(kvrecall_session_append(s, l, kbuf, vbuf, prompt), "append prompt");
        check(kvrecall_session_prefill_queries(s, l, pq, prompt), "prefill queries");
    }
    double b0 = now_ms();
    check(kvrecall_session_build_indexes(s), "build");
    double build_ms = now_ms() - b0;
    double sum = 0, max = 0, perfect = 0, quarter[4] = {0}, tail = 0, tail_perfect = 0;
    long count = 0, quarter_count[4] = {0};
    double *times = malloc(sizeof(double) * steps);
    int *rows = malloc(sizeof(int) * (n + TOPK));
    float q[KV * G * D], out[KV * G * D], ref[D], kq[KV * D], vq[KV * D];
    for (int step = 0; step < steps; step++) {
        int t = prompt + step;  /* the new token's position */
        double step_ms = 0;
        for (int l = 0; l < LAYERS; l++) {
            /* The queries of position t depend on t and the layer only: two runs that reach t hold
             * the same keys and ask the same queries there (prompt 1000 + 3000 steps against a
             * prompt of 3970 + the last 30 steps). */
            rng_state = 0x9E3779B97F4A7C15ull ^ ((uint64_t)t * 1000003u + (uint64_t)l * 7919u + 1);
            for (int k = 0; k < KV; k++) {
                memcpy(kq + k * D, heads[l][k].keys + (size_t)t * D, sizeof(float) * D);
                memcpy(vq + k * D, heads[l][k].values + (size_t)t * D, sizeof(float) * D);
                for (int j = 0; j < G; j++) {
                    int far = t + 1 - WINDOW;  /* aim outside the window */
                    aim(&heads[l][k], far > 1 ? (int)(uniform() * far) : 0, q + (k * G + j) * D);
                }
            }
            double t0 = now_ms();
            check(kvrecall_session_append(s, l, kq, vq, 1), "append");
            check(kvrecall_session_attend(s, l, q, out, KV * G * D), "attend");
            step_ms += now_ms() - t0;
            for (int k = 0; k < KV; k++) {
                for (int j = 0; j < G; j++) {
                    const float *qj = q + (k * G + j) * D;
                    attend_rows(&heads[l][k], t + 1, qj, NULL, 0, ref);
                    double e = rel_error(out + (k * G + j) * D, ref);
                    sum += e; if (e > max) max = e;
                    quarter[step * 4 / steps] += e; quarter_count[step * 4 / steps]++;
                    int m = perfect_rows(&heads[l][k], t + 1, qj, rows);
                    float top[D];
                    attend_rows(&heads[l][k], t + 1, qj, rows, m, top);
                    double pe = rel_error(top, ref);
                    perfect += pe;
                    if (step >= steps - TAIL) { tail += e; tail_perfect += pe; }
                    count++;
                }
            }
        }
        times[step] = step_ms;
    }
    qsort(times, steps, sizeof(double), cmp_double);
    size_t length = 0;
    kvrecall_session_report(s, NULL, 0, &length);
    char *report = malloc(length + 1);
    kvrecall_session_report(s, report, length + 1, &length);
    int refreshes = 0;
    for (char *p = report; (p = strstr(p, "refreshed ")) != NULL; p += 10) refreshes += atoi(p + 10);
    long tail_count = (long)(steps < TAIL ? steps : TAIL) * LAYERS * KV * G;
    printf("%-10s prompt %5d steps %5d  error mean %.4f (last %d steps %.4f) max %.3f  perfect top-%d %.4f (last %.4f)  step ms p50 %.3f p99 %.3f max %.2f  build %.0f ms  refreshes %d\n",
           name, prompt, steps, sum / count, TAIL, tail / tail_count, max, TOPK, perfect / count, tail_perfect / tail_count, times[steps / 2],
           times[(int)(steps * 0.99)], times[steps - 1], build_ms, refreshes);
    printf("%-10s   error by quarter of the steps: %.4f %.4f %.4f %.4f\n", name, quarter[0] / (quarter_count[0] + 1e-9),
           quarter[1] / (quarter_count[1] + 1e-9), quarter[2] / (quarter_count[2] + 1e-9), quarter[3] / (quarter_count[3] + 1e-9));
    if (getenv("LONG_DECODE_REPORT")) printf("%s\n", report);
    fflush(stdout);
    kvrecall_session_close(s);
    free(report); free(times); free(rows); free(kbuf); free(vbuf); free(pq);
    for (int l = 0; l < LAYERS; l++) for (int k = 0; k < KV; k++) { free(heads[l][k].keys); free(heads[l][k].values); }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: long_decode PROMPT STEPS METHOD[,METHOD...] [REFRESH]\n"); return 2; }
    int prompt = atoi(argv[1]), steps = atoi(argv[2]);
    if (getenv("LONG_DECODE_SHARPNESS")) sharpness = (float)atof(getenv("LONG_DECODE_SHARPNESS"));
    if (argc > 4) refresh = strcmp(argv[4], "none") == 0 ? -1 : atof(argv[4]);
    char *list = strdup(argv[3]);
    for (char *name = strtok(list, ","); name; name = strtok(NULL, ",")) {
        int method = -1;
        for (int m = 0; m < 32; m++) { const char *x = kvrecall_method_name(m); if (x && strcmp(x, name) == 0) method = m; }
        if (method < 0) { fprintf(stderr, "unknown method %s\n", name); return 2; }
        run(prompt, steps, method, name);
    }
    free(list);
    return 0;
}
