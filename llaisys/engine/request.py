"""A request and its completions: the state the scheduler plans over and the executor advances.

A request has n completions; each is one KV sequence (a core seq id while running). Its tokens are
the prompt followed by its own output. `num_computed` counts the leading tokens whose KV cells are
in the cache for that sequence; the tokens after it are pending (the prompt, or the last sampled
token, or everything after a preemption). The prompt is computed once, by the first live
completion (the leader), and shared with the others through the core's seq_cp.
"""
from __future__ import annotations

import enum
import time
from typing import Optional

import numpy as np

from .detokenizer import IncrementalDetokenizer
from .outputs import CompletionOutput, RequestMetrics, RequestOutput, StepLogprobs
from .sampling_params import SamplingParams


class RequestState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def done(self) -> bool:
        return self in (RequestState.FINISHED, RequestState.CANCELLED, RequestState.FAILED)


class Completion:
    """One completion of a request: its output tokens, KV progress, random generator and text."""

    def __init__(self, request: "Request", index: int, detokenizer: IncrementalDetokenizer):
        self.request = request
        self.index = index
        self.seq_id: Optional[int] = None  # core sequence while running
        self.output_ids: list[int] = []
        self.num_computed = 0
        self.finish_reason: Optional[str] = None
        self.stop_reason = None
        self.detokenizer = detokenizer
        params = request.params
        self.generator = None if params.greedy else np.random.default_rng(
            None if params.seed is None else [params.seed, index])
        self.logprobs: Optional[list[StepLogprobs]] = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        # What changed since the last increment was taken (for streaming).
        self.new_text = ""
        self.new_ids: list[int] = []
        self.new_logprobs: list[StepLogprobs] = []
        self.finish_reported = False

    @property
    def has_news(self) -> bool:
        return bool(self.new_ids or self.new_text) or (self.finished and not self.finish_reported)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def num_tokens(self) -> int:
        return self.request.num_prompt_tokens + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    def tokens(self, start: int, stop: int) -> list[int]:
        """Tokens [start, stop) of prompt + output."""
        prompt = self.request.prompt_ids
        n = len(prompt)
        head = prompt[start:min(stop, n)] if start < n else []
        tail = self.output_ids[max(start - n, 0):stop - n] if stop > n else []
        return head + tail

    def finish(self, reason: str, stop_reason=None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
        if reason != "stop" or not isinstance(stop_reason, str):
            self.new_text += self.detokenizer.flush()

    def output(self, delta: bool) -> CompletionOutput:
        if delta:
            out = CompletionOutput(self.index, self.new_text, self.new_ids, self.finish_reason, self.stop_reason,
                                   self.new_logprobs if self.logprobs is not None else None)
            self.new_text, self.new_ids, self.new_logprobs = "", [], []
            self.finish_reported = self.finished
            return out
        return CompletionOutput(self.index, self.detokenizer.text, list(self.output_ids), self.finish_reason,
                                self.stop_reason, self.logprobs,
                                self.cumulative_logprob if self.logprobs is not None else None)


class Request:
    """A prompt, its sampling parameters, its completions and its lifecycle."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_ids: list[int], params: SamplingParams,
                 eos_ids: frozenset[int], max_context: int, make_detokenizer, arrival_time: Optional[float] = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.state = RequestState.QUEUED
        self.error: Optional[str] = None
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        # The output may not outgrow max_tokens nor the context.
        room = max_context - len(prompt_ids)
        self.max_output = room if params.max_tokens is None else min(params.max_tokens, room)
        self.completions = [Completion(self, i, make_detokenizer(prompt_ids)) for i in range(params.n)]
        self.metrics = RequestMetrics(arrival_time=time.time() if arrival_time is None else arrival_time,
                                      num_prompt_tokens=len(prompt_ids))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def live(self) -> list[Completion]:
        return [c for c in self.completions if not c.finished]

    @property
    def leader(self) -> Optional[Completion]:
        """The completion that computes the shared prompt: the first one still running."""
        return next((c for c in self.completions if not c.finished), None)

    @property
    def prompt_done(self) -> bool:
        leader = self.leader
        return leader is None or leader.num_computed >= self.num_prompt_tokens

    def _prompt_cells(self, live: list[Completion]) -> int:
        """Prompt cells in the cache, shared by the live completions (0 when none is live)."""
        return min(self.num_prompt_tokens, max((c.num_computed for c in live), default=0))

    @property
    def kv_cells(self) -> int:
        """Cells this request holds in the cache: the shared prompt once, plus each live output."""
        live, n = self.live, self.num_prompt_tokens
        return self._prompt_cells(live) + sum(max(c.num_computed - n, 0) for c in live)

    @property
    def cells_to_resume(self) -> int:
        """Cells needed to bring every live completion back to decoding (after a preemption: all of it)."""
        live = self.live
        if not live:
            return 0
        n = self.num_prompt_tokens
        return n - self._prompt_cells(live) + sum(c.num_tokens - max(c.num_computed, n) for c in live)

    def reset_for_recompute(self) -> None:
        """Forget every KV cell (preempted): the live completions will recompute their tokens."""
        for c in self.completions:
            c.num_computed = 0
        self.state = RequestState.QUEUED
        self.metrics.num_preemptions += 1

    def end(self, state: RequestState, reason: str, error: str | None = None) -> None:
        """Finish every live completion with `reason` and enter a final state."""
        for c in self.live:
            c.finish(reason)
        self.state = state
        self.error = error
        self.metrics.finished_time = time.time()

    def fail(self, message: str) -> None:
        self.end(RequestState.FAILED, "abort", message)

    def take_output(self, delta: bool) -> RequestOutput:
        """The cumulative output, or (delta) what changed since the last increment."""
        completions = self.completions
        if delta:
            completions = [c for c in completions if c.has_news]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, [c.output(delta) for c in completions],
                             self.state.done, self.state.value, self.metrics, self.error)
