// How `kvrecall repl` reads keys on a terminal (libedit's rl_getc_function) and handles Ctrl-C,
// resizes and Ctrl-Z; see line_reader.c for why. Compiled once, in this target: the state the
// signal handler writes and the Swift side reads must exist exactly once in the program.
#ifndef KVRECALL_LINE_READER_H
#define KVRECALL_LINE_READER_H

#ifdef __cplusplus
extern "C" {
#endif

/// Installs the handlers (SIGINT, SIGWINCH, SIGCONT) and the key reader (libedit's
/// rl_getc_function; rl_catch_signals off); the calling thread is the one that reads keys.
/// Call before rl_initialize(). 0 on success, -1 if a handler could not be installed.
int kvr_install_line_reader(void);

/// 1 if Ctrl-C was pressed since the last call (and clears the record).
int kvr_take_sigint(void);

/// 1 if the terminal was resized since the last call (and clears the record).
int kvr_take_sigwinch(void);

#ifdef __cplusplus
}
#endif
#endif
