/* A C decoder driving KVRecall through its C ABI: prefill a prompt, build the indexes, then decode
 * step by step (append the new token's K/V, attend its queries), checking each output against
 * exact attention from a second session, and exercising every error path.
 *
 * Build: cc Examples/c/session_example.c -Iinclude -L.build/debug -lKVRecallC -lm -o session_example
 * Run:   LD_LIBRARY_PATH=.build/debug ./session_example
 */
#include "kvrecall.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LAYERS 2
#define KV_HEADS 2
#define GROUP 2
#define DIM 16
#define PROMPT 1500
#define STEPS 20

static unsigned long long state = 12345;
static float gaussian(void) {
    double u1, u2;
    state = state * 6364136223846793005ULL + 1442695040888963407ULL; u1 = ((state >> 11) + 1.0) / 9007199254740993.0;
    state = state * 6364136223846793005ULL + 1442695040888963407ULL; u2 = (state >> 11) / 9007199254740992.0;
    return (float)(sqrt(-2 * log(u1)) * cos(6.283185307179586 * u2));
}

static int failures = 0;
#define EXPECT(cond, msg) do { if (!(cond)) { fprintf(stderr, "FAIL: %s (%s)\n", msg, kvrecall_last_error()); failures++; } } while (0)

static void fill(float *x, size_t n, float scale) { for (size_t i = 0; i < n; i++) x[i] = gaussian() * scale; }

int main(void) {
    kvrecall_config config, exact_config;
    kvrecall_config_default(&config, LAYERS, KV_HEADS, GROUP, DIM);
    config.dtype = KVRECALL_F32;
    config.method = KVRECALL_METHOD_HNSW;
    config.k = 200; config.ef = 256;
    exact_config = config;
    exact_config.method = KVRECALL_METHOD_EXACT;

    kvrecall_session *s = NULL, *exact = NULL;
    EXPECT(kvrecall_session_open(&config, NULL, &s) == KVRECALL_OK, "open");
    EXPECT(kvrecall_session_open(&exact_config, NULL, &exact) == KVRECALL_OK, "open exact");

    /* Error paths: every one returns a code, none crashes. */
    float q[KV_HEADS * GROUP * DIM], out[KV_HEADS * GROUP * DIM], ref[KV_HEADS * GROUP * DIM];
    fill(q, KV_HEADS * GROUP * DIM, 1);
    EXPECT(kvrecall_session_attend(s, 0, q, out, KV_HEADS * GROUP * DIM) == KVRECALL_ERR_ORDER, "attend before append");
    EXPECT(kvrecall_session_build_indexes(s) == KVRECALL_ERR_ORDER, "build before append");
    EXPECT(kvrecall_session_attend(NULL, 0, q, out, 1) == KVRECALL_ERR_NULL, "null session");
    EXPECT(kvrecall_session_attend(s, 0, NULL, out, 1) == KVRECALL_ERR_NULL, "null queries");
    EXPECT(kvrecall_session_attend(s, 7, q, out, KV_HEADS * GROUP * DIM) == KVRECALL_ERR_LAYER, "unknown layer");
    EXPECT(kvrecall_session_append(s, 0, NULL, q, 1) == KVRECALL_ERR_NULL, "null keys");
    EXPECT(kvrecall_session_append(s, 0, q, q, 0) == KVRECALL_ERR_ARGUMENT, "zero tokens");
    EXPECT(kvrecall_session_open(NULL, NULL, &s) == KVRECALL_ERR_NULL, "null config");
    kvrecall_config bad = config; bad.struct_size = 3;
    kvrecall_session *t = NULL;
    EXPECT(kvrecall_session_open(&bad, NULL, &t) == KVRECALL_ERR_ARGUMENT && t == NULL, "wrong struct size");
    bad = config; bad.head_dim = 0;
    EXPECT(kvrecall_session_open(&bad, NULL, &t) == KVRECALL_ERR_ARGUMENT, "zero head dim");
    EXPECT(kvrecall_session_resume("/nonexistent/kvrecall", &t) != KVRECALL_OK, "resume missing store");
    EXPECT(strlen(kvrecall_last_error()) > 0, "error message present");

    /* Prefill: prompt keys/values, then indexes. Queries of a decode step are close to a few keys. */
    size_t n = (size_t)KV_HEADS * PROMPT * DIM;
    float *keys = malloc(n * sizeof *keys), *values = malloc(n * sizeof *values);
    for (int layer = 0; layer < LAYERS; layer++) {
        fill(keys, n, 1); fill(values, n, 1);
        EXPECT(kvrecall_session_append(s, layer, keys, values, PROMPT) == KVRECALL_OK, "prefill append");
        EXPECT(kvrecall_session_append(exact, layer, keys, values, PROMPT) == KVRECALL_OK, "prefill append exact");
    }
    EXPECT(kvrecall_session_build_indexes(s) == KVRECALL_OK, "build indexes");
    EXPECT(kvrecall_session_attend(s, 0, q, out, 5) == KVRECALL_ERR_ARGUMENT, "wrong output size");

    double worst = 0;
    float k1[KV_HEADS * DIM], v1[KV_HEADS * DIM];
    for (int step = 0; step < STEPS; step++) {
        for (int layer = 0; layer < LAYERS; layer++) {
            fill(k1, KV_HEADS * DIM, 1); fill(v1, KV_HEADS * DIM, 1);
            EXPECT(kvrecall_session_append(s, layer, k1, v1, 1) == KVRECALL_OK, "decode append");
            EXPECT(kvrecall_session_append(exact, layer, k1, v1, 1) == KVRECALL_OK, "decode append exact");
            /* A sharp query: a scaled copy of one stored key, so attention is concentrated. */
            for (int h = 0; h < KV_HEADS; h++)
                for (int g = 0; g < GROUP; g++)
                    for (int c = 0; c < DIM; c++) q[(h * GROUP + g) * DIM + c] = (8.0f + g) * keys[((size_t)h * PROMPT + 17 * step) * DIM + c];
            EXPECT(kvrecall_session_attend(s, layer, q, out, KV_HEADS * GROUP * DIM) == KVRECALL_OK, "attend");
            EXPECT(kvrecall_session_attend(exact, layer, q, ref, KV_HEADS * GROUP * DIM) == KVRECALL_OK, "attend exact");
            double num = 0, den = 0;
            for (int i = 0; i < KV_HEADS * GROUP * DIM; i++) { num += (out[i] - ref[i]) * (out[i] - ref[i]); den += ref[i] * ref[i]; }
            double err = sqrt(num / den);
            if (err > worst) worst = err;
        }
    }
    size_t length = 0;
    EXPECT(kvrecall_session_length(s, 1, &length) == KVRECALL_OK && length == PROMPT + STEPS, "length");
    printf("decoded %d steps x %d layers; worst relative output error vs exact: %.4f\n", STEPS, LAYERS, worst);
    EXPECT(worst < 0.05, "retrieval attention close to exact on sharp queries");

    kvrecall_session_close(s);
    EXPECT(kvrecall_session_attend(s, 0, q, out, KV_HEADS * GROUP * DIM) == KVRECALL_ERR_HANDLE, "use after close");
    kvrecall_session_close(s); /* closing twice is harmless */
    kvrecall_session_close(exact);
    kvrecall_session_close(NULL);
    free(keys); free(values);
    printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
