"""Greedy generation for one sequence straight on a model adapter.

The engine (scheduler, sampling, batching) builds on the same core calls; this module is the
smallest complete path from a prompt to text, used by `llaisys generate` and the parity checks.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np

from .core import Batch
from .models import ModelAdapter


def greedy_token_ids(adapter: ModelAdapter, prompt_ids: Sequence[int], max_tokens: int,
                     seq_id: int = 0) -> Iterator[int]:
    """Yield greedily chosen tokens until an end-of-sequence token (not yielded) or max_tokens.

    The prompt is fed in chunks of the model's batch size; the sequence's KV cells are freed at the end.
    """
    model = adapter.model
    if not prompt_ids:
        raise ValueError("prompt_ids is empty")
    if len(prompt_ids) + max_tokens > adapter.max_context:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context "
                         f"({adapter.max_context})")
    n_batch = model.params.n_batch
    try:
        for start in range(0, len(prompt_ids), n_batch):
            chunk = prompt_ids[start:start + n_batch]
            model.decode(Batch(chunk, seq_ids=seq_id))  # logits for the chunk's last token only
        for _ in range(max_tokens):
            token = int(np.argmax(model.logits_ith(-1)))
            if token in adapter.eos_token_ids:
                return
            yield token
            model.decode(Batch([token], seq_ids=seq_id))
    finally:
        model.kv_seq_rm(seq_id)


def stream_text(decode: Callable[[Sequence[int]], str], token_ids: Iterator[int]) -> Iterator[str]:
    """Turn a token stream into text pieces that concatenate to decode(all ids).

    A piece ending in U+FFFD (a UTF-8 character split across tokens) is held back until it completes.
    """
    ids: list[int] = []
    emitted = ""
    for token in token_ids:
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        yield text[len(emitted):]
        emitted = text
    text = decode(ids)
    if len(text) > len(emitted):
        yield text[len(emitted):]
