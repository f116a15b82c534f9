/* How the quantized tier's scans meet memory on this machine (docs/BENCHMARKS.md, "VNNI bodies and
 * prefetches").
 *
 * Part 1 reads a head's group rows (the layout of a 256-channel 4-bit head: a 9216-byte key part, then
 * a 9728-byte value part, per 64 positions) with caches evicted before each pass: only the key parts
 * (what the key scan reads), the same bytes contiguous, and the whole rows. Part 2 runs the real
 * kernels (kvr_code_scores over every group, then kvr_code_values over every group with positive
 * weights) for each body this CPU has (AVX-512 VNNI, AVX2), warm and cold. Part 3 runs the key scan
 * of the blocks order (the stores' default) over all 256 channels and over the first 128 (half the key
 * bytes: what a scan of 2-bit planes would read), warm and cold: does the cold scan follow its bytes?
 * Run two copies at once to see it beside another core's scan, as a quantized step's two parts run.
 *
 * Build from the repository root (the kernels are compiled in):
 *   clang -O2 -I Sources/CKernels/include -I Sources/CKernels -o /tmp/codes_memory \
 *       Tools/bench/codes_memory.c Sources/CKernels/kvcodes.c Sources/CKernels/kvkernels.c \
 *       Sources/CKernels/kvattend.c -lm
 *   /tmp/codes_memory [groups] [rounds]      (default 256 groups, one core's half of a 32K head; 3 rounds)
 * Best of 5 passes per figure; one thread. */
#include "kvkernels.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static volatile uint64_t sink;
static uint8_t *evictor;
static const size_t evict_bytes = (size_t)96 << 20;

static void evict(void) { sink += kvr_read_bytes(evictor, evict_bytes); }

