"""Tests for SamplingParams validation and the sampler: supports, distributions, penalties, seeds, logprobs.

The statistical tests draw with fixed seeds, so they are deterministic; their bound (chi-square at
p ~ 3e-7) passes a correct sampler for almost any seed and fails a wrong distribution by far.
"""
import math

import numpy as np
import pytest

from llaisys.engine.sampler import SamplingRow, probabilities, sample
from llaisys.engine.sampling_params import SamplingParams


def read_only(logits) -> np.ndarray:
    a = np.array(logits, dtype=np.float32)
    a.setflags(write=False)
    return a


def make_row(generator=None, prompt=(), output=(), banned=(), **params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), generator, list(prompt), list(output), banned)


def draw(x, n, seed=0, banned=(), **params) -> np.ndarray:
    """n tokens drawn from the logits row x: one batch of n rows sharing one generator."""
    row = make_row(np.random.default_rng(seed), banned=banned, **params)
    return sample(np.broadcast_to(read_only(x), (n, len(x))), [row] * n).token_ids


def reference_probabilities(x, temperature, top_k=0, top_p=1.0, min_p=0.0) -> np.ndarray:
    """The straightforward implementation: float64 softmax(x / T), a full stable sort, top_k, top_p, min_p."""
    x = np.asarray(x, dtype=np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1.0:
        cum = np.cumsum(p[order]) / p[order].sum()
        order = order[:np.searchsorted(cum, top_p) + 1]
    kept = np.zeros(p.size, dtype=bool)
    kept[order] = True
    kept &= p >= min_p * p.max()
    q = np.where(kept, p, 0.0)
    return q / q.sum()


def softmax(x) -> np.ndarray:
    e = np.exp(np.asarray(x, dtype=np.float64) - np.max(x))
    return e / e.sum()


# --- SamplingParams ---------------------------------------------------------------------------------

@pytest.mark.parametrize("field, kwargs", [
    ("n", dict(n=0)),
    ("n", dict(n=2.0)),
    ("max_tokens", dict(max_tokens=0)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=10, max_tokens=5)),
    ("temperature", dict(temperature=-0.5)),
    ("temperature", dict(temperature=float("nan"))),
    ("top_k", dict(top_k=-2)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.01)),
    ("min_p", dict(min_p=-0.1)),
    ("min_p", dict(min_p=1.5)),
    ("seed", dict(seed=-1)),
    ("seed", dict(seed="7")),
    ("stop", dict(stop=[""])),
    ("stop", dict(stop=["ok", 3])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
    ("stop_token_ids", dict(stop_token_ids=["2"])),
    ("ignore_eos", dict(ignore_eos=1)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-2.5)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("repetition_penalty", dict(repetition_penalty=float("inf"))),
    ("logprobs", dict(logprobs=21)),
    ("logprobs", dict(logprobs=-1)),
])
def test_invalid_params_raise_naming_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_valid_params_and_their_properties():
    params = SamplingParams(stop="END", max_tokens=None, top_k=-1, logprobs=0, seed=0)
    assert params.stop == ["END"] and params.stop_token_ids == []
    assert not params.greedy and not params.has_penalties
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(presence_penalty=0.1).has_penalties
    assert SamplingParams(repetition_penalty=1.1).has_penalties


# --- supports ---------------------------------------------------------------------------------------

# A 50-token distribution with its head at scattered ids (id order is not probability order);
# the other 44 ids share 0.12 equally, so they tie and top_p must break ties by id.
HEAD = {17: 0.30, 3: 0.20, 41: 0.15, 8: 0.10, 29: 0.08, 0: 0.05}
TAIL = [t for t in range(50) if t not in HEAD]


def support_logits() -> np.ndarray:
    p = np.full(50, 0.12 / len(TAIL))
    p[list(HEAD)] = list(HEAD.values())
    return np.log(p)


