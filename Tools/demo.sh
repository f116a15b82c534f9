#!/usr/bin/env bash
# One command: install what is missing, build (release) and run the demo on the bundled sample.
# With Gemma 3 270M in the model cache (Tools/fetch_model.sh puts it there), the demo also
# generates a few tokens after a bundled text with exact and retrieval attention side by side.
set -euo pipefail
cd "$(dirname "$0")/.."
bash Tools/setup.sh
swift build -c release --product kvrecall
.build/release/kvrecall demo "$@"
MODEL="${KVRECALL_MODELS:-$HOME/.cache/kvrecall/models}/gemma-3-270m-q4_k_m.gguf"
if [[ -f "$MODEL" ]]; then
  echo
  echo "== Gemma 3 270M on KVRecall: the same prompt continued with exact and retrieval attention =="
  .build/release/kvrecall generate --prompt-file Data/text/short.txt --max-tokens 24 --method exact,retrieval
else
  echo
  echo "(Gemma 3 270M is not in the model cache: run 'bash Tools/fetch_model.sh' to add a real decoder to the demo.)"
fi
