#!/usr/bin/env bash
# Tools/python_test.sh: installs the Python package (Python/, over libKVRecallC.so) into its own
# venv (Python/.venv, git-ignored) with the transformers extra (see below) and runs its pytest tests,
# the decode-loop and transformers examples included.
# Builds (incrementally) the release C library first, so the tests never run a stale one.
# Environment: PYTHON, the interpreter that creates the venv (default python3); KVRECALL_BUILD_DIR,
# the SwiftPM scratch path holding release/libKVRecallC.so (default .build).
# `Tools/python_test.sh --install-only` installs everything and runs no test (Tools/bench/transformers.sh).
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

# The transformers extra (kvrecall.transformers: torch, transformers, gguf, accelerate), unless
# KVRECALL_SKIP_TRANSFORMERS=1; its tests skip with the reason when it is absent. PyPI's Linux torch
# wheels need several GB of CUDA libraries even to import (with --no-deps: "libcublasLt.so not found"),
# so the CPU-only wheel is tried first (pip finds torch==2.13.0+cpu through its find-links on this
# machine kind, 190 MB, pure-Python dependencies only); PyPI's torch with its CUDA dependencies is
# the fallback. A stamp keeps later runs from reinstalling.
install_transformers_extra() {
  local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
  local req=Python/requirements-transformers.txt stamp="$venv/.transformers-extra"
  local want; want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] &&
     "$venv/bin/python" -c 'import torch, transformers, gguf, accelerate' 2>/dev/null; then
    return 0
  fi
  local start=$SECONDS
  if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    if "${pip[@]}" --only-binary=:all: "torch==2.13.0+cpu" >&2; then
      echo "python_test: torch 2.13.0+cpu (CPU-only wheel) installed" >&2
    else
      echo "python_test: no CPU-only torch wheel reachable; installing PyPI's torch==2.13.0 with its CUDA libraries (several GB)" >&2
      "${pip[@]}" "torch==2.13.0" >&2 || return 1
    fi
  fi
  "${pip[@]}" -r "$req" >&2 || return 1
  # Verified by use, not by pip's word: import everything and run a matrix product on the CPU.
  "$venv/bin/python" -c 'import torch, transformers, gguf, accelerate
x = torch.randn(64, 64); assert torch.isfinite(x @ x).all()
print("python_test: torch", torch.__version__, "transformers", transformers.__version__, "gguf ok")' >&2 || return 1
  echo "$want" >"$stamp"
  echo "python_test: transformers extra installed in $((SECONDS - start)) s" >&2
}
if [[ "${KVRECALL_SKIP_TRANSFORMERS:-0}" != 1 ]]; then
  install_transformers_extra || echo "python_test: WARNING: the transformers extra could not be installed; its tests will be skipped" >&2
fi
# Reinstalled each run, so the package's copy of the library is the build just made.
KVRECALL_LIBRARY="$library" "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --force-reinstall --no-deps ./Python
rm -rf Python/build Python/kvrecall.egg-info
[[ "${1:-}" == --install-only ]] && { echo "$PWD/$venv/bin/python"; exit 0; }
# Run from outside Python/ so the installed package is the one imported; no KVRECALL_LIBRARY, so
# the package finds its own copy.
env -u KVRECALL_LIBRARY "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider "$PWD/Python/tests"
