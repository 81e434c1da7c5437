"""The mock model's logits in Python: the oracle the core tests compare against (c_core/src/mock.cpp)."""
from __future__ import annotations

import numpy as np


def mock_row(bias: np.ndarray, history, pos: int) -> np.ndarray:
    """Logits for an output at `pos` of a sequence whose cells hold history = [(token, position)]."""
    n = len(bias)
    h = 0
    for tok, p in history:
        if p <= pos:
            h = (h + tok * (p + 1)) % n
    return bias.astype(np.float32) - np.float32(0.25) * ((np.arange(n) - h) % n).astype(np.float32)
