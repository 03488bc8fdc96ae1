#!/usr/bin/env bash
# One command for the main job: set up .venv, then train the demo model (W&B offline).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/optkit demo "$@"
