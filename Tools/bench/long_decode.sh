#!/usr/bin/env bash
# Tools/bench/long_decode.sh: builds Tools/bench/long_decode.c against the release C library and
# runs it (issue 25: long generations through the C ABI). Arguments go to the program:
#   Tools/bench/long_decode.sh PROMPT STEPS METHOD[,METHOD...] [REFRESH]
# e.g. Tools/bench/long_decode.sh 1000 3000 retrieval,hnsw,ivf   (see docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/../.."
scratch="${KVRECALL_BUILD_DIR:-.build}"
[[ -n "${KVRECALL_SKIP_BUILD:-}" ]] || swift build -c release --product KVRecallC --scratch-path "$scratch" >&2
lib="$PWD/$scratch/release"
out="$scratch/long_decode"
cc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Iinclude Tools/bench/long_decode.c -L"$lib" -lKVRecallC -Wl,-rpath,"$lib" -lm -o "$out"
exec "$out" "$@"
