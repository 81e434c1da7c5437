"""KvManager: the one owner of KV accounting: sequence slots, cells held by running requests, cells
shared with the prefix cache (and its locks), free cells.

The core's cell map is the truth; this class mirrors it exactly (tests check after every step) and
queues the KV operations (`take_ops`) that keep the core in step with its decisions. A running
request holds private cells (the ones it computed and nobody else has) and shares the cells of its
cached prefix with the radix cache: positions [0, shared) of its leader come from the cache and
are locked there. With n > 1 the prompt is computed once by the leader; the other completions get
its cells with seq_cp. Used cells = the cache's cells + every running request's private cells.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from .kv_ops import KvOp, SeqCp, SeqRm
from .radix_cache import Node, RadixCache
from .request import Completion, Request


@dataclasses.dataclass
class CachedPrefix:
    """Positions [0, length) of a leader's tokens held by the cache, through node: what a waiting
    request can take, or what a running one took (and holds locked)."""

    node: Optional[Node] = None
    length: int = 0


class KvManager:
    def __init__(self, capacity: int, max_num_seqs: int, cache_seqs: int, max_cached_cells: Optional[int] = None):
        """cache_seqs: core sequences for the prefix cache, numbered after the max_num_seqs running slots
        (0: no prefix cache). max_cached_cells: cells the cache may keep that nothing running uses."""
        self.capacity = capacity
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))  # popped from the end: lowest first
        self._ops: list[KvOp] = []
        self.cache = RadixCache(range(max_num_seqs, max_num_seqs + cache_seqs), self._ops) if cache_seqs else None
        self.max_cached_cells = max_cached_cells
        self.shares: dict[Request, CachedPrefix] = {}  # every request holding cells
        self.queries = 0  # prompt tokens looked up in the cache (first admission of each request)
        self.hits = 0  # of those, tokens whose cells were reused

    def take_ops(self) -> list[KvOp]:
        """The KV operations decided since the last call, in the order they must be applied."""
        ops, self._ops[:] = list(self._ops), []
        return ops

    # accounting
    def held(self, request: Request) -> int:
        """Private cells of a running request: its prompt once (less what it shares with the cache)
        plus each live completion's own tokens."""
        live = request.live
        if request not in self.shares or not live:
            return 0
        n, shared = request.num_prompt_tokens, self.shares[request].length
        prompt = min(n, max(c.num_computed for c in live))
        return prompt - min(shared, prompt) + sum(max(c.num_computed - max(n, shared), 0) for c in live)

    @staticmethod
    def cells_to_resume(request: Request) -> int:
        """Cells a request still needs to bring every live completion to decoding."""
        live = request.live
        if not live:
            return 0
        n = request.num_prompt_tokens
        prompt = min(n, max(c.num_computed for c in live))
        return n - prompt + sum(c.num_tokens - max(c.num_computed, n) for c in live)

    @property
    def cached(self) -> int:
        """Cells the prefix cache holds (some may be shared with running requests)."""
        return self.cache.cells if self.cache is not None else 0

    @property
    def evictable(self) -> int:
        """Cached cells that nothing running uses: free for the taking."""
        return self.cache.evictable if self.cache is not None else 0

    @property
    def used(self) -> int:
        """Cells the core holds: the cache's plus every running request's private ones."""
        return self.cached + sum(self.held(r) for r in self.shares)

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def reclaim(self, wanted: int) -> bool:
        """Evict cached cells, least recently used first, until `wanted` cells are free; whether they are."""
        while self.free < wanted and self.cache is not None and self.cache.evict_one():
            pass
        return self.free >= wanted

    def trim(self) -> None:
        """Keep the cache within its budget of cells nothing running uses."""
        if self.cache is not None and self.max_cached_cells is not None:
            while self.cache.evictable > self.max_cached_cells and self.cache.evict_one():
                pass

    def reset_cache(self) -> None:
        """Evict every cached cell that nothing running uses."""
        while self.cache is not None and self.cache.evict_one():
            pass

    # admission
    def find_prefix(self, request: Request) -> CachedPrefix:
        """The longest cached prefix a waiting request can take, ending on a node boundary (a node
        may be split for that: the cells stay where they are). Its last token is always left to
        compute (its logits are needed); with n > 1 only the shared prompt counts, and the leader
        computes its last token again (then the others get its cells, prompt_done)."""
        if self.cache is None:
            return CachedPrefix()
        leader = request.leader
        limit = request.num_prompt_tokens if request.params.n > 1 else leader.num_tokens
        node, length = self.cache.match(np.asarray(leader.tokens(0, limit), dtype=np.int64))
        node, length = self.cache.cut(node, min(length, limit - 1))
        return CachedPrefix(node, length) if length > 0 else CachedPrefix()

    def protected(self, hit: CachedPrefix) -> int:
        """Evictable cells a hit would lock (they stop being free for the taking)."""
        if hit.node is None:
            return 0
        return sum(len(n.tokens) for n in hit.node.path() if n.lock == 0)

    def admit(self, request: Request, hit: CachedPrefix) -> None:
        """Give a request's live completions sequence slots and its leader the hit's cells."""
        for c in request.live:
            c.seq_id = self.free_slots.pop()
        if hit.node is not None:
            self.cache.lock(hit.node)
            self.cache.copy_into(hit.node, request.leader.seq_id)
            request.leader.num_computed = hit.length
        self.shares[request] = dataclasses.replace(hit)
        if request.metrics.first_scheduled_time is None:  # a request is counted once, not per re-admission
            self.queries += request.num_prompt_tokens
            self.hits += hit.length
            request.metrics.num_cached_tokens = hit.length

    def prompt_done(self, request: Request) -> None:
        """The leader has just computed the prompt: the cache takes it (other requests can share it
        while this one runs) and the other completions get its cells."""
        leader, n = request.leader, request.num_prompt_tokens
        share = self.shares[request]
        if self.cache is not None and share.length < n:
            node = self.cache.insert(np.asarray(request.prompt_ids, dtype=np.int64), leader.seq_id, share.length,
                                     final=False)
            if node is not None:
                self._relock(share, node, n)
        for c in request.live:
            if c is not leader and c.num_computed < n:
                self._ops.append(SeqCp(leader.seq_id, c.seq_id, 0, n))
                c.num_computed = n

    def _relock(self, share: CachedPrefix, node: Node, length: int) -> None:
        self.cache.lock(node)
        if share.node is not None:
            self.cache.unlock(share.node)
        share.node, share.length = node, length

    def cut(self, completion: Completion, end: int) -> None:
        """A completion's cells past its computed tokens, up to position end, were a verify's rejected
        drafts: drop them."""
        if completion.num_computed < end:
            self._ops.append(SeqRm(completion.seq_id, completion.num_computed, -1))

    # release
    def release(self, completion: Completion, keep: bool) -> None:
        """Free a completion's sequence slot and cells; keep: its computed tokens go to the cache first
        (not while siblings still share prompt cells the cache does not hold)."""
        request, seq = completion.request, completion.seq_id
        if seq is None:
            return
        share = self.shares[request]
        siblings = [c for c in request.completions if c is not completion and c.seq_id is not None]
        shares_prompt = bool(siblings) and share.length < request.num_prompt_tokens
        if keep and self.cache is not None and completion.num_computed > share.length and not shares_prompt:
            self.cache.insert(np.asarray(completion.tokens(0, completion.num_computed), dtype=np.int64), seq,
                              share.length, final=True)
        self._ops.append(SeqRm(seq, 0, -1))
        completion.seq_id = None
        self.free_slots.append(seq)
        if not siblings:
            if share.node is not None:
                self.cache.unlock(share.node)
            del self.shares[request]

    def release_all(self, request: Request, keep: bool) -> None:
        for c in request.completions:
            self.release(c, keep)
