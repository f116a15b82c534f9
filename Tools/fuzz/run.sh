#!/usr/bin/env bash
# libFuzzer for the .npy and .safetensors parsers (issue 7). Builds one binary per parser with
# `swiftc -sanitize=fuzzer,address` from Tools/fuzz/FuzzTarget.swift plus Sources/KVRecallFormats/*.swift
# (outside SwiftPM), seeds a corpus with small valid files, and runs each for a bounded time.
#
#   bash Tools/fuzz/run.sh [seconds per parser, default 60] [jobs, default 1]
#
# Output: .build-fuzz/ (git-ignored): binaries, corpora, and crash-* files for any finding;
# the closing libFuzzer statistics of each run are printed. Exit status is non-zero on a finding.
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-60}"
jobs="${2:-1}"
out=.build-fuzz
mkdir -p "$out"

le() {  # le VALUE BYTES: VALUE as BYTES little-endian bytes, printf escapes
  local v=$1 n=$2 s="" i
  for ((i = 0; i < n; i++)); do s+="\\x$(printf %02x $(((v >> (8 * i)) & 255)))"; done
  printf '%s' "$s"
}

npy_seed() {  # npy_seed FILE DESCR SHAPE PAYLOAD-ESCAPES
  local dict="{'descr': '$2', 'fortran_order': False, 'shape': $3, }"
  local len=$((${#dict} + 1))
  local pad=$(((64 - (10 + len) % 64) % 64))
  printf "\x93NUMPY\x01\x00$(le $((len + pad)) 2)%s%*s\n$4" "$dict" "$pad" "" > "$1"
}

st_seed() {  # st_seed FILE JSON PAYLOAD-ESCAPES
  local json=$2
  local pad=$(((8 - ${#json} % 8) % 8))
  printf "$(le $((${#json} + pad)) 8)%s%*s$3" "$json" "$pad" "" > "$1"
}

one="\x00\x00\x80\x3f"   # 1.0f
half="\x00\x3c"          # 1.0 as f16
status=0
for target in npy safetensors; do
  bin="$out/fuzz-$target"
  define=$([ "$target" = npy ] && echo FUZZ_NPY || echo FUZZ_SAFETENSORS)
  echo "== building $bin"
  swiftc -sanitize=fuzzer,address -parse-as-library -O -D "$define" \
    Tools/fuzz/FuzzTarget.swift Sources/KVRecallFormats/*.swift -o "$bin" 2>&1 | { grep -v "Cannot export local symbol" || true; }
  corpus="$out/corpus-$target"
  mkdir -p "$corpus"
  if [ "$target" = npy ]; then
    npy_seed "$corpus/seed-f32.npy" "<f4" "(2, 3)" "$one$one$one$one$one$one"
    npy_seed "$corpus/seed-f16.npy" "<f2" "(2, 2, 2)" "$half$half$half$half$half$half$half$half"
  else
    st_seed "$corpus/seed.safetensors" \
      '{"__metadata__":{"format":"pt"},"k":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"v":{"dtype":"F16","shape":[2,2],"data_offsets":[24,32]}}' \
      "$one$one$one$one$one$one$half$half$half$half"
  fi
  echo "== running $bin for ${seconds}s"
  set +e
  parallel=()
  [ "$jobs" -gt 1 ] && parallel=(-jobs="$jobs" -workers="$jobs")
  (cd "$out" && "./fuzz-$target" -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
      "${parallel[@]}" -print_final_stats=1 -artifact_prefix="crash-$target-" \
      -dict="../Tools/fuzz/$target.dict" "corpus-$target") > "$out/log-$target.txt" 2>&1
  rc=$?
  set -e
  grep -E "^(stat::|Done|#[0-9]+ *DONE)|ERROR|Fatal|crash-" "$out/log-$target.txt" | tail -15 || true
  echo "corpus: $(ls "$corpus" | wc -l) files; exit status $rc"
  [ "$rc" -eq 0 ] || status=1
done
exit $status
