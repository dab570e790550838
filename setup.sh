#!/usr/bin/env bash
# One command to set up a development machine: a virtual environment in .venv with the CPU build of
# torch pinned (an unpinned torch pulls a multi-GB CUDA build) and the package in editable mode.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# Headless Chromium for the web UI's browser test (Debian packages; skipped where apt is absent).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
    || echo "setup.sh: could not install chromium; the browser test will be skipped" >&2
fi
echo "setup.sh: done. Activate with '. .venv/bin/activate'; run the tests with './test.sh'."
