/* The quantized tier's two code orders side by side (docs/BENCHMARKS.md, "Codes in blocks"): the
 * 4-bit key scan position by position (key_dots_u4_vnni, key_dots_u4) against channel blocks
 * (key_dots_u4_blocks_vnni, key_dots_u4_blocks), and the 4-bit value pass channel by channel
 * (group_values_u4_vnni, group_values_u4) against position blocks (group_values_u4_blocks_vnni,
 * group_values_u4_blocks), on the same random codes, four heads, groups of 64, one thread, codes warm.
 * Every key body is first checked against the portable dot products, and every value body's sums
 * against the channel-by-channel VNNI body's.
 *
 * Build from the repository root (kvcodes.c is compiled in, so its bodies can be called):
 *   clang -O2 -I Sources/CKernels/include -I Sources/CKernels -o /tmp/code_blocks \
 *       Tools/bench/code_blocks.c Sources/CKernels/kvkernels.c Sources/CKernels/kvattend.c -lm
 *   /tmp/code_blocks [padded dimension: 256] [groups: 256]
 * Prints ns per position (four heads) for each key body and us per group for each value body, best
 * of 7 passes, three rounds. */
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
        fprintf(stderr, "usage: code_blocks [padded dimension: 64, 128, 192 or 256] [groups >= 1]\n");
        return 2;
    }
    if (!kvr_has_vnni()) { fprintf(stderr, "code_blocks: this CPU has no AVX-512 VNNI\n"); return 2; }
    const size_t P = (size_t)p_arg, groups = (size_t)g_arg, G = 64, g = 4, bytes = G * P / 2;
    kvr_code_layout pos = {0}, blk;
    pos.key_code_bytes = P / 2; pos.padded = P; pos.group = G; pos.key_bits = 4; pos.value_bits = 4;
    blk = pos; blk.key_blocks = 1;
    uint8_t *a = aligned_alloc(64, groups * bytes), *b = aligned_alloc(64, groups * bytes);
    int8_t *q8 = aligned_alloc(64, g * P);
    int32_t *want = malloc(g * G * sizeof(int32_t)), *got = malloc(g * G * sizeof(int32_t));
    if (!a || !b || !q8 || !want || !got) { fprintf(stderr, "code_blocks: out of memory\n"); return 1; }
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
    printf("padded %zu, %zu groups of %zu, %zu heads; key scan: %ld dot products differ from the portable body's\n", P, groups, G, g, bad);
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

    /* The value pass: whole group rows (f16 mins and steps in [0.5, 2)), the same codes in both orders. */
    kvr_code_layout vpos = {0}, vblk;
    vpos.key_min = 0; vpos.key_step = 2 * P; vpos.key_codes = 4 * P; vpos.key_code_bytes = P / 2;
    vpos.value_min = vpos.key_codes + G * vpos.key_code_bytes; vpos.value_step = vpos.value_min + 2 * P;
    vpos.value_mean = vpos.value_step + 2 * P; vpos.value_codes = vpos.value_mean + 2 * P; vpos.value_code_bytes = G / 2;
    vpos.row_bytes = vpos.value_codes + P * vpos.value_code_bytes; vpos.padded = P; vpos.group = G; vpos.key_bits = 4; vpos.value_bits = 4;
    vblk = vpos; vblk.value_blocks = 1;
    const size_t R = vpos.row_bytes;
    uint8_t *ra = aligned_alloc(64, groups * R), *rb = aligned_alloc(64, groups * R);
    float *w = malloc(g * groups * G * sizeof(float)), *o1 = calloc(g * P, sizeof(float)), *o2 = calloc(g * P, sizeof(float));
    float *scratch = malloc(3 * P * sizeof(float));
    if (!ra || !rb || !w || !o1 || !o2 || !scratch) { fprintf(stderr, "code_blocks: out of memory\n"); return 1; }
    for (size_t i = 0; i < groups * R; i++) ra[i] = (uint8_t)rand();
    for (size_t gi = 0; gi < groups; gi++) {
        uint8_t *r = ra + gi * R, *v = rb + gi * R + vpos.value_codes;
        for (size_t c = 0; c < P; c++) {
            uint16_t h = (uint16_t)(0x3800 + rand() % 0x800);
            memcpy(r + vpos.value_min + 2 * c, &h, 2);
            h = (uint16_t)(0x3800 + rand() % 0x800);
            memcpy(r + vpos.value_step + 2 * c, &h, 2);
        }
        memcpy(rb + gi * R, r, R);
        memset(v, 0, P * G / 2);
        for (size_t c = 0; c < P; c++)
            for (size_t i = 0; i < G; i++) {
                const unsigned code = value_code(&vpos, r + vpos.value_codes, i, c);
                v[(i / 8) * P * 4 + c * 4 + i % 4] |= (uint8_t)(i % 8 < 4 ? code : code << 4);
            }
    }
    for (size_t i = 0; i < g * groups * G; i++) w[i] = expf((float)(rand() % 1000) / 250.0f);
    typedef void (*pass)(const float *, size_t, size_t, const kvr_code_layout *, const uint8_t *, size_t, float *, float *,
                         const uint8_t *, size_t);
    const struct { const char *name; pass run; const kvr_code_layout *L; const uint8_t *rows; } values[4] = {
        {"channels, AVX-512 VNNI", group_values_u4_vnni, &vpos, ra}, {"position blocks, AVX-512 VNNI", group_values_u4_blocks_vnni, &vblk, rb},
        {"channels, AVX2", group_values_u4, &vpos, ra}, {"position blocks, AVX2", group_values_u4_blocks, &vblk, rb}};
    long vbad = 0;
    for (size_t gi = 0; gi < groups; gi++) {
        memset(o1, 0, g * P * sizeof(float));
        values[0].run(w + gi * G, g, groups * G, &vpos, ra + gi * R, P, o1, scratch, NULL, 0);
        for (int k = 1; k < 4; k++) {
            memset(o2, 0, g * P * sizeof(float));
            values[k].run(w + gi * G, g, groups * G, values[k].L, values[k].rows + gi * R, P, o2, scratch, NULL, 0);
            for (size_t i = 0; i < g * P; i++) vbad += o1[i] != o2[i];
        }
    }
    printf("value pass: %ld sums differ from the channel-by-channel VNNI body's\n", vbad);
    for (int round = 0; round < 3; round++) {
        double best[4] = {1e9, 1e9, 1e9, 1e9};
        for (int pass_ = 0; pass_ < 7; pass_++)
            for (int k = 0; k < 4; k++) {
                const double t0 = now();
                for (size_t gi = 0; gi < groups; gi++)
                    values[k].run(w + gi * G, g, groups * G, values[k].L, values[k].rows + gi * R, P, o2, scratch, NULL, 0);
                const double t = now() - t0;
                if (t < best[k]) best[k] = t;
            }
        for (int k = 0; k < 4; k++) printf("  %-30s %6.3f us per group\n", values[k].name, best[k] * 1e6 / (double)groups);
        printf("  position blocks: %.2fx (VNNI), %.2fx (AVX2)\n", best[0] / best[1], best[2] / best[3]);
    }
    return bad != 0 || vbad != 0;
#else
    (void)argc; (void)argv;
    fprintf(stderr, "code_blocks: x86 only\n");
    return 2;
#endif
}
