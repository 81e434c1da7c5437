"""The scheduler: the one owner of request state. schedule() plans a step; postprocess() applies
its result. Neither runs the model.

Continuous batching with a per-step token budget. Each step takes, in order:
1. one decode row for every running completion waiting on its last sampled token (decodes first,
   so a long prompt never starves them);
2. chunks of the running requests' unfinished prompts (or recomputation after a preemption), in
   admission order, within the remaining budget;
3. new requests from the waiting queue, first come first served (nobody overtakes the head of the
   queue), while sequence slots, budget and KV cells allow. A request is admitted only when the
   cells to reach decoding can be had; it starts from the longest prefix of its tokens that the
   prefix cache holds.
With a speculator, decode rows then carry drafted tokens (spec_decode.py) within the budget and the
free cells, ahead of prompt chunks; the cells of drafts the target rejects are cut after the step.
Cells are counted by the KV manager, which mirrors the core's cell map. Cached cells that nothing
running uses give way (least recently used first) before anything running does. When the running
completions cannot all grow by one token, the most recently admitted request is preempted: its
computed tokens go to the prefix cache, its cells are freed and it goes back to the front of the
queue. A request that cannot fit even alone is failed, never retried forever.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import time
from typing import Optional

from .kv_manager import KvManager
from .kv_ops import KvOp
from .outputs import StepLogprobs
from .request import Completion, Request, RequestState
from .spec_decode import Speculator

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Chunk:
    """Tokens [start, start + length) of one completion; sample = its logits row is sampled. A decode
    chunk may carry drafted tokens after its one token: then every row has logits (a verify). A plan
    may leave up to max_draft of them to the draft model, which proposes them when the step runs."""

    completion: Completion
    start: int
    length: int
    draft: tuple[int, ...] = ()
    max_draft: int = 0

    @property
    def sample(self) -> bool:
        return self.start + self.length == self.completion.num_tokens

    @property
    def rows(self) -> int:
        return self.length + len(self.draft)


@dataclasses.dataclass
class Plan:
    """One step: the KV operations to apply first, then the chunks to compute (one batch)."""

    chunks: list[Chunk] = dataclasses.field(default_factory=list)
    kv_ops: list[KvOp] = dataclasses.field(default_factory=list)
    failed: list[Request] = dataclasses.field(default_factory=list)  # ended while planning

    @property
    def num_tokens(self) -> int:
        return sum(c.rows for c in self.chunks)


@dataclasses.dataclass
class Sampled:
    completion: Completion
    token: int
    logprobs: Optional[StepLogprobs]


@dataclasses.dataclass
class StepResult:
    """What a step computed, as plain data: nothing in it has been applied to any request yet."""

    computed: list[Chunk] = dataclasses.field(default_factory=list)  # their KV is now in the cache
    sampled: list[Sampled] = dataclasses.field(default_factory=list)
    failed: dict[Request, str] = dataclasses.field(default_factory=dict)  # requests the model rejected
    accepted: dict[Completion, int] = dataclasses.field(default_factory=dict)  # per verify: drafts accepted
    draft_seconds: float = 0.0  # of the step's time, the draft model's


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, kv: KvManager,
                 speculator: Optional[Speculator] = None):
        # EngineArgs guarantees max_num_batched_tokens >= max_num_seqs: every decode row fits a step.
        self.max_num_seqs = max_num_seqs
        self.token_budget = max_num_batched_tokens
        self.kv = kv
        self.speculator = speculator
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.num_preemptions = 0
        self.prompt_tokens_total = 0  # prompt tokens of admitted requests, cached or not, each counted once

    @property
    def kv_used(self) -> int:
        """Cells in use by running requests (their own and those they share with the cache)."""
        return self.kv.used - self.kv.evictable

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    # planning
    def schedule(self) -> Plan:
        plan = Plan()
        decodes = self._make_room_for_decodes(plan)
        plan.chunks += [Chunk(c, c.num_computed, 1) for c in decodes]
        drafted = self._draft(plan.chunks) if self.speculator is not None else 0
        planned = len(decodes) + drafted  # cells this step's chunks will occupy
        budget = self.token_budget - planned
        for request in self.running:
            for c in self._prefill_candidates(request):
                self.kv.reclaim(planned + min(c.num_pending, budget))  # running work before cached prefixes
                n = min(c.num_pending, budget, self.kv.free - planned)
                if n <= 0:
                    break
                plan.chunks.append(Chunk(c, c.num_computed, n))
                budget, planned = budget - n, planned + n
        # Cells still owed to running requests beyond this step are not free for newcomers.
        owed = sum(self.kv.cells_to_resume(r) for r in self.running) - (planned - drafted)
        self._admit(plan, budget, planned, owed)
        if not plan.chunks and self.running:  # nothing can move: without this, nothing ever would
            self._give_way(plan)
        plan.kv_ops = self.kv.take_ops()
        return plan

    def _make_room_for_decodes(self, plan: Plan) -> list[Completion]:
        """The completions to decode this step, evicting cached prefixes, then preempting the newest
        requests, until they fit."""
        while True:
            decodes = [c for r in self.running if r.prompt_done for c in r.live if c.num_pending == 1]
            if self.kv.reclaim(len(decodes)):
                return decodes
            self._give_way(plan)

    def _draft(self, decodes: list[Chunk]) -> int:
        """Give the decode chunks their drafts (or room for the draft model's), within the budget and the
        cells left; the drafts planned. Cached cells give way only to drafts actually proposed."""
        budget, drafted = self.token_budget - len(decodes), 0
        for ch in decodes:
            draft, deferred = self.speculator.draft(ch.completion, budget - drafted, len(decodes))
            wanted = len(draft) + deferred
            if wanted:
                self.kv.reclaim(len(decodes) + drafted + wanted)
                wanted = min(wanted, max(self.kv.free - len(decodes) - drafted, 0))
            ch.draft, ch.max_draft = draft[:wanted], wanted if deferred else 0
            drafted += wanted
        return drafted

    def _give_way(self, plan: Plan) -> None:
        """The newest running request makes room: preempted, or failed when it runs alone."""
        victim = self.running[-1]
        if len(self.running) > 1:
            self._preempt(victim)
            return
        self._fail(plan, victim, f"the request needs more KV cells than the cache holds ({self.kv.capacity}); "
                                 f"lower n or max_tokens, or raise the context size")

    def _prefill_candidates(self, request: Request) -> list[Completion]:
        if not request.prompt_done:
            return [request.leader]
        return [c for c in request.live if c.num_pending > 1]

    def _admit(self, plan: Plan, budget: int, planned: int, owed: int) -> None:
        while self.waiting and budget > 0:
            request = self.waiting[0]
            need = self.kv.cells_to_resume(request)
            if need > self.kv.capacity:
                self.waiting.popleft()
                self._fail(plan, request, f"the prompt needs {need} KV cells but the cache holds {self.kv.capacity}")
                continue
            hit = self.kv.find_prefix(request)
            need -= hit.length
            room = self.kv.free - planned - owed + self.kv.evictable - self.kv.protected(hit)
            if need > room or len(request.live) > len(self.kv.free_slots):
                return  # first come first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.kv.admit(request, hit)
            request.state = RequestState.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
                self.prompt_tokens_total += request.num_prompt_tokens
            self.running.append(request)
            leader = request.leader
            self.kv.reclaim(planned + min(leader.num_pending, budget))  # later steps reclaim what they need
            n = min(leader.num_pending, budget, self.kv.free - planned)
            if n > 0:
                plan.chunks.append(Chunk(leader, leader.num_computed, n))
            budget, planned, owed = budget - n, planned + n, owed + need - n

    # applying a step
    def postprocess(self, plan: Plan, result: StepResult) -> set[Request]:
        """Apply a step's result to its requests; returns every request that changed. The KV
        operations this decides are left in the manager (take_ops)."""
        touched = set(plan.failed)
        for request, message in result.failed.items():
            self._fail(plan, request, message)
            touched.add(request)
        for ch in result.computed:
            c, request = ch.completion, ch.completion.request
            c.num_computed += ch.length + result.accepted.get(c, 0)
            if c is request.leader and ch.start < request.num_prompt_tokens <= c.num_computed:
                self.kv.prompt_done(request)
        now = time.time()
        for s in result.sampled:
            if not s.completion.finished:  # a stop inside an accepted run drops the tokens after it
                s.completion.append_token(s.token, s.logprobs, now)
            touched.add(s.completion.request)
        for ch in result.computed:
            if ch.draft:
                self._settle_verify(ch, result.accepted.get(ch.completion, 0))
            elif ch.max_draft:
                self.speculator.missed(ch.completion)
        for request in touched:
            if request.state is not RequestState.RUNNING:
                continue
            for c in request.completions:
                if c.finished:
                    self.kv.release(c, keep=True)
            if not request.live:
                request.end(RequestState.FINISHED, "stop")
                self.running.remove(request)
        self.kv.trim()
        return touched

    def _settle_verify(self, ch: Chunk, accepted: int) -> None:
        """Only the tokens the completion kept have cells: the rejected drafts' (and an accepted run's
        past a stop) are cut."""
        c = ch.completion
        c.num_computed = min(c.num_computed, c.num_tokens)
        self.kv.cut(c, ch.start + ch.rows)
        self.speculator.record(c, len(ch.draft), accepted)

    def abort(self, request: Request, error: Optional[str] = None) -> None:
        """Cancel a queued or running request now (fail it, when an error is given). A cancelled
        request's computed tokens stay in the prefix cache: a chat stopped mid-reply goes on from there."""
        self._remove(request, keep=error is None)
        if error is None:
            request.end(RequestState.CANCELLED, "abort")
        else:
            request.fail(error)

    def preempt_newest(self) -> None:
        self._preempt(self.running[-1])

    def _remove(self, request: Request, keep: bool) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv.release_all(request, keep)

    def _preempt(self, request: Request) -> None:
        log.info("preempting request %s (%d cells) to make room; it will be recomputed",
                 request.request_id, self.kv.held(request))
        self._remove(request, keep=True)
        request.reset_for_recompute()
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _fail(self, plan: Plan, request: Request, message: str) -> None:
        log.warning("request %s failed: %s", request.request_id, message)
        self._remove(request, keep=False)
        request.fail(message)
        plan.failed.append(request)
