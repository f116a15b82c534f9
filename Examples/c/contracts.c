/* The contracts of the C ABI, version 2, checked from C: handles that never alias, an append that is
 * all or nothing across KV heads, concurrency (threads on one session, sessions in parallel, a
 * second writer of a store refused), kill -9 and resume, truncate, log-sum-exp output, f16/bf16
 * input, softmax scale, build parameters with progress and abort, version and log callback.
 *
 * Build: cc Examples/c/contracts.c -Iinclude -L.build/debug -lKVRecallC -lm -pthread -o contracts
 * Run:   LD_LIBRARY_PATH=.build/debug ./contracts [kill-trials]
 */
#include "kvrecall.h"
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define LAYERS 3
#define KV_HEADS 2
#define GROUP 2
#define DIM 16
#define QN (KV_HEADS * GROUP * DIM)

static int failures = 0;
#define EXPECT(cond, ...) do { if (!(cond)) { fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
    fprintf(stderr, __VA_ARGS__); fprintf(stderr, " [%s]\n", kvrecall_last_error()); failures++; } } while (0)

/* Deterministic data: value c of (layer, head, token) from a hash, so any process can regenerate it. */
static float datum(unsigned layer, unsigned head, unsigned long token, unsigned c, unsigned stream) {
    unsigned long long x = ((((unsigned long long)token * 131 + layer) * 131 + head) * 131 + c) * 7 + stream + 1;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdULL; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ULL; x ^= x >> 33;
    return (float)((double)(x >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

/* Keys (stream 0) or values (stream 1) of tokens [first, first + n) of a layer: [KV_HEADS][n][DIM]. */
static void tokens_of(float *out, unsigned layer, unsigned long first, size_t n, unsigned stream) {
    for (unsigned h = 0; h < KV_HEADS; h++)
        for (size_t t = 0; t < n; t++)
            for (unsigned c = 0; c < DIM; c++)
                out[((size_t)h * n + t) * DIM + c] = datum(layer, h, first + t, c, stream);
}

static void query_of(float *q, unsigned layer, unsigned step) {
    for (unsigned i = 0; i < QN; i++) q[i] = 3.0f * datum(layer, 99, step, i, 2);
}

static kvrecall_config base_config(int method) {
    kvrecall_config c;
    kvrecall_config_default(&c, LAYERS, KV_HEADS, GROUP, DIM);
    c.dtype = KVRECALL_F32;
    c.method = method;
    c.k = 64; c.sinks = 4; c.window = 16; c.ef = 128;
    c.threads = 2;
    return c;
}

/* Exact attention in double for one layer over tokens [0, n) with `scale`: outputs and lse. */
static void reference(unsigned layer, size_t n, const float *q, double scale, float *out, float *lse) {
    float *k = malloc(sizeof(float) * KV_HEADS * n * DIM), *v = malloc(sizeof(float) * KV_HEADS * n * DIM);
    double *s = malloc(sizeof(double) * n);
    tokens_of(k, layer, 0, n, 0); tokens_of(v, layer, 0, n, 1);
    for (unsigned h = 0; h < KV_HEADS; h++)
        for (unsigned g = 0; g < GROUP; g++) {
            const float *qq = q + (h * GROUP + g) * DIM;
            double m = -INFINITY, l = 0;
            for (size_t t = 0; t < n; t++) {
                double d = 0;
                for (unsigned c = 0; c < DIM; c++) d += (double)qq[c] * k[((size_t)h * n + t) * DIM + c];
                s[t] = d * scale; if (s[t] > m) m = s[t];
            }
            double acc[DIM] = {0};
            for (size_t t = 0; t < n; t++) {
                double w = exp(s[t] - m); l += w;
                for (unsigned c = 0; c < DIM; c++) acc[c] += w * v[((size_t)h * n + t) * DIM + c];
            }
            for (unsigned c = 0; c < DIM; c++) out[(h * GROUP + g) * DIM + c] = (float)(acc[c] / l);
            if (lse) lse[h * GROUP + g] = (float)(m + log(l));
        }
    free(k); free(v); free(s);
}

static double max_diff(const float *a, const float *b, size_t n) {
    double w = 0;
    for (size_t i = 0; i < n; i++) { double d = fabs((double)a[i] - b[i]); if (d > w) w = d; }
    return w;
}

/* Appends tokens [first, first + n) to every layer. */
static int append_range(kvrecall_session *s, unsigned long first, size_t n) {
    float *k = malloc(sizeof(float) * KV_HEADS * n * DIM), *v = malloc(sizeof(float) * KV_HEADS * n * DIM);
    int rc = KVRECALL_OK;
    for (unsigned layer = 0; layer < LAYERS && rc == KVRECALL_OK; layer++) {
        tokens_of(k, layer, first, n, 0); tokens_of(v, layer, first, n, 1);
        rc = kvrecall_session_append(s, layer, k, v, n);
    }
    free(k); free(v);
    return rc;
}

/* ---- version, log callback ---- */
static int log_errors = 0;
static char last_log[512];
static void on_log(int level, const char *message, void *user) {
    (void)user;
    if (level == KVRECALL_LOG_ERROR) log_errors++;
    snprintf(last_log, sizeof last_log, "%s", message);
}

static void test_version_and_log(void) {
    EXPECT(kvrecall_abi_version() == KVRECALL_ABI_VERSION, "ABI %d, header %d", kvrecall_abi_version(), KVRECALL_ABI_VERSION);
    EXPECT(strlen(kvrecall_version()) > 0, "version string");
    kvrecall_set_log_callback(on_log, NULL);
    kvrecall_session *s = NULL;
    EXPECT(kvrecall_session_open(NULL, NULL, &s) == KVRECALL_ERR_NULL, "null config");
    EXPECT(log_errors == 1 && strstr(last_log, "kvrecall_session_open"), "error logged: %d '%s'", log_errors, last_log);
    kvrecall_set_log_callback(NULL, NULL);
}

/* ---- configuration checks ---- */
static void test_configuration(void) {
    kvrecall_session *s = NULL;
    kvrecall_config c = base_config(KVRECALL_METHOD_EXACT);
    c.head_dim = 100000;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT && s == NULL, "head_dim 100000 is an argument error");
    c = base_config(KVRECALL_METHOD_EXACT); c.soft_cap = -1;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT, "negative soft cap refused");
    c = base_config(KVRECALL_METHOD_EXACT); c.soft_cap = 30;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "soft cap 30 accepted");
    kvrecall_config capped; capped.struct_size = sizeof capped;
    EXPECT(kvrecall_session_get_config(s, &capped) == KVRECALL_OK && capped.soft_cap == 30, "soft cap kept");
    /* The report: sized by a first call, then written (one line per head). */
    size_t needed = 0;
    EXPECT(kvrecall_session_report(s, NULL, 0, &needed) == KVRECALL_OK && needed > 0, "report length %zu", needed);
    char report[4096] = {0};
    size_t written = 0;
    EXPECT(needed < sizeof report && kvrecall_session_report(s, report, sizeof report, &written) == KVRECALL_OK
           && written == needed && strncmp(report, "layer 0 head 0: exact", 21) == 0, "report '%s'", report);
    EXPECT(kvrecall_session_report(s, report, sizeof report, NULL) == KVRECALL_ERR_NULL, "report without length");
    kvrecall_session_close(s);
    s = NULL;
    c = base_config(KVRECALL_METHOD_EXACT); c.scale = -1;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT, "negative scale refused");
    c = base_config(42);
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT, "unknown method refused");
    /* A version-1 caller's smaller config is still accepted. */
    c = base_config(KVRECALL_METHOD_EXACT);
    c.struct_size = offsetof(kvrecall_config, scale) + 4;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "ABI 1 config size %zu accepted", c.struct_size);
    kvrecall_config back; back.struct_size = sizeof back;
    EXPECT(kvrecall_session_get_config(s, &back) == KVRECALL_OK && back.head_dim == DIM && back.scale == 0
           && back.method == KVRECALL_METHOD_EXACT, "get_config");
    kvrecall_session_close(s);
    /* The adaptive budget: 0.9 by default, 0 for a fixed k, outside [0, 1] refused; a caller of the
     * first ABI-2 size (config without budget_mass) keeps a fixed k. */
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    EXPECT(c.budget_mass > 0.89f && c.budget_mass < 0.91f, "default budget mass %g", c.budget_mass);
    c.budget_mass = 1.5f;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "budget_mass"),
           "budget mass 1.5 refused");
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    c.struct_size = offsetof(kvrecall_config, budget_mass);
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "first ABI-2 config size %zu accepted", c.struct_size);
    back.struct_size = sizeof back;
    EXPECT(kvrecall_session_get_config(s, &back) == KVRECALL_OK && back.budget_mass == 0, "first ABI-2 caller: fixed k");
    kvrecall_session_close(s);
    /* Refreshes (long generations): 0.5 by default, negative for never, not finite refused; a caller
     * of the second ABI-2 size (config without refresh_fraction) gets the default. */
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    EXPECT(c.refresh_fraction == 0.5, "default refresh fraction %g", c.refresh_fraction);
    c.refresh_fraction = -1;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "refresh never");
    back.struct_size = sizeof back;
    EXPECT(kvrecall_session_get_config(s, &back) == KVRECALL_OK && back.refresh_fraction < 0, "never refresh kept");
    kvrecall_session_close(s);
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    c.refresh_fraction = INFINITY;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "refresh_fraction"),
           "infinite refresh fraction refused");
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    c.refresh_fraction = 0;
    c.struct_size = offsetof(kvrecall_config, refresh_fraction);
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "second ABI-2 config size %zu accepted", c.struct_size);
    back.struct_size = sizeof back;
    EXPECT(kvrecall_session_get_config(s, &back) == KVRECALL_OK && back.refresh_fraction == 0.5, "second ABI-2 caller: default refresh");
    kvrecall_session_close(s);
    /* auto's target error: 0.02 by default, kept, negative or not finite refused; a caller of the
     * third ABI-2 size (config without target_error) gets the default. */
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    EXPECT(c.target_error == 0.02, "default target error %g", c.target_error);
    c.target_error = 0.05;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "target error 0.05");
    back.struct_size = sizeof back;
    EXPECT(kvrecall_session_get_config(s, &back) == KVRECALL_OK && back.target_error == 0.05, "target error kept");
    kvrecall_session_close(s);
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    c.target_error = -0.1;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "target_error"),
           "negative target error refused");
    c.target_error = NAN;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "target_error"),
           "NaN target error refused");
    c = base_config(KVRECALL_METHOD_RETRIEVAL);
    c.target_error = 0;
    c.struct_size = offsetof(kvrecall_config, target_error);
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "third ABI-2 config size %zu accepted", c.struct_size);
    back.struct_size = sizeof back;
    EXPECT(kvrecall_session_get_config(s, &back) == KVRECALL_OK && back.target_error == 0.02, "third ABI-2 caller: default target");
    kvrecall_session_close(s);
    /* auto: available once the library's AttentionMethod has it; otherwise a clear argument error. */
    c = base_config(KVRECALL_METHOD_AUTO);
    int rc = kvrecall_session_open(&c, NULL, &s);
    EXPECT(rc == KVRECALL_OK || (rc == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "auto")), "auto: %d", rc);
    printf("method auto: %s\n", rc == KVRECALL_OK ? "available" : kvrecall_last_error());
    if (rc == KVRECALL_OK) kvrecall_session_close(s);
}

