"""The core's KV cell cache (c_core/src/kv_cells.cpp, with the batch checks of model.cpp) in Python:
the model that test_kv_cache.py's state machine and the C API fuzz (core_api_fuzz.py) check the
mock model's cache against, return code by return code."""
from __future__ import annotations

from typing import Optional

import numpy as np

from mock_oracle import mock_row

MAX_POS = 2**31 - 2  # KvCells::kMaxPos: the largest position a cell may hold


class CellModel:
    """Each cell is None (free) or [pos, set of seqs, token]; bias is the mock model's logit_bias."""

    def __init__(self, n_ctx: int, n_seq: int, n_batch: int, bias: np.ndarray):
        self.n_ctx, self.n_seq, self.n_batch, self.bias = n_ctx, n_seq, n_batch, bias
        self.n_vocab = len(bias)
        self.cells: list = [None] * n_ctx

    @property
    def used(self) -> int:
        return sum(c is not None for c in self.cells)

    def valid(self, s: int) -> bool:
        return 0 <= s < self.n_seq

    def of(self, s):
        return [i for i, c in enumerate(self.cells) if c is not None and s in c[1]]

    def pos_max(self, s):
        if not self.valid(s):
            return -1
        return max((self.cells[i][0] for i in self.of(s)), default=-1)

    def pos_min(self, s):
        if not self.valid(s):
            return -1
        return min((self.cells[i][0] for i in self.of(s)), default=-1)

    def find_free(self, n):
        free = [i for i, c in enumerate(self.cells) if c is None]
        return free[:n] if len(free) >= n else None

    @staticmethod
    def norm(p0, p1):
        return (0 if p0 < 0 else p0), (2 ** 31 - 1 if p1 < 0 else p1)

    def decode(self, tokens, pos, seqs: Optional[list], mask) -> tuple[int, Optional[np.ndarray]]:
        """Returns (code, expected logits rows). seqs None: every token in sequence 0; a token's seqs
        entry None: its sequence pointer is NULL (invalid)."""
        n = len(tokens)
        if not 1 <= n <= self.n_batch:
            return -1, None
        seqs = [[0]] * n if seqs is None else seqs
        nxt: dict[int, int] = {}
        members: dict[int, list[int]] = {}  # batch indices of each sequence so far
        positions = []
        for i in range(n):
            if not 0 <= tokens[i] < self.n_vocab:
                return -1, None
            ss = seqs[i]
            if not ss:
                return -1, None
            for k, s in enumerate(ss):
                if not self.valid(s) or s in ss[:k]:
                    return -1, None
                nxt.setdefault(s, self.pos_max(s) + 1)
            p = pos[i] if pos is not None else nxt[ss[0]]
            if not 0 <= p <= MAX_POS:
                return -1, None
            for k, s in enumerate(ss):
                if p != nxt[s]:
                    return -1, None
                nxt[s] = p + 1
                # a shared token joins only sequences with the same cells and the same batch tokens
                if k > 0 and (members.get(s, []) != members.get(ss[0], []) or set(self.of(s)) != set(self.of(ss[0]))):
                    return -1, None
            for s in ss:
                members.setdefault(s, []).append(i)
            positions.append(p)
        free = self.find_free(n)
        if free is None:
            return 1, None
        for i in range(n):
            self.cells[free[i]] = [positions[i], set(seqs[i]), tokens[i]]
        out = [i == n - 1 for i in range(n)] if mask is None else mask
        rows = []
        for i in range(n):
            if out[i]:
                s = seqs[i][0]
                history = [(self.cells[c][2], self.cells[c][0]) for c in self.of(s)]
                rows.append(mock_row(self.bias, history, positions[i]))
        return 0, (np.stack(rows) if rows else np.empty((0, self.n_vocab), np.float32))

    def rm(self, seq, p0, p1):
        if seq >= self.n_seq:
            return -1
        p0, p1 = self.norm(p0, p1)
        for i, c in enumerate(self.cells):
            if c is None or not p0 <= c[0] < p1:
                continue
            if seq < 0:
                self.cells[i] = None
            elif seq in c[1]:
                c[1].discard(seq)
                if not c[1]:
                    self.cells[i] = None
        return 1

    def cp(self, src, dst, p0, p1):
        if not (self.valid(src) and self.valid(dst)):
            return -1
        p0, p1 = self.norm(p0, p1)
        for c in self.cells:
            if c is not None and p0 <= c[0] < p1 and src in c[1]:
                c[1].add(dst)
        return 0

    def keep(self, seq):
        if not self.valid(seq):
            return -1
        for i, c in enumerate(self.cells):
            if c is None:
                continue
            if seq in c[1]:
                c[1] = {seq}
            else:
                self.cells[i] = None
        return 0

    def add(self, seq, p0, p1, delta):
        if not self.valid(seq):
            return -1
        p0, p1 = self.norm(p0, p1)
        if delta == 0:
            return 0
        targets = [i for i, c in enumerate(self.cells) if c is not None and p0 <= c[0] < p1 and seq in c[1]]
        if any(self.cells[i][0] + delta > MAX_POS for i in targets):
            return -1
        copies = sum(1 for i in targets if len(self.cells[i][1]) > 1 and self.cells[i][0] + delta >= 0)
        spare = self.find_free(copies)
        if spare is None:
            return 1
        spare = list(spare)
        for i in targets:
            c = self.cells[i]
            moved = c[0] + delta
            if len(c[1]) > 1:  # shared: seq gets its own moved copy, the others keep the cell
                c[1].discard(seq)
                if moved >= 0:
                    self.cells[spare.pop(0)] = [moved, {seq}, c[2]]
            elif moved < 0:
                self.cells[i] = None
            else:
                c[0] = moved
        return 0

    def clear(self):
        self.cells = [None] * self.n_ctx
