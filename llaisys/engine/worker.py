"""The worker: owns the model adapter and its core model; turns planned chunks into one batch."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core import Batch
from ..models import ModelAdapter
from .scheduler import Chunk


class Worker:
    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.model = adapter.model

    @property
    def kv_capacity(self) -> int:
        return self.model.kv_capacity

    @property
    def kv_used(self) -> int:
        return self.model.kv_used

    def execute(self, chunks: Sequence[Chunk]) -> np.ndarray:
        """Decode the chunks as one batch; returns the logits rows of the sampled chunks, in chunk order.

        The rows are a view of the core's buffer, valid until the next decode.
        """
        tokens, pos, seqs, wants = [], [], [], []
        for ch in chunks:
            tokens += ch.completion.tokens(ch.start, ch.start + ch.length)
            pos.append(np.arange(ch.start, ch.start + ch.length, dtype=np.int32))
            seqs.append(np.full(ch.length, ch.completion.seq_id, dtype=np.int32))
            want = np.zeros(ch.length, dtype=np.int8)
            want[-1] = ch.sample
            wants.append(want)
        self.model.decode(Batch(tokens, pos=np.concatenate(pos), seq_ids=np.concatenate(seqs),
                                logits=np.concatenate(wants)))
        return self.model.logits()

    def free(self, seq_ids: Sequence[int]) -> None:
        """Drop every cell of these sequences."""
        for seq in seq_ids:
            self.model.kv_seq_rm(seq)

    def truncate(self, seq: int, n_tokens: int) -> None:
        """Drop the sequence's cells from position n_tokens on."""
        self.model.kv_seq_rm(seq, n_tokens, -1)

    def share_prefix(self, src: int, dst: int, n_tokens: int) -> None:
        """Let sequence dst use src's cells for positions [0, n_tokens) (no copy: the cells are shared)."""
        self.model.kv_seq_cp(src, dst, 0, n_tokens)