/* ---- handles never alias ---- */
static void test_handle_reuse(void) {
    kvrecall_config c = base_config(KVRECALL_METHOD_EXACT);
    float k[KV_HEADS * DIM], v[KV_HEADS * DIM];
    tokens_of(k, 0, 0, 1, 0); tokens_of(v, 0, 0, 1, 1);
    int aliased = 0, refused = 0;
    for (int cycle = 0; cycle < 64; cycle++) {
        kvrecall_session *a = NULL, *b = NULL;
        EXPECT(kvrecall_session_open(&c, NULL, &a) == KVRECALL_OK, "open a");
        kvrecall_session_close(a);
        EXPECT(kvrecall_session_open(&c, NULL, &b) == KVRECALL_OK, "open b");
        if (a == b) aliased++;
        if (kvrecall_session_append(a, 0, k, v, 1) == KVRECALL_ERR_HANDLE) refused++;
        size_t n = 99;
        EXPECT(kvrecall_session_length(b, 0, &n) == KVRECALL_OK && n == 0, "b untouched by a stale handle (length %zu)", n);
        kvrecall_session_close(b);
    }
    printf("handle reuse: 64 close/open cycles, %d aliased handles, %d stale appends refused\n", aliased, refused);
    EXPECT(aliased == 0 && refused == 64, "handles alias");
    kvrecall_session_close(NULL);
}

