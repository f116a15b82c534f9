/* The machine's own step-time jitter, for reading `kvrecall bench session`'s step p99 (issue 25).
 *
 * Times 3000 "steps" of pure arithmetic over a 4 MB array (no allocation, no system call, no I/O),
 * on one thread or split over two (the caller and a helper that spins between steps, so no wake-up
 * is ever waited for), and prints the median, the p99 over it, and the p99 of each step over the
 * median of the 101 steps around it (bench session's "local" ratio). Whatever this prints is the
 * floor under any decode step of the same length on this machine.
 *
 *   cc -O2 -pthread -o /tmp/jitter Tools/bench/jitter.c && /tmp/jitter 300000 1 && /tmp/jitter 300000 2
 *
 * Arguments: work per step (loop iterations; 300000 is ~0.35 ms on one 3 GHz core), threads (1 or 2).
 */
#include "spin_pair.h"
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { STEPS = 3000, WINDOW = 101, SIZE = 1 << 20 };

static float data[SIZE];
static long work;
static volatile double sink;

static double micros(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static double compute(long n) {
    double s = 0;
    for (long k = 0; k < n; k++) s += data[(k * 64) & (SIZE - 1)] * 1.0001;
    return s;
}

static void half_step(void *result) { *(double *)result = compute(work / 2); }

static int ascending(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
    if (argc != 3 || atol(argv[1]) <= 0 || (atoi(argv[2]) != 1 && atoi(argv[2]) != 2)) {
        fprintf(stderr, "usage: %s <work per step, e.g. 300000> <threads: 1 or 2>\n", argv[0]);
        return 2;
    }
    work = atol(argv[1]);
    int threads = atoi(argv[2]);
    for (int i = 0; i < SIZE; i++) data[i] = (float)i;
    if (threads == 2 && spin_pair_start() != 0) { perror("pthread_create"); return 1; }
    static double step[STEPS], local[STEPS], window[WINDOW];
    for (int i = 0; i < STEPS; i++) {
        double t0 = micros();
        if (threads == 2) {
            double halves[2];
            spin_pair_run(half_step, &halves[0], &halves[1]);
            sink = halves[0] + halves[1];
        } else {
            sink = compute(work);
        }
        step[i] = micros() - t0;
    }
    for (int i = 0; i < STEPS; i++) {
        int lo = i - WINDOW / 2;
        if (lo < 0) lo = 0;
        if (lo > STEPS - WINDOW) lo = STEPS - WINDOW;
        for (int j = 0; j < WINDOW; j++) window[j] = step[lo + j];
        qsort(window, WINDOW, sizeof(double), ascending);
        local[i] = step[i] / window[WINDOW / 2];
    }
    qsort(step, STEPS, sizeof(double), ascending);
    qsort(local, STEPS, sizeof(double), ascending);
    int p99 = (int)(STEPS * 0.99);
    printf("%d thread%s, %ld per step: median %.1f us, p99 %.1f us (%.2fx); p99 over the local median %.2fx\n", threads,
           threads == 1 ? "" : "s", work, step[STEPS / 2], step[p99], step[p99] / step[STEPS / 2], local[p99]);
    return 0;
}
