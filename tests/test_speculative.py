"""Speculative decoding (engine/spec_decode.py, engine/ngram.py) never changes what a request returns.

On the mock model (exact oracle, cheap steps) for the bookkeeping: greedy and seeded outputs (tokens,
text, logprobs, finish reasons) identical with speculation off and on across k and n-gram settings,
alone and batched, with n > 1, penalties and min_tokens; stops and max_tokens at every position of
an accepted run; cancellation, failures and preemption mid-verify free every cell; the prefix cache
only ever holds accepted tokens; acceptance counters exact on a prompt the model must copy. On the
real default model: the same outputs for a few prompts (the core's half is tests/test_core_verify_rows.py).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llaisys import SamplingParams
from llaisys.engine import AsyncLLM, EngineArgs, LLMEngine, RequestState
from llaisys.engine import ngram
from llaisys.engine.spec_decode import Speculator, StepCost, accept_drafts
from llaisys.models.mock import write_mock_model
from llaisys.server.config import ServerConfig
from llaisys.server.metrics import ServerMetrics

from mock_oracle import check_kv, held_cells, mock_engine, mock_greedy, run_checked, run_random_workload

VOCAB = 300
COPY = 16  # tokens the copy prompt makes the mock repeat
SPEC = dict(speculative="ngram", speculative_adaptive=False)


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return write_mock_model(tmp_path_factory.mktemp("mock"), vocab_size=VOCAB)


def copy_prompt(seed: int, head: int = 4) -> tuple[list[int], list[int]]:
    """A prompt [x] + S + C + S whose greedy mock continuation starts with C: the n-gram drafter
    finds S and proposes C. The mock's next token is the running sum of token * (position + 1) mod
    VOCAB, so the continuation depends only on that sum and the length; x sets the sum."""
    rng = random.Random(seed)
    s = [rng.randrange(256) for _ in range(head)]
    length = 1 + 2 * head + COPY
    target = rng.randrange(VOCAB - 1)
    total, c = target, []
    for i in range(COPY):
        c.append(total % VOCAB)
        total += c[-1] * (length + i + 1)
    rest = s + c + s
    x = (target - sum(t * (p + 2) for p, t in enumerate(rest))) % VOCAB
    prompt = [x] + rest
    assert mock_greedy(prompt, COPY, VOCAB, ignore_eos=True) == c
    return prompt, c


def workload(seed: int, n: int) -> list[list[int]]:
    """Copy prompts, and prompts over a 4-token alphabet (many short matches, mostly rejected)."""
    rng = random.Random(seed)
    return [copy_prompt(seed * 100 + i)[0] if i % 2 else [rng.randrange(4) for _ in range(rng.randint(2, 40))]
            for i in range(n)]


# The mock's logits fall by 0.25 per token away from its choice: at low temperatures a seeded request
# still strays from greedy now and then, and otherwise copies (so drafts get accepted).
PARAMS = {"greedy": dict(temperature=0.0),
          "seeded": dict(temperature=0.1, seed=7),
          "seeded n=2, logprobs, penalties": dict(temperature=0.15, top_p=0.9, seed=3, n=2, logprobs=2,
                                                  repetition_penalty=1.3, frequency_penalty=0.5, min_tokens=3)}


def outputs(engine, prompts, params: SamplingParams, together: bool) -> list:
    """Every completion's tokens, text, finish and logprobs; the requests run together or one by one."""
    done = []
    for group in [prompts] if together else [[p] for p in prompts]:
        requests = [engine.add_request(list(p), params) for p in group]
        run_checked(engine)
        done += requests
    return [(c.output_ids, c.detokenizer.text, c.finish_reason, c.stop_reason, c.logprobs)
            for r in done for c in r.completions]


@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
@pytest.mark.parametrize("kind", PARAMS)
def test_outputs_identical_with_speculation_off_and_on(mock_dir, kind, together):
    params = SamplingParams(max_tokens=24, ignore_eos=True, **PARAMS[kind])
    prompts = workload(1, 10)
    want = outputs(mock_engine(mock_dir), prompts, params, together)
    accepted = rejected = 0
    for k in (1, 2, 4, 8):
        for lo, hi in ((1, 1), (2, 5), (3, 3)):
            engine = mock_engine(mock_dir, num_speculative_tokens=k, prompt_lookup_min=lo, prompt_lookup_max=hi,
                                 **SPEC)
            assert outputs(engine, prompts, params, together) == want, (k, lo, hi)
            spec = engine.stats().spec_decode
            assert spec.num_drafts > 0, (k, lo, hi)
            accepted += spec.num_accepted_tokens
            rejected += spec.num_draft_tokens - spec.num_accepted_tokens
    assert accepted > 0 and rejected > 0


