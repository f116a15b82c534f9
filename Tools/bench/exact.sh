#!/usr/bin/env bash
# Exact top-100 over 131072 x 128: kvrecall's Flat scan (f32/f16/bf16 storage, with a bare
# cblas_sgemv over the same f32 matrix in the same process) and faiss IndexFlatIP, one thread each,
# on the same files, one after the other. Results land in Tools/bench/out/.
set -euo pipefail
cd "$(dirname "$0")/../.."
D=${1:-Tools/bench/out/synth}
PY=Tools/bench/.venv/bin/python
[ -x "$PY" ] || { python3 -m venv Tools/bench/.venv && "$PY" -m pip install -q -r Tools/bench/requirements.txt; }
[ -f "$D/keys.npy" ] || "$PY" Tools/make_synthetic.py --out "$D"
bash Tools/setup.sh
swift build -c release --product kvrecall
rm -f Tools/bench/out/exact_ours.json
.build/release/kvrecall bench exact --keys "$D/keys.npy" --queries "$D/queries.npy" -k 100 --limit 200 \
    --json Tools/bench/out/exact_ours.json
"$PY" Tools/bench/peers.py --keys "$D/keys.npy" --queries "$D/queries.npy" --k 100 --peers faiss-flat \
    --threads 1 --max-queries 200 --out Tools/bench/out/exact_faiss.json
"$PY" - <<'PY'
import json
for f in ("Tools/bench/out/exact_ours.json", "Tools/bench/out/exact_faiss.json"):
    for r in json.load(open(f)):
        print("%-10s %-12s median %.3f ms" % (r["library"], r["method"], r["median_us"] / 1e3))
PY
