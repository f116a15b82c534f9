#!/usr/bin/env bash
# Side-by-side ANN benchmark on the same .npy files, one thread each: kvrecall's indexes
# (hnsw, ivf, lsh, tree, retrieval) and the peers (faiss, hnswlib, usearch), then plots.
# Usage: Tools/bench/ann.sh [DATA_DIR] [--quick]
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-Tools/bench/out/synth}
QUICK=${2:-}
PY=Tools/bench/.venv/bin/python
OUT=Tools/bench/out
[ -x "$PY" ] || { python3 -m venv Tools/bench/.venv && "$PY" -m pip install -q -r Tools/bench/requirements.txt; }
[ -f "$D/keys.npy" ] || "$PY" Tools/make_synthetic.py --out "$D"
bash Tools/setup.sh
swift build -c release --product kvrecall
K=.build/release/kvrecall
OURS=$OUT/ann_ours.json
rm -f "$OURS"
LIMIT=1000; [ "$QUICK" = "--quick" ] && LIMIT=200
common=(--keys "$D/keys.npy" --queries "$D/queries.npy" --key-queries "$D/key_queries.npy" --limit "$LIMIT" --json "$OURS")
for k in 10 100; do
  $K bench ann "${common[@]}" -k $k --index hnsw --M 16 --ef-construction 200 --threads 1 --sweep 16,32,64,128,256,512,1024
  $K bench ann "${common[@]}" -k $k --index ivf --cluster-metric ip --sweep 1,2,4,8,16,32,64,128,256
  $K bench ann "${common[@]}" -k $k --index ivf --cluster-metric l2 --sweep 1,2,4,8,16,32,64,128,256
  $K bench ann "${common[@]}" -k $k --index lsh --tables 150 --bits 10 --sweep 1,2,3,4,6,8
  $K bench ann "${common[@]}" -k $k --index tree --sweep 1,2,4,8,16,32,64
  $K bench ann "${common[@]}" -k $k --index retrieval --prefill "$D/prefill_queries.npy" --sweep 100,200,300,400,600,800
done
PEERS=$OUT/ann_peers.json
if [ ! -f "$PEERS" ] || [ "${REDO_PEERS:-0}" = 1 ]; then
  "$PY" Tools/bench/peers.py --keys "$D/keys.npy" --queries "$D/queries.npy" --key-queries "$D/key_queries.npy" \
      --k 10,100 --threads 1 --max-queries "$LIMIT" --out "$PEERS" \
      --peers faiss-flat,faiss-hnsw,faiss-ivf,hnswlib,usearch,hnswlib-c,faiss-ivf-c,faiss-lsh
fi
"$PY" Tools/bench/peers.py --plot "$PEERS" "$OURS" --k 10 --png docs/ann_recall_qps_k10.png
"$PY" Tools/bench/peers.py --plot "$PEERS" "$OURS" --k 100 --y scanned --query-set decode --png docs/ann_recall_scanned_k100_decode.png
