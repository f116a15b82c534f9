/* A second thread for the benchmark harnesses that run one job split over two cores (a decode step's two
 * parts): started once, it spins between jobs so that no job waits for a wake-up (a sleeping vCPU takes
 * tens of microseconds to wake, as `kvrecall`'s own helper pool knows). Header-only, for the harnesses here
 * built with -pthread (jitter.c, exact_overlap.c). */
#ifndef KVR_BENCH_SPIN_PAIR_H
#define KVR_BENCH_SPIN_PAIR_H
#include <pthread.h>
#include <stdatomic.h>

typedef void (*spin_pair_job)(void *);

static struct {
    spin_pair_job job;
    void *arg;
    atomic_int issued, done;  /* jobs handed to the helper and finished by it; -1 issued: stop */
    pthread_t thread;
} spin_pair;

static void *spin_pair_loop(void *unused) {
    (void)unused;
    for (int seen = 0;;) {
        int issued;
        while ((issued = atomic_load(&spin_pair.issued)) == seen) __builtin_ia32_pause();
        if (issued < 0) return NULL;
        spin_pair.job(spin_pair.arg);
        seen = issued;
        atomic_store(&spin_pair.done, issued);
    }
}

/* Starts the helper; 0 on success. */
static inline int spin_pair_start(void) { return pthread_create(&spin_pair.thread, NULL, spin_pair_loop, NULL); }

/* Runs job(here) on this thread and job(there) on the helper at once, and returns when both are done. */
static inline void spin_pair_run(spin_pair_job job, void *here, void *there) {
    spin_pair.job = job;
    spin_pair.arg = there;
    const int issued = atomic_load(&spin_pair.issued) + 1;
    atomic_store(&spin_pair.issued, issued);  /* publishes job and arg */
    job(here);
    while (atomic_load(&spin_pair.done) != issued) __builtin_ia32_pause();
}

/* Stops and joins the helper. */
static inline void spin_pair_stop(void) {
    atomic_store(&spin_pair.issued, -1);
    pthread_join(spin_pair.thread, NULL);
}
#endif
