#!/usr/bin/env bash
# Creates (or reuses) .venv and installs the package with the tested versions, saying what it does.
# Usage: scripts/setup_env.sh [extras]   e.g. scripts/setup_env.sh dev,triton
#
# Skips pip when .venv is already current: .venv/.optkit-setup-stamp holds a hash of constraints.txt,
# pyproject.toml, this script and the venv's Python version (line 1) and the extras installed with them
# (line 2). Any change there, or an extra not installed yet, reinstalls (the extras installed before
# are kept). The stamp is removed before pip runs and written only after every install succeeded, so
# a failed or interrupted setup reruns. OPTKIT_SETUP_FORCE=1 reinstalls anyway.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
stamp=.venv/.optkit-setup-stamp
start=$SECONDS
say() { echo "setup: $*" >&2; }
# comma-separated names -> sorted, unique, comma-separated
normalize() { tr ',' '\n' <<<"$1" | sed -e 's/[[:space:]]//g' -e '/^$/d' | sort -u | paste -sd, - || true; }

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PY" --version 2>&1) ..."
  "$PY" -m venv .venv
elif ! .venv/bin/python -c "" 2>/dev/null; then
  say ".venv/bin/python does not run (was its Python removed?); delete .venv and run this again"
  exit 1
fi
VPY=.venv/bin/python

key="$("$VPY" - <<'PYEOF'
import hashlib
import sys

digest = hashlib.sha256(sys.version.encode())
for path in ("constraints.txt", "pyproject.toml", "scripts/setup_env.sh"):
    with open(path, "rb") as f:
        digest.update(path.encode() + b"\0" + f.read() + b"\0")
print(digest.hexdigest())
PYEOF
)"
wanted="$(normalize "$extras")"
installed=""
if [ -f "$stamp" ]; then
  installed="$(sed -n 2p "$stamp")"
  if [ -z "${OPTKIT_SETUP_FORCE:-}" ] && [ "$(sed -n 1p "$stamp")" = "$key" ]; then
    missing="$(comm -23 <(tr ',' '\n' <<<"$wanted" | sed '/^$/d') <(tr ',' '\n' <<<"$installed" | sed '/^$/d'))"
    if [ -z "$missing" ]; then
      say ".venv is current (extras: ${installed:-none}); nothing to install"
      exit 0
    fi
  fi
fi
all="$(normalize "$installed,$wanted")"  # keep what an earlier setup installed

rm -f "$stamp"
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
say "upgrading pip ..."
"$VPY" -m pip install -q --upgrade pip >/dev/null
# Install torch first, pinned, so that no dependency can pull a CUDA build.
say "installing $(grep -m1 '^torch==' constraints.txt || echo torch) (CPU build) ..."
"$VPY" -m pip install -q ${find_links[@]+"${find_links[@]}"} -c constraints.txt torch
target="."
[ -n "$all" ] && target=".[${all}]"
say "installing lightning_optkit${all:+[$all]} and its dependencies (a minute or two on a fresh .venv) ..."
"$VPY" -m pip install -q ${find_links[@]+"${find_links[@]}"} -c constraints.txt -e "$target"
printf '%s\n%s\n' "$key" "$all" >"$stamp"
say "done in $((SECONDS - start)) s (extras: ${all:-none})"