/* ---- a failed append changes nothing ---- */
static void test_failed_append(void) {
    kvrecall_config c = base_config(KVRECALL_METHOD_EXACT);
    kvrecall_session *s = NULL;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "open");
    EXPECT(append_range(s, 0, 8) == KVRECALL_OK, "append 8");
    float k[KV_HEADS * DIM], v[KV_HEADS * DIM];
    tokens_of(k, 0, 8, 1, 0); tokens_of(v, 0, 8, 1, 1);
    k[DIM + 3] = NAN; /* KV head 1's key */
    EXPECT(kvrecall_session_append(s, 0, k, v, 1) == KVRECALL_ERR_ARGUMENT, "NaN key refused");
    for (unsigned h = 0; h < KV_HEADS; h++) {
        size_t n = 0;
        EXPECT(kvrecall_session_head_length(s, 0, h, &n, NULL) == KVRECALL_OK && n == 8, "head %u holds %zu after a failed append", h, n);
    }
    size_t n = 0;
    EXPECT(kvrecall_session_head_length(s, 0, KV_HEADS, &n, NULL) == KVRECALL_ERR_LAYER, "unknown KV head");
    kvrecall_session_close(s);
}

/* ---- attention convention: scale, lse, f16/bf16 input ---- */
static void test_attention_convention(void) {
    const size_t n = 200;
    for (int scaled = 0; scaled < 2; scaled++) {
        kvrecall_config c = base_config(KVRECALL_METHOD_EXACT);
        c.scale = scaled ? 0.5f : 0;
        kvrecall_session *s = NULL;
        EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "open");
        EXPECT(append_range(s, 0, n) == KVRECALL_OK, "append");
        float q[QN], out[QN], lse[KV_HEADS * GROUP], ref[QN], ref_lse[KV_HEADS * GROUP];
        query_of(q, 1, 0);
        EXPECT(kvrecall_session_attend_ex(s, 1, q, out, QN, lse, KV_HEADS * GROUP) == KVRECALL_OK, "attend_ex");
        reference(1, n, q, scaled ? 0.5 : 1 / sqrt(DIM), ref, ref_lse);
        EXPECT(max_diff(out, ref, QN) < 1e-5, "output vs double reference: %g", max_diff(out, ref, QN));
        EXPECT(max_diff(lse, ref_lse, KV_HEADS * GROUP) < 1e-4, "lse vs double reference: %g", max_diff(lse, ref_lse, KV_HEADS * GROUP));
        EXPECT(kvrecall_session_attend_ex(s, 1, q, out, QN, lse, 3) == KVRECALL_ERR_ARGUMENT, "wrong lse size");
        kvrecall_session_close(s);
    }
    /* 16-bit input: values k/64 with |k| < 128 are exact in f16 and in bf16. */
    kvrecall_config c = base_config(KVRECALL_METHOD_EXACT);
    kvrecall_session *a = NULL, *b = NULL, *r = NULL;
    EXPECT(kvrecall_session_open(&c, NULL, &a) == KVRECALL_OK && kvrecall_session_open(&c, NULL, &b) == KVRECALL_OK
           && kvrecall_session_open(&c, NULL, &r) == KVRECALL_OK, "open 3");
    enum { T = 40, N = KV_HEADS * T * DIM };
    static float kf[N], vf[N];
    static uint16_t kh[N], vh[N], kb[N], vb[N];
    for (int i = 0; i < N; i++) {
        int ki = (int)(datum(0, 0, i, 0, 3) * 127), vi = (int)(datum(0, 0, i, 0, 4) * 127);
        kf[i] = ki / 64.0f; vf[i] = vi / 64.0f;
        uint32_t bits; memcpy(&bits, &kf[i], 4); kb[i] = bits >> 16;
        memcpy(&bits, &vf[i], 4); vb[i] = bits >> 16;
        /* f16: sign, exponent rebias 127 -> 15, top 10 mantissa bits (exact for these values). */
        for (int which = 0; which < 2; which++) {
            float x = which ? vf[i] : kf[i];
            uint16_t h;
            if (x == 0) h = 0;
            else {
                uint32_t u; memcpy(&u, &x, 4);
                h = (uint16_t)(((u >> 16) & 0x8000) | ((((u >> 23) & 0xff) - 127 + 15) << 10) | ((u >> 13) & 0x3ff));
            }
            if (which) vh[i] = h; else kh[i] = h;
        }
    }
    EXPECT(kvrecall_session_append_f16(a, 0, kh, vh, T) == KVRECALL_OK, "append f16");
    EXPECT(kvrecall_session_append_bf16(b, 0, kb, vb, T) == KVRECALL_OK, "append bf16");
    EXPECT(kvrecall_session_append(r, 0, kf, vf, T) == KVRECALL_OK, "append f32");
    EXPECT(kvrecall_session_append_f16(a, 0, NULL, vh, T) == KVRECALL_ERR_NULL, "append f16 NULL");
    float q[QN], oa[QN], ob[QN], or_[QN];
    query_of(q, 0, 1);
    EXPECT(kvrecall_session_attend(a, 0, q, oa, QN) == KVRECALL_OK && kvrecall_session_attend(b, 0, q, ob, QN) == KVRECALL_OK
           && kvrecall_session_attend(r, 0, q, or_, QN) == KVRECALL_OK, "attend 3");
    EXPECT(max_diff(oa, or_, QN) == 0 && max_diff(ob, or_, QN) == 0, "16-bit input equals f32 input: %g %g",
           max_diff(oa, or_, QN), max_diff(ob, or_, QN));
    kvrecall_session_close(a); kvrecall_session_close(b); kvrecall_session_close(r);

    /* Values an f16 session cannot hold (|x| > 65504) are refused on every append path, naming the
     * layer, head, token and value; nothing is appended and attention never answers NaN. */
    c = base_config(KVRECALL_METHOD_EXACT);
    c.dtype = KVRECALL_F16;
    kvrecall_session *h = NULL;
    EXPECT(kvrecall_session_open(&c, NULL, &h) == KVRECALL_OK, "open f16");
    EXPECT(kvrecall_session_append(h, 0, kf, vf, T) == KVRECALL_OK, "append f32 into f16");
    static float big[N];
    static uint16_t bigb[N];
    memcpy(big, kf, sizeof big);
    memcpy(bigb, kb, sizeof bigb);
    big[DIM * 3 + 5] = 70000.0f;   /* KV head 0, token 3, column 5 */
    bigb[DIM * 3 + 5] = 0x4789;    /* bf16 70144 */
    EXPECT(kvrecall_session_append(h, 0, big, vf, T) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "70000")
           && strstr(kvrecall_last_error(), "token 3") && strstr(kvrecall_last_error(), "f16"), "f32 70000 into f16 refused");
    EXPECT(kvrecall_session_append_bf16(h, 0, bigb, vb, T) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "70144"),
           "bf16 70144 into f16 refused");
    EXPECT(kvrecall_session_prefill_queries(h, 0, big, T) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "70000"),
           "prefill query 70000 into f16 refused");
    size_t length = 0;
    EXPECT(kvrecall_session_length(h, 0, &length) == KVRECALL_OK && length == T, "nothing appended (%zu tokens)", length);
    EXPECT(kvrecall_session_attend(h, 0, q, oa, QN) == KVRECALL_OK, "attend f16");
    int finite = 1;
    for (int i = 0; i < QN; i++) finite &= isfinite(oa[i]) != 0;
    EXPECT(finite, "f16 session answers finite outputs");
    kvrecall_session_close(h);
}

