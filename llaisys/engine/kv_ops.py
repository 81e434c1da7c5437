"""KV operations: the changes to the core's cell map that the scheduler decides and the worker applies."""
from __future__ import annotations

import dataclasses
from typing import Union


@dataclasses.dataclass(frozen=True)
class SeqRm:
    """Drop sequence seq's cells at positions [p0, p1) (p1 = -1: to the end)."""

    seq: int
    p0: int
    p1: int


@dataclasses.dataclass(frozen=True)
class SeqCp:
    """Let sequence dst use src's cells at positions [p0, p1) (the cells are shared, not copied)."""

    src: int
    dst: int
    p0: int
    p1: int


KvOp = Union[SeqRm, SeqCp]
