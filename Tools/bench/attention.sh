#!/usr/bin/env bash
# Attention methods side by side in two regimes, k = 100, sinks 4, window 64:
#   sparse  - the synthetic out-of-distribution set (131072 x 128, sharp queries);
#   diffuse - the real MiniLM sample in Data/minilm.
# Builds every index into a store under Tools/bench/out/, then `kvrecall attend --method all`.
# Usage: Tools/bench/attention.sh [SYNTHETIC_DIR] [QUERY_LIMIT]
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-Tools/bench/out/synth}
LIMIT=${2:-200}
PY=Tools/bench/.venv/bin/python
OUT=Tools/bench/out
[ -x "$PY" ] || { python3 -m venv Tools/bench/.venv && "$PY" -m pip install -q -r Tools/bench/requirements.txt; }
[ -f "$D/keys.npy" ] || "$PY" Tools/make_synthetic.py --out "$D"
bash Tools/setup.sh
swift build -c release --product kvrecall
K=.build/release/kvrecall

run_regime() {  # name keys values prefill queries ef nprobe
  local name=$1 store=$OUT/attention-$1
  rm -rf "$store"
  $K ingest --store "$store" --keys "$2" --values "$3" --queries "$4" --quiet
  for index in hnsw ivf lsh tree retrieval landmark; do $K build --store "$store" --index "$index" --quiet; done
  echo "== $name regime =="
  $K attend --store "$store" --queries "$5" --method all -k 100 --sinks 4 --window 64 --limit "$LIMIT" \
      --ef "$6" --nprobe "$7" --beam 16
  $K attend --store "$store" --queries "$5" --method all -k 100 --sinks 4 --window 64 --limit "$LIMIT" \
      --ef "$6" --nprobe "$7" --beam 16 --json > "$OUT/attention-$name.json"
  $K attend --store "$store" --queries "$5" --method estimate -k 100 --limit "$LIMIT" --top-p 0.9 --max-retrieved 4096 \
      | tail -n 1 | sed "s/^/top-p 0.9: /"
}
run_regime sparse "$D/keys.npy" "$D/values.npy" "$D/prefill_queries.npy" "$D/queries.npy" 400 64
run_regime diffuse Data/minilm/keys.npy Data/minilm/values.npy Data/minilm/prefill_queries.npy Data/minilm/queries.npy 128 8