/* ---- build parameters, progress, abort ---- */
static int progress_calls = 0;
static size_t progress_total = 0;
static int progress(size_t done, size_t total, void *user) {
    progress_calls++; progress_total = total;
    return user != NULL && done >= 2; /* with user data: stop after two heads */
}

static void test_build_progress(void) {
    kvrecall_config c = base_config(KVRECALL_METHOD_HNSW);
    kvrecall_session *s = NULL;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "open");
    EXPECT(append_range(s, 0, 400) == KVRECALL_OK, "prefill");
    kvrecall_build_params p;
    kvrecall_build_params_default(&p);
    EXPECT(p.hnsw_m == 16 && p.struct_size == sizeof p, "defaults");
    p.progress = progress; p.user_data = (void *)1; p.hnsw_m = 8;
    EXPECT(kvrecall_session_build_indexes_ex(s, &p) == KVRECALL_ERR_ABORTED && progress_calls == 2, "abort after 2 heads (%d calls)", progress_calls);
    p.hnsw_m = 1;
    EXPECT(kvrecall_session_build_indexes_ex(s, &p) == KVRECALL_ERR_ARGUMENT, "M 1 refused");
    p.hnsw_m = 8; p.user_data = NULL; progress_calls = 0;
    EXPECT(kvrecall_session_build_indexes_ex(s, &p) == KVRECALL_OK && progress_calls == LAYERS * KV_HEADS
           && progress_total == LAYERS * KV_HEADS, "full build with progress (%d calls)", progress_calls);
    size_t tokens = 0, indexed = 0;
    EXPECT(kvrecall_session_head_length(s, 2, 1, &tokens, &indexed) == KVRECALL_OK && tokens == 400 && indexed == 400 - 16,
           "head length %zu, indexed %zu", tokens, indexed);
    kvrecall_session_close(s);
}

