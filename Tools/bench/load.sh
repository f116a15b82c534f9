#!/usr/bin/env bash
# Index load cost before and after a change to how index sections are read (issue 11, part 4:
# zero-copy sections). Each binary gets its own store over the same head (keys, values, prefill
# queries of DATA_DIR), builds every stored index kind there, then `kvrecall query` with one
# query is timed ROUNDS times per kind, the two binaries interleaved. A run opens the store,
# loads the index and searches once: the difference between the binaries is the load.
# With QUERIES=N (default 1) each run searches N decode queries: with many, the search dominates and
# the ratio shows whether views of the map search as fast as owned arrays.
# Usage: Tools/bench/load.sh BEFORE_BINARY AFTER_BINARY DATA_DIR [SCRATCH]
#   DATA_DIR holds keys.npy, values.npy, prefill_queries.npy, queries.npy (e.g. Tools/bench/out/synth_s1)
set -euo pipefail
A=$1; B=$2; D=$3; S=${4:-${TMPDIR:-/tmp}/kvrecall-load}; ROUNDS=${ROUNDS:-7}; QUERIES=${QUERIES:-1}
KINDS=${KINDS:-"hnsw ivf tree lsh retrieval landmark"}
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}
mkdir -p "$S"
"$PY" -c "import numpy as np; q=np.load('$D/queries.npy'); np.save('$S/q.npy', q[:$QUERIES].astype(np.float32))"
for tag in before after; do
  K=$A; [ "$tag" = after ] && K=$B
  if [ ! -e "$S/$tag.done" ]; then
    rm -rf "$S/$tag"
    "$K" ingest --store "$S/$tag" --keys "$D/keys.npy" --values "$D/values.npy" --queries "$D/prefill_queries.npy" >/dev/null
    for kind in $KINDS; do "$K" build --store "$S/$tag" --index "$kind" >/dev/null 2>&1; done
    touch "$S/$tag.done"
  fi
done
"$PY" - "$A" "$B" "$S" "$ROUNDS" "$QUERIES" $KINDS <<'PYEOF'
import subprocess, sys, time, statistics, os
a, b, s, rounds, queries, kinds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6:]
def run(binary, store, kind):
    """Wall seconds and peak resident MB of one `kvrecall query` process."""
    t = time.perf_counter()
    p = subprocess.Popen([binary, "query", "--store", store, "--queries", f"{s}/q.npy", "-k", "10", "--index", kind],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    if status != 0: sys.exit(f"{binary} query --index {kind} failed (status {status})")
    return time.perf_counter() - t, usage.ru_maxrss / 1024
print(f"load average {os.getloadavg()[0]:.1f}; medians over {rounds} interleaved rounds of `kvrecall query` ({queries} queries, k 10)")
print("| index | before: wall s / peak RSS MB | after: wall s / peak RSS MB | wall after / before |")
print("|---|---|---|---|")
for kind in kinds + ["flat"]:
    tb, ta, rb, ra = [], [], [], []
    for _ in range(rounds):
        t, r = run(a, f"{s}/before", kind); tb.append(t); rb.append(r)
        t, r = run(b, f"{s}/after", kind); ta.append(t); ra.append(r)
    mb, ma = statistics.median(tb), statistics.median(ta)
    print(f"| {kind} | {mb:.3f} / {statistics.median(rb):.0f} | {ma:.3f} / {statistics.median(ra):.0f} | {ma / mb:.2f} |", flush=True)
PYEOF
