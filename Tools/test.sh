#!/usr/bin/env bash
# One command: install what is missing, build and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash Tools/setup.sh
swift build
swift build --build-tests
swift test --skip-build