@pytest.mark.parametrize("params, support", [
    (dict(top_k=3), {17, 3, 41}),
    (dict(top_p=0.2), {17}),                     # the first token alone crosses 0.2
    (dict(top_p=0.45), {17, 3}),                 # 0.30, 0.50: the crossing token 3 is kept
    (dict(top_p=0.55), {17, 3, 41}),             # 0.30, 0.50, 0.65
    (dict(top_p=0.95), set(HEAD) | set(TAIL[:26])),  # 0.88 + 26 * 0.12/44 = 0.9509; ties by id
    (dict(min_p=0.3), {17, 3, 41, 8}),           # p >= 0.09
    (dict(min_p=0.6), {17, 3}),                  # p >= 0.18
    # top_p is a share of the top-5 mass 0.83: 0.361, 0.602, 0.783, 0.904 (of all: 5 tokens)
    (dict(top_k=5, top_p=0.8), {17, 3, 41, 8}),
    (dict(top_k=5, top_p=0.8, min_p=0.4), {17, 3, 41}),  # and p >= 0.12
    # T = 0.5 squares the probabilities: 0.09, 0.04, 0.0225, 0.01, ... of 0.1712: 0.526, 0.759, 0.891
    (dict(temperature=0.5, top_p=0.8), {17, 3, 41}),
    (dict(temperature=1.0), set(range(50))),
])
def test_only_the_hand_computed_support_is_sampled(params, support):
    x = support_logits()
    p = probabilities(read_only(x), make_row(np.random.default_rng(0), **params))
    assert set(np.flatnonzero(p).tolist()) == support
    drawn = set(draw(x, 3000, **params).tolist())
    assert drawn <= support
    assert drawn >= {t for t in support if p[t] > 0.01}  # e.g. the boundary token is really drawn


def test_banned_ids_are_never_sampled_and_count_before_the_filters():
    x = support_logits()
    assert set(draw(x, 3000, banned={17}, top_k=2).tolist()) == {3, 41}
    assert 17 not in draw(x, 3000, banned=[17, 5], temperature=3.0)
    greedy = make_row(banned={17, 3}, temperature=0)
    assert sample(read_only([x]), [greedy]).token_ids.tolist() == [41]
    with pytest.raises(ValueError, match="no finite logit"):
        sample(read_only([x]), [make_row(np.random.default_rng(0), banned=range(50))])


def test_greedy_is_the_argmax_lowest_id_on_ties_and_draws_nothing():
    x = support_logits()
    tied = x.copy()
    tied[[30, 9]] = x.max() + 1
    generator = np.random.default_rng(3)
    state = generator.bit_generator.state
    rows = [make_row(generator, temperature=0), make_row(None, temperature=0), make_row(generator, temperature=0)]
    assert sample(read_only([x, tied, x]), rows).token_ids.tolist() == [17, 9, 17]
    assert generator.bit_generator.state == state
    assert probabilities(read_only(tied), rows[1]).tolist() == [float(t == 9) for t in range(50)]


@pytest.mark.parametrize("x, params", [
    # One likely token and a long tail each below 1e-4 of it that holds ~19% of the mass: the
    # nucleus (and the top 3000) reach far past the tokens the sampler looks at first.
    (np.r_[0.0, np.full(4999, -10.0)], dict(top_p=0.9)),
    (np.r_[0.0, np.full(4999, -10.0)], dict(top_k=3000)),
    (np.r_[0.0, np.full(4999, -10.0)], dict(top_k=3000, top_p=0.5)),
    (np.random.default_rng(1).standard_normal(20000) * 3, dict(temperature=0.7, top_p=0.95)),
    (np.random.default_rng(2).standard_normal(20000) * 3, dict(temperature=0.7, top_k=40, top_p=0.9)),
    (np.random.default_rng(3).standard_normal(20000) * 0.3, dict(temperature=1.5, top_p=0.5, min_p=0.5)),
    (np.random.default_rng(4).standard_normal(20000), dict(temperature=1.0, min_p=0.05)),
    # Flat rows of the real vocabulary's size: the nucleus holds most tokens (the bucketed path).
    (np.random.default_rng(5).standard_normal(151936), dict(temperature=1.0, top_p=0.9)),
    (np.random.default_rng(6).standard_normal(151936) * 2, dict(temperature=1.5, top_p=0.95, min_p=0.01)),
])
def test_probabilities_match_a_full_sort_reference(x, params):
    x = read_only(x)
    got = probabilities(x, make_row(np.random.default_rng(0), **params))
    want = reference_probabilities(x, **{"temperature": 1.0, **params})
    assert np.array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-9)


# --- distributions ----------------------------------------------------------------------------------

def chi_square_bound(df: int, z: float = 5.0) -> float:
    """The chi-square quantile at the normal quantile z (Wilson-Hilferty); z = 5 is p ~ 3e-7."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def assert_fits(drawn: np.ndarray, p: np.ndarray) -> None:
    """Pearson's chi-square goodness of fit of drawn tokens to p, bins of expectation < 5 pooled."""
    counts = np.bincount(drawn, minlength=p.size)
    assert counts[p == 0].sum() == 0
    expected = drawn.size * p
    big = expected >= 5
    observed, expected = list(counts[big]), list(expected[big])
    rest = drawn.size * p[~big].sum()
    if rest >= 5:
        observed.append(counts[~big].sum())
        expected.append(rest)
    else:  # too small for a bin of its own: joins the smallest one
        observed[int(np.argmin(expected))] += counts[~big].sum()
        expected[int(np.argmin(expected))] += rest
    observed, expected = np.array(observed), np.array(expected)
    stat = float(((observed - expected) ** 2 / expected).sum())
    assert stat < chi_square_bound(len(expected) - 1), f"chi-square {stat:.1f} with {len(expected) - 1} df"


