#!/usr/bin/env bash
# Index load cost before and after a change to how index sections are read (issue 11, part 4:
# zero-copy sections). Each binary gets its own store over the same head (keys, values, prefill
# queries of DATA_DIR), builds every stored index kind there, then `kvrecall query` with one
# query is timed ROUNDS times per kind, the two binaries interleaved. A run opens the store,
# loads the index and searches once: the difference between the binaries is the load.
# Usage: Tools/bench/load.sh BEFORE_BINARY AFTER_BINARY DATA_DIR [SCRATCH]
#   DATA_DIR holds keys.npy, values.npy, prefill_queries.npy, queries.npy (e.g. Tools/bench/out/synth_s1)
set -euo pipefail
A=$1; B=$2; D=$3; S=${4:-${TMPDIR:-/tmp}/kvrecall-load}; ROUNDS=${ROUNDS:-7}
KINDS=${KINDS:-"hnsw ivf tree lsh retrieval landmark"}
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
mkdir -p "$S"
"$PY" -c "import numpy as np; q=np.load('$D/queries.npy'); np.save('$S/q1.npy', q[:1].astype(np.float32))"
for tag in before after; do
  K=$A; [ "$tag" = after ] && K=$B
  if [ ! -e "$S/$tag.done" ]; then
    rm -rf "$S/$tag"
    "$K" ingest --store "$S/$tag" --keys "$D/keys.npy" --values "$D/values.npy" --queries "$D/prefill_queries.npy" >/dev/null
    for kind in $KINDS; do "$K" build --store "$S/$tag" --index "$kind" >/dev/null 2>&1; done
    touch "$S/$tag.done"
  fi
done
"$PY" - "$A" "$B" "$S" "$ROUNDS" $KINDS <<'PYEOF'
import subprocess, sys, time, statistics, os
a, b, s, rounds, kinds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
def run(binary, store, kind):
    t = time.perf_counter()
    subprocess.run([binary, "query", "--store", store, "--queries", f"{s}/q1.npy", "-k", "10", "--index", kind],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t
print(f"load average {os.getloadavg()[0]:.1f}; median wall seconds of `kvrecall query` (1 query, k 10) over {rounds} rounds")
print("| index | before (s) | after (s) | after / before |")
print("|---|---|---|---|")
for kind in kinds + ["flat"]:
    tb, ta = [], []
    for _ in range(rounds):
        tb.append(run(a, f"{s}/before", kind)); ta.append(run(b, f"{s}/after", kind))
    mb, ma = statistics.median(tb), statistics.median(ta)
    print(f"| {kind} | {mb:.3f} | {ma:.3f} | {ma / mb:.2f} |", flush=True)
PYEOF
