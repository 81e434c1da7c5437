"""The prefix cache (a radix tree over KV cells, engine/radix_cache.py) and its KV manager.

On the mock model (exact oracle: any wrong cell changes the tokens) for the bookkeeping: outputs
identical with the cache on and off, exact hit counts, sharing, eviction, the manager against the
core after every step. On the real default model for numerical truth: a cached prefix gives the
same tokens, bit for bit, as computing it; and the engine client's tokenizer is safe across threads.
"""
from __future__ import annotations

import random
import threading

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llaisys import SamplingParams
from llaisys.engine import AsyncLLM, EngineArgs, LLMEngine, RequestState
from llaisys.models.mock import write_mock_model

from mock_oracle import check_kv, mock_engine, mock_greedy, run_checked, run_random_workload

VOCAB = 300
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return write_mock_model(tmp_path_factory.mktemp("mock"), vocab_size=VOCAB)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def history(request) -> list[int]:
    return request.prompt_ids + request.completions[0].output_ids


def cached_tokens(request) -> int:
    return request.metrics.num_cached_tokens


# outputs identical with the cache on and off
def chat_workload(engine: LLMEngine, params: SamplingParams) -> list[list[int]]:
    """Conversations that share a system prompt, several turns each, two of them at a time; prompts
    that are a prefix of, or equal to, cached ones; an n = 3 request on a cached prefix."""
    system = tokens(1, 60)
    chats = [system + tokens(10 + i, 12) for i in range(4)]
    outputs = []
    for turn in range(3):
        for pair in (chats[:2], chats[2:]):
            requests = [engine.add_request(list(chat), params) for chat in pair]
            run_checked(engine)
            outputs += [c.output_ids for r in requests for c in r.completions]
        chats = [chat + out + tokens(100 * turn + i, 5) for i, (chat, out) in enumerate(zip(chats, outputs[-4:]))]
    for prompt in (system[:30], system, chats[0][:len(chats[0]) // 2], chats[1]):
        request = engine.add_request(prompt, params)
        run_checked(engine)
        outputs.append(request.completions[0].output_ids)
    n3 = engine.add_request(system + tokens(7, 3), SamplingParams(**{**_fields(params), "n": 3}))
    run_checked(engine)
    return outputs + [c.output_ids for c in n3.completions]


def _fields(params: SamplingParams) -> dict:
    return {k: getattr(params, k) for k in ("max_tokens", "temperature", "seed", "ignore_eos")}


@pytest.mark.parametrize("params", [SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY),
                                    SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)],
                         ids=["greedy", "seeded"])
def test_outputs_are_identical_with_the_cache_on_and_off(mock_dir, params):
    on = mock_engine(mock_dir, n_ctx=1024, max_num_batched_tokens=32)
    off = mock_engine(mock_dir, n_ctx=1024, max_num_batched_tokens=32, enable_prefix_caching=False)
    assert chat_workload(on, params) == chat_workload(off, params)
    assert on.stats().prefix_cache_hits > on.stats().prefix_cache_queries // 2
    assert off.stats().prefix_cache_hits == 0 and off.worker.kv_used == 0


def test_hits_at_every_cut_point(mock_dir):
    """A request sharing its first k tokens with a cached sequence reuses exactly k of them (all but
    its last token, when it is entirely cached), for every k, and follows the oracle."""
    engine = mock_engine(mock_dir, n_ctx=4096, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=4, ignore_eos=True, **GREEDY)
    first = engine.add_request(tokens(2, 40), params)
    run_checked(engine)
    cached = history(first)[:-1]  # the last sampled token was never computed
    for k in range(1, len(cached) + 2):
        for prompt in (cached[:k], cached[:k] + [(cached[k] + 1) % 256 if k < len(cached) else 7]):
            request = engine.add_request(prompt, params)
            run_checked(engine)
            assert cached_tokens(request) == min(k, len(prompt) - 1, len(cached)), (k, len(prompt))
            assert request.completions[0].output_ids == mock_greedy(prompt, 4, VOCAB, ignore_eos=True)


