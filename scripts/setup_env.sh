#!/usr/bin/env bash
# Creates (or reuses) .venv and installs the package with the tested versions.
# Usage: scripts/setup_env.sh [extras]   e.g. scripts/setup_env.sh dev,triton
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# Install torch first, pinned, so that no dependency can pull a CUDA build.
find_links=()
[ -d /opt/wheels ] && find_links=(--find-links /opt/wheels)
python -m pip install -q "${find_links[@]}" -c constraints.txt torch
target="."
[ -n "$extras" ] && target=".[${extras}]"
python -m pip install -q "${find_links[@]}" -c constraints.txt -e "$target"