def test_adaptive_speculation_gives_the_same_outputs(mock_dir, monkeypatch):
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.1, seed=1)
    prompts = workload(2, 12)
    want = outputs(mock_engine(mock_dir), prompts, params, False)
    engine = mock_engine(mock_dir, speculative="ngram", num_speculative_tokens=8)
    # The mock's step times are noise: a fixed row cost keeps the drafting (not the outputs) repeatable.
    monkeypatch.setattr(engine.speculator.cost, "observe", lambda rows, seconds: None)
    engine.speculator.cost.row_cost = 0.1
    assert outputs(engine, prompts, params, False) == want
    assert engine.stats().spec_decode.num_accepted_tokens > 0


def test_acceptance_counters_exact_on_a_copy(mock_dir):
    """Prefill gives C[0]; S + C[0] matches, so the drafts are C[1:5], all accepted (5 tokens), then
    C[6:10] (5 more); with 1 token left the last step drafts nothing: 1 + 3 steps instead of 1 + 11."""
    prompt, c = copy_prompt(5)
    engine = mock_engine(mock_dir, num_speculative_tokens=4, max_num_batched_tokens=64, **SPEC)
    request = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert run_checked(engine) == 4
    assert request.completions[0].output_ids == c[:12]
    for spec in (engine.stats().spec_decode, request.metrics.spec):
        assert (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) == (2, 8, 8)
        assert spec.accepted_per_position == [2, 2, 2, 2]
        assert spec.acceptance_rate == 1.0 and spec.mean_accepted_length == 5.0
    scraped = ServerMetrics("m", engine.stats).render().decode()
    for line in ('llaisys:spec_decode_num_drafts_total{model_name="m"} 2.0',
                 'llaisys:spec_decode_num_draft_tokens_total{model_name="m"} 8.0',
                 'llaisys:spec_decode_num_accepted_tokens_total{model_name="m"} 8.0',
                 'llaisys:spec_decode_num_accepted_tokens_per_pos_total{model_name="m",position="3"} 2.0'):
        assert line in scraped


@pytest.mark.parametrize("end", range(1, COPY))
def test_stops_and_max_tokens_inside_an_accepted_run(mock_dir, end):
    """max_tokens, a stop token id and a stop string landing on each position of the copied run."""
    prompt, c = copy_prompt(11)
    cases = [dict(max_tokens=end), dict(max_tokens=COPY, stop_token_ids=[c[end]])]
    if c[end] < 128:
        cases.append(dict(max_tokens=COPY, stop=[chr(c[end])]))
    for case in cases:
        params = SamplingParams(temperature=0.0, ignore_eos=True, **case)
        want = outputs(mock_engine(mock_dir), [prompt], params, False)
        engine = mock_engine(mock_dir, num_speculative_tokens=8, max_num_batched_tokens=64, **SPEC)
        assert outputs(engine, [prompt], params, False) == want, case
        assert len(want[0][0]) <= end + 1  # it ended inside the copied run
        if "stop" in case or "stop_token_ids" in case or end >= 3:
            assert engine.stats().spec_decode.num_accepted_tokens > 0


def verify_started(engine) -> None:
    """Step until a verify has run."""
    while engine.stats().spec_decode.num_drafts == 0:
        engine.step()
        check_kv(engine)


def test_cancellation_mid_verify_frees_every_cell(mock_dir):
    engine = mock_engine(mock_dir, num_speculative_tokens=8, **SPEC)
    requests = [engine.add_request(p, SamplingParams(n=2, max_tokens=30, temperature=0.1, seed=1, ignore_eos=True))
                for p in workload(3, 6)]
    verify_started(engine)
    for r in requests[::2]:
        engine.abort_request(r.request_id)
        check_kv(engine)
    run_checked(engine)
    assert all(r.state is RequestState.CANCELLED for r in requests[::2])