def test_two_conversations_with_one_system_prompt_reuse_their_whole_previous_turn(mock_dir):
    """A1 B1 A2 B2 with a 200-token system prompt: B1 reuses the system prompt, A2 and B2 each their
    whole previous turn (prompt and reply, less the reply's last token, which was never computed),
    and both conversations stay cached, the system prompt held once."""
    engine = mock_engine(mock_dir, n_ctx=2048, max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY)
    system = tokens(3, 200)
    a1 = engine.add_request(system + [1] + tokens(4, 30), params)
    run_checked(engine)
    b1 = engine.add_request(system + [2] + tokens(5, 25), params)
    run_checked(engine)
    assert (cached_tokens(a1), cached_tokens(b1)) == (0, 200)
    a_rest, b_rest = len(history(a1)) - 1 - 200, len(history(b1)) - 1 - 200
    assert engine.stats().prefix_cache_cells == 200 + a_rest + b_rest
    a2 = engine.add_request(history(a1) + tokens(6, 8), params)
    run_checked(engine)
    b2 = engine.add_request(history(b1) + tokens(7, 8), params)
    run_checked(engine)
    assert cached_tokens(a2) == len(history(a1)) - 1 and cached_tokens(b2) == len(history(b1)) - 1
    stats = engine.stats()
    assert stats.prefix_cache_queries == sum(r.num_prompt_tokens for r in (a1, b1, a2, b2))
    assert stats.prefix_cache_hits == 200 + len(history(a1)) - 1 + len(history(b1)) - 1
    assert stats.prefix_cache_hit_rate == stats.prefix_cache_hits / stats.prefix_cache_queries
    for r in (a1, b1, a2, b2):
        assert r.completions[0].output_ids == mock_greedy(r.prompt_ids, 10, VOCAB, ignore_eos=True)


def test_running_requests_feed_the_cache(mock_dir):
    """A request arriving while another with the same system prompt is still decoding reuses its
    prompt cells at once; both texts are right."""
    engine = mock_engine(mock_dir, n_ctx=1024, max_num_batched_tokens=32)
    params = SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY)
    system = tokens(8, 90)
    first = engine.add_request(system + [1, 2, 3], params)
    while not first.completions[0].output_ids:
        engine.step()
        check_kv(engine)
    second = engine.add_request(system + [4, 5], params)
    engine.step()
    check_kv(engine)
    assert cached_tokens(second) == 90 and first.state is RequestState.RUNNING
    run_checked(engine)
    for r in (first, second):
        assert r.completions[0].output_ids == mock_greedy(r.prompt_ids, 30, VOCAB, ignore_eos=True)


def test_n_completions_and_cancelled_requests_feed_the_cache_and_failed_ones_do_not(mock_dir, monkeypatch):
    from llaisys.core import InvalidArgumentError

    engine = mock_engine(mock_dir, n_ctx=1024, max_num_batched_tokens=32)
    many = engine.add_request(tokens(9, 20), SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=2))
    run_checked(engine)
    for c in many.completions:  # each completion's reply is cached: its follow-up reuses it all
        follow = engine.add_request(many.prompt_ids + c.output_ids + [1], SamplingParams(max_tokens=2))
        run_checked(engine)
        assert cached_tokens(follow) == 20 + len(c.output_ids) - 1
    stopped = engine.add_request(tokens(10, 12), SamplingParams(max_tokens=40, ignore_eos=True, **GREEDY))
    for _ in range(4):
        engine.step()
    engine.abort_request(stopped.request_id)
    computed = stopped.completions[0].num_computed
    again = engine.add_request(history(stopped) + [3], SamplingParams(max_tokens=2, **GREEDY))
    run_checked(engine)
    assert cached_tokens(again) == computed
    execute = engine.worker.execute

    def reject(chunks):
        if any(ch.completion.request.request_id == "bad" for ch in chunks):
            raise InvalidArgumentError("decode: planted fault")
        return execute(chunks)

    monkeypatch.setattr(engine.worker, "execute", reject)
    before = engine.stats().prefix_cache_cells
    bad = engine.add_request(tokens(11, 50), SamplingParams(max_tokens=5), request_id="bad")
    run_checked(engine)
    assert bad.state is RequestState.FAILED and engine.stats().prefix_cache_cells == before


