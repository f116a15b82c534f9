// libedit (Debian: libedit-dev, pkg-config libedit) through its readline-compatible API:
// readline(), add_history()/read_history()/write_history(), and completion with
// rl_attempted_completion_function / rl_completion_matches (all present in libedit 3.1).
#ifndef KVRECALL_CEDITLINE_SHIM_H
#define KVRECALL_CEDITLINE_SHIM_H

#include <stdio.h>
#include <editline/readline.h>

// The key reader and signal handling of `kvrecall repl` live in the CLineReader target (a C
// file compiled once): static state in this header would be duplicated per object file.

#endif