DIST_LOGITS = np.random.default_rng(7).standard_normal(50) * 1.5


@pytest.mark.parametrize("params", [
    dict(temperature=0.5),
    dict(temperature=1.0),
    dict(temperature=2.0),
    dict(temperature=0.8, top_k=20, top_p=0.9),
    dict(temperature=1.0, min_p=0.05),
])
def test_empirical_distribution_fits(params):
    want = reference_probabilities(DIST_LOGITS, **params)
    np.testing.assert_allclose(probabilities(read_only(DIST_LOGITS), make_row(np.random.default_rng(0), **params)),
                               want, rtol=1e-5, atol=1e-9)
    assert_fits(draw(DIST_LOGITS, 20000, seed=11, **params), want)


def test_each_sampled_token_is_one_draw_by_inverse_cdf_in_id_order():
    x = read_only(np.random.default_rng(5).standard_normal(1000) * 2)
    params = dict(temperature=0.9, top_k=100, top_p=0.9)
    p = probabilities(x, make_row(np.random.default_rng(0), **params))
    cum = np.cumsum(p)
    for seed in range(30):
        generator, twin = np.random.default_rng(seed), np.random.default_rng(seed)
        token = sample(x[None, :], [make_row(generator, **params)]).token_ids[0]
        assert token == np.searchsorted(cum, twin.random() * cum[-1], side="right")
        assert generator.random() == twin.random()  # exactly one draw was used


# --- penalties --------------------------------------------------------------------------------------

PENALTY_LOGITS = [2.0, -1.0, 0.5, 1.5, 0.0, 1.9]


@pytest.mark.parametrize("params, prompt, output, adjusted", [
    # HF: positive logits divided by the penalty, negative ones multiplied; prompt and output count.
    (dict(repetition_penalty=2.0), [0, 4], [1, 3, 3], [1.0, -2.0, 0.5, 0.75, 0.0, 1.9]),
    (dict(repetition_penalty=0.5), [2], [1], [2.0, -0.5, 1.0, 1.5, 0.0, 1.9]),
    # OpenAI: frequency * count + presence, for output tokens only (token 2 is in the prompt).
    (dict(frequency_penalty=0.5, presence_penalty=0.25), [2], [0, 3, 0, 1], [0.75, -1.75, 0.5, 0.75, 0.0, 1.9]),
    (dict(presence_penalty=-1.0), [], [4, 4, 4], [2.0, -1.0, 0.5, 1.5, 1.0, 1.9]),
    # All three: the repetition penalty first, then the subtractions.
    (dict(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), [2], [0, 3, 0, 1],
     [-0.25, -2.75, 0.25, 0.0, 0.0, 1.9]),
])
def test_penalties_match_hand_computed_logits(params, prompt, output, adjusted):
    x = read_only(PENALTY_LOGITS)
    sampled = make_row(np.random.default_rng(0), prompt, output, **params)
    np.testing.assert_allclose(probabilities(x, sampled), softmax(adjusted), rtol=1e-6)
    greedy = make_row(None, prompt, output, temperature=0, **params)
    assert sample(x[None, :], [greedy]).token_ids.tolist() == [int(np.argmax(adjusted))]


def test_penalties_change_the_greedy_pick():
    x = read_only([PENALTY_LOGITS])
    assert sample(x, [make_row(temperature=0)]).token_ids.tolist() == [0]
    assert sample(x, [make_row(prompt=[0], temperature=0, repetition_penalty=1.2)]).token_ids.tolist() == [5]
    assert sample(x, [make_row(output=[0], temperature=0, presence_penalty=0.2)]).token_ids.tolist() == [5]
    assert sample(x, [make_row(prompt=[0], temperature=0, presence_penalty=0.2)]).token_ids.tolist() == [0]


# --- seeds ------------------------------------------------------------------------------------------

SEEDED = dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.2, frequency_penalty=0.3)


