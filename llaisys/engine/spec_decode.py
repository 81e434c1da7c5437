"""Speculative decoding: which drafts each decode row carries, and what the engine learns from them.

A completion waiting on its last token decodes it together with k drafted tokens in one batch, logits
on every row (scheduler.py plans it, the executor verifies it: `accept_drafts`). Verification samples
the target's own token at each row with the request's own generator and accepts while it equals the
draft; the first token that differs (or the one after the last draft) is still the target's own. With
a one-hot draft that accepts with probability p(draft), the rejection rule's, and spends exactly the
draws a run without speculation spends; since the core computes each verify row bit-identically to a
1-row decode, the text is the same with speculation on and off, greedy or seeded.

Two drafters: n-gram prompt lookup (ngram.py; its tokens are known when the step is planned) and a
draft model (draft_model.py; the plan reserves rows for up to n drafts, the model proposes them when
the step runs). Drafts cost: a target step costs a + b * rows, and a draft model's draft token costs
e more (its own steps). With B decode rows, a draft token costs c = (b + e) * B / (a + b * B) of a row's
share of the step, and a completion whose drafts are each accepted with probability alpha (measured)
expects (1 - alpha**(k+1)) / ((1 - alpha) * (1 + k * c)) times the tokens per second of no drafts
with k of them (stage3.md's formula): it drafts the k that maximises that, none when nothing beats 1.
A draft model first computes a completion's prompt (once): it starts only if that speedup over the
completion's remaining tokens saves more than the prompt costs it. So busy batches, costly drafters and text without matches draft little or nothing (adaptive).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Optional, TypeVar

import numpy as np

from .ngram import NgramDrafter
from .outputs import SpecCounters
from .request import Completion

T = TypeVar("T")  # a sampled choice with a .token

# b / a before the engine has measured it: one extra verify row of the default 0.5B GGUF on 2 AVX2
# cores costs about 0.3 of a 1-row step.
DEFAULT_ROW_COST = 0.3
# e / a before a draft model's steps are measured: the 0.5B default drafting for its 1.5B sibling.
DEFAULT_DRAFT_COST = 0.4
_STEP_MEMORY = 0.98  # forgetting factor of the step-cost fit (about the last 50 decode steps)
_PROMPT_MEMORY = 0.8  # and of a prompt row's seconds
_MEMORY = 0.8  # forgetting factor of a completion's acceptance counts
_OVERALL_MEMORY = 0.99  # and of the engine-wide ones (they follow the workload, not one reply)
_IDLE_DECAY = 0.95  # a completion not drafting drifts back to the engine-wide acceptance, so it probes again
_PRIOR_WEIGHT = 1.0  # pseudo-drafts of the engine-wide acceptance in a completion's estimate


class StepCost:
    """A least-squares fit of step seconds = a + b * rows, forgetting old steps; row_cost = b / a."""

    def __init__(self):
        self.sums = np.zeros(5)  # weight, rows, seconds, rows^2, rows * seconds
        self.row_cost = DEFAULT_ROW_COST
        self.prompt_row_seconds: Optional[float] = None  # a row of a prompt-sized piece, measured

    def observe_prompt(self, rows: int, seconds: float) -> None:
        """A piece of many rows per sequence (a prompt): its seconds per row, averaged over recent ones."""
        rate = seconds / rows
        old = self.prompt_row_seconds
        self.prompt_row_seconds = rate if old is None else _PROMPT_MEMORY * old + (1.0 - _PROMPT_MEMORY) * rate

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

    @property
    def base(self) -> Optional[float]:
        """a in seconds, from the mean step and row_cost (so also before the rows varied); None unmeasured."""
        w, x, y = self.sums[:3]
        return None if w == 0 else (y / w) / (1.0 + self.row_cost * x / w)


@dataclasses.dataclass
class _Acceptance:
    accepted: float = 0.0
    rejected: float = 0.0


class Speculator:
    """How many drafts each decode row carries (adaptive k), and the counters of what verification accepted.

    ngram: the n-gram drafter, or None for a draft model, whose step costs `draft_cost` measures and
    which must first compute `prompt_lacking(c)` tokens of a completion's prompt to draft for it.
    """

    def __init__(self, k: int, adaptive: bool, ngram: Optional[NgramDrafter] = None,
                 draft_cost: Optional[StepCost] = None, prompt_lacking: Callable[[Completion], int] = lambda c: 0):
        self.k, self.adaptive, self.ngram, self.draft_cost = k, adaptive, ngram, draft_cost
        self.prompt_lacking = prompt_lacking
        self.counters = SpecCounters()
        self.cost = StepCost()
        # Engine-wide, from an even prior; a draft model of the target's family agrees far more often
        # than not (3:1, p_min's confidence), and from an even prior would never start drafting.
        self.overall = _Acceptance(1.0, 1.0) if draft_cost is None else _Acceptance(3.0, 1.0)
        self._completions: weakref.WeakKeyDictionary[Completion, _Acceptance] = weakref.WeakKeyDictionary()

    def draft(self, c: Completion, limit: int, batch: int) -> tuple[tuple[int, ...], int]:
        """For c's next verify, in a step with `batch` decode rows, at most min(k, limit) drafts: the
        n-gram drafter's tokens, or how many the draft model may propose when the step runs."""
        request = c.request
        limit = min(self.k, limit, request.max_output - len(c.output_ids) - 1)
        if limit <= 0 or not request.params.speculative:
            return (), 0
        proposal = self.ngram.propose(c, limit) if self.ngram is not None else None
        if proposal == []:
            return (), 0
        n = limit if proposal is None else len(proposal)
        if self.adaptive:
            n = min(n, self._worth(c, batch))
            if n == 0:
                state = self._state(c)
                state.accepted *= _IDLE_DECAY
                state.rejected *= _IDLE_DECAY
        return ((), n) if proposal is None else (tuple(proposal[:n]), 0)

    def _worth(self, c: Completion, batch: int) -> int:
        """The k that maximises the expected tokens per second of c's row (the module's formula)."""
        state, overall = self._state(c), self.overall
        prior = overall.accepted / (overall.accepted + overall.rejected)
        alpha = (state.accepted + _PRIOR_WEIGHT * prior) / (state.accepted + state.rejected + _PRIOR_WEIGHT)
        r = self.cost.row_cost
        cost = (r + self._draft_token_cost(batch)) * batch / (1.0 + r * batch)
        k = max(range(self.k + 1), key=lambda k: expected_speedup(alpha, k, cost))
        if k == 0:
            return 0
        # A draft model lacking c's prompt computes it before its first draft: a cost paid once, worth it
        # only if the expected saving over c's remaining tokens (at most) is larger. Units: the target's a.
        lacking = self.prompt_lacking(c)
        if lacking:
            row_share = (1.0 + r * batch) / batch
            remaining = c.request.max_output - len(c.output_ids)
            saving = remaining * row_share * (1.0 - 1.0 / expected_speedup(alpha, k, cost))
            if saving <= lacking * self._prompt_row_cost():
                return 0
        return k

    def _prompt_row_cost(self) -> float:
        """A row of a prompt in the draft model, against the target's a; 0 until measured: the first
        prompt it computes measures it (a guess could keep it from ever starting)."""
        target, rate = self.cost.base, self.draft_cost.prompt_row_seconds
        return 0.0 if target is None or rate is None else rate / target

    def _draft_token_cost(self, batch: int) -> float:
        """e / a: a draft model's step per drafting row (`batch` of them share it) against the target's a."""
        if self.draft_cost is None:
            return 0.0
        target, draft = self.cost.base, self.draft_cost.base
        if target is None or draft is None:
            return DEFAULT_DRAFT_COST
        return draft * (1.0 / batch + self.draft_cost.row_cost) / target

    def _state(self, c: Completion) -> _Acceptance:
        state = self._completions.get(c)
        if state is None:
            state = self._completions[c] = _Acceptance()
        return state

    def record(self, c: Completion, drafted: int, accepted: int) -> None:
        """A verify of c's `drafted` tokens accepted the first `accepted`."""
        self.counters.add(drafted, accepted)
        c.request.metrics.spec.add(drafted, accepted)
        self._learn(c, accepted, 1 if accepted < drafted else 0)  # positions after a rejection were never tried

    def missed(self, c: Completion) -> None:
        """The draft model, given room, proposed nothing (below p_min): its step bought no token, which
        the worth must see as a rejected first draft."""
        self._learn(c, 0, 1)

    def _learn(self, c: Completion, accepted: int, rejected: int) -> None:
        state = self._state(c)
        state.accepted = _MEMORY * state.accepted + accepted
        state.rejected = _MEMORY * state.rejected + rejected
        self.overall.accepted = _OVERALL_MEMORY * self.overall.accepted + accepted
        self.overall.rejected = _OVERALL_MEMORY * self.overall.rejected + rejected


def expected_speedup(alpha: float, k: int, cost: float) -> float:
    """Tokens per unit of cost with k drafts, each accepted with probability alpha and costing `cost`,
    against 1 with none: (1 - alpha**(k+1)) / ((1 - alpha) * (1 + k * cost))."""
    tokens = k + 1 if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
    return tokens / (1.0 + k * cost)


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
