#!/usr/bin/env bash
# Quick start: set up if needed, then serve the default model: the chat page at http://127.0.0.1:8000/
# and the OpenAI-compatible API under /v1. Extra arguments go to `llaisys serve`
# (e.g. scripts/run.sh --port 8080 --api-key KEY; --host 0.0.0.0 to serve other machines).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec llaisys serve "$@"
