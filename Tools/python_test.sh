#!/usr/bin/env bash
# Tools/python_test.sh: installs the Python package (Python/, over libKVRecallC.so) into its own
# venv (Python/.venv, git-ignored) and runs its pytest tests, the decode-loop example included.
# Builds (incrementally) the release C library first, so the tests never run a stale one.
# Environment: PYTHON, the interpreter that creates the venv (default python3); KVRECALL_BUILD_DIR,
# the SwiftPM scratch path holding release/libKVRecallC.so (default .build).
set -euo pipefail
cd "$(dirname "$0")/.."
scratch="${KVRECALL_BUILD_DIR:-.build}"
swift build -c release --product KVRecallC --scratch-path "$scratch" >&2
library="$PWD/$scratch/release/libKVRecallC.so"
venv=Python/.venv
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c "import sys" 2>/dev/null; then
  rm -rf "$venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check numpy pytest
# Reinstalled each run, so the package's copy of the library is the build just made.
KVRECALL_LIBRARY="$library" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./Python
rm -rf Python/build Python/kvrecall.egg-info
# Run from outside Python/ so the installed package is the one imported; no KVRECALL_LIBRARY, so
# the package finds its own copy.
env -u KVRECALL_LIBRARY "$venv/bin/python" -m pytest -q -p no:cacheprovider "$PWD/Python/tests"
