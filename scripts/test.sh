#!/usr/bin/env bash
# Quick start: set up if needed (Chromium too, for the chat page's browser test), then run the whole
# test suite, the default model included.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/install_chromium.sh
export PATH="$PWD/.venv/bin:$PATH"
model_dir=$(llaisys fetch-model)
export LLAISYS_TEST_MODEL="$model_dir"
status=0
python -m pytest -ra "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "test: pytest collected no tests" >&2
  exit 1
fi
exit "$status"
