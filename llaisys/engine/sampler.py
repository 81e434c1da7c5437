"""Choosing the next token of every sequence from one step's logits (vLLM / HF semantics).

Per row, in this order:
  1. banned_ids (EOS / stop ids before min_tokens) and tokens outside the row's `allowed` mask (a
     grammar's) get -inf, then logit_bias is added;
  2. repetition_penalty on tokens of the prompt or output (HF: positive logits divided, others multiplied),
     then frequency_penalty * count and presence_penalty * (count > 0) subtracted (OpenAI);
  3. greedy rows (temperature 0) take the argmax, lowest id on ties, and draw nothing;
  4. other rows: softmax(logits / temperature), then top_k, top_p (on the top-k renormalized mass; the
     token that crosses top_p is kept), min_p (p >= min_p * p_max), and one token by inverse CDF over
     the kept tokens in id order from exactly ONE generator.random() draw. One draw per token is what
     makes a seeded request give the same text whatever else is in the batch.
Logprobs come from the raw logits (before steps 1-4), like vLLM's default.

Speed: V is ~152k and the engine calls this every step, so full sorts and full cumulative sums are
avoided in the common case: the exponentials are computed over the whole batch block at once, top-k /
top-p sort only the head of the distribution or one bucket of it (_largest, _nucleus), and the draw sums blocks of
weights before scanning one (_inverse_cdf).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import numpy as np

from .sampling_params import SamplingParams

# top-p first looks at the tokens at least this many times as likely as the most likely one, and sorts
# them when they hold enough mass and are at most _SORT_LIMIT (a peaked distribution).
_CANDIDATE_RATIO = 1e-4
_SORT_LIMIT = 4096
# Tokens per block of the two-level inverse CDF.
_BLOCK = 1024


@dataclasses.dataclass
class SamplingRow:
    """What the sampler needs to know about one logits row."""
    params: SamplingParams
    generator: np.random.Generator | None   # None only when params.greedy
    prompt_ids: Sequence[int]               # for repetition_penalty
    output_ids: Sequence[int]               # for all three penalties
    banned_ids: Collection[int] = ()        # must not be sampled now (EOS / stop ids before min_tokens)
    allowed: np.ndarray | None = None       # (V,) bool: only these may be sampled (a grammar's mask)


@dataclasses.dataclass
class Logprobs:
    """Log-probabilities at one step (from the raw model logits, before penalties/temperature/filters,
    like vLLM's default)."""
    token_logprob: float        # of the sampled token
    token_rank: int             # 1 = most likely
    top_ids: list[int]          # the params.logprobs most likely tokens, most likely first
    top_logprobs: list[float]


@dataclasses.dataclass
class SampleResult:
    token_ids: np.ndarray            # (B,) int64
    logprobs: list[Logprobs | None]  # per row; None when the row's params.logprobs is None


def sample(logits: np.ndarray, rows: Sequence[SamplingRow]) -> SampleResult:
    """logits: (B, V) float32 (may be a read-only view: never modify it in place; copy what you change)."""
    logits = _checked(logits, rows)
    token_ids = np.empty(len(rows), dtype=np.int64)
    sampled = []
    for i, row in enumerate(rows):
        if row.params.greedy:
            token_ids[i] = _greedy_token(logits[i], row)
        else:
            sampled.append(i)
    if sampled:
        weights = _weights(logits, sampled, rows)
        for w, i in zip(weights, sampled):
            token_ids[i] = _draw(w, rows[i])
    logprobs = [None if row.params.logprobs is None else _logprobs(logits[i], int(token_ids[i]), row.params.logprobs)
                for i, row in enumerate(rows)]
    return SampleResult(token_ids, logprobs)


def probabilities(logits_row: np.ndarray, row: SamplingRow) -> np.ndarray:
    """The (V,) float64 distribution `sample` draws this row's token from (one-hot when greedy)."""
    x = np.asarray(logits_row, dtype=np.float32)
    p = np.zeros(x.size)
    if row.params.greedy:
        p[_greedy_token(x, row)] = 1.0
        return p
    w = _weights(x[None, :], [0], [row])[0]
    kept = _kept(w, row.params)
    ids = slice(None) if kept is None else kept
    p[ids] = w[ids]
    return p / p.sum()


def _checked(logits: np.ndarray, rows: Sequence[SamplingRow]) -> np.ndarray:
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2 or logits.shape[0] != len(rows):
        raise ValueError(f"logits must be (len(rows) = {len(rows)}, V), got shape {logits.shape}")
    for i, row in enumerate(rows):
        if row.generator is None and not row.params.greedy:
            raise ValueError(f"row {i}: temperature {row.params.temperature} needs a generator")
    return logits


def _needs_adjusting(row: SamplingRow) -> bool:
    return len(row.banned_ids) > 0 or row.allowed is not None or bool(row.params.logit_bias) or row.params.has_penalties


def _adjust(x: np.ndarray, row: SamplingRow) -> None:
    """Steps 1 and 2 of the module docstring, in place on one row the caller owns."""
    params = row.params
    if len(row.banned_ids):
        x[np.fromiter(row.banned_ids, dtype=np.int64)] = -np.inf
    if row.allowed is not None:
        np.copyto(x, -np.inf, where=~row.allowed)
    if params.logit_bias:
        x[np.fromiter(params.logit_bias, dtype=np.int64)] += np.fromiter(params.logit_bias.values(), dtype=np.float32)
    if params.repetition_penalty != 1.0:
        # Repeated ids need no np.unique: each copy is set to the same value, computed from the original.
        seen = np.concatenate([np.asarray(row.prompt_ids, dtype=np.int64), np.asarray(row.output_ids, dtype=np.int64)])
        v = x[seen]
        x[seen] = np.where(v > 0, v / params.repetition_penalty, v * params.repetition_penalty)
    if params.frequency_penalty or params.presence_penalty:
        ids, counts = np.unique(np.asarray(row.output_ids, dtype=np.int64), return_counts=True)
        x[ids] -= params.frequency_penalty * counts + params.presence_penalty


def _greedy_token(x: np.ndarray, row: SamplingRow) -> int:
    if _needs_adjusting(row):
        x = x.copy()
        _adjust(x, row)
    token = int(np.argmax(x))  # the first maximum: lowest id on ties
    _require_finite(x[token])
    return token


def _require_finite(top) -> None:
    if not np.all(np.isfinite(top)):
        raise ValueError("a row has no finite logit left to choose from (all banned, or inf/nan logits)")


def _weights(logits: np.ndarray, idx: list[int], rows: Sequence[SamplingRow]) -> np.ndarray:
    """exp((adjusted logit - row max) / temperature) for the rows idx, computed over the block at once.

    The most likely token of each row gets weight exactly 1 (exp(0)), so min_p needs no normalization.
    """
    z = logits[idx]  # fancy indexing copies: adjusting z leaves the caller's logits alone
    for j, i in enumerate(idx):
        _adjust(z[j], rows[i])
    top = z.max(axis=1, keepdims=True)
    _require_finite(top)
    z -= top
    # Floored so that a temperature below float32's range still leaves 0 / t = 0 at the top, not nan.
    z /= np.maximum(np.array([[rows[i].params.temperature] for i in idx], dtype=np.float32),
                    np.finfo(np.float32).tiny)
    np.exp(z, out=z)
    return z


def _kept(w: np.ndarray, params: SamplingParams) -> np.ndarray | None:
    """The ids (in id order) that survive top_k, top_p and min_p; None when every token does."""
    top_k = params.top_k if 0 < params.top_k < w.size else 0
    kept = None
    if top_k or params.top_p < 1.0:
        kept = _top_k_top_p(w, top_k, params.top_p)
    if params.min_p > 0.0:
        # w is relative to the most likely token (w_max = 1), so min_p * p_max is just min_p.
        kept = np.flatnonzero(w >= params.min_p) if kept is None else kept[w[kept] >= params.min_p]
    return kept


def _top_k_top_p(w: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The top_k most likely ids (all when 0), cut to the shortest prefix whose mass reaches top_p of
    theirs; in id order."""
    if not top_k:
        return _nucleus(w, top_p * float(w.sum(dtype=np.float64)))
    order = _largest(w, top_k)
    cum = np.cumsum(w[order], dtype=np.float64)
    # top_p is a share of the top-k mass: vLLM renormalizes after top-k. The entry reaching it is kept.
    return np.sort(order[:np.searchsorted(cum, top_p * cum[-1]) + 1])


def _largest(values: np.ndarray, n: int) -> np.ndarray:
    """The ids of the n largest values, largest first (ties by id), without sorting all of them.

    Cut values into n or more blocks: at least n values reach the n-th largest block maximum, so the
    values reaching it hold the n largest (and every tie of the n-th), usually few more than n.
    """
    starts = np.arange(0, values.size, max(1, values.size // n))
    maxima = np.maximum.reduceat(values, starts)
    floor = np.partition(maxima, maxima.size - n)[maxima.size - n]
    return _by_value(values, np.flatnonzero(values >= floor))[:n]


def _nucleus(w: np.ndarray, target: float) -> np.ndarray:
    """The shortest prefix of the ids by weight (largest first, ties by id) whose weight reaches target,
    in id order.

    Peaked distributions: the tokens at least _CANDIDATE_RATIO times as likely as the most likely one
    are the head of the sorted order; when they hold target, sorting those few is exact. Flat ones:
    positive float32 values order like their bit patterns, so the top 16 bits (exponent and 7 mantissa
    bits) bucket the weights by value. The buckets above the one where the cumulative weight crosses
    target are kept whole and only that bucket is sorted: no sort of the whole vocabulary.
    """
    ids = np.flatnonzero(w >= _CANDIDATE_RATIO)
    if ids.size <= _SORT_LIMIT and w[ids].sum(dtype=np.float64) >= target:
        order = _by_value(w, ids)
        return np.sort(order[:np.searchsorted(np.cumsum(w[order], dtype=np.float64), target) + 1])
    bucket = w.view(np.int32) >> 16
    rank = (bucket.max() - bucket).astype(np.intp)  # 0 = the bucket of the most likely tokens
    # bincount takes intp and float64 as they are; other dtypes go through a much slower path.
    cum = np.cumsum(np.bincount(rank, weights=w.astype(np.float64)))
    edge = min(int(np.searchsorted(cum, target)), cum.size - 1)
    before = cum[edge - 1] if edge else 0.0
    order = _by_value(w, np.flatnonzero(rank == edge))
    kept = rank < edge
    kept[order[:np.searchsorted(np.cumsum(w[order], dtype=np.float64), target - before) + 1]] = True
    return np.flatnonzero(kept)


def _by_value(values: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """ids (ascending) sorted by value, largest first; the stable sort keeps ties by id."""
    return ids[np.argsort(-values[ids], kind="stable")]


def _draw(w: np.ndarray, row: SamplingRow) -> int:
    """One token: inverse CDF over the kept tokens in id order, from exactly one generator.random()."""
    kept = _kept(w, row.params)
    i = _inverse_cdf(w if kept is None else w[kept], row.generator.random())
    return i if kept is None else int(kept[i])


def _inverse_cdf(weights: np.ndarray, u: float) -> int:
    """The first index whose cumulative weight exceeds u * total weight, so zero weights are not chosen.

    In two levels (the block, then the index in it) because a cumsum over 1.5*10^5 weights costs ~0.5 ms
    and block sums ~50 us.
    """
    starts = np.arange(0, weights.size, _BLOCK)
    block_cum = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    target = u * block_cum[-1]
    # The min()s only matter when rounding puts target at or past the end (u within ~1e-16 of 1).
    b = min(int(np.searchsorted(block_cum, target, side="right")), starts.size - 1)
    inner = np.cumsum(weights[starts[b]:starts[b] + _BLOCK], dtype=np.float64)
    before = block_cum[b - 1] if b else 0.0
    return int(starts[b]) + min(int(np.searchsorted(inner, target - before, side="right")), inner.size - 1)


def _logprobs(x: np.ndarray, token: int, n: int) -> Logprobs:
    """The sampled token's log-probability and rank, and the n most likely tokens, from the raw logits x."""
    top = x.max()
    log_total = float(top) + float(np.log(np.exp(x - top).sum()))
    top_ids = _largest(x, min(n, x.size)).tolist() if n else []
    return Logprobs(token_logprob=float(x[token]) - log_total,
                    token_rank=1 + int(np.count_nonzero(x > x[token])),
                    top_ids=top_ids,
                    top_logprobs=[float(x[t]) - log_total for t in top_ids])
