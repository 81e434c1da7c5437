"""The C API fuzz (core_api_fuzz.py) with a fixed seed: every call's return code and the cache's state
after it as kv_cell_model.CellModel says; scripts/sanitize.sh runs it against the ASan/UBSan build.
LLAISYS_FUZZ_OPS (default 3000) and LLAISYS_FUZZ_SEED (default 0) make a longer or another run."""
from __future__ import annotations

import os

from core_api_fuzz import CoreApiFuzzer


def test_random_calls_agree_with_the_cell_model():
    ops = int(os.environ.get("LLAISYS_FUZZ_OPS", "3000"))
    seed = int(os.environ.get("LLAISYS_FUZZ_SEED", "0"))
    counts = CoreApiFuzzer(seed).run(ops)
    print(f"\n{ops} calls (seed {seed}):", ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    # The run reached the interesting outcomes, not only refusals.
    for outcome in ("decode: 0", "decode: -1", "decode: 1", "add: 0", "add: -1", "add_far: -1", "rm: 1", "cp: 0",
                    "keep: 0", "null model"):
        assert counts[outcome] > 0, f"the fuzz never saw {outcome!r}: {dict(counts)}"
