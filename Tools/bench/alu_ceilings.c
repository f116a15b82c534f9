/* What one core of this machine can compute at most, for the instructions the attention kernels spend their
 * time in, and what that bounds their per-position times at (docs/BENCHMARKS.md, fourteenth session):
 *   - the clock: a chain of dependent integer adds (one per cycle on every x86 core of the last decade);
 *   - ymm FMAs (exact attention's score and value passes: 2 x 128 per position of a 256-dim f16 head, four query
 *     heads), twelve independent chains;
 *   - f16 -> f32 conversions of 8 lanes (vcvtph2ps, 2 x 32 per position);
 *   - vpmaddubsw (u8 x i8 pairs summed to int16; the quantized tier's scans, 2048 per group of 64 positions
 *     at 256 channels and four heads, key scan and value pass alike), alone and with the int16 add that
 *     accumulates each product.
 * The bounds assume every instruction at its peak and nothing else: a kernel cannot beat them, and one far
 * above them on warm data waits on something else (memory, dependencies, the front end).
 *
 * Build from the repository root (x86-64 with AVX2/FMA/F16C) with clang, whose -O2 keeps every chain in a
 * register (checked in its assembly; gcc may keep them on the stack and measure store forwarding instead):
 *   clang -O2 -o /tmp/alu_ceilings Tools/bench/alu_ceilings.c && /tmp/alu_ceilings
 * Prints medians of 7 rounds. */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define T __attribute__((target("avx2,fma,f16c"), noinline))
enum { ROUNDS = 7 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int by_value(const void *a, const void *b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* 64 dependent register-to-register adds per iteration (an add of an immediate may be folded at rename on
 * some cores): cycles per second. */
static uint64_t adds(long n) {
    uint64_t x = 0, one = 1;
    for (long k = 0; k < n; k++) {
#define A4 "add %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\tadd %1, %0\n\t"
        __asm__ volatile(A4 A4 A4 A4 A4 A4 A4 A4 A4 A4 A4 A4 A4 A4 A4 A4 : "+r"(x) : "r"(one));
#undef A4
    }
    return x;
}

/* 12 independent FMA chains (latency 4-5 cycles, two or so pipes: enough to fill them). */
T static float fmas(long n) {
    __m256 a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps(0.001f * (float)i);
    const __m256 x = _mm256_set1_ps(0.999f), y = _mm256_set1_ps(1e-4f);
    for (long k = 0; k < n; k++) {
        for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], x, y);
        __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]), "+x"(a[6]),
                         "+x"(a[7]), "+x"(a[8]), "+x"(a[9]), "+x"(a[10]), "+x"(a[11]));
    }
    __m256 s = a[0];
    for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, a[i]);
    return _mm256_cvtss_f32(s);
}

/* 8 conversions per iteration from an L1-resident buffer, each into its own sum chain. */
T static float conversions(const uint16_t *p, long n) {
    __m256 s[8];
    for (int i = 0; i < 8; i++) s[i] = _mm256_setzero_ps();
    for (long k = 0; k < n; k++) {
        for (int i = 0; i < 8; i++) s[i] = _mm256_or_ps(s[i], _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8 * i))));
        __asm__ volatile("" : "+x"(s[0]), "+x"(s[1]), "+x"(s[2]), "+x"(s[3]), "+x"(s[4]), "+x"(s[5]), "+x"(s[6]), "+x"(s[7]) : "r"(p));
    }
    __m256 t = s[0];
    for (int i = 1; i < 8; i++) t = _mm256_or_ps(t, s[i]);
    return _mm256_cvtss_f32(t);
}

/* Exact attention's inner mix: one f16 conversion per four FMAs (each converted row chunk meets the four query
 * heads; 256 FMAs and 64 conversions per position over both passes), 12 chains so that latency never limits.
 * Where the conversions share the FMA pipes, this runs at fewer FMAs per cycle than `fmas`. */
T static float fma_mix(const uint16_t *p, long n) {
    __m256 a[12];
    for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps(0.001f * (float)i);
    const __m256 q = _mm256_set1_ps(0.999f);
    for (long k = 0; k < n; k++) {
        const __m256 x0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8 * (k & 3))));
        const __m256 x1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 32 + 8 * (k & 3))));
        const __m256 x2 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16 + 8 * (k & 3))));
        for (int i = 0; i < 4; i++) a[i] = _mm256_fmadd_ps(q, x0, a[i]);
        for (int i = 4; i < 8; i++) a[i] = _mm256_fmadd_ps(q, x1, a[i]);
        for (int i = 8; i < 12; i++) a[i] = _mm256_fmadd_ps(q, x2, a[i]);
        __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]), "+x"(a[6]),
                         "+x"(a[7]), "+x"(a[8]), "+x"(a[9]), "+x"(a[10]), "+x"(a[11]) : "r"(p));
    }
    __m256 s = a[0];
    for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, a[i]);
    return _mm256_cvtss_f32(s);
}

