#!/usr/bin/env bash
# Quick start: set up if needed, then run the main job on the default model.
# Until the server exists the main job is `llaisys generate` (a greedy chat reply through the engine, streamed).
# Extra arguments go to `llaisys generate`, e.g. scripts/run.sh "Write a haiku about CPUs".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec llaisys generate "$@"
