#!/usr/bin/env bash
# Installs what KVRecall needs to build and test, when missing; does nothing when all is present.
# Debian packages: OpenBLAS (CBLAS), LMDB, libedit (REPL line editing), pkg-config.
set -euo pipefail

packages=(libopenblas-dev liblmdb-dev libedit-dev pkg-config)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v swift >/dev/null || { echo "setup: swift is not on PATH (Swift 6 toolchain required)" >&2; exit 1; }
pkg-config --exists lmdb openblas libedit || { echo "setup: pkg-config cannot find lmdb, openblas or libedit" >&2; exit 1; }
