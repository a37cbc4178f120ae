#!/usr/bin/env bash
# Runs a command with the environment the tests expect on a CPU machine.
set -euo pipefail
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/igpt-torch-extensions}"
export MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
export TOKENIZERS_PARALLELISM=false
exec "$@"