def seeded_sequence(position: int, mates: list[dict], steps: int = 50, vocab: int = 1000) -> list[int]:
    """The tokens of one seeded row sampled at `position` among `mates` (params, with a generator each
    unless greedy, all mates sharing one), its logits the same at every step whatever the batch."""
    target_logits = np.random.default_rng(100).standard_normal((steps, vocab)) * 2
    mate_logits = np.random.default_rng(len(mates) + 10 * position).standard_normal((steps, len(mates), vocab)) * 2
    target, mates_rng = np.random.default_rng(1234), np.random.default_rng(99)
    output = []
    for step in range(steps):
        rows = [make_row(None if p.get("temperature") == 0 else mates_rng, [1, 2, 3], [5, 5], **p) for p in mates]
        rows.insert(position, make_row(target, [1, 2, 3], output, **SEEDED))
        logits = read_only(np.insert(mate_logits[step], position, target_logits[step], axis=0))
        output.append(int(sample(logits, rows).token_ids[position]))
    return output


def test_a_seeded_row_gives_the_same_tokens_whatever_its_batch():
    alone = seeded_sequence(0, [])
    assert len(set(alone)) > 10  # it really samples
    sampled = dict(temperature=1.0)
    greedy = dict(temperature=0)
    penalized = dict(temperature=0.7, top_p=0.8, presence_penalty=1.0, repetition_penalty=1.5, logprobs=3)
    for position, mates in [(0, [sampled, sampled]), (2, [sampled, sampled]), (1, [greedy, greedy, greedy]),
                            (1, [penalized, greedy, sampled]), (3, [dict(temperature=0.5, min_p=0.2)] * 5)]:
        assert seeded_sequence(position, mates) == alone, (position, mates)


# --- logprobs ---------------------------------------------------------------------------------------

def test_logprobs_come_from_the_raw_logits():
    x = read_only(np.random.default_rng(6).standard_normal((3, 1000)) * 2)
    rows = [make_row(np.random.default_rng(0), output=[1, 2, 3], temperature=0.7, top_p=0.9,
                     repetition_penalty=1.3, logprobs=5),
            make_row(None, temperature=0, logprobs=0),
            make_row(np.random.default_rng(1))]
    result = sample(x, rows)
    assert result.logprobs[2] is None
    for i in (0, 1):
        lp, token = result.logprobs[i], int(result.token_ids[i])
        ref = x[i].astype(np.float64) - np.log(np.exp(x[i].astype(np.float64)).sum())
        top = np.argsort(-ref, kind="stable")[:rows[i].params.logprobs]
        assert lp.top_ids == top.tolist()
        np.testing.assert_allclose(lp.top_logprobs, ref[top], atol=1e-5)
        assert lp.token_logprob == pytest.approx(ref[token], abs=1e-5)
        assert lp.token_rank == 1 + np.count_nonzero(ref > ref[token])
    assert result.logprobs[1].top_ids == [] and result.logprobs[1].top_logprobs == []
    assert result.logprobs[1].token_rank == 1


def test_logprobs_break_ties_by_id_and_stop_at_the_vocabulary():
    x = read_only([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [1.0, 3.0, 3.0, 0.0, 3.0, 2.0]])
    rows = [make_row(temperature=0, banned=[1], logprobs=4), make_row(temperature=0, logprobs=20)]
    result = sample(x, rows)
    assert result.logprobs[0].top_ids == [1, 2, 4, 5]
    assert result.token_ids[0] == 2 and result.logprobs[0].token_rank == 1
    assert result.logprobs[1].top_ids == [1, 2, 4, 5, 0, 3]


# --- inputs -----------------------------------------------------------------------------------------

def test_the_logits_are_never_modified():
    x = np.random.default_rng(8).standard_normal((4, 300)).astype(np.float32)
    before = x.copy()
    rows = [make_row(np.random.default_rng(0), [1, 2], [3, 3, 4], banned=[5], repetition_penalty=1.5,
                     frequency_penalty=0.5, presence_penalty=0.5, top_p=0.9, logprobs=2),
            make_row(None, [1, 2], [3], banned=[6], temperature=0, repetition_penalty=2.0),
            make_row(np.random.default_rng(1), temperature=0.5, min_p=0.1),
            make_row(None, temperature=0, logprobs=3)]
    sample(x, rows)
    assert np.array_equal(x, before)
    x.setflags(write=False)
    sample(x, rows)  # a read-only array is fine
    for i, row in enumerate(rows):
        probabilities(x[i], row)
    assert np.array_equal(x, before)


def test_bad_inputs_are_rejected():
    x = read_only(np.zeros((2, 10)))
    with pytest.raises(ValueError, match="shape"):
        sample(x, [make_row(temperature=0)])
    with pytest.raises(ValueError, match="generator"):
        sample(x, [make_row(temperature=0), make_row(None, temperature=0.5)])
