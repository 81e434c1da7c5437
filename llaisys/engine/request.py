"""A request and its completions: the state the scheduler plans over and the executor advances.

A request has n completions; each is one KV sequence (a core seq id while running). Its tokens are
the prompt followed by its own output. `num_computed` counts the leading tokens whose KV cells are
in the cache for that sequence; the tokens after it are pending (the prompt, or the last sampled
token, or everything after a preemption). The prompt is computed once, by the first live
completion (the leader), and shared with the others through the core's seq_cp. Only the scheduler
changes these objects (see scheduler.py); everyone else reads them or takes their outputs.
"""
from __future__ import annotations

import dataclasses
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
        self.grammar = request.make_grammar() if request.make_grammar is not None else None
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

    def append_token(self, token: int, logprobs: Optional[StepLogprobs], now: float) -> None:
        """Append a sampled token, extend the text and check every stop condition."""
        request, params = self.request, self.request.params
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        metrics.num_generated_tokens += 1
        self.output_ids.append(token)
        self.new_ids.append(token)
        if logprobs is not None:
            self.logprobs.append(logprobs)
            self.new_logprobs.append(logprobs)
            self.cumulative_logprob += logprobs[token].logprob
        n_out = len(self.output_ids)
        if token in params.stop_token_ids:
            self.finish("stop", token)
        elif token in request.special_stops:
            self.finish("stop", request.special_stops[token])
        elif token in request.eos_ids:
            self.finish("stop")
        else:
            self.new_text += self.detokenizer.add_token(token, check_stop=n_out >= params.min_tokens)
            if self.detokenizer.stop_string is not None:
                self.finish("stop", self.detokenizer.stop_string)
        if not self.finished and self.grammar is not None:
            self.grammar.sync(self.output_ids, request.eos_ids)
            if self.grammar.done:
                self.finish("stop")
        if not self.finished and n_out >= request.max_output:
            self.finish("length")

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
                                self.stop_reason, None if self.logprobs is None else list(self.logprobs),
                                self.cumulative_logprob if self.logprobs is not None else None)


class Request:
    """A prompt, its sampling parameters, its completions and its lifecycle."""

    def __init__(self, request_id: str, prompt: Optional[str], prompt_ids: list[int], params: SamplingParams,
                 eos_ids: frozenset[int], max_context: int, make_detokenizer, arrival_time: Optional[float] = None,
                 special_stops: Optional[dict[int, str]] = None, make_grammar=None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_ids = prompt_ids
        self.params = params
        self.state = RequestState.QUEUED
        self.error: Optional[str] = None
        self.eos_ids = frozenset() if params.ignore_eos else eos_ids
        self.special_stops = special_stops or {}  # token id -> the stop string that names it
        self.make_grammar = make_grammar  # () -> a GrammarState for each completion; None = unconstrained
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
        """The cumulative output, or (delta) what changed since the last increment: a copy that the
        engine no longer touches, safe to hand to another thread."""
        completions = self.completions
        if delta:
            completions = [c for c in completions if c.has_news]
        return RequestOutput(self.request_id, self.prompt, self.prompt_ids, [c.output(delta) for c in completions],
                             self.state.done, self.state.value,
                             dataclasses.replace(self.metrics, spec=self.metrics.spec.copy()), self.error)
