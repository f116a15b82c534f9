// libedit (Debian: libedit-dev, pkg-config libedit) through its readline-compatible API:
// readline(), add_history()/read_history()/write_history(), and completion with
// rl_attempted_completion_function / rl_completion_matches (all present in libedit 3.1).
#ifndef KVRECALL_CEDITLINE_SHIM_H
#define KVRECALL_CEDITLINE_SHIM_H

#include <stdio.h>
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/select.h>
#include <editline/readline.h>

// How `kvrecall repl` reads keys on a terminal, and why.
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
// The state is static in this header: these helpers are used from one Swift file only
// (LineEditor.swift). (SwiftPM does not recompile Swift files when this header changes: touch
// LineEditor.swift after editing it.)
static volatile sig_atomic_t kvr_sigint_seen = 0;
static volatile sig_atomic_t kvr_sigwinch_seen = 0;
static volatile sig_atomic_t kvr_sigcont_seen = 0;

// The thread that reads keys. A function-local static: Swift's Clang importer does not emit a
// file-scope static pthread_t that Swift code never names (the link fails).
static inline pthread_t *kvr_reader_thread(void) {
    static pthread_t thread;
    return &thread;
}

static void kvr_signal_handler(int signo) {
    if (signo == SIGWINCH) { kvr_sigwinch_seen = 1; return; }
    if (signo == SIGCONT) { kvr_sigcont_seen = 1; return; }
    kvr_sigint_seen = 1;
    pthread_t reader = *kvr_reader_thread();
    if (!pthread_equal(pthread_self(), reader)) {
        pthread_kill(reader, signo);
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
        if (kvr_sigint_seen) break;
        if (kvr_sigwinch_seen) {
            kvr_sigwinch_seen = 0;
            rl_resize_terminal();
        }
        if (kvr_sigcont_seen) {
            kvr_sigcont_seen = 0;
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

/// Installs the handlers and the key reader; the calling thread is the one that reads keys.
static inline int kvr_install_line_reader(void) {
    *kvr_reader_thread() = pthread_self();
    rl_catch_signals = 0;
    rl_getc_function = kvr_getc;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = kvr_signal_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    if (sigaction(SIGWINCH, &sa, NULL) != 0) return -1;
    if (sigaction(SIGCONT, &sa, NULL) != 0) return -1;
    return sigaction(SIGINT, &sa, NULL);
}

/// 1 if Ctrl-C was pressed since the last call (and clears the record).
static inline int kvr_take_sigint(void) {
    int seen = kvr_sigint_seen;
    kvr_sigint_seen = 0;
    return seen;
}

/// 1 if the terminal was resized since the last call (and clears the record).
static inline int kvr_take_sigwinch(void) {
    int seen = kvr_sigwinch_seen;
    kvr_sigwinch_seen = 0;
    return seen;
}

#endif
