#!/usr/bin/env bash
# The real decoder on KVRecall (Gemma 3 270M): every method judged by perplexity and the passkey
# test against exact attention, and decode speed at long contexts. Results go to
# Tools/bench/out/decoder_*.json, the plot to docs/decoder_methods.png.
#
# Usage: Tools/bench/decoder.sh [ppl|passkey|speed|plot|all] (default all)
# Environment: TEXT (default: the long text in Data/text), TRIALS (10), CONTEXTS (1024,4096,16384),
#              SPEED_CONTEXTS (8192,16384,32768), PREFILL (8192), TOKENS (512).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-all}
OUT=Tools/bench/out
mkdir -p "$OUT"
TEXT=${TEXT:-$(ls -S Data/text/*.txt | head -n 1)}
TRIALS=${TRIALS:-10}
CONTEXTS=${CONTEXTS:-1024,4096,16384}
SPEED_CONTEXTS=${SPEED_CONTEXTS:-8192,16384,32768}
PREFILL=${PREFILL:-8192}
TOKENS=${TOKENS:-512}
bash Tools/setup.sh
bash Tools/fetch_model.sh >/dev/null
swift build -c release --product kvrecall
K=.build/release/kvrecall

if [[ $WHAT == ppl || $WHAT == all ]]; then
  # One exact prefill of $PREFILL tokens shared by every method, then $TOKENS teacher-forced decode steps each.
  $K eval --text "$TEXT" --prefill "$PREFILL" --tokens "$TOKENS" --method all --fidelity --json > "$OUT/decoder_ppl.json"
fi
if [[ $WHAT == passkey || $WHAT == all ]]; then
  $K eval --passkey --context "$CONTEXTS" --trials "$TRIALS" --seed 1 --method all --json > "$OUT/decoder_passkey.json"
fi
if [[ $WHAT == speed || $WHAT == all ]]; then
  # Prefill N-64 tokens, then 64 decode steps: prefill tokens/s, index build time, ms/token, exact against retrieval.
  : > "$OUT/decoder_speed.jsonl"
  for N in ${SPEED_CONTEXTS//,/ }; do
    $K eval --text "$TEXT" --prefill $((N - 64)) --tokens 64 --method exact,retrieval --json \
      | python3 -c 'import json,sys; r=json.load(sys.stdin); [print(json.dumps(dict(x, context=int(sys.argv[1])))) for x in r]' "$N" \
      >> "$OUT/decoder_speed.jsonl"
  done
fi
if [[ $WHAT == plot || $WHAT == all ]]; then
  PY="$(bash Tools/python_env.sh | tail -n 1)"
  "$PY" Tools/bench/decoder_plot.py --out "$OUT" --png docs/decoder_methods.png
fi
