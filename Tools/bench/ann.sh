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
# Graph index against hnswlib/faiss/usearch: k=10, both query sets, one build thread like the peers.
$K bench ann "${common[@]}" -k 10 --index hnsw --M 16 --ef-construction 200 --threads 1 --sweep 16,32,64,128,256,512,1024
# Partition, hashing, tree and query-aware indexes on decode queries: k=100.
$K bench ann "${common[@]}" -k 100 --index ivf --cluster-metric ip --sweep 8,16,32,64,96,128,192,256,384
$K bench ann "${common[@]}" -k 100 --index ivf --cluster-metric l2 --sweep 8,16,32,64,96,128,192,256,384
$K bench ann "${common[@]}" -k 100 --index lsh --tables 150 --bits 10 --sweep 2,3,4,6,8,12
$K bench ann "${common[@]}" -k 100 --index tree --sweep 32,64,128,256,512,1024
$K bench ann "${common[@]}" -k 100 --index retrieval --prefill "$D/prefill_queries.npy" --sweep 100,200,300,400,600,800
$K bench ann "${common[@]}" -k 100 --index hnsw --M 16 --ef-construction 200 --sweep 100,200,400,800,1600
PEERS=$OUT/ann_peers.json
if [ ! -f "$PEERS" ] || [ "${REDO_PEERS:-0}" = 1 ]; then
  "$PY" Tools/bench/peers.py --keys "$D/keys.npy" --queries "$D/queries.npy" --key-queries "$D/key_queries.npy" \
      --k 10,100 --threads 1 --max-queries "$LIMIT" --out "$PEERS" \
      --peers faiss-flat,faiss-hnsw,faiss-ivf,hnswlib,usearch,hnswlib-c,faiss-ivf-c
fi
"$PY" Tools/bench/peers.py --plot "$PEERS" "$OURS" --k 10 --png docs/ann_recall_qps_k10.png
"$PY" Tools/bench/peers.py --plot "$PEERS" "$OURS" --k 100 --y scanned --query-set decode --png docs/ann_recall_scanned_k100_decode.png
