"""SamplingParams: how one request's tokens are chosen and when its completions stop (vLLM's fields)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs


@dataclasses.dataclass
class SamplingParams:
    """Sampling and stopping for one request; every field is checked at construction.

    n:                  completions of the prompt (they share its KV cells).
    max_tokens:         most tokens per completion; None = up to the context length.
    min_tokens:         tokens before EOS, stop_token_ids or stop strings may end a completion.
    temperature:        0 = greedy (argmax); otherwise logits are divided by it.
    top_k:              keep the k most likely tokens; 0 or -1 = all.
    top_p:              keep the smallest set of most likely tokens whose mass reaches top_p.
    min_p:              keep tokens at least min_p times as likely as the most likely one.
    seed:               per-request random generator: the same seed gives the same text whatever
                        else is in the batch.
    stop:               strings that end a completion; they are not included in the text.
    stop_token_ids:     token ids that end a completion (kept in token_ids, not in the text).
    ignore_eos:         keep generating past the model's end-of-sequence tokens.
    presence_penalty:   subtracted from a token's logit once if it appeared in the output.
    frequency_penalty:  subtracted from a token's logit per time it appeared in the output.
    repetition_penalty: > 1 makes tokens seen in the prompt or output less likely (HF's rule:
                        positive logits divided by it, negative ones multiplied).
    logprobs:           return the log-probabilities of the N most likely tokens at each step
                        (plus the sampled one); None = none.
    speculative:        False = never draft tokens for this request, even when the engine speculates
                        (its output is the same either way; only its speed changes).
    logit_bias:         token id -> a value in [-100, 100] added to its logit (OpenAI's).
    grammar:            an llguidance grammar (LLMatcher.grammar_from_json_schema / _lark / _regex):
                        only tokens it allows are sampled, and the completion stops when it is complete.
    """

    n: int = 1
    max_tokens: Optional[int] = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: Optional[int] = None
    stop: Union[None, str, list[str]] = None
    stop_token_ids: Optional[list[int]] = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: Optional[int] = None
    speculative: bool = True
    logit_bias: Optional[dict[int, float]] = None
    grammar: Optional[str] = None

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _check_int("n", self.n, low=1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        _check_float("temperature", self.temperature, low=0.0)
        _check_int("top_k", self.top_k, low=-1)
        _check_float("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_float("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0)
        for name in ("ignore_eos", "speculative"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        _check_float("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_float("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_float("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        self.logit_bias = dict(self.logit_bias or {})
        for token, bias in self.logit_bias.items():
            _check_int("logit_bias", token, low=0)
            _check_float("logit_bias", bias, low=-100.0, high=100.0)
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise ValueError(f"grammar must be a string, got {type(self.grammar).__name__}")
        if self.grammar is not None and self.min_tokens:
            raise ValueError("min_tokens cannot be combined with a grammar (it may have to end sooner)")
        if self.grammar is not None and self.ignore_eos:
            raise ValueError("ignore_eos cannot be combined with a grammar (the grammar decides where the end is)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_range(low, high)}, got {value}")


def _check_float(name: str, value, low: float | None = None, high: float | None = None,
                 low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        raise ValueError(f"{name} must be {_range(low, high, low_open)}, got {value}")


def _range(low, high, low_open: bool = False) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"in {'(' if low_open else '['}{low}, {high}]"