int main(int argc, char **argv) {
    const long groups_arg = argc > 1 ? atol(argv[1]) : 256, rounds = argc > 2 ? atol(argv[2]) : 3;
    if (groups_arg < 2 || rounds < 1) {
        fprintf(stderr, "usage: codes_memory [groups >= 2] [rounds >= 1]\n");
        return 2;
    }
    const size_t groups = (size_t)groups_arg, P = 256, G = 64, g = 4;
    kvr_code_layout L = {0};
    L.key_min = 0; L.key_step = 2 * P; L.key_codes = 4 * P; L.key_code_bytes = P / 2;
    L.value_min = L.key_codes + G * L.key_code_bytes; L.value_step = L.value_min + 2 * P; L.value_mean = L.value_step + 2 * P;
    L.value_codes = L.value_mean + 2 * P; L.value_code_bytes = G / 2; L.row_bytes = L.value_codes + P * L.value_code_bytes;
    L.padded = P; L.group = G; L.key_bits = 4; L.value_bits = 4; L.wide_steps = 0;
    const size_t bytes = groups * L.row_bytes, key_part = L.value_min;
    uint8_t *rows = aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);
    evictor = malloc(evict_bytes);
    float *scores = malloc(g * groups * G * sizeof(float)), *weights = malloc(g * groups * G * sizeof(float));
    if (!rows || !evictor || !scores || !weights) { fprintf(stderr, "codes_memory: out of memory\n"); return 1; }
    memset(evictor, 1, evict_bytes);
    srand(1);
    for (size_t i = 0; i < bytes; i++) rows[i] = (uint8_t)rand();
    const uint16_t one = 0x3c00;  /* f16 1.0: every min, step and mean */
    for (size_t gi = 0; gi < groups; gi++) {
        uint8_t *r = rows + gi * L.row_bytes;
        for (size_t c = 0; c < 2 * P; c++) { memcpy(r + 2 * c, &one, 2); memcpy(r + L.value_min + 2 * c, &one, 2); }
        for (size_t c = 0; c < P; c++) memcpy(r + L.value_mean + 2 * c, &one, 2);
    }
    const void **pointers = malloc(groups * sizeof(void *));
    for (size_t gi = 0; gi < groups; gi++) pointers[gi] = rows + gi * L.row_bytes;
    float q[4 * 256], out[4 * 256], scratch[3 * 256];
    int8_t q8[4 * 256];
    int32_t dots[4 * 64];
    for (size_t i = 0; i < g * P; i++) q[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    for (size_t i = 0; i < g * groups * G; i++) weights[i] = (float)(rand() % 100) / 100.0f + 0.01f;

    printf("%zu groups of %zu positions, rows of %zu bytes (key part %zu); one thread, best of 5\n", groups, G, L.row_bytes, key_part);
    for (long round = 0; round < rounds; round++) {
        double strided = 1e9, contiguous = 1e9, whole = 1e9;
        for (int r = 0; r < 5; r++) {
            evict();
            double t0 = now();
            for (size_t gi = 0; gi < groups; gi++) sink += kvr_read_bytes(rows + gi * L.row_bytes, key_part);
            double t = now() - t0;
            strided = t < strided ? t : strided;
            evict();
            t0 = now();
            sink += kvr_read_bytes(rows, groups * key_part);
            t = now() - t0;
            contiguous = t < contiguous ? t : contiguous;
            evict();
            t0 = now();
            sink += kvr_read_bytes(rows, bytes);
            t = now() - t0;
            whole = t < whole ? t : whole;
        }
        const double kb = (double)(groups * key_part);
        printf("round %ld, cold reads: key parts %.0f us (%.1f GB/s); the same bytes contiguous %.0f us (%.1f GB/s); "
               "whole rows %.0f us (%.1f GB/s)\n", round + 1, strided * 1e6, kb / strided / 1e9, contiguous * 1e6,
               kb / contiguous / 1e9, whole * 1e6, (double)bytes / whole / 1e9);
        for (int cap = 2; cap >= 1; cap--) {
            kvr_cap_codes_path(cap);
            if (kvr_codes_path() != cap) continue;
            double scan[2] = {1e9, 1e9}, values[2] = {1e9, 1e9};
            for (int cold = 0; cold < 2; cold++)
                for (int r = 0; r < 5; r++) {
                    if (cold) evict();
                    memset(out, 0, sizeof out);
                    double t0 = now();
                    kvr_code_scores(q, g, P, pointers, groups, &L, 0.0625f, scores, groups * G, q8, dots, scratch);
                    double t1 = now();
                    kvr_code_values(weights, g, groups * G, pointers, groups, &L, P, out, scratch, NULL);
                    double t2 = now();
                    scan[cold] = t1 - t0 < scan[cold] ? t1 - t0 : scan[cold];
                    values[cold] = t2 - t1 < values[cold] ? t2 - t1 : values[cold];
                }
            printf("round %ld, %s body: key scan warm %.0f us (%.2f ns per position), cold %.0f us; "
                   "value pass (every group) warm %.0f us, cold %.0f us\n", round + 1, cap == 2 ? "VNNI" : "AVX2",
                   scan[0] * 1e6, scan[0] * 1e9 / (double)(groups * G), scan[1] * 1e6, values[0] * 1e6, values[1] * 1e6);
        }
        kvr_cap_codes_path(2);
        kvr_code_layout B = L, H;
        B.key_blocks = 1; B.value_blocks = 1;
        H = B;  /* the first 16 key blocks (4 KB per row) and half the mins and steps */
        H.padded = P / 2; H.key_code_bytes = P / 4; H.value_min = H.key_codes + G * (P / 4);
        double t[2][2] = {{1e9, 1e9}, {1e9, 1e9}};
        for (int r = 0; r < 5; r++)
            for (int half = 0; half < 2; half++)
                for (int cold = 0; cold < 2; cold++) {
                    if (cold) evict();
                    double t0 = now();
                    kvr_code_scores(q, g, half ? P / 2 : P, pointers, groups, half ? &H : &B, 0.0625f, scores, groups * G, q8,
                                    dots, scratch);
                    double e = now() - t0;
                    if (e < t[half][cold]) t[half][cold] = e;
                }
        printf("round %ld, blocks order: key scan of 256 channels warm %.0f us, cold %.0f us; of 128 warm %.0f us, "
               "cold %.0f us (cold 128/256: %.2f)\n", round + 1, t[0][0] * 1e6, t[0][1] * 1e6, t[1][0] * 1e6, t[1][1] * 1e6,
               t[1][1] / t[0][1]);
    }
    return 0;
}