/* ---- truncate ---- */
static void test_truncate(void) {
    kvrecall_config c = base_config(KVRECALL_METHOD_HNSW);
    c.k = 1000; /* more than the positions: the retrieved set is everything, so the output is exact */
    kvrecall_session *s = NULL;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "open");
    EXPECT(append_range(s, 0, 300) == KVRECALL_OK, "prefill");
    EXPECT(kvrecall_session_build_indexes(s) == KVRECALL_OK, "build");
    EXPECT(append_range(s, 300, 5) == KVRECALL_OK, "decode 5");
    EXPECT(kvrecall_session_truncate(s, 301) == KVRECALL_OK, "rollback 4 speculative tokens");
    size_t tokens = 0, indexed = 0;
    for (unsigned layer = 0; layer < LAYERS; layer++)
        for (unsigned h = 0; h < KV_HEADS; h++) {
            EXPECT(kvrecall_session_head_length(s, layer, h, &tokens, &indexed) == KVRECALL_OK && tokens == 301 && indexed <= 301,
                   "after rollback: layer %u head %u holds %zu (indexed %zu)", layer, h, tokens, indexed);
        }
    EXPECT(kvrecall_session_truncate(s, 100) == KVRECALL_OK, "truncate below the index");
    EXPECT(kvrecall_session_head_length(s, 1, 0, &tokens, &indexed) == KVRECALL_OK && tokens == 100 && indexed == 100 - 16,
           "index rebuilt over the kept keys: %zu indexed of %zu", indexed, tokens);
    EXPECT(kvrecall_session_truncate(s, 101) == KVRECALL_ERR_ARGUMENT, "truncate cannot grow");
    EXPECT(append_range(s, 100, 10) == KVRECALL_OK, "append after truncate");
    float q[QN], out[QN], ref[QN];
    query_of(q, 2, 7);
    EXPECT(kvrecall_session_attend(s, 2, q, out, QN) == KVRECALL_OK, "attend after truncate");
    reference(2, 110, q, 1 / sqrt(DIM), ref, NULL);
    EXPECT(max_diff(out, ref, QN) < 1e-5, "truncated session attends exactly its tokens: %g", max_diff(out, ref, QN));
    kvrecall_session_close(s);
}

