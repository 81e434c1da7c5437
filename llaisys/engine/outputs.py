"""What callers get back: vLLM-shaped RequestOutput / CompletionOutput, with per-request metrics."""
from __future__ import annotations

import dataclasses
from typing import Optional, Union


@dataclasses.dataclass
class Logprob:
    """Log-probability of one token at one step; rank 1 = the most likely token."""

    logprob: float
    rank: int
    decoded_token: str


# One step: token id -> its Logprob (the sampled token and the top-N alternatives).
StepLogprobs = dict[int, Logprob]


@dataclasses.dataclass
class CompletionOutput:
    """One of a request's n completions (cumulative, or the newest piece in a streamed delta).

    finish_reason: None while running, then "stop" (EOS, stop string or stop token), "length"
    (max_tokens or the context) or "abort" (cancelled or failed). stop_reason: the stop string or
    stop token id that ended it, None otherwise.
    """

    index: int
    text: str
    token_ids: list[int]
    finish_reason: Optional[str] = None
    stop_reason: Union[None, str, int] = None
    logprobs: Optional[list[StepLogprobs]] = None
    cumulative_logprob: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class SpecCounters:
    """vLLM's spec_decode counters: verifies, drafted tokens, accepted tokens (per draft position)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)

    def copy(self) -> "SpecCounters":
        return dataclasses.replace(self, accepted_per_position=list(self.accepted_per_position))

    def add(self, drafted: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        grow = drafted - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(grow, 0)
        for j in range(accepted):
            self.accepted_per_position[j] += 1

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens; 0 before any draft."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens a verify emits on average: its accepted drafts plus the target's own (vLLM's)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclasses.dataclass
class RequestMetrics:
    """Wall-clock times (time.time() seconds) of a request's life, and its token counts."""

    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_preemptions: int = 0
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (first admission)
    spec: SpecCounters = dataclasses.field(default_factory=SpecCounters)  # speculative decoding's verifies

    @property
    def queue_time(self) -> Optional[float]:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time

    @property
    def time_to_first_token(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e_latency(self) -> Optional[float]:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclasses.dataclass
class RequestOutput:
    """A request's result (LLM.generate, AsyncLLM.generate) or one streamed increment (AsyncLLM.stream).

    In an increment, `outputs` holds only the completions that changed, each with just its new
    text and token ids. state: "queued", "running", "finished", "cancelled" or "failed" (then
    `error` says why).
    """

    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    state: str
    metrics: RequestMetrics
    error: Optional[str] = None


class OutputAccumulator:
    """A request's cumulative output rebuilt from its increments, on the receiving side: streams and
    callers read this, never the engine's live request (which another thread is changing)."""

    def __init__(self, initial: RequestOutput):
        """initial: the request's cumulative output before it ran (taken where it was made)."""
        self.output = initial

    def add(self, delta: RequestOutput) -> None:
        out = self.output
        out.finished, out.state, out.metrics, out.error = delta.finished, delta.state, delta.metrics, delta.error
        for piece in delta.outputs:
            c = out.outputs[piece.index]
            c.text += piece.text
            c.token_ids = c.token_ids + piece.token_ids
            c.finish_reason, c.stop_reason = piece.finish_reason, piece.stop_reason
            if piece.logprobs is not None:
                c.logprobs = c.logprobs + piece.logprobs
                for token, step in zip(piece.token_ids, piece.logprobs):
                    c.cumulative_logprob += step[token].logprob
