#!/usr/bin/env bash
# The code format study of the quantized KV tier (docs/QUANT_STUDY.md): generates the data sets that
# are missing (both synthetic families at 32K and 128K, the Gemma 3 32K capture), then runs
# Tools/bench/quant_study.py on every set and prints the tables.
#
# Usage:  bash Tools/bench/quant_study.sh            (results: Tools/bench/out/quant_study.json, .md)
# Env:    PY (a python with numpy; default python3 if it imports numpy, else Tools/python_env.sh's venv)
#         SETS (space-separated NAME=SPEC list to run instead of all of them)
# Took about 70 minutes on this shared 2-core machine (numpy, one process); run it with `nice`.
set -euo pipefail
cd "$(dirname "$0")/../.."
O=Tools/bench/out
mkdir -p "$O"
if [[ -z "${PY:-}" ]]; then
  if python3 -c 'import numpy' 2>/dev/null; then PY=python3; else PY="$(bash Tools/python_env.sh | tail -n 1)"; fi
fi
gen() { [[ -f "$O/$1/keys.npy" ]] || "$PY" Tools/make_synthetic.py --out "$O/$1" "${@:2}"; }
gen synth32k_f1 --n 32768
gen synth128k_f1
gen synth32k_f2 --family drift --n 32768
gen synth128k_f2 --family drift
[[ -f "$O/gemma32k/layer17_keys.npy" ]] || bash Tools/bench/capture32k.sh "$O/gemma32k"

SETS=${SETS:-"gemma32k-L5=$O/gemma32k:5 gemma32k-L11=$O/gemma32k:11 gemma32k-L17=$O/gemma32k:17
  f2-32k=$O/synth32k_f2 f1-32k=$O/synth32k_f1
  gemma1k-L5=Data/gemma3:5 gemma1k-L11=Data/gemma3:11 gemma1k-L17=Data/gemma3:17
  f2-128k=$O/synth128k_f2 f1-128k=$O/synth128k_f1"}
args=()
for s in $SETS; do args+=(--set "$s"); done
# Capture sets: 128 evenly spaced decode positions x 4 query heads; synthetic sets: 200 decode queries.
# Key codes 2/4/8 bits for recall; the output error of every 4-bit key code with V4-tok, of every
# 2/4-bit value code (and block means) with K4-g64, and K4-g64 with V8-tok for reference.
"$PY" Tools/bench/quant_study.py --out "$O/quant_study.json" --max-positions 128 --max-rows 200 \
  --key-schemes ch,ch-frozen,g32,g64,g128,rot-ch,rot-g64,tok32,tok32-m,sym-ch,sym-ch-m,g64-q8 \
  --error-key-schemes ch,ch-frozen,g32,g64,g128,rot-ch,rot-g64,tok32-m,g64-q8 \
  --value-bits 2,4 --value-schemes tok,tok32,ch,g64,mean32,mean64 --pairs K4-g64+V8-tok \
  "${args[@]}"
"$PY" Tools/bench/quant_study.py --report "$O/quant_study.json" --m-sweep K4-g64+V4-tok,K4-g64+V2-g64 \
  | tee "$O/quant_study.md"
