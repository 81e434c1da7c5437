"""The scheduler: decides what each engine step computes. It plans only; it never runs the model.

Continuous batching with a per-step token budget. Each step takes, in order:
1. one decode row for every running completion waiting on its last sampled token (decodes first,
   so a long prompt never starves them);
2. chunks of the running requests' unfinished prompts (or recomputation after a preemption), in
   admission order, within the remaining budget;
3. new requests from the waiting queue, first come first served, while sequence slots, budget and
   KV cells allow. A request is admitted only when the cells to reach decoding are free. A request
   that starts like a sequence in the prefix cache takes that sequence over and skips the shared part.
KV cells are counted here from the requests' own state (see Request.kv_cells) plus the prefix
cache's, which together mirror the core's cell map exactly. Cached sequences give way (least
recently used first) before anything running does. When the running completions cannot all grow
by one token, the most recently admitted request is preempted: its cells are freed and it goes
back to the front of the queue to be recomputed. A request that cannot fit even alone is failed,
never retried forever.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

from .prefix_cache import CachedSequence, PrefixCache
from .request import Completion, Request, RequestState

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Chunk:
    """Tokens [start, start + length) of one completion; sample = its logits row is sampled."""

    completion: Completion
    start: int
    length: int

    @property
    def sample(self) -> bool:
        return self.start + self.length == self.completion.num_tokens


@dataclasses.dataclass
class Plan:
    """One step: the sequences whose cells must be freed and those cut short (sequence, tokens kept), first;
    then the chunks to compute (one batch)."""

    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    freed_seq_ids: list[int] = dataclasses.field(default_factory=list)
    truncated: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    preempted: list[Request] = dataclasses.field(default_factory=list)
    failed: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, kv_capacity: int,
                 prefix_caching: bool = True):
        # EngineArgs guarantees max_num_batched_tokens >= max_num_seqs: every decode row fits a step.
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.kv_capacity = kv_capacity
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.free_seq_ids = list(range(max_num_seqs - 1, -1, -1))  # popped from the end: lowest first
        self.num_preemptions = 0
        self.prompt_tokens_total = 0  # prompt tokens of admitted requests, cached or not, each counted once
        self.cache = PrefixCache() if prefix_caching else None

    @property
    def kv_used(self) -> int:
        """Cells held by running requests."""
        return sum(r.kv_cells for r in self.running)

    @property
    def kv_cached(self) -> int:
        """Cells held by the prefix cache (free for the taking)."""
        return self.cache.cells if self.cache is not None else 0

    def _free_cells(self) -> int:
        return self.kv_capacity - self.kv_used - self.kv_cached

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request, retain: bool = False) -> list[int]:
        """Take a request out of the queues; returns the sequences whose cells the caller must free.

        retain: keep a single completion's cells in the prefix cache instead (a cancelled request).
        """
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        return [seq for seq in (self.release(c, retain) for c in request.completions) if seq is not None]

    def release(self, completion: Completion, retain: bool = False) -> int | None:
        """Give back a completion's sequence slot; returns it (the caller must free its cells) or None.

        retain: a single-completion request's computed tokens go to the prefix cache with their
        cells (with n > 1 the prompt cells are shared between sequences, so they are never kept).
        """
        seq = completion.seq_id
        if seq is None:
            return None
        completion.seq_id = None
        if retain and self.cache is not None and completion.request.params.n == 1 and completion.num_computed:
            self.cache.add(seq, completion.tokens(0, completion.num_computed))
            return None
        self.free_seq_ids.append(seq)
        return seq

    def evict_all(self) -> list[int]:
        """Empty the prefix cache; returns the sequences whose cells the caller must free."""
        plan = Plan()
        while self._evict(plan):
            pass
        return plan.freed_seq_ids

    def _evict(self, plan: Plan, keep: CachedSequence | None = None) -> int:
        """Drop the least recently used cached sequence (not `keep`); returns the cells freed (0: none)."""
        victim = self.cache.evict_oldest(keep) if self.cache is not None else None
        if victim is None:
            return 0
        plan.freed_seq_ids.append(victim.seq_id)
        self.free_seq_ids.append(victim.seq_id)
        return len(victim.tokens)

    def schedule(self) -> Plan:
        plan = Plan()
        decodes = self._make_room_for_decodes(plan)
        free = self._free_cells() - len(decodes)
        budget = self.token_budget - len(decodes)
        plan.chunks += [Chunk(c, c.num_computed, 1) for c in decodes]
        scheduled_prefill = 0
        for request in self.running:
            for c in self._prefill_candidates(request):
                while free < min(c.num_pending, budget) and (cells := self._evict(plan)):
                    free += cells  # running work comes before cached prefixes
                n = min(c.num_pending, budget, free)
                if n <= 0:
                    break
                plan.chunks.append(Chunk(c, c.num_computed, n))
                budget, free, scheduled_prefill = budget - n, free - n, scheduled_prefill + n
        # Cells still owed to running requests beyond this step are not free for newcomers.
        owed = sum(r.cells_to_resume for r in self.running) - len(decodes) - scheduled_prefill
        self._admit(plan, budget, free, free - owed)
        return plan

    def _make_room_for_decodes(self, plan: Plan) -> list[Completion]:
        """The completions to decode this step, evicting cached prefixes, then preempting the newest
        requests, until they fit."""
        while True:
            decodes = [c for r in self.running if r.prompt_done for c in r.live if c.num_pending == 1]
            if len(decodes) <= self._free_cells():
                return decodes
            if self._evict(plan):
                continue
            victim = self.running[-1]
            if len(self.running) == 1:
                self._fail(plan, victim, f"the request needs more KV cells than the cache holds "
                                         f"({self.kv_capacity}); lower n or max_tokens, or raise the context size")
                continue
            self._preempt(plan, victim)

    def _prefill_candidates(self, request: Request) -> list[Completion]:
        if not request.prompt_done:
            return [request.leader]
        return [c for c in request.live if c.num_pending > 1]

    def _admit(self, plan: Plan, budget: int, free: int, free_to_admit: int) -> None:
        while self.waiting and budget > 0:
            request = self.waiting[0]
            need = request.cells_to_resume
            if need > self.kv_capacity:
                self.waiting.popleft()
                self._fail(plan, request, f"the prompt needs {need} KV cells but the cache holds {self.kv_capacity}")
                continue
            entry, reused = self._cached_prefix(request)
            need -= reused
            gained = len(entry.tokens) - reused if entry is not None else 0  # cut from the entry's tail
            slots = len(request.live) - (entry is not None)
            evictable = self.kv_cached - (len(entry.tokens) if entry is not None else 0)
            evictable_slots = (self.cache.num_entries if self.cache is not None else 0) - (entry is not None)
            if need > free_to_admit + gained + evictable or slots > len(self.free_seq_ids) + evictable_slots:
                return  # first come first served: nobody overtakes the head of the queue
            while need > free_to_admit + gained or slots > len(self.free_seq_ids):
                cells = self._evict(plan, keep=entry)
                free, free_to_admit = free + cells, free_to_admit + cells
            self.waiting.popleft()
            if self.cache is not None:
                self.cache.count_lookup(request.leader.num_tokens, reused)
            if entry is not None:
                request.leader.seq_id = self.cache.take(entry)
                request.leader.num_computed = reused
                plan.truncated.append((entry.seq_id, reused))
                free, free_to_admit = free + gained, free_to_admit + gained
            for c in request.live:
                if c.seq_id is None:
                    c.seq_id = self.free_seq_ids.pop()
            request.state = RequestState.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
                self.prompt_tokens_total += request.num_prompt_tokens
            self.running.append(request)
            leader = request.leader
            n = min(leader.num_pending, budget, free)
            plan.chunks.append(Chunk(leader, leader.num_computed, n))
            budget, free, free_to_admit = budget - n, free - n, free_to_admit - need

    def _cached_prefix(self, request: Request) -> tuple[CachedSequence | None, int]:
        """The cached sequence a waiting request can take over and how many of its tokens it covers
        (at most all but the last, whose logits are needed).

        Taking a sequence over cuts what follows the common prefix, so it is done only when the
        prefix is at least half of the request (llama.cpp's slot-similarity rule): a new chat that
        shares just a system prompt with a cached one computes its own and leaves the other intact.
        """
        if self.cache is None or not self.cache.num_entries or request.params.n != 1:
            return None, 0
        c = request.leader
        entry, match = self.cache.longest_match(c.tokens(0, c.num_tokens))
        reused = min(match, c.num_tokens - 1)
        return (entry, reused) if reused > 0 and 2 * match >= c.num_tokens else (None, 0)

    def preempt_newest(self) -> list[int]:
        """Preempt the most recently admitted request now; returns the sequences whose cells must be freed."""
        plan = Plan()
        self._preempt(plan, self.running[-1])
        return plan.freed_seq_ids

    def _preempt(self, plan: Plan, request: Request) -> None:
        log.info("preempting request %s (%d cells) to make room; it will be recomputed",
                 request.request_id, request.kv_cells)
        plan.freed_seq_ids += self.remove(request)
        request.reset_for_recompute()
        plan.preempted.append(request)
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _fail(self, plan: Plan, request: Request, message: str) -> None:
        log.warning("request %s failed: %s", request.request_id, message)
        plan.freed_seq_ids += self.remove(request)
        request.fail(message)
        plan.failed.append(request)
