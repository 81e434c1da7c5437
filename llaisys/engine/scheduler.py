"""The scheduler: decides what each engine step computes. It plans only; it never runs the model.

Continuous batching with a per-step token budget. Each step takes, in order:
1. one decode row for every running completion waiting on its last sampled token (decodes first,
   so a long prompt never starves them);
2. chunks of the running requests' unfinished prompts (or recomputation after a preemption), in
   admission order, within the remaining budget;
3. new requests from the waiting queue, first come first served, while sequence slots, budget and
   KV cells allow. A request is admitted only when the cells to reach decoding are free.
KV cells are counted here from the requests' own state (see Request.kv_cells), which mirrors the
core's cell map exactly. When the running completions cannot all grow by one token, the most
recently admitted request is preempted: its cells are freed and it goes back to the front of the
queue to be recomputed. A request that cannot fit even alone is failed, never retried forever.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time

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
    """One step: the sequences whose cells must be freed first, then the chunks to compute (one batch)."""

    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    freed_seq_ids: list[int] = dataclasses.field(default_factory=list)
    preempted: list[Request] = dataclasses.field(default_factory=list)
    failed: list[Request] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.chunks)


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, kv_capacity: int):
        # EngineArgs guarantees max_num_batched_tokens >= max_num_seqs: every decode row fits a step.
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.kv_capacity = kv_capacity
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.free_seq_ids = list(range(max_num_seqs - 1, -1, -1))  # popped from the end: lowest first
        self.num_preemptions = 0

    @property
    def kv_used(self) -> int:
        return sum(r.kv_cells for r in self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> list[int]:
        """Take a request out of the queues; returns the sequences whose cells the caller must free."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        return [seq for seq in map(self.release, request.completions) if seq is not None]

    def release(self, completion: Completion) -> int | None:
        """Give back a completion's sequence slot; returns it (the caller must free its cells) or None."""
        seq = completion.seq_id
        if seq is not None:
            self.free_seq_ids.append(seq)
            completion.seq_id = None
        return seq

    def schedule(self) -> Plan:
        plan = Plan()
        free = self.kv_capacity - self.kv_used
        decodes = self._make_room_for_decodes(plan, free)
        free -= len(decodes)
        budget = self.token_budget - len(decodes)
        plan.chunks += [Chunk(c, c.num_computed, 1) for c in decodes]
        scheduled_prefill = 0
        for request in self.running:
            for c in self._prefill_candidates(request):
                n = min(c.num_pending, budget, free)
                if n <= 0:
                    break
                plan.chunks.append(Chunk(c, c.num_computed, n))
                budget, free, scheduled_prefill = budget - n, free - n, scheduled_prefill + n
        # Cells still owed to running requests beyond this step are not free for newcomers.
        owed = sum(r.cells_to_resume for r in self.running) - len(decodes) - scheduled_prefill
        self._admit(plan, budget, free, free - owed)
        return plan

    def _make_room_for_decodes(self, plan: Plan, free: int) -> list[Completion]:
        """The completions to decode this step, preempting the newest requests until they fit."""
        while True:
            decodes = [c for r in self.running if r.prompt_done for c in r.live if c.num_pending == 1]
            if len(decodes) <= free:
                return decodes
            victim = self.running[-1]
            if len(self.running) == 1:
                self._fail(plan, victim, f"the request needs more KV cells than the cache holds "
                                         f"({self.kv_capacity}); lower n or max_tokens, or raise the context size")
                continue
            free += victim.kv_cells
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
            if need > free_to_admit or len(request.live) > len(self.free_seq_ids):
                return  # first come first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            for c in request.live:
                c.seq_id = self.free_seq_ids.pop()
            request.state = RequestState.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
            self.running.append(request)
            leader = request.leader
            n = min(leader.num_pending, budget, free)
            plan.chunks.append(Chunk(leader, leader.num_computed, n))
            budget, free, free_to_admit = budget - n, free - n, free_to_admit - need

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