/* ---- concurrency ---- */
struct worker { kvrecall_session *s; unsigned layer; int steps; int errors; float out[QN]; };

static void *decode_worker(void *arg) {
    struct worker *w = arg;
    float k[KV_HEADS * DIM], v[KV_HEADS * DIM], q[QN];
    for (int step = 0; step < w->steps; step++) {
        tokens_of(k, w->layer, 100 + step, 1, 0); tokens_of(v, w->layer, 100 + step, 1, 1);
        if (kvrecall_session_append(w->s, w->layer, k, v, 1) != KVRECALL_OK) w->errors++;
        query_of(q, w->layer, step);
        if (kvrecall_session_attend(w->s, w->layer, q, w->out, QN) != KVRECALL_OK) w->errors++;
    }
    return NULL;
}

static void test_concurrency(const char *dir) {
    /* Threads sharing one session: each drives its own layer; calls are serialised by the library. */
    kvrecall_config c = base_config(KVRECALL_METHOD_EXACT);
    kvrecall_session *s = NULL;
    EXPECT(kvrecall_session_open(&c, NULL, &s) == KVRECALL_OK, "open shared");
    EXPECT(append_range(s, 0, 100) == KVRECALL_OK, "prefill");
    pthread_t threads[LAYERS];
    struct worker w[LAYERS];
    for (unsigned l = 0; l < LAYERS; l++) {
        w[l] = (struct worker){ .s = s, .layer = l, .steps = 50 };
        pthread_create(&threads[l], NULL, decode_worker, &w[l]);
    }
    for (unsigned l = 0; l < LAYERS; l++) pthread_join(threads[l], NULL);
    for (unsigned l = 0; l < LAYERS; l++) {
        float ref[QN], q[QN];
        size_t n = 0;
        query_of(q, l, 49);
        reference(l, 150, q, 1 / sqrt(DIM), ref, NULL);
        EXPECT(w[l].errors == 0 && kvrecall_session_length(s, l, &n) == KVRECALL_OK && n == 150, "layer %u: %d errors, %zu tokens", l, w[l].errors, n);
        EXPECT(max_diff(w[l].out, ref, QN) < 1e-5, "layer %u output under concurrency: %g", l, max_diff(w[l].out, ref, QN));
    }
    kvrecall_session_close(s);

    /* Separate sessions in parallel threads. */
    kvrecall_session *a = NULL, *b = NULL;
    EXPECT(kvrecall_session_open(&c, NULL, &a) == KVRECALL_OK && kvrecall_session_open(&c, NULL, &b) == KVRECALL_OK, "open two");
    EXPECT(append_range(a, 0, 100) == KVRECALL_OK && append_range(b, 0, 100) == KVRECALL_OK, "prefill two");
    struct worker wa = { .s = a, .layer = 1, .steps = 50 }, wb = { .s = b, .layer = 1, .steps = 50 };
    pthread_create(&threads[0], NULL, decode_worker, &wa);
    pthread_create(&threads[1], NULL, decode_worker, &wb);
    pthread_join(threads[0], NULL); pthread_join(threads[1], NULL);
    EXPECT(wa.errors == 0 && wb.errors == 0 && max_diff(wa.out, wb.out, QN) == 0, "two sessions in two threads agree");
    kvrecall_session_close(a); kvrecall_session_close(b);

    /* One store, one writer: a second open in this process, or in another one, is refused. */
    kvrecall_session *first = NULL, *second = NULL;
    EXPECT(kvrecall_session_open(&c, dir, &first) == KVRECALL_OK, "open on %s", dir);
    EXPECT(kvrecall_session_open(&c, dir, &second) == KVRECALL_ERR_BUSY && second == NULL, "second open in this process refused");
    pid_t child = fork();
    if (child == 0) {
        kvrecall_session *other = NULL;
        int rc = kvrecall_session_open(&c, dir, &other);
        _exit(rc == KVRECALL_ERR_BUSY && strstr(kvrecall_last_error(), "another") ? 0 : 10 + rc);
    }
    int status = 0;
    waitpid(child, &status, 0);
    EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0, "another process's open refused while held (exit %d)", WEXITSTATUS(status));
    kvrecall_session_close(first);
    /* Released at close: reopening works, and a different configuration is refused by name. */
    EXPECT(kvrecall_session_open(&c, dir, &second) == KVRECALL_OK, "reopen after close");
    kvrecall_session_close(second);
    kvrecall_config other = c; other.k = 7;
    EXPECT(kvrecall_session_open(&other, dir, &second) == KVRECALL_ERR_ARGUMENT && strstr(kvrecall_last_error(), "k 64"),
           "different configuration refused");
}

