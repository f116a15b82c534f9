#!/usr/bin/env bash
# IVF side by side on out-of-distribution decode queries, k = 100, one thread: kvrecall's IVF (SQ8 and
# f16 list codes, exact re-rank) against faiss IndexIVFFlat, IndexIVFSQ8 and IndexIVFSQ8 + IndexRefineFlat,
# same nlist (4 sqrt N), same nprobe sweep, alternated for ROUNDS rounds on this noisy machine; every
# library times each query as its best of REPEAT passes over all queries (3; one warm-up pass first); then
# the median QPS per point, QPS at recall@100 0.9 (interpolated) with ratios, and the plot.
# Usage: Tools/bench/ivf.sh [DATA_DIR] [--quick]      (ROUNDS=3 by default)
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-Tools/bench/out/synth}
QUICK=${2:-}
ROUNDS=${ROUNDS:-3}
REPEAT=${REPEAT:-3}
PY="$(bash Tools/python_env.sh | tail -n 1)"
OUT=Tools/bench/out/ivf
mkdir -p "$OUT"
[ -f "$D/keys.npy" ] || "$PY" Tools/make_synthetic.py --out "$D"
SCRATCH=${SCRATCH:-.build}
swift build -c release --product kvrecall --scratch-path "$SCRATCH" >&2
K=$SCRATCH/release/kvrecall
LIMIT=1000; [ "$QUICK" = "--quick" ] && LIMIT=200
NPROBE=64,96,128,160,192,224,256,320
NAME=$(basename "$D")
rm -f "$OUT/$NAME"_*.json
for r in $(seq 1 "$ROUNDS"); do
  for codes in sq8 f16; do
    $K bench ann --keys "$D/keys.npy" --queries "$D/queries.npy" --limit "$LIMIT" -k 100 --index ivf \
        --cluster-metric ip --list-codes $codes --sweep $NPROBE --repeat "$REPEAT" --json "$OUT/${NAME}_ours_r$r.json"
  done
  "$PY" Tools/bench/peers.py --keys "$D/keys.npy" --queries "$D/queries.npy" --k 100 --threads 1 \
      --max-queries "$LIMIT" --repeat "$REPEAT" --nprobe $NPROBE --peers faiss-ivf,faiss-ivfsq8,faiss-ivfsq8-r \
      --out "$OUT/${NAME}_peers_r$r.json"
done
"$PY" Tools/bench/ivf_summary.py --recall 0.9 --baseline IndexIVFFlat --merged "$OUT/${NAME}_median.json" \
    "$OUT/$NAME"_*_r*.json
"$PY" Tools/bench/peers.py --plot "$OUT/${NAME}_median.json" --k 100 --query-set decode \
    --title "IVF, recall@100 vs QPS, decode queries ($NAME, one thread)" --png "docs/ivf_recall_qps_k100_$NAME.png"
