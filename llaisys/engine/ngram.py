"""N-gram prompt lookup: the draft-free drafter (vLLM's ngram proposer, llama.cpp's ngram-simple).

The longest suffix of a sequence's tokens (prompt and output so far), of min_n to max_n tokens, that
also occurs earlier in them; the tokens that followed its latest earlier occurrence are the draft.
Code edits, quotes and summaries repeat their input, so a model rewriting a function mostly copies
it: those drafts are accepted in long runs.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from .request import Completion


def propose(tokens: np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest matching suffix."""
    size = len(tokens)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        # Windows starting before size - n: each occurrence is followed by at least one token.
        windows = sliding_window_view(tokens[:size - 1], n)
        hits = np.flatnonzero((windows == tokens[size - n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
    """Prompt lookup over a completion's tokens, matching suffixes of min_n to max_n tokens."""

    min_n: int
    max_n: int

    def propose(self, c: Completion, k: int) -> list[int]:
        tokens = np.asarray(c.request.prompt_ids + c.output_ids, dtype=np.int64)
        return propose(tokens, k, self.min_n, self.max_n)