/* ---- kill -9 and resume ---- */
#define PROMPT 300
#define CHECKPOINT_EVERY 40

/* The child: prefill (layer by layer), build, checkpoint, then decode steps (append every layer,
 * attend), checkpointing every CHECKPOINT_EVERY steps; reports each finished step on `fd`. */
static void decoder_child(const char *dir, int method, int fd) {
    kvrecall_config c = base_config(method);
    kvrecall_session *s = NULL;
    if (kvrecall_session_open(&c, dir, &s) != KVRECALL_OK) _exit(3);
    size_t n = 0;
    kvrecall_session_length(s, 0, &n);
    if (n == 0) {
        float *k = malloc(sizeof(float) * KV_HEADS * PROMPT * DIM), *v = malloc(sizeof(float) * KV_HEADS * PROMPT * DIM);
        for (unsigned layer = 0; layer < LAYERS; layer++) {
            tokens_of(k, layer, 0, PROMPT, 0); tokens_of(v, layer, 0, PROMPT, 1);
            if (kvrecall_session_append(s, layer, k, v, PROMPT) != KVRECALL_OK) _exit(4);
            if (write(fd, "p", 1) != 1) _exit(5);
            usleep(20000); /* the prefill of a real model takes a while: let kills land inside it */
        }
        if (kvrecall_session_build_indexes(s) != KVRECALL_OK || kvrecall_session_checkpoint(s) != KVRECALL_OK) _exit(6);
        n = PROMPT;
    }
    float k[KV_HEADS * DIM], v[KV_HEADS * DIM], q[QN], out[QN];
    for (unsigned long t = n; t < n + 100000; t++) {
        for (unsigned layer = 0; layer < LAYERS; layer++) {
            tokens_of(k, layer, t, 1, 0); tokens_of(v, layer, t, 1, 1);
            if (kvrecall_session_append(s, layer, k, v, 1) != KVRECALL_OK) _exit(7);
            query_of(q, layer, (unsigned)t);
            if (kvrecall_session_attend(s, layer, q, out, QN) != KVRECALL_OK) _exit(8);
        }
        if ((t + 1) % CHECKPOINT_EVERY == 0 && kvrecall_session_checkpoint(s) != KVRECALL_OK) _exit(9);
        if (write(fd, "s", 1) != 1) _exit(5);
    }
    _exit(0);
}

