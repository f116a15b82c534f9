#!/usr/bin/env bash
# Hot paths before and after a code change that should not move them (issue 11: the engine split
# into one SwiftPM target per layer): two kvrecall binaries, interleaved ROUNDS times, each timing
# search on a 32K head for every index kind (one thread, QPS at fixed knobs) and the session's
# per-token time. Prints each run's figures; compare the medians per line.
# Usage: Tools/bench/layers.sh BEFORE_BINARY AFTER_BINARY DATA_DIR   (DATA_DIR: keys.npy,
#        queries.npy, prefill_queries.npy of 32768 x 128, e.g. a slice of synth_p128k)
set -euo pipefail
A=$1; B=$2; D=$3; ROUNDS=${ROUNDS:-3}
run() {
  local K=$1 tag=$2
  for spec in "hnsw 64" "ivf 32" "tree 64" "lsh 2" "retrieval 128" "landmark 8"; do
    set -- $spec
    extra=""; [ "$1" = retrieval ] && extra="--prefill $D/prefill_queries.npy"
    $K bench ann --keys "$D/keys.npy" --queries "$D/queries.npy" --index "$1" --sweep "$2" --limit 200 $extra 2>/dev/null \
      | awk -v t="$tag" -v i="$1" '$1=="ood:" {print t, i, "qps", $4, "recall", $3}'
  done
}
for r in $(seq 1 "$ROUNDS"); do
  run "$A" before; run "$B" after
done
