#!/usr/bin/env bash
# One command: install what is missing, build (release) and run the demo on the bundled sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash Tools/setup.sh
swift build -c release --product kvrecall
.build/release/kvrecall demo "$@"