def test_a_fault_while_verifying_fails_the_requests_and_frees_their_cells(mock_dir, monkeypatch):
    engine = mock_engine(mock_dir, num_speculative_tokens=4, max_num_batched_tokens=64, **SPEC)
    request = engine.add_request(copy_prompt(2)[0], SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    engine.step()  # the prompt; the next step verifies

    def broken(*args):
        raise RuntimeError("sampler fault")

    monkeypatch.setattr(engine.executor, "_sample_row", broken)
    engine.step()
    assert request.state is RequestState.FAILED and "sampler fault" in request.error
    check_kv(engine)
    assert held_cells(engine) == 0  # the prompt's cells stay cached, free for the taking


def test_preemption_mid_verify_gives_the_same_outputs(mock_dir):
    params = SamplingParams(max_tokens=24, temperature=0.1, seed=4, ignore_eos=True)
    prompts = [copy_prompt(20 + i)[0] for i in range(6)]
    small = dict(n_ctx=120, max_num_batched_tokens=32)
    want = outputs(mock_engine(mock_dir, **small), prompts, params, True)
    engine = mock_engine(mock_dir, num_speculative_tokens=8, **small, **SPEC)
    assert outputs(engine, prompts, params, True) == want
    assert engine.stats().num_preemptions > 0 and engine.stats().spec_decode.num_accepted_tokens > 0


def test_the_prefix_cache_holds_only_accepted_tokens(mock_dir):
    """A follow-up of a speculated reply finds it in the cache (its cells checked by check_kv after
    every step) and continues exactly as without speculation or cache."""
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = mock_engine(mock_dir, num_speculative_tokens=8, **SPEC)
    first = engine.add_request(copy_prompt(8)[0], params)
    run_checked(engine)
    follow = first.prompt_ids + first.completions[0].output_ids + [5, 6]
    second = engine.add_request(follow, params)
    run_checked(engine)
    assert second.metrics.num_cached_tokens == len(follow) - 3
    assert second.completions[0].output_ids == mock_greedy(follow, 20, VOCAB, ignore_eos=True)
    assert engine.stats().spec_decode.num_draft_tokens > engine.stats().spec_decode.num_accepted_tokens > 0


def test_a_request_can_opt_out(mock_dir):
    engine = mock_engine(mock_dir, num_speculative_tokens=4, **SPEC)
    prompt = copy_prompt(9)[0]
    on = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    off = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, speculative=False))
    run_checked(engine)
    assert on.metrics.spec.num_drafts > 0 and off.metrics.spec.num_drafts == 0
    assert on.completions[0].output_ids == off.completions[0].output_ids


def test_cached_cells_give_way_only_to_proposed_drafts(mock_dir):
    """A full cache and a request that drafts nothing: nothing is evicted for drafts."""
    engine = mock_engine(mock_dir, n_ctx=64, num_speculative_tokens=8, **SPEC)
    engine.add_request(list(range(40)), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    run_checked(engine)
    assert engine.kv.cached == 49  # the last token is never computed
    drafts = engine.stats().spec_decode.num_drafts
    engine.add_request(list(range(100, 108)), SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True,
                                                             speculative=False))
    run_checked(engine)
    assert engine.kv.cached == 49 + 11 and engine.stats().spec_decode.num_drafts == drafts


async def test_a_stream_gets_each_verify_as_one_increment(mock_dir):
    """Accepted runs stream as multi-token increments whose tokens, text and logprobs add up."""
    prompt, c = copy_prompt(13)
    params = SamplingParams(max_tokens=COPY, temperature=0.0, ignore_eos=True, logprobs=1)
    engine = mock_engine(mock_dir, num_speculative_tokens=4, max_num_batched_tokens=64, **SPEC)
    async with AsyncLLM(engine) as llm:
        deltas = [d.outputs[0] for d in [d async for d in llm.stream(prompt, params)] if d.outputs]
    assert sum((d.token_ids for d in deltas), []) == c and max(len(d.token_ids) for d in deltas) == 5
    assert all(len(d.logprobs) == len(d.token_ids) for d in deltas)
    assert "".join(d.text for d in deltas) == bytes(t for t in c if t < 256).decode("utf-8", "replace")
    assert held_cells(engine) == 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n_ctx=st.integers(60, 200), budget=st.integers(8, 24), k=st.integers(1, 8))
def test_random_workloads_with_speculation_keep_every_invariant(mock_dir, seed, n_ctx, budget, k):
    """Random arrivals, copies, n and aborts under a small cache: cells always match the core, nothing
    leaks, every greedy completion that ran to its end follows the oracle."""
    rng = random.Random(seed)
    engine = mock_engine(mock_dir, n_ctx=n_ctx, max_num_seqs=6, max_num_batched_tokens=budget,
                         num_speculative_tokens=k, **SPEC)

    def new_prompt(step, requests):
        if rng.random() < 0.5:
            return copy_prompt(rng.randrange(10**6))[0]
        return [rng.randrange(4) for _ in range(rng.randint(1, 30))]

    run_random_workload(engine, rng, new_prompt, arrivals=30, max_tokens=30, steps=400)


# the draft-model drafter
@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory):
    """A mock draft that agrees with the target where the target's choice is even: on an odd choice
    its bias on even tokens makes it propose the next token instead (about half its drafts are wrong)."""
    import json

    path = tmp_path_factory.mktemp("draft")
    bias = [0.3 if v % 2 == 0 else 0.0 for v in range(VOCAB)]
    (path / "config.json").write_text(json.dumps({"model_type": "mock", "vocab_size": VOCAB, "logit_bias": bias}))
    return path


