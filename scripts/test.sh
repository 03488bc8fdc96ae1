#!/usr/bin/env bash
# One command for the whole test suite: set up .venv with dev and triton extras, lint, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh dev,triton
.venv/bin/ruff check .
export WANDB_MODE=offline WANDB_SILENT=true
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
