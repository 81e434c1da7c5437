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


def mock_greedy(prompt, steps: int, vocab: int = 300, keep_eos: bool = False) -> list[int]:
    """The mock's greedy continuation: next = sum of token * (position + 1) mod vocab, until EOS (vocab - 1)."""
    seq, out = list(prompt), []
    for _ in range(steps):
        token = sum(t * (p + 1) for p, t in enumerate(seq)) % vocab
        if token == vocab - 1:
            return out + [token] if keep_eos else out
        out.append(token)
        seq.append(token)
    return out


def held_cells(engine) -> int:
    """Cells the core holds for requests: all it holds minus the prefix cache's (which are free for the taking)."""
    return engine.worker.kv_used - engine.scheduler.kv_cached
