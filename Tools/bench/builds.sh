#!/usr/bin/env bash
# Issue 14's build and session figures: build time per head against context length for every index
# kind (with hnswlib and faiss IVFFlat in the same rounds), the retrieval graph over a 128K head with
# all prefill queries offered (recall@100 at ef 400), and the session's per-token time at 32K and 128K
# (exact against retrieval, groups of 4). Logs and JSON in Tools/bench/out/builds; plot in docs/.
# Usage: Tools/bench/builds.sh [--quick]     (ROUNDS=3 by default; SCRATCH=.build by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS=${ROUNDS:-3}
[ "${1:-}" = "--quick" ] && ROUNDS=1
PY="$(bash Tools/python_env.sh | tail -n 1)"
D=Tools/bench/out/synth_p128k
OUT=Tools/bench/out/builds
mkdir -p "$OUT"
[ -f "$D/keys.npy" ] || "$PY" Tools/make_synthetic.py --out "$D" --prefill 131072
SCRATCH=${SCRATCH:-.build}
swift build -c release --product kvrecall --scratch-path "$SCRATCH" >&2
K=$SCRATCH/release/kvrecall
"$PY" Tools/bench/build_times.py --kvrecall "$K" --data "$D" --rounds "$ROUNDS" --out "$OUT/build_times.json" \
    --png docs/build_time_context.png | tee "$OUT/build_times.md"
$K bench ann --keys "$D/keys.npy" --queries "$D/queries.npy" --prefill "$D/prefill_queries.npy" --index retrieval \
    --sweep 400 --limit 200 | tee "$OUT/retrieval_128k.txt"
for CTX in 32768 131056; do  # 131056 + 16 decode steps = the 131072 keys
  $K bench session --data "$D" --layers 1 --kv-heads 4 --group 4 --context $CTX --method retrieval \
      | tee "$OUT/session_$CTX.txt"
done