def test_without_prefix_caching_nothing_is_kept(mock_dir):
    engine = mock_engine(mock_dir, enable_prefix_caching=False)
    params = SamplingParams(n=2, max_tokens=10, ignore_eos=True, **GREEDY)
    for _ in range(2):
        request = engine.add_request("the same prompt", params)
        run_checked(engine)
        assert engine.worker.kv_used == 0 and cached_tokens(request) == 0
    assert engine.stats().prefix_cache_hits == 0 and engine.kv.cache is None


# eviction and limits
def test_eviction_under_a_small_cache_never_fails_or_preempts_what_fits_without_it(mock_dir):
    """Three sequence slots and room for two requests at once, requests arriving in pairs: the cache
    keeps what it can and evicts least recently used first; nothing is preempted or failed, with the
    cache or without. (All at once, sharing lets more requests in than fit without the cache; their
    growth may then preempt the newest, whose computed tokens stay cached: see docs/engine.md.)"""
    # Each request shares 50 tokens with its neighbour, the first of a pair with the pair before.
    workload = [tokens(20 + (i + 1) // 2, 50) + tokens(30 + i, 10) for i in range(12)]
    params = SamplingParams(max_tokens=20, ignore_eos=True, **GREEDY)
    results, hits = {}, {}
    for caching in (True, False):
        engine = mock_engine(mock_dir, max_num_seqs=3, n_ctx=170, max_num_batched_tokens=32,
                             enable_prefix_caching=caching, prefix_cache_seqs=4)
        requests = []
        for i in range(0, len(workload), 2):
            requests += [engine.add_request(p, params) for p in workload[i:i + 2]]
            run_checked(engine)
            assert engine.worker.kv_used <= 170
        results[caching] = [r.completions[0].output_ids for r in requests]
        stats = engine.stats()
        assert stats.num_preemptions == 0 and stats.requests_failed == 0
        hits[caching] = stats.prefix_cache_hits
    assert results[True] == results[False]
    assert hits[True] > 0 == hits[False]
    engine = mock_engine(mock_dir, max_num_seqs=3, n_ctx=170, max_num_batched_tokens=32, prefix_cache_seqs=4)
    requests = [engine.add_request(prompt, params) for prompt in workload]
    run_checked(engine)
    assert engine.stats().requests_failed == 0 and engine.stats().prefix_cache_hits > 0
    assert [r.completions[0].output_ids for r in requests] == results[False]
    engine.reset_prefix_cache()
    assert engine.worker.kv_used == engine.stats().prefix_cache_cells == 0


def test_the_cache_budget_and_its_sequences_are_apart_from_the_running_slots(mock_dir):
    """More cached conversations than running slots, a budget of cells nobody running uses."""
    engine = mock_engine(mock_dir, max_num_seqs=2, n_ctx=2048, max_num_batched_tokens=32,
                         prefix_cache_max_cells=150, prefix_cache_seqs=6)
    params = SamplingParams(max_tokens=5, ignore_eos=True, **GREEDY)
    for i in range(10):
        request = engine.add_request(tokens(40 + i, 30), params)
        run_checked(engine)
        assert engine.stats().kv_cached_cells <= 150 and len(engine.kv.cache.nodes) <= 6
        assert request.completions[0].output_ids == mock_greedy(request.prompt_ids, 5, VOCAB, ignore_eos=True)
    assert engine.stats().kv_cached_cells > 100  # several conversations stay cached with two slots
    with pytest.raises(ValueError, match="prefix_cache_max_cells"):
        EngineArgs(prefix_cache_max_cells=-1)
    with pytest.raises(ValueError, match="prefix_cache_seqs"):
        EngineArgs(max_num_seqs=32, prefix_cache_seqs=4090)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n_ctx=st.integers(60, 260), budget=st.integers(8, 40),
       cache_seqs=st.integers(1, 12))
def test_random_workloads_keep_the_manager_equal_to_the_core(mock_dir, seed, n_ctx, budget, cache_seqs):
    """Random arrivals that share prefixes, n > 1, aborts, a small cache: after every step the
    manager's cells, the cache's nodes and locks match the core; every completion follows the oracle."""
    rng = random.Random(seed)
    engine = mock_engine(mock_dir, n_ctx=n_ctx, max_num_seqs=5, max_num_batched_tokens=budget,
                         prefix_cache_seqs=cache_seqs)
    system = tokens(seed % 1000, 30)

    def new_prompt(step, requests):
        if requests and rng.random() < 0.5:  # a follow-up: part of an earlier request's tokens, then more
            base = rng.choice(requests)
            prompt = history(base)[:rng.randint(1, len(history(base)))] + tokens(step, rng.randint(0, 6))
        else:
            prompt = system[:rng.randint(0, 30)] + tokens(step + 7, rng.randint(1, 20))
        return prompt[:n_ctx - 2]

    run_random_workload(engine, rng, new_prompt, arrivals=60, max_tokens=20)


# the real model: numerical truth, and the client's tokenizer across threads
SYSTEM = ("You are a careful senior software engineer. Answer with working code, explain briefly, prefer the "
          "standard library, and point out edge cases. ") * 4


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(**GREEDY), dict(temperature=0.8, top_p=0.95, seed=11)],
                         ids=["greedy", "seeded"])