static void test_kill_resume(const char *root, int trials) {
    int consistent = 0, cut = 0, killed_in_prefill = 0, exact_checks = 0;
    unsigned long long rng = 88172645463325252ULL;
    for (int trial = 0; trial < trials; trial++) {
        char dir[4096];
        snprintf(dir, sizeof dir, "%s/kill-%d", root, trial);
        int method = trial % 3 == 2 ? KVRECALL_METHOD_HNSW : KVRECALL_METHOD_EXACT;
        rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
        /* Kill after a random number of reported events: a few prefill layers, or up to 60 steps. */
        int target = trial % 4 == 1 ? 1 + (int)(rng % (LAYERS - 1)) : LAYERS + 1 + (int)(rng % 60);
        int pipefd[2];
        if (pipe(pipefd) != 0) { perror("pipe"); failures++; return; }
        pid_t child = fork();
        if (child == 0) { close(pipefd[0]); decoder_child(dir, method, pipefd[1]); }
        close(pipefd[1]);
        char ch; int events = 0;
        while (events < target && read(pipefd[0], &ch, 1) == 1) events++;
        kill(child, SIGKILL);
        int status = 0;
        waitpid(child, &status, 0);
        close(pipefd[0]);
        EXPECT(WIFSIGNALED(status), "trial %d: the child ended by itself (status %d)", trial, status);

        kvrecall_resume_info info; memset(&info, 0, sizeof info); info.struct_size = sizeof info;
        kvrecall_session *s = NULL;
        int rc = kvrecall_session_resume_ex(dir, &info, &s);
        EXPECT(rc == KVRECALL_OK, "trial %d: resume (%d)", trial, rc);
        if (rc != KVRECALL_OK) continue;
        if (info.longest > info.tokens) cut++;
        int same = 1;
        for (unsigned layer = 0; layer < LAYERS; layer++)
            for (unsigned h = 0; h < KV_HEADS; h++) {
                size_t tokens = 0, indexed = 0;
                kvrecall_session_head_length(s, layer, h, &tokens, &indexed);
                if (tokens != info.tokens || indexed > tokens) same = 0;
            }
        consistent += same;
        EXPECT(same, "trial %d: layers differ after resume", trial);
        /* A prompt cut short on some layers resumes with no token at all. */
        if (info.tokens < PROMPT) { EXPECT(info.tokens == 0, "trial %d: resumed inside the prompt at %zu tokens", trial, info.tokens); killed_in_prefill++; }
        /* Decode steps run only after the build was checkpointed: every index is back. */
        if (method == KVRECALL_METHOD_HNSW && info.tokens > PROMPT)
            EXPECT(info.indexes_loaded + info.indexes_rebuilt == LAYERS * KV_HEADS, "trial %d: indexes %u loaded %u rebuilt",
                   trial, info.indexes_loaded, info.indexes_rebuilt);
        if (method == KVRECALL_METHOD_HNSW && info.tokens == PROMPT)
            EXPECT(info.indexes_loaded + info.indexes_missing == LAYERS * KV_HEADS, "trial %d: indexes %u loaded %u missing",
                   trial, info.indexes_loaded, info.indexes_missing);
        /* The resumed content is the deterministic sequence itself: exact attention matches the reference. */
        if (method == KVRECALL_METHOD_EXACT && info.tokens > 0) {
            float q[QN], out[QN], ref[QN];
            query_of(q, LAYERS - 1, 5);
            EXPECT(kvrecall_session_attend(s, LAYERS - 1, q, out, QN) == KVRECALL_OK, "attend after resume");
            reference(LAYERS - 1, info.tokens, q, 1 / sqrt(DIM), ref, NULL);
            EXPECT(max_diff(out, ref, QN) < 1e-5, "trial %d: resumed data differs: %g", trial, max_diff(out, ref, QN));
            exact_checks++;
        }
        /* Decoding continues from the resumed length. */
        EXPECT(append_range(s, info.tokens, 1) == KVRECALL_OK, "append after resume");
        kvrecall_session_close(s);
    }
    printf("kill/resume: %d trials, %d consistent (every layer and head the same length), %d cut back a partial step, "
           "%d killed during prefill, %d content checks against the reference\n", trials, consistent, cut, killed_in_prefill, exact_checks);
}

int main(int argc, char **argv) {
    int trials = argc > 1 ? atoi(argv[1]) : 12;
    char root[] = "/tmp/kvrecall-contracts-XXXXXX";
    if (!mkdtemp(root)) { perror("mkdtemp"); return 2; }
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/shared", root);

    test_version_and_log();
    test_configuration();
    test_handle_reuse();
    test_failed_append();
    test_attention_convention();
    test_build_progress();
    test_truncate();
    test_concurrency(dir);
    test_kill_resume(root, trials);

    char command[4200];
    snprintf(command, sizeof command, "rm -rf '%s'", root);
    if (system(command) != 0) fprintf(stderr, "could not remove %s\n", root);
    printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
