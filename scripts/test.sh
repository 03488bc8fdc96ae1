#!/usr/bin/env bash
# One command for the whole test suite: set up .venv with the dev, triton and bench extras, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,triton,bench  # bench: the peer libraries tests/test_optim_peers.py checks against
.venv/bin/ruff check .
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
