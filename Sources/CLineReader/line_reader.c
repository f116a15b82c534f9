// The key reader and signal handling of `kvrecall repl` (declared in kvr_line_reader.h).
//
// libedit's own signal handling is off (rl_catch_signals = 0): on SIGINT it would put the
// terminal back in cooked mode and re-raise with kill(0, ...), and its read loop retries the
// first EINTR, so one Ctrl-C would not end readline(). Instead libedit reads every key through
// kvr_getc (rl_getc_function), which waits with pselect() and SIGINT blocked except during the
// wait, so a Ctrl-C cannot slip in between the check and the wait:
//  - SIGINT (Ctrl-C) records the signal; when it lands on another thread of the process it is
//    forwarded to the thread that reads keys, whose pselect() then returns EINTR. kvr_getc
//    returns -1, which libedit takes as the end of input: readline() returns NULL with the record
//    set ("clear the line"), unlike Ctrl-D (NULL without it). Outside readline() the handler
//    only records (SA_RESTART: no system call of a running command is interrupted).
//  - SIGWINCH (resize) and SIGCONT (back from Ctrl-Z) are recorded too; kvr_getc then has libedit
//    read the terminal size again, or set its editing mode again and redraw the line.
// The handlers only store to volatile sig_atomic_t and call pthread_kill (async-signal-safe).
//
// Why a C file and not static functions in CEditLine's header, as before: a header's static
// variables are emitted once per object file that uses them, and the release build (whole-module
// optimisation with one object file per source file) got two copies of the Ctrl-C record, one
// written by the handler and one read by Swift. Ctrl-C then looked like Ctrl-D and the release
// REPL quit with status 0. Here the state is defined once.
#define _GNU_SOURCE
#include "kvr_line_reader.h"

#include <stdio.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/select.h>
#include <editline/readline.h>

static volatile sig_atomic_t sigint_seen = 0;
static volatile sig_atomic_t sigwinch_seen = 0;
static volatile sig_atomic_t sigcont_seen = 0;
static pthread_t reader_thread;

static void signal_handler(int signo) {
    if (signo == SIGWINCH) { sigwinch_seen = 1; return; }
    if (signo == SIGCONT) { sigcont_seen = 1; return; }
    sigint_seen = 1;
    if (!pthread_equal(pthread_self(), reader_thread)) {
        pthread_kill(reader_thread, signo);
    }
}

/// One key for libedit: a byte, or a UTF-8 sequence as its code point; -1 at end of input or
/// when Ctrl-C was pressed.
static int kvr_getc(FILE *stream) {
    int fd = stream ? fileno(stream) : STDIN_FILENO;
    sigset_t block, saved, waiting;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    pthread_sigmask(SIG_BLOCK, &block, &saved);
    waiting = saved;
    sigdelset(&waiting, SIGINT);
    int result = -1, need = 1, have = 0;
    unsigned char bytes[4];
    for (;;) {
        if (sigint_seen) break;
        if (sigwinch_seen) {
            sigwinch_seen = 0;
            rl_resize_terminal();
        }
        if (sigcont_seen) {
            sigcont_seen = 0;
            rl_deprep_terminal();
            rl_prep_terminal(1);
            rl_forced_update_display();
        }
        fd_set readable;
        FD_ZERO(&readable);
        FD_SET(fd, &readable);
        if (pselect(fd + 1, &readable, NULL, NULL, NULL, &waiting) < 0) {
            if (errno == EINTR) continue;
            break;
        }
        ssize_t n = read(fd, bytes + have, 1);
        if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
        if (n <= 0) break;
        if (have == 0) {
            unsigned char b = bytes[0];
            need = b < 0x80 ? 1 : (b & 0xE0) == 0xC0 ? 2 : (b & 0xF0) == 0xE0 ? 3 : (b & 0xF8) == 0xF0 ? 4 : 1;
        } else if ((bytes[have] & 0xC0) != 0x80) {
            result = bytes[have];  // a broken sequence: keep the last byte alone
            break;
        }
        if (++have < need) continue;
        if (need == 1) {
            result = bytes[0];
        } else {
            result = bytes[0] & (0xFF >> (need + 1));
            for (int i = 1; i < need; i++) result = (result << 6) | (bytes[i] & 0x3F);
        }
        break;
    }
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
    return result;
}

int kvr_install_line_reader(void) {
    reader_thread = pthread_self();
    rl_catch_signals = 0;
    rl_getc_function = kvr_getc;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = signal_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGWINCH, &sa, NULL) != 0) return -1;
    if (sigaction(SIGCONT, &sa, NULL) != 0) return -1;
    return sigaction(SIGINT, &sa, NULL);
}

int kvr_take_sigint(void) {
    int seen = sigint_seen;
    sigint_seen = 0;
    return seen;
}

int kvr_take_sigwinch(void) {
    int seen = sigwinch_seen;
    sigwinch_seen = 0;
    return seen;
}
