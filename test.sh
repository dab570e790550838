#!/usr/bin/env bash
# The test command: offline, CPU-only, the whole suite.
set -euo pipefail
cd "$(dirname "$0")"
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check customshift tests benchmarks scripts
python -m pytest -q "$@"