# The mock's top probability is about 0.22: p_min 0 lets its drafts through.
def draft_engine(mock_dir, draft, **args):
    return mock_engine(mock_dir, speculative="draft", draft_model=str(draft),
                       **{"speculative_p_min": 0.0, "speculative_adaptive": False, **args})


@pytest.mark.parametrize("together", [False, True], ids=["alone", "batched"])
@pytest.mark.parametrize("kind", PARAMS)
def test_draft_model_outputs_identical_with_speculation_off_and_on(mock_dir, draft_dir, kind, together):
    params = SamplingParams(max_tokens=24, ignore_eos=True, **PARAMS[kind])
    prompts = workload(4, 10)
    want = outputs(mock_engine(mock_dir), prompts, params, together)
    for k in (1, 2, 4, 8):
        engine = draft_engine(mock_dir, draft_dir, num_speculative_tokens=k)
        assert outputs(engine, prompts, params, together) == want, k
        spec = engine.stats().spec_decode
        assert spec.num_draft_tokens > spec.num_accepted_tokens > 0, k


def test_a_draft_equal_to_the_target_is_always_accepted(mock_dir):
    """Prefill gives one token; each verify then drafts 4, all accepted (5 tokens), twice; the 1 token
    left is a plain decode: 1 + 3 steps instead of 12."""
    engine = draft_engine(mock_dir, mock_dir, num_speculative_tokens=4, max_num_batched_tokens=64)
    prompt = workload(6, 2)[0]
    request = engine.add_request(prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert run_checked(engine) == 4
    assert request.completions[0].output_ids == mock_greedy(prompt, 12, VOCAB, ignore_eos=True)
    for spec in (engine.stats().spec_decode, request.metrics.spec):
        assert (spec.num_drafts, spec.num_draft_tokens, spec.num_accepted_tokens) == (2, 8, 8)
        assert spec.acceptance_rate == 1.0 and spec.mean_accepted_length == 5.0


def test_the_draft_model_stops_below_p_min(mock_dir):
    engine = draft_engine(mock_dir, mock_dir, num_speculative_tokens=4, speculative_p_min=0.5)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    run_checked(engine)
    assert engine.stats().spec_decode.num_drafts == 0  # the mock is never that sure


def test_adaptive_drafting_stops_running_a_draft_model_that_proposes_nothing(mock_dir, monkeypatch):
    engine = draft_engine(mock_dir, mock_dir, num_speculative_tokens=4, speculative_p_min=0.5,
                          speculative_adaptive=True)
    monkeypatch.setattr(engine.speculator.cost, "observe", lambda rows, seconds: None)  # no timing noise
    engine.speculator.overall.accepted = 9.0  # it starts out sure of the draft model
    runs = []
    drafts = engine.drafter._drafts
    monkeypatch.setattr(engine.drafter, "_drafts", lambda chunks: runs.append(len(chunks)) or drafts(chunks))
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True))
    run_checked(engine)
    assert 0 < len(runs) < 15  # it probes now and then, not at each of the 59 decode steps


@pytest.mark.parametrize("end", range(1, 16))
def test_draft_model_stops_and_max_tokens_inside_an_accepted_run(mock_dir, end):
    prompt = workload(7, 2)[0]
    c = mock_greedy(prompt, 16, VOCAB, ignore_eos=True)
    cases = [dict(max_tokens=end), dict(max_tokens=16, stop_token_ids=[c[end]])]
    if c[end] < 128:
        cases.append(dict(max_tokens=16, stop=[chr(c[end])]))
    for case in cases:
        params = SamplingParams(temperature=0.0, ignore_eos=True, **case)
        want = outputs(mock_engine(mock_dir), [prompt], params, False)
        engine = draft_engine(mock_dir, mock_dir, num_speculative_tokens=8, max_num_batched_tokens=64)
        assert outputs(engine, [prompt], params, False) == want, case
        assert len(want[0][0]) <= end + 1
        if case["max_tokens"] >= 3:  # else one token is left after the prompt's: nothing to draft
            assert engine.stats().spec_decode.num_accepted_tokens > 0


def test_draft_model_cancellation_mid_verify_frees_every_cell(mock_dir, draft_dir):
    engine = draft_engine(mock_dir, draft_dir, num_speculative_tokens=8)
    requests = [engine.add_request(p, SamplingParams(n=2, max_tokens=30, temperature=0.1, seed=1, ignore_eos=True))
                for p in workload(3, 6)]
    verify_started(engine)
    assert engine.drafter.kv_used > 0
    for r in requests[::2]:
        engine.abort_request(r.request_id)
        check_kv(engine)
    run_checked(engine)  # checks that neither model holds a cell at the end
    assert all(r.state is RequestState.CANCELLED for r in requests[::2])


