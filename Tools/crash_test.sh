#!/usr/bin/env bash
# Long forms of the reliability tests (issue 7), through the same Swift test code the suite runs
# in short form (Tests/KVRecallTests/ReliabilityTests.swift, MalformedInputTests.swift):
#
#   - SIGKILL `kvrecall ingest` at random moments KILLS times (default 60) and `kvrecall build`
#     BUILD_KILLS times (default 50), reopening and checking the store after every kill;
#   - the concurrency soak for SOAK seconds (default 60);
#   - the parser mutation fuzzer for FUZZ inputs per parser (default 200000).
#
#   bash Tools/crash_test.sh                 # everything, with the debug build
#   KILLS=200 BUILD_KILLS=0 SOAK=0 FUZZ=0 bash Tools/crash_test.sh    # only ingest kills
#   RELEASE=1 bash Tools/crash_test.sh       # spawn a release kvrecall (faster runs, other timing)
#   SEED=42 ...                              # another sequence of kill delays
#
# Needs only the Swift toolchain and the packages Tools/setup.sh installs. The figures are printed
# as one line per part (crash/ingest, crash/build, soak, fuzz) and recorded in docs/RELIABILITY.md.
set -euo pipefail
cd "$(dirname "$0")/.."

KILLS="${KILLS:-60}"
BUILD_KILLS="${BUILD_KILLS:-50}"
SOAK="${SOAK:-60}"
FUZZ="${FUZZ:-200000}"
SEED="${SEED:-7}"

bash Tools/setup.sh >/dev/null
swift build --build-tests 2>&1 | tail -1
export KVRECALL_CRASH_SEED="$SEED"
if [ "${RELEASE:-0}" = 1 ]; then
  swift build -c release --product kvrecall 2>&1 | tail -1
  export KVRECALL_BIN="$PWD/.build/release/kvrecall"
  echo "spawning $KVRECALL_BIN"
fi

log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
run() {  # run FILTER: one suite or test of the Swift suite, printing its figure lines
  if swift test --skip-build --filter "$1" >"$log" 2>&1; then
    grep -E "^(crash/|soak:|fuzz |malformed )" "$log" || true
    grep -E "Test run with" "$log" | tail -1
  else
    status=1
    grep -vE "^(◇|↳)" "$log" | tail -60
  fi
}

if [ "$KILLS" -gt 0 ]; then
  KVRECALL_CRASH_KILLS="$KILLS" run "CrashSafetyTests/ingestKilledAtRandomMoments"
fi
if [ "$BUILD_KILLS" -gt 0 ]; then
  KVRECALL_BUILD_KILLS="$BUILD_KILLS" run "CrashSafetyTests/buildKilledAtRandomMoments"
fi
if [ "$SOAK" != 0 ]; then
  KVRECALL_SOAK_SECONDS="$SOAK" run "ConcurrencySoakTests"
fi
if [ "$FUZZ" -gt 0 ]; then
  KVRECALL_FUZZ_ITERATIONS="$FUZZ" KVRECALL_FUZZ_SECONDS=600 run "MalformedInputTests/fuzz"
fi
exit $status
