/* The 4-bit key scan's two code orders side by side (docs/BENCHMARKS.md, "Key codes in channel
 * blocks"): position by position (key_dots_u4_vnni, key_dots_u4) against channel blocks
 * (key_dots_u4_blocks_vnni, key_dots_u4_blocks), on the same random codes, four heads, groups of 64,
 * one thread, codes warm. Each body is first checked against the portable dot products.
 *
 * Build from the repository root (kvcodes.c is compiled in, so its bodies can be called):
 *   clang -O2 -I Sources/CKernels/include -I Sources/CKernels -o /tmp/key_blocks \
 *       Tools/bench/key_blocks.c Sources/CKernels/kvkernels.c Sources/CKernels/kvattend.c -lm
 *   /tmp/key_blocks [padded dimension: 256] [groups: 256]
 * Prints ns per position (four heads) for each body, best of 7 passes, three rounds. */
#include "../../Sources/CKernels/kvcodes.c"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

typedef void (*body)(const int8_t *, size_t, const kvr_code_layout *, const uint8_t *, int32_t *, const uint8_t *, size_t);

int main(int argc, char **argv) {
#if KVR_X86
    const long p_arg = argc > 1 ? atol(argv[1]) : 256, g_arg = argc > 2 ? atol(argv[2]) : 256;
    if (p_arg < 64 || p_arg % 64 || p_arg > 256 || g_arg < 1) {
        fprintf(stderr, "usage: key_blocks [padded dimension: 64, 128, 192 or 256] [groups >= 1]\n");
        return 2;
    }
    if (!kvr_has_vnni()) { fprintf(stderr, "key_blocks: this CPU has no AVX-512 VNNI\n"); return 2; }
    const size_t P = (size_t)p_arg, groups = (size_t)g_arg, G = 64, g = 4, bytes = G * P / 2;
    kvr_code_layout pos = {0}, blk;
    pos.key_code_bytes = P / 2; pos.padded = P; pos.group = G; pos.key_bits = 4; pos.value_bits = 4;
    blk = pos; blk.key_blocks = 1;
    uint8_t *a = aligned_alloc(64, groups * bytes), *b = aligned_alloc(64, groups * bytes);
    int8_t *q8 = aligned_alloc(64, g * P);
    int32_t *want = malloc(g * G * sizeof(int32_t)), *got = malloc(g * G * sizeof(int32_t));
    if (!a || !b || !q8 || !want || !got) { fprintf(stderr, "key_blocks: out of memory\n"); return 1; }
    srand(7);
    for (size_t i = 0; i < groups * bytes; i++) a[i] = (uint8_t)rand();
    for (size_t i = 0; i < g * P; i++) q8[i] = (int8_t)(rand() % 255 - 127);
    memset(b, 0, groups * bytes);
    for (size_t gi = 0; gi < groups; gi++)  /* the same codes in channel blocks */
        for (size_t i = 0; i < G; i++)
            for (size_t c = 0; c < P; c++) {
                const unsigned code = key_code(&pos, a + gi * bytes, i, c);
                b[gi * bytes + (c / 8) * G * 4 + i * 4 + c % 4] |= (uint8_t)(c % 8 < 4 ? code : code << 4);
            }
    const struct { const char *name; body run; const kvr_code_layout *L; const uint8_t *codes; } bodies[4] = {
        {"positions, AVX-512 VNNI", key_dots_u4_vnni, &pos, a}, {"channel blocks, AVX-512 VNNI", key_dots_u4_blocks_vnni, &blk, b},
        {"positions, AVX2", key_dots_u4, &pos, a}, {"channel blocks, AVX2", key_dots_u4_blocks, &blk, b}};
    long bad = 0;
    for (size_t gi = 0; gi < groups; gi++) {
        key_dots_portable(q8, g, &pos, a + gi * bytes, want);
        for (int k = 0; k < 4; k++) {
            bodies[k].run(q8, g, bodies[k].L, bodies[k].codes + gi * bytes, got, NULL, 0);
            for (size_t i = 0; i < g * G; i++) bad += got[i] != want[i];
        }
    }
    printf("padded %zu, %zu groups of %zu, %zu heads: %ld dot products differ from the portable body's\n", P, groups, G, g, bad);
    for (int round = 0; round < 3; round++) {
        double best[4] = {1e9, 1e9, 1e9, 1e9};
        for (int pass = 0; pass < 7; pass++)
            for (int k = 0; k < 4; k++) {
                const double t0 = now();
                for (size_t gi = 0; gi < groups; gi++) bodies[k].run(q8, g, bodies[k].L, bodies[k].codes + gi * bytes, got, NULL, 0);
                const double t = now() - t0;
                if (t < best[k]) best[k] = t;
            }
        for (int k = 0; k < 4; k++) printf("  %-30s %6.2f ns per position\n", bodies[k].name, best[k] * 1e9 / (double)(groups * G));
        printf("  channel blocks: %.2fx (VNNI), %.2fx (AVX2)\n", best[0] / best[1], best[2] / best[3]);
    }
    return bad != 0;
#else
    (void)argc; (void)argv;
    fprintf(stderr, "key_blocks: x86 only\n");
    return 2;
#endif
}
