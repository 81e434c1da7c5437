#!/usr/bin/env bash
# Build the portable core (-Dnative=false: no AVX, the generic vector code) and run the kernel and
# core tests against it, so the path other CPUs take stays correct (and batch-invariant).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
pkg=$(bash scripts/build_variant.sh build-portable -Dnative=false)
exec python scripts/pytest_with_package.py "$pkg" -q -p no:cacheprovider \
  tests/test_quant_kernels.py tests/test_core_decode_batch.py tests/test_core_verify_rows.py \
  tests/test_core_parity.py tests/test_core_shared_weights.py "$@"
