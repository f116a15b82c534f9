#!/usr/bin/env bash
# Gemma 3 270M traces at 32K tokens on a text the defaults were NOT tuned on (issue 21, part 6).
#
# The defaults (budgets, calibration ladders, auto) were measured on Jane Austen's *Persuasion*
# (Data/text). This script captures the three global layers over a different kind of English: the
# Vim user manual (technical documentation with commands, examples and tables), as shipped by the
# Debian package vim-runtime (bookworm: 2:9.0.1378-2+deb12u2) in /usr/share/vim/vim90/doc.
#
#   text      usr_01.txt .. usr_90.txt (the 35 chapters, not usr_toc.txt), concatenated in file-name
#             order (LC_ALL=C), unchanged: 631,674 bytes, sha256 below, 173,040 Gemma tokens with BOS
#   licence   "The Vim user manual and reference manual are Copyright (c) 1988-2003 by Bram
#             Moolenaar. This material may be distributed only subject to the terms and conditions
#             set forth in the Open Publication License, v1.0 or later." (usr_01.txt, 01.4). The
#             text and the traces stay in the git-ignored output folder; nothing of it is committed.
#   capture   kvrecall capture --tokens 32768 (BOS + the first 32767 tokens) --layers 5,11,17
#             --decode-queries 256 --dtype f16: keys/values [32768, 256], prefill queries of
#             positions 0..32511 and decode queries of positions 32512..32767 (x 4 query heads)
#
# Usage:  bash Tools/bench/capture32k.sh [OUT]        (default OUT: Tools/bench/out/gemma32k)
# Env:    TOKENS (32768), DECODE (256), DOC (/usr/share/vim/vim90/doc), KVRECALL (the CLI; default:
#         builds .build/release/kvrecall)
# Took 772 s on this shared 2-core machine (exact prefill of 32K tokens); run it with
# `nice` if others share the machine. Writes 289 MB (f16: per layer keys and values 16 MB each, prefill queries 67 MB).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-Tools/bench/out/gemma32k}
TOKENS=${TOKENS:-32768}
DECODE=${DECODE:-256}
DOC=${DOC:-/usr/share/vim/vim90/doc}
EXPECTED_SHA=fe9a00b6565a2716a5689be7d668bd4f77b51db3ea2e32bbaa8563f95fd05c7d

if [[ ! -f "$DOC/usr_01.txt" ]]; then
  echo "capture32k: $DOC/usr_01.txt not found; install it with: apt-get install vim-runtime" >&2
  exit 1
fi
mkdir -p "$OUT"
TEXT="$OUT/vim_user_manual.txt"
# The chapters in file-name order (usr_01 .. usr_90), byte for byte.
(cd "$DOC" && LC_ALL=C ls usr_[0-9][0-9].txt | LC_ALL=C sort | xargs cat) > "$TEXT"
SHA=$(sha256sum "$TEXT" | cut -d' ' -f1)
VER=$(dpkg-query -W -f='${Version}' vim-runtime 2>/dev/null || echo unknown)
echo "capture32k: text $TEXT: $(wc -c < "$TEXT") bytes, sha256 $SHA (vim-runtime $VER)" >&2
if [[ "$SHA" != "$EXPECTED_SHA" ]]; then
  echo "capture32k: NOTE: sha256 differs from the one measured in docs/QUANT_STUDY.md ($EXPECTED_SHA);" \
       "another vim-runtime version gives another text (the figures will differ)" >&2
fi

if [[ -z "${KVRECALL:-}" ]]; then
  bash Tools/fetch_model.sh >/dev/null
  swift build -c release --product kvrecall >&2
  KVRECALL=.build/release/kvrecall
fi
start=$(date +%s)
"$KVRECALL" capture --text "$TEXT" --tokens "$TOKENS" --layers 5,11,17 --decode-queries "$DECODE" \
  --dtype f16 --out "$OUT"
cat > "$OUT/PROVENANCE.txt" <<EOF
text: Vim user manual, usr_[0-9][0-9].txt from $DOC concatenated in C-locale name order
vim-runtime: $VER
text sha256: $SHA  ($(wc -c < "$TEXT") bytes)
command: $KVRECALL capture --text $TEXT --tokens $TOKENS --layers 5,11,17 --decode-queries $DECODE --dtype f16 --out $OUT
seconds: $(( $(date +%s) - start ))
EOF
echo "capture32k: done in $(( $(date +%s) - start )) s -> $OUT" >&2
