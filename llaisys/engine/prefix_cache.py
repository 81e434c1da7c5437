"""PrefixCache: the KV cells of finished sequences, kept for later requests that start with the same tokens.

A finished (or cancelled) single-completion request leaves its sequence here instead of freeing
it: the core sequence and the token ids whose cells it holds. A new request whose tokens start the
same way takes that sequence over, the cells past the common prefix are dropped, and only the rest
is computed, the way llama.cpp's server reuses a slot's prompt. A chat that resends its whole
conversation each turn then computes only the newest message. Entries give way, least recently
used first, whenever the scheduler needs their cells or their sequence slot; cached cells are not
counted as used (like vLLM's evictable blocks), though they are in the core's cell map.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Optional

import numpy as np


@dataclasses.dataclass
class CachedSequence:
    seq_id: int
    tokens: np.ndarray  # the token ids at positions 0.. whose cells the sequence holds


class PrefixCache:
    def __init__(self) -> None:
        self._entries: collections.OrderedDict[int, CachedSequence] = collections.OrderedDict()  # oldest first
        self.cells = 0
        self.queries = 0  # tokens looked up
        self.hits = 0  # of those, tokens found cached

    @property
    def num_entries(self) -> int:
        return len(self._entries)

    def add(self, seq_id: int, tokens: list[int]) -> None:
        self._entries[seq_id] = CachedSequence(seq_id, np.asarray(tokens, dtype=np.int64))
        self.cells += len(tokens)

    def longest_match(self, tokens: list[int]) -> tuple[Optional[CachedSequence], int]:
        """The entry sharing the longest prefix with tokens, and that prefix's length (0: none)."""
        best, best_len = None, 0
        query = np.asarray(tokens, dtype=np.int64)
        for entry in self._entries.values():
            n = min(len(entry.tokens), len(query))
            differ = np.flatnonzero(entry.tokens[:n] != query[:n])
            length = int(differ[0]) if len(differ) else n
            if length > best_len:
                best, best_len = entry, length
        return best, best_len

    def take(self, entry: CachedSequence) -> int:
        """Remove an entry that a request takes over; returns its sequence."""
        del self._entries[entry.seq_id]
        self.cells -= len(entry.tokens)
        return entry.seq_id

    def evict_oldest(self, keep: Optional[CachedSequence] = None) -> Optional[CachedSequence]:
        """Remove the least recently used entry other than `keep` (the caller frees its cells); None if none."""
        victim = next((e for e in self._entries.values() if e is not keep), None)
        if victim is not None:
            self.take(victim)
        return victim

    def count_lookup(self, queried: int, hit: int) -> None:
        self.queries += queried
        self.hits += hit
