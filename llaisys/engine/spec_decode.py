"""Speculative decoding: which drafts each decode row carries, and what the engine learns from them.

A completion waiting on its last token decodes it together with k drafted tokens in one batch, logits
on every row (scheduler.py plans it, the executor verifies it: `accept_drafts`). Verification samples
the target's own token at each row with the request's own generator and accepts while it equals the
draft; the first token that differs (or the one after the last draft) is still the target's own. With
a one-hot draft that accepts with probability p(draft), the rejection rule's, and spends exactly the
draws a run without speculation spends; since the core computes each verify row bit-identically to a
1-row decode, the text is the same with speculation on and off, greedy or seeded.

Drafts cost rows. With a step costing a + b * rows and a completion's drafts each accepted with
probability alpha (measured), draft j yields a token with probability alpha**j and costs b; it is
worth its row when alpha**j beats the step's tokens per row-cost, g = c*B / (1 + c*B) with c = b / a
and B decode rows. So busy batches and text without matches draft little or nothing (adaptive).
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Callable, TypeVar

import numpy as np

from . import ngram
from .outputs import SpecCounters
from .request import Completion

T = TypeVar("T")  # a sampled choice with a .token

# b / a before the engine has measured it: one extra verify row of the default 0.5B GGUF on 2 AVX2
# cores costs about 0.3 of a 1-row step.
DEFAULT_ROW_COST = 0.3
_STEP_MEMORY = 0.98  # forgetting factor of the step-cost fit (about the last 50 decode steps)
_MEMORY = 0.8  # forgetting factor of a completion's acceptance counts
_OVERALL_MEMORY = 0.99  # and of the engine-wide ones (they follow the workload, not one reply)
_IDLE_DECAY = 0.95  # a completion not drafting drifts back to the engine-wide acceptance, so it probes again
_PRIOR_WEIGHT = 1.0  # pseudo-drafts of the engine-wide acceptance in a completion's estimate


class StepCost:
    """A least-squares fit of decode-step seconds = a + b * rows, forgetting old steps; c = b / a."""

    def __init__(self):
        self.sums = np.zeros(5)  # weight, rows, seconds, rows^2, rows * seconds
        self.row_cost = DEFAULT_ROW_COST

    def observe(self, rows: int, seconds: float) -> None:
        self.sums = _STEP_MEMORY * self.sums + np.array([1.0, rows, seconds, rows * rows, rows * seconds])
        w, x, y, xx, xy = self.sums
        spread = w * xx - x * x
        if spread <= 0.25 * w * w:  # the rows hardly varied: no slope to read; keep the last estimate
            return
        b = (w * xy - x * y) / spread
        a = (y - b * x) / w
        if a > 0 and b > 0:
            self.row_cost = min(b / a, 4.0)  # bounded: a few noisy steps can give a wild fit


@dataclasses.dataclass
class _Acceptance:
    accepted: float = 0.0
    rejected: float = 0.0


class Speculator:
    """The n-gram drafter with its adaptive draft length, and the counters of what verification accepted."""

    def __init__(self, k: int, min_n: int, max_n: int, adaptive: bool):
        self.k, self.min_n, self.max_n, self.adaptive = k, min_n, max_n, adaptive
        self.counters = SpecCounters()
        self.cost = StepCost()
        self.overall = _Acceptance(1.0, 1.0)  # engine-wide, starting from an even prior
        self._completions: weakref.WeakKeyDictionary[Completion, _Acceptance] = weakref.WeakKeyDictionary()

    def draft(self, c: Completion, limit: int, batch: int) -> tuple[int, ...]:
        """At most min(k, limit) tokens for c's next verify, in a step with `batch` decode rows."""
        request = c.request
        limit = min(self.k, limit, request.max_output - len(c.output_ids) - 1)
        if limit <= 0 or not request.params.speculative:
            return ()
        tokens = np.asarray(request.prompt_ids + c.output_ids, dtype=np.int64)
        proposal = ngram.propose(tokens, limit, self.min_n, self.max_n)
        if not proposal or not self.adaptive:
            return tuple(proposal)
        worth = self._worth(c, batch)
        if worth == 0:
            state = self._state(c)
            state.accepted *= _IDLE_DECAY
            state.rejected *= _IDLE_DECAY
        return tuple(proposal[:worth])

    def _worth(self, c: Completion, batch: int) -> int:
        """The drafts j whose chance of a token, alpha**j, beats the step's tokens per row-cost."""
        state, overall = self._state(c), self.overall
        prior = overall.accepted / (overall.accepted + overall.rejected)
        alpha = (state.accepted + _PRIOR_WEIGHT * prior) / (state.accepted + state.rejected + _PRIOR_WEIGHT)
        g = self.cost.row_cost * batch / (1.0 + self.cost.row_cost * batch)
        if alpha <= g:
            return 0
        return self.k if alpha >= 1.0 else min(self.k, int(math.log(g) / math.log(alpha)))

    def _state(self, c: Completion) -> _Acceptance:
        state = self._completions.get(c)
        if state is None:
            state = self._completions[c] = _Acceptance()
        return state

    def record(self, c: Completion, drafted: int, accepted: int) -> None:
        """A verify of c's `drafted` tokens accepted the first `accepted`."""
        self.counters.add(drafted, accepted)
        c.request.metrics.spec.add(drafted, accepted)
        rejected = 1 if accepted < drafted else 0  # positions after the first rejection were never tried
        state = self._state(c)
        state.accepted = _MEMORY * state.accepted + accepted
        state.rejected = _MEMORY * state.rejected + rejected
        self.overall.accepted = _OVERALL_MEMORY * self.overall.accepted + accepted
        self.overall.rejected = _OVERALL_MEMORY * self.overall.rejected + rejected


def accept_drafts(draft: tuple[int, ...], first: T, sample_row: Callable[[int, list[T]], T]) -> list[T]:
    """What a verify emits: `first` (the target's choice at the last token's row), then, while the
    previous choice's token equals its draft, the target's choice at the next row, sample_row(row,
    emitted so far). Every choice is emitted: the accepted drafts and the target's own last one."""
    emitted = [first]
    for j, d in enumerate(draft, start=1):
        if emitted[-1].token != d:
            break
        emitted.append(sample_row(j, emitted))
    return emitted