def test_draft_model_preemption_mid_verify_gives_the_same_outputs(mock_dir, draft_dir):
    params = SamplingParams(max_tokens=24, temperature=0.1, seed=4, ignore_eos=True)
    prompts = [copy_prompt(20 + i)[0] for i in range(6)]
    small = dict(n_ctx=120, max_num_batched_tokens=32)
    want = outputs(mock_engine(mock_dir, **small), prompts, params, True)
    engine = draft_engine(mock_dir, draft_dir, num_speculative_tokens=8, **small)
    assert outputs(engine, prompts, params, True) == want
    assert engine.stats().num_preemptions > 0 and engine.stats().spec_decode.num_accepted_tokens > 0


def test_the_draft_model_computes_a_shared_prompt_once(mock_dir, draft_dir):
    """n = 3: the three draft sequences compute the prompt in shared rows; a later request starting
    with a running one's prompt copies those cells. Outputs as without speculation."""
    rows = []  # every draft row: (position, its sequences)

    def counting(engine):
        decode = engine.drafter.model.decode

        def counted(batch):
            seqs = np.split(batch.seq_flat, np.cumsum(batch.seq_counts)[:-1])
            rows.extend(zip(batch.pos.tolist(), map(tuple, seqs)))
            return decode(batch)

        engine.drafter.model.decode = counted
        return engine

    rng = random.Random(9)
    prompt = [rng.randrange(256) for _ in range(30)]
    params = SamplingParams(n=3, max_tokens=12, temperature=0.1, seed=2, ignore_eos=True)
    want = outputs(mock_engine(mock_dir), [prompt], params, True)
    engine = counting(draft_engine(mock_dir, draft_dir, num_speculative_tokens=4, max_num_batched_tokens=64))
    assert outputs(engine, [prompt], params, True) == want
    in_prompt = [seqs for p, seqs in rows if p < len(prompt)]
    assert len(in_prompt) == len(prompt) and all(len(seqs) == 3 for seqs in in_prompt)

    rows.clear()
    engine = counting(draft_engine(mock_dir, draft_dir, num_speculative_tokens=4, max_num_batched_tokens=64))
    first = engine.add_request(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    verify_started(engine)
    seq = first.leader.seq_id
    later = engine.add_request(prompt + [7, 8], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    run_checked(engine)
    assert [seqs for p, seqs in rows if p < len(prompt)] == [(seq,)] * len(prompt)
    assert later.completions[0].output_ids == mock_greedy(prompt + [7, 8], 10, VOCAB, ignore_eos=True)
    assert later.metrics.spec.num_drafts > 0


def test_a_failing_draft_model_only_costs_its_drafts(mock_dir, draft_dir, monkeypatch):
    from llaisys.core import KVCacheFullError

    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = workload(8, 4)
    want = outputs(mock_engine(mock_dir), prompts, params, True)
    engine = draft_engine(mock_dir, draft_dir, num_speculative_tokens=4)
    decode = engine.drafter.model.decode
    calls = iter(range(10**6))

    def flaky(batch):
        if next(calls) % 7 == 6:  # out of step with the 4 draft batches of a step
            raise KVCacheFullError("no room in the draft")
        return decode(batch)

    monkeypatch.setattr(engine.drafter.model, "decode", flaky)
    assert outputs(engine, prompts, params, True) == want
    assert engine.stats().spec_decode.num_accepted_tokens > 0


def test_a_draft_model_with_other_tokens_is_refused(mock_dir, tmp_path):
    from llaisys.engine.errors import DraftModelMismatchError

    other = write_mock_model(tmp_path / "other", vocab_size=VOCAB + 1)
    with pytest.raises(DraftModelMismatchError, match="vocabulary size differs: 301 against the target's 300"):
        draft_engine(mock_dir, other)
    special = write_mock_model(tmp_path / "special", vocab_size=VOCAB, special_tokens={"<|im_end|>": 260})
    with pytest.raises(DraftModelMismatchError, match="special tokens differ"):
        draft_engine(mock_dir, special)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n_ctx=st.integers(60, 200), budget=st.integers(8, 24), k=st.integers(1, 8))
def test_random_workloads_with_a_draft_model_keep_every_invariant(mock_dir, draft_dir, seed, n_ctx, budget, k):
    """As the n-gram one; check_kv also holds the draft's cells to a prefix of each running completion."""
    rng = random.Random(seed)
    engine = draft_engine(mock_dir, draft_dir, n_ctx=n_ctx, max_num_seqs=6, max_num_batched_tokens=budget,
                          num_speculative_tokens=k)
    run_random_workload(engine, rng, lambda step, requests: [rng.randrange(256) for _ in range(rng.randint(1, 30))],
                        arrivals=30, max_tokens=30, steps=400)


def test_adaptive_drafting_counts_the_draft_models_steps():
    """Same acceptance, same target: a cheap draft model drafts, a costly one does not."""
    from llaisys.engine.request import Request
    from llaisys.engine.spec_decode import expected_speedup

    assert expected_speedup(0.8, 0, 0.5) == 1.0 and expected_speedup(1.0, 3, 0.0) == 4.0
    assert expected_speedup(0.8, 4, 0.1) == pytest.approx((1 - 0.8 ** 5) / 0.2 / 1.4)
    target = StepCost()
    for rows in (1, 3, 5, 9):
        target.observe(rows, 0.1 + 0.01 * rows)  # a = 0.1 s
    draft = StepCost()
    for rows in (1, 3, 5, 9):
        draft.observe(rows, 0.02 + 0.002 * rows)  # a_d = 0.02 s, 0.2 of the target's
    assert target.base == pytest.approx(0.1) and draft.base == pytest.approx(0.02)

    def drafts(cost: StepCost, batch: int) -> int:
        spec = Speculator(k=8, adaptive=True, draft_cost=cost)
        spec.cost = target
        r = Request("r", None, [1, 2, 3], SamplingParams(max_tokens=100), frozenset(), 1000, lambda ids: None)
        for _ in range(10):
            spec.record(r.leader, 8, 6)
        tokens, deferred = spec.draft(r.leader, 8, batch)
        assert tokens == ()
        return deferred

    assert 0 < drafts(draft, 1) <= 8
    costly = StepCost()
    for rows in (1, 3, 5, 9):
        costly.observe(rows, 0.2 + 0.002 * rows)  # slower than the target itself
    assert drafts(costly, 1) == 0
    assert drafts(draft, 64) < drafts(draft, 1)


def test_the_draft_model_counts_the_prompt_tokens_it_lacks(mock_dir):
    engine = draft_engine(mock_dir, mock_dir, num_speculative_tokens=4)
    prompt = list(range(1, 40))
    first = engine.add_request(prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    while not first.leader.output_ids:  # the target's prefill
        engine.step()
    assert engine.drafter.prompt_lacking(first.leader) == len(prompt)
    engine.step()  # the first verify: the draft model computed the prompt
    assert engine.drafter.prompt_lacking(first.leader) == 0
    second = engine.add_request(prompt[:30] + [99] * 9, SamplingParams(max_tokens=8, temperature=0.0))
    assert engine.drafter.prompt_lacking(second.leader) == 9  # the first 30 can be shared from the first's
    run_checked(engine)


def test_a_draft_model_lacking_the_prompt_starts_only_where_it_pays_for_it():
    """The draft model's first computation of a prompt is charged once against the drafts' saving over
    the tokens left: a long prompt and a short reply in a busy batch do not start it; a long reply does;
    a prompt it holds costs nothing."""
    from llaisys.engine.request import Request

    target, draft = StepCost(), StepCost()
    for rows in (1, 3, 5, 9):
        target.observe(rows, 0.1 + 0.01 * rows)  # a = 0.1 s, b / a = 0.1
        draft.observe(rows, 0.02 + 0.002 * rows)
    draft.observe_prompt(500, 500 * 0.002)  # 2 ms a prompt row: 0.02 of the target's a

    def drafts(prompt: int, max_tokens: int, batch: int, lacking: int) -> int:
        spec = Speculator(k=4, adaptive=True, draft_cost=draft, prompt_lacking=lambda c: lacking)
        spec.cost = target
        r = Request("r", None, [1] * prompt, SamplingParams(max_tokens=max_tokens), frozenset(), 100000,
                    lambda ids: None)
        for _ in range(10):
            spec.record(r.leader, 4, 4)
        return spec.draft(r.leader, 4, batch)[1]

    assert drafts(500, 128, 1, lacking=500) == 4  # saves ~0.6 a a token: 128 tokens repay the prompt's 10 a
    assert drafts(500, 128, 8, lacking=500) == 0  # ~0.06 a a token at batch 8: 128 do not
    assert drafts(500, 4096, 8, lacking=500) > 0  # 4,096 would
    assert drafts(500, 128, 8, lacking=0) > 0  # and once it holds the prompt, drafts are the usual choice
    draft.prompt_row_seconds = None
    assert drafts(500, 128, 8, lacking=500) > 0  # unmeasured: the first prompt it computes measures it



# speculation under a grammar (response_format json_schema): drafts the mask forbids are rejected
COLOURS = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 6, "maxItems": 12}


@pytest.mark.parametrize("drafter", ["ngram", "draft"])
@pytest.mark.parametrize("kind", ["greedy", "seeded", "seeded n=2, logprobs, penalties"])
def test_a_grammar_with_speculation_gives_the_same_valid_outputs(mock_dir, drafter, kind):
    import json

    import jsonschema

    from llaisys.server.structured import schema_grammar

    params = SamplingParams(max_tokens=100, grammar=schema_grammar(COLOURS, "response_format"),
                            **{key: value for key, value in PARAMS[kind].items() if key != "min_tokens"})
    prompts = [[rng.randrange(256) for _ in range(rng.randint(2, 30))] for rng in map(random.Random, range(6))]
    want = outputs(mock_engine(mock_dir), prompts, params, True)
    spec = SPEC if drafter == "ngram" else dict(speculative="draft", draft_model=str(mock_dir),
                                                speculative_p_min=0.0, speculative_adaptive=False)
    engine = mock_engine(mock_dir, num_speculative_tokens=4, max_num_batched_tokens=64, **spec)
    got = outputs(engine, prompts, params, True)
    assert got == want
    for tokens, text, finish, _, _ in got:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), COLOURS)
    counters = engine.stats().spec_decode
    # the draft model (the target without the mask) proposes tokens the grammar forbids: some rejected
    assert counters.num_draft_tokens > counters.num_accepted_tokens > 0


