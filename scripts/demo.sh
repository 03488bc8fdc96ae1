#!/usr/bin/env bash
# One command for the main job: set up .venv (with the examples extra, so every script in examples/ and
# `optkit schedule --plot` run in it), then train the demo model (W&B offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh examples
exec .venv/bin/optkit demo "$@"
