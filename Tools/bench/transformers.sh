#!/usr/bin/env bash
# kvrecall.transformers on Gemma 3 270M (transformers' GGUF loading of the file Tools/fetch_model.sh
# fetches) against transformers' own attention (sdpa, eager) and DynamicCache, on the same token ids.
# Results: one JSON line per row in Tools/bench/out/transformers_<check>.jsonl; docs/BENCHMARKS.md
# ("Hugging Face transformers on KVRecall") records them.
#
# Usage: Tools/bench/transformers.sh [greedy|ppl1k|ppl8k|speed|passkey|all] (default all)
#   greedy   64 greedy tokens after a 1024-token prompt: method exact against sdpa and eager
#   ppl1k    perplexity of 256 tokens after a 1024-token prefill: transformers' own against exact
#   ppl8k    perplexity of 256 tokens after an 8192-token prefill: transformers' own against the
#            default method (auto) and exact, with decode ms/token
#   speed    decode ms/token after an 8192-token prefill, transformers' own, auto and exact, steps interleaved
#   passkey  passkey at 1K and 4K (TRIALS trials, default 10): transformers' own against auto
# Environment: TRIALS (10), THREADS (torch threads, default 1: on this shared 2-core machine two OpenMP
# threads made a decode step 3-8x slower than one while other jobs ran; 0 = all cores).
set -euo pipefail
cd "$(dirname "$0")/../.."
WHAT=${1:-all}
OUT=Tools/bench/out
mkdir -p "$OUT"
TRIALS=${TRIALS:-10}
bash Tools/fetch_model.sh >/dev/null
PY="$(bash Tools/python_test.sh --install-only | tail -n 1)"
B=(nice "$PY" Tools/bench/transformers_bench.py --threads "${THREADS:-1}")
SHORT=Data/text/short.txt
LONG=Data/text/persuasion_vol1.txt
run() { local name=$1; shift; echo "transformers.sh: $name: $*" >&2; "${B[@]}" "$@" | tee "$OUT/transformers_$name.jsonl"; }
[[ $WHAT == greedy || $WHAT == all ]] && run greedy greedy --text $SHORT --prompt 1024 --new-tokens 64 --methods exact,transformers,eager
[[ $WHAT == ppl1k || $WHAT == all ]] && run ppl1k ppl --text $SHORT --prefill 1024 --tokens 256 --methods transformers,exact
[[ $WHAT == ppl8k || $WHAT == all ]] && run ppl8k ppl --text $LONG --prefill 8192 --tokens 256 --methods transformers,auto,exact
[[ $WHAT == speed || $WHAT == all ]] && run speed speed --text $LONG --prefill 8192 --tokens 65 --methods transformers,auto,exact
[[ $WHAT == passkey || $WHAT == all ]] && run passkey passkey --contexts 1024,4096 --trials "$TRIALS" --methods transformers,auto
exit 0