# the parts
def test_ngram_proposes_what_followed_the_latest_longest_match():
    t = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3])
    assert ngram.propose(t, 2, 1, 3) == [7, 8]  # "2 3" last seen before 7 8 (a longer "5 2 3" is nowhere else)
    assert ngram.propose(t, 1, 3, 3) == []  # no earlier "5 2 3"
    assert ngram.propose(np.array([4, 4, 4, 4]), 3, 1, 2) == [4]  # the latest earlier "4 4" is followed by one 4
    assert ngram.propose(np.array([6]), 3, 1, 2) == []


def test_accept_drafts_takes_the_targets_choices_up_to_the_first_mismatch():
    class Pick:
        def __init__(self, token):
            self.token = token

    target = [5, 6, 7, 8, 9]
    run = lambda draft: [p.token for p in accept_drafts(draft, Pick(target[0]), lambda j, done: Pick(target[j]))]
    assert run((5, 6, 7, 8)) == [5, 6, 7, 8, 9]  # all accepted and the bonus token
    assert run((5, 0, 7)) == [5, 6]  # the target's 6 replaces the rejected 0
    assert run((1,)) == [5]


def test_adaptive_drafting_follows_acceptance_and_batch_size(mock_dir):
    cost = StepCost()
    for rows in (1, 3, 5, 9, 1, 5):
        cost.observe(rows, 2.0 + 0.5 * rows)
    assert cost.row_cost == pytest.approx(0.25)
    spec = Speculator(k=8, adaptive=True, ngram=ngram.NgramDrafter(1, 3))
    spec.cost = cost
    engine = mock_engine(mock_dir)
    good, half, bad = (engine.make_request([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3], SamplingParams(max_tokens=100)).leader
                       for _ in range(3))
    for _ in range(10):
        spec.record(good, 8, 8)
        spec.record(half, 8, 4)
        spec.record(bad, 8, 0)
    assert spec.draft(good, 8, batch=1) == ((4, 5, 6, 7, 8, 9, 1, 2), 0)
    assert 0 < len(spec.draft(half, 8, batch=1)[0]) < 8
    assert spec.draft(half, 8, batch=64) == ((), 0) and spec.draft(bad, 8, batch=1) == ((), 0)
    assert good.request.metrics.spec.num_accepted_tokens == 80


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="needs a draft_model"):
        EngineArgs(speculative="draft")
    with pytest.raises(ValueError, match="a draft_model needs speculative='draft'"):
        EngineArgs(speculative="ngram", draft_model="/some/draft")
    with pytest.raises(ValueError, match="speculative_p_min must be a number in"):
        EngineArgs(speculative="draft", draft_model="/some/draft", speculative_p_min=1.5)
    with pytest.raises(ValueError, match="speculative must be one of"):
        EngineArgs(speculative="eagle")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineArgs(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="prompt_lookup_max"):
        EngineArgs(prompt_lookup_min=4, prompt_lookup_max=3)
    with pytest.raises(ValueError, match="speculative must be a bool"):
        SamplingParams(speculative="no")
    config = ServerConfig.from_env({"LLAISYS_SPECULATIVE": "ngram", "LLAISYS_SPECULATIVE_TOKENS": "6",
                                    "LLAISYS_SPECULATIVE_ADAPTIVE": "off"})
    args = config.engine_args()
    assert (args.speculative, args.num_speculative_tokens, args.speculative_adaptive) == ("ngram", 6, False)
    with pytest.raises(ValueError, match="LLAISYS_SPECULATIVE_NGRAM_MIN must be an integer"):
        ServerConfig.from_env({"LLAISYS_SPECULATIVE_NGRAM_MIN": "two"})
    args = ServerConfig.from_env({"LLAISYS_SPECULATIVE": "draft", "LLAISYS_DRAFT_MODEL": "/d",
                                  "LLAISYS_SPECULATIVE_P_MIN": "0.5"}).engine_args()
    assert (args.speculative, args.draft_model, args.speculative_p_min) == ("draft", "/d", 0.5)


