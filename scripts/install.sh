#!/usr/bin/env bash
# Set up a virtual environment in .venv with trt-asr-engine installed (editable).
#   bash scripts/install.sh            # runtime only
#   bash scripts/install.sh dev,serve  # with extras (dev = tests; nemo = NeMo reference for parity tests)
# torch is pinned to 2.13.0 first (constraints.txt), so pip never swaps it for another build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1:-}
[ -x .venv/bin/python ] || python3 -m venv .venv
py=.venv/bin/python
$py -m pip install -q --upgrade pip >/dev/null 2>&1 || true
$py -c "import torch" 2>/dev/null || $py -m pip install -q torch==2.13.0
spec="."
[ -n "$extras" ] && spec=".[$extras]"
$py -m pip install -q -c constraints.txt -e "$spec"
