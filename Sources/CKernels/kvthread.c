/* Scheduling of background threads (a session's refresh builder, issue 25). Linux's idle class
 * and per-thread nice values are not reachable from Swift's Glibc module (SCHED_IDLE, gettid). */
#define _GNU_SOURCE
#include "kvkernels.h"
#include <errno.h>
#include <sched.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* Whether the calling thread made itself a background thread (the idle class or a nicer value) or runs
 * a background thread's tasks (kvr_thread_set_background). */
static __thread int background;

long kvr_thread_id(void) { return (long)syscall(SYS_gettid); }

int kvr_thread_is_background(void) { return background; }

int kvr_thread_set_background(int on) {
    const int was = background;
    background = on;
    return was;
}

void kvr_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

int kvr_thread_enter_idle(void) {
    background = 1;
    struct sched_param none = {0};
    return sched_setscheduler(0, SCHED_IDLE, &none) == 0 ? 0 : errno;
}

int kvr_thread_leave_idle(long tid, int niceness) {
    if (tid == kvr_thread_id()) background = 1;
    struct sched_param none = {0};
    if (sched_setscheduler((pid_t)tid, SCHED_OTHER, &none) != 0) return errno;
    errno = 0;
    int base = getpriority(PRIO_PROCESS, 0);
    if (errno != 0) base = 0;
    int nice = base + niceness > 19 ? 19 : base + niceness;
    return setpriority(PRIO_PROCESS, (id_t)tid, nice) == 0 ? 0 : errno;
}