/* 8 independent vpmaddubsw per iteration; with_add: each accumulated by vpaddw (a scan's inner step). */
T static int maddubs(const uint8_t *codes, long n, int with_add) {
    __m256i a[8];
    const __m256i w = _mm256_set1_epi8(3);
    for (int i = 0; i < 8; i++) a[i] = _mm256_set1_epi8((char)i);
    if (with_add) {
        for (long k = 0; k < n; k++) {
            for (int i = 0; i < 8; i++)
                a[i] = _mm256_add_epi16(a[i], _mm256_maddubs_epi16(w, _mm256_loadu_si256((const __m256i *)(codes + 32 * i))));
            __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]), "+x"(a[6]), "+x"(a[7]) : "r"(codes));
        }
    } else {
        for (long k = 0; k < n; k++) {
            for (int i = 0; i < 8; i++) a[i] = _mm256_maddubs_epi16(a[i], w);
            __asm__ volatile("" : "+x"(a[0]), "+x"(a[1]), "+x"(a[2]), "+x"(a[3]), "+x"(a[4]), "+x"(a[5]), "+x"(a[6]), "+x"(a[7]));
        }
    }
    __m256i s = a[0];
    for (int i = 1; i < 8; i++) s = _mm256_add_epi16(s, a[i]);
    return _mm256_extract_epi32(s, 0);
}

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) {
        fprintf(stderr, "alu_ceilings: this CPU lacks AVX2, FMA or F16C\n");
        return 2;
    }
    static uint16_t halves[64];
    static uint8_t codes[256];
    for (int i = 0; i < 64; i++) halves[i] = 0x3c00;
    for (int i = 0; i < 256; i++) codes[i] = (uint8_t)(i & 15);
    const long n = 20000000;
    double r[6][ROUNDS];
    volatile double sink = 0;
    for (int k = 0; k < ROUNDS; k++) {
        double t = now();
        sink += (double)adds(n / 4);
        r[0][k] = (double)(n / 4) * 64 / (now() - t);
        t = now();
        sink += fmas(n);
        r[1][k] = (double)n * 12 / (now() - t);
        t = now();
        sink += conversions(halves, n);
        r[2][k] = (double)n * 8 / (now() - t);
        t = now();
        sink += maddubs(codes, n, 0);
        r[3][k] = (double)n * 8 / (now() - t);
        t = now();
        sink += maddubs(codes, n, 1);
        r[4][k] = (double)n * 8 / (now() - t);
        t = now();
        sink += fma_mix(halves, n);
        r[5][k] = (double)n * 12 / (now() - t);
    }
    for (int i = 0; i < 6; i++) qsort(r[i], ROUNDS, sizeof(double), by_value);
    const double ghz = r[0][ROUNDS / 2] / 1e9, fma = r[1][ROUNDS / 2] / 1e9, cvt = r[2][ROUNDS / 2] / 1e9;
    const double mad = r[3][ROUNDS / 2] / 1e9, madd = r[4][ROUNDS / 2] / 1e9, mix = r[5][ROUNDS / 2] / 1e9;
    printf("one core, medians of %d rounds (G per second; per cycle at the measured clock):\n", ROUNDS);
    printf("  clock (dependent adds)            %5.2f GHz\n", ghz);
    printf("  ymm FMA                           %5.2f  (%.2f per cycle)\n", fma, fma / ghz);
    printf("  ymm FMA beside 1 conversion per 4 %5.2f  (%.2f)\n", mix, mix / ghz);
    printf("  vcvtph2ps ymm                     %5.2f  (%.2f)\n", cvt, cvt / ghz);
    printf("  vpmaddubsw ymm, register chains   %5.2f  (%.2f)\n", mad, mad / ghz);
    printf("  vpmaddubsw ymm from memory+vpaddw %5.2f  (%.2f)\n", madd, madd / ghz);
    /* exact, 256-dim f16 head, four query heads: 256 FMAs and 64 conversions per position (two passes) */
    printf("bounds at these rates, one core:\n");
    printf("  exact attention, 256 dims, 4 heads: FMAs alone %.1f ns per position; with their conversions %.1f\n",
           256 / fma, 256 / mix);
    printf("  quantized key scan or value pass, group of 64 x 256 channels, 4 heads: %.2f us per group\n", 2048 / madd / 1e3);
    return sink == 42.0 ? 3 : 0;
}
