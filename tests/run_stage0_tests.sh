#!/usr/bin/env bash
# Stage 0 tests: the core API, KV cache, adapters and registry; with a model directory also
# parity against transformers and the greedy inference check.
#   tests/run_stage0_tests.sh PYTHON [MODEL_DIR]
# RUN_PARITY=auto (default) runs the parity tests when MODEL_DIR is given, 1 always, 0 never.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${1:?usage: tests/run_stage0_tests.sh PYTHON [MODEL_DIR]}
model_dir=${2:-}
run_parity=${RUN_PARITY:-auto}
if [ "$run_parity" = auto ]; then
  run_parity=$([ -n "$model_dir" ] && echo 1 || echo 0)
fi
tests=(tests/test_core_model_api.py tests/test_core_decode_batch.py tests/test_core_output_api.py
       tests/test_kv_cache.py tests/test_qwen2_adapter.py tests/test_model_registry.py tests/test_default_model.py)
if [ "$run_parity" = 1 ]; then
  tests+=(tests/test_core_parity.py tests/test_infer.py)
  [ -n "$model_dir" ] && export LLAISYS_TEST_MODEL="$model_dir"
fi
"$python" -m pytest -q "${tests[@]}"
if [ "$run_parity" = 1 ] && [ -n "$model_dir" ]; then
  "$python" tests/test_infer.py --model "$model_dir" --test
fi