def test_real_shared_system_prompt_and_follow_ups_are_identical_with_the_cache_on_and_off(default_model, sampling):
    params = SamplingParams(max_tokens=24, **sampling)
    questions = ["Reverse a string in Python.", "What is a mutex?", "Sort a dict by value."]
    results = []
    for caching in (True, False):
        engine = LLMEngine.from_engine_args(EngineArgs(model=str(default_model), n_ctx=4096, max_num_seqs=4,
                                                       max_num_batched_tokens=128, enable_prefix_caching=caching))
        chats = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in questions]
        outs = []
        for turn in range(2):
            requests = [engine.add_request(engine.chat_prompt(chat), params) for chat in chats]
            run_checked(engine)
            outs += [r.completions[0].output_ids for r in requests]
            for chat, r in zip(chats, requests):
                chat += [{"role": "assistant", "content": r.completions[0].detokenizer.text},
                         {"role": "user", "content": "Shorter, please."}]
        results.append((outs, engine.stats()))
    (on, stats), (off, _) = results
    assert on == off
    assert stats.prefix_cache_hits > len(engine.tokenize(SYSTEM)[1]) * 4


@pytest.mark.slow
def test_real_client_tokenizer_is_safe_from_threads_while_the_engine_steps(default_model):
    texts = ["def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n" * 20, "héllo wörld ✓ " * 50]

    async def main():
        engine = AsyncLLM.from_engine_args(EngineArgs(model=str(default_model), n_ctx=2048, max_num_seqs=4))
        errors = []

        def hammer():
            try:
                for i in range(40):
                    _, ids = engine.tokenize(texts[i % 2])
                    assert engine.detokenize(ids) == texts[i % 2]
                    engine.chat_prompt([{"role": "user", "content": texts[i % 2][:50]}])
            except Exception as e:  # noqa: BLE001 - any error is the failure being tested for
                errors.append(e)

        async with engine:
            threads = [threading.Thread(target=hammer) for _ in range(3)]
            for t in threads:
                t.start()
            outs = [await engine.generate(texts[i % 2][:200], SamplingParams(max_tokens=16, **GREEDY))
                    for i in range(3)]
            for t in threads:
                await anyio.to_thread.run_sync(t.join)
        assert not errors, errors
        assert all(o.outputs[0].token_ids for o in outs)

    anyio.run(main)
