"""The worker: owns the model adapter and its core model; turns planned chunks into one batch."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core import Batch
from ..models import ModelAdapter
from .kv_ops import KvOp, SeqCp
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
        """Decode the chunks as one batch; returns the logits rows of the sampled chunks (every row of a
        verify), in chunk order.

        The rows are a view of the core's buffer, valid until the next decode.
        """
        tokens, pos, seqs, wants = [], [], [], []
        for ch in chunks:
            tokens += ch.completion.tokens(ch.start, ch.start + ch.length) + list(ch.draft)
            pos.append(np.arange(ch.start, ch.start + ch.rows, dtype=np.int32))
            seqs.append(np.full(ch.rows, ch.completion.seq_id, dtype=np.int32))
            want = np.zeros(ch.rows, dtype=np.int8)
            want[ch.length - 1:] = ch.sample
            wants.append(want)
        self.model.decode(Batch(tokens, pos=np.concatenate(pos), seq_ids=np.concatenate(seqs),
                                logits=np.concatenate(wants)))
        return self.model.logits()

    def apply(self, ops: Sequence[KvOp]) -> None:
        """Apply KV operations to the core's cell map, in order."""
        for op in ops:
            if isinstance(op, SeqCp):
                self.model.kv_seq_cp(op.src, op.dst, op.p0, op.p1)
            else:
                self.model.kv_seq_rm(op.seq, op.p0, op.p1)
