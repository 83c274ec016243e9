#!/usr/bin/env bash
# Everything the test suite needs on a fresh Debian machine, then the tests. CI (.ci/run) calls this script.
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  need=()
  command -v espeak-ng >/dev/null || need+=(espeak-ng)
  command -v chromium >/dev/null || need+=(chromium)
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
      || echo "warning: could not install ${need[*]}; tests that need them will skip" >&2
  fi
fi
bash scripts/install.sh dev,serve,nemo
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