# The real default model: the kernels' batch invariance end to end.
REAL_PROMPTS = ["Add a docstring to this function:\n\ndef area(w, h):\n    return w * h\n",
                "Why is the sky blue?"]


@pytest.fixture(scope="module")
def real_model(default_model):
    from pathlib import Path

    gguf = Path.home() / ".cache/llaisys/qwen2.5-coder-0.5b-instruct.gguf"  # the same model, faster here
    return str(gguf if gguf.is_file() else default_model)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_real_outputs_identical_with_speculation_off_and_on(real_model, kind):
    params = SamplingParams(max_tokens=40, **PARAMS[kind])
    base = LLMEngine.from_engine_args(EngineArgs(model=real_model, n_ctx=1024, max_num_seqs=4))
    prompts = [base.chat_prompt([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    prompts = [base.tokenize(p)[1] for p in prompts]
    want = outputs(base, prompts, params, True)
    for k in (2, 8):
        engine = LLMEngine.from_engine_args(EngineArgs(model=real_model, n_ctx=1024, max_num_seqs=4,
                                                       num_speculative_tokens=k, **SPEC))
        assert outputs(engine, prompts, params, True) == want, k
        assert engine.stats().spec_decode.num_accepted_tokens > 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_real_draft_model_outputs_identical_with_speculation_off_and_on(real_model, kind):
    """The 1.5B sibling drafted for by the default model when its GGUF is there, else the default model
    drafting for itself."""
    from pathlib import Path

    sibling = Path.home() / ".cache/llaisys/qwen2.5-coder-1.5b-instruct.gguf"
    target = str(sibling) if sibling.is_file() else real_model
    params = SamplingParams(max_tokens=40, **PARAMS[kind])
    common = dict(model=target, n_ctx=1024, max_num_seqs=4)
    base = LLMEngine.from_engine_args(EngineArgs(**common))
    prompts = [base.tokenize(base.chat_prompt([{"role": "user", "content": p}]))[1] for p in REAL_PROMPTS]
    want = outputs(base, prompts, params, True)
    engine = LLMEngine.from_engine_args(EngineArgs(**common, speculative="draft", draft_model=real_model,
                                                   num_speculative_tokens=4, speculative_adaptive=False))
    assert outputs(engine, prompts, params, True) == want
    assert engine.stats().spec_decode.num_accepted_tokens > 0 and engine.drafter.kv_used == 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_real_json_schema_with_speculation_gives_the_same_valid_output(real_model, kind):
    """response_format json_schema (the server's grammar) with n-gram and draft-model speculation (the
    default model drafting for itself, unmasked): the same tokens as without, and valid."""
    import json

    import jsonschema

    from llaisys.server.structured import response_format_grammar

    schema = {"type": "array", "minItems": 4, "maxItems": 4, "items": {
        "type": "object", "additionalProperties": False, "required": ["name", "order"],
        "properties": {"name": {"type": "string", "maxLength": 12}, "order": {"type": "integer"}}}}
    grammar = response_format_grammar({"response_format": {"type": "json_schema",
                                                           "json_schema": {"name": "planets", "schema": schema}}})
    params = SamplingParams(max_tokens=120, grammar=grammar, **PARAMS[kind])
    common = dict(model=real_model, n_ctx=1024, max_num_seqs=4)
    base = LLMEngine.from_engine_args(EngineArgs(**common))
    messages = [[{"role": "user", "content": "The first four planets from the sun, with their order, as JSON."}],
                [{"role": "user", "content": "Four programming languages and the order they were created in."}]]
    prompts = [base.tokenize(base.chat_prompt(m))[1] for m in messages]
    want = outputs(base, prompts, params, True)
    for text in (w[1] for w in want):
        jsonschema.validate(json.loads(text), schema)
    for spec in (dict(SPEC, num_speculative_tokens=4),
                 dict(speculative="draft", draft_model=real_model, num_speculative_tokens=4,
                      speculative_adaptive=False)):
        engine = LLMEngine.from_engine_args(EngineArgs(**common, **spec))
        assert outputs(engine, prompts, params, True) == want, spec["speculative"]
        assert engine.stats().spec_decode.num_accepted_tokens > 0
