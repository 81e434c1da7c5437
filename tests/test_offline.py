"""The offline engine: LLM.generate and LLMEngine.step, on the mock model (fast, exact oracle) and
on the real default model (greedy parity with transformers, batch invariance, preemption)."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llaisys import LLM, SamplingParams
from llaisys.engine import EngineArgs, LLMEngine, PromptTooLongError, RequestState
from llaisys.models.mock import write_mock_model

from mock_oracle import check_kv, held_cells, mock_engine, mock_greedy, run_checked

VOCAB = 300
EOS = VOCAB - 1
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return write_mock_model(tmp_path_factory.mktemp("mock"), vocab_size=VOCAB)


def mock_llm(mock_dir, **args) -> LLM:
    return LLM(str(mock_dir), **{"max_num_seqs": 8, "max_num_batched_tokens": 16, "n_ctx": 512, **args})


def mock_text(ids) -> str:
    return bytes(t for t in ids if t < 256).decode("utf-8", "replace")


PROMPTS = ["hello", "the quick brown fox", "a", "llaisys serves many requests at once", "zz top", "0123456789"]


def test_greedy_mock_outputs_follow_the_oracle(mock_dir):
    llm = mock_llm(mock_dir)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=40, **GREEDY), use_tqdm=False)
    assert [o.prompt for o in outs] == PROMPTS
    for prompt, out in zip(PROMPTS, outs):
        expected = mock_greedy(prompt.encode(), 40, VOCAB, keep_eos=True)
        c = out.outputs[0]
        assert c.token_ids == expected, prompt
        assert c.finish_reason == ("stop" if expected[-1] == EOS else "length")
        assert c.text == mock_text(expected)
        assert out.finished and out.state == "finished"
        assert out.prompt_token_ids == list(prompt.encode())
        m = out.metrics
        assert m.num_prompt_tokens == len(prompt) and m.num_generated_tokens == len(expected)
        assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
        assert m.queue_time >= 0 and m.time_to_first_token >= m.queue_time
    assert held_cells(llm.engine) == 0


def test_prompt_forms_and_params_per_prompt(mock_dir):
    llm = mock_llm(mock_dir)
    ids = list(b"abc")
    forms = ["abc", ids, {"prompt": "abc"}, {"prompt_token_ids": ids}]
    outs = [llm.generate(f, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)[0] for f in forms]
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
    assert [o.prompt for o in outs] == ["abc", None, "abc", None]
    outs = llm.generate([ids, ids], [SamplingParams(max_tokens=3, **GREEDY), SamplingParams(max_tokens=6, **GREEDY)],
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3, 6]
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(["a", "b", "c"], [SamplingParams(), SamplingParams()])


def test_alone_or_batched_gives_the_same_tokens(mock_dir):
    params = SamplingParams(max_tokens=30, **GREEDY)
    alone = [mock_llm(mock_dir).generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS]
    together = mock_llm(mock_dir, max_num_batched_tokens=8).generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == alone


def test_long_prompt_is_chunked_and_decodes_are_not_starved(mock_dir):
    engine = mock_engine(mock_dir, max_num_batched_tokens=8)
    short = engine.add_request("hi", SamplingParams(max_tokens=60, ignore_eos=True, **GREEDY))
    engine.step()  # prompt of 2 tokens, first token sampled
    long_prompt = "x" * 100
    long = engine.add_request(long_prompt, SamplingParams(max_tokens=5, **GREEDY))
    steps = 0
    while long.completions[0].num_computed < len(long_prompt):
        before = len(short.completions[0].output_ids)
        engine.step()
        steps += 1
        assert len(short.completions[0].output_ids) == before + 1, "the decode was starved by the prefill"
    assert steps == -(-len(long_prompt) // 7)  # 7 prompt tokens per step next to one decode row
    run_checked(engine)
    assert long.completions[0].output_ids == mock_greedy(long_prompt.encode(), 5, VOCAB, keep_eos=True)


def test_max_tokens_stop_strings_and_stop_token_ids(mock_dir):
    llm = mock_llm(mock_dir)
    prompt = "the quick brown fox"
    full = mock_greedy(prompt.encode(), 40, VOCAB, keep_eos=True)
    full_text = mock_text(full)
    # A stop string spanning two tokens, taken from the middle of the greedy output.
    stop_at = next(i for i in range(3, len(full) - 1) if full[i] < 128 and full[i + 1] < 128)
    stop = bytes(full[stop_at:stop_at + 2]).decode()
    out = llm.generate(prompt, SamplingParams(max_tokens=40, stop=[stop], **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full_text[:full_text.index(stop)]
    assert out.token_ids == full[:len(out.token_ids)] and mock_text(out.token_ids).endswith(stop)

    stop_id = full[5]
    out = llm.generate(prompt, SamplingParams(max_tokens=40, stop_token_ids=[stop_id], **GREEDY),
                       use_tqdm=False)[0].outputs[0]
    first = full.index(stop_id)
    assert out.token_ids == full[:first + 1] and out.stop_reason == stop_id and out.finish_reason == "stop"
    assert out.text == mock_text(full[:first])  # the stop token itself is not text

    out = llm.generate(prompt, SamplingParams(max_tokens=7, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == full[:7] and out.finish_reason == "length"


def test_eos_min_tokens_and_ignore_eos(mock_dir):
    llm = mock_llm(mock_dir)
    prompt = next(p for p in (bytes([i, j]) for i in range(97, 123) for j in range(97, 123))
                  if EOS in mock_greedy(p, 12, VOCAB, keep_eos=True))
    natural = mock_greedy(prompt, 12, VOCAB, keep_eos=True)
    out = llm.generate(list(prompt), SamplingParams(max_tokens=12, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == natural and out.finish_reason == "stop" and out.stop_reason is None
    for params in (SamplingParams(max_tokens=len(natural) + 5, ignore_eos=True, **GREEDY),
                   SamplingParams(max_tokens=len(natural) + 5, min_tokens=len(natural) + 2, **GREEDY)):
        out = llm.generate(list(prompt), params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids[:len(natural) - 1] == natural[:-1]
        assert out.token_ids[len(natural) - 1] != EOS or params.ignore_eos
        assert len(out.token_ids) >= len(natural) + 2 - (1 if params.ignore_eos else 0)


def test_n_completions_share_the_prompt_cells(mock_dir):
    engine = mock_engine(mock_dir, max_num_batched_tokens=64)
    prompt = "shared prompt of some length"
    request = engine.add_request(prompt, SamplingParams(n=3, max_tokens=20, ignore_eos=True, **GREEDY))
    engine.step()
    # One copy of the prompt's cells serves all three completions.
    assert engine.worker.kv_used == engine.scheduler.kv_used == len(prompt)
    assert [c.num_computed for c in request.completions] == [len(prompt)] * 3
    run_checked(engine)
    expected = mock_greedy(prompt.encode(), 20, VOCAB, keep_eos=True)
    assert [c.token_ids for c in request.take_output(delta=False).outputs] == [expected] * 3
    assert [c.index for c in request.take_output(delta=False).outputs] == [0, 1, 2]


def test_n_seeded_completions_differ_and_reproduce(mock_dir):
    llm = mock_llm(mock_dir, max_num_batched_tokens=64)
    params = SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    first = [c.token_ids for c in llm.generate("abc", params, use_tqdm=False)[0].outputs]
    again = [c.token_ids for c in llm.generate(["zzz", "abc"], params, use_tqdm=False)[1].outputs]
    assert first == again
    assert len({tuple(t) for t in first}) > 1, "completions of one seeded request must not all be equal"


def test_preemption_under_small_kv_gives_identical_greedy_text(mock_dir):
    params = SamplingParams(max_tokens=30, ignore_eos=True, **GREEDY)
    engine = mock_engine(mock_dir, n_ctx=80, max_num_batched_tokens=16)
    requests = [engine.add_request(p, params) for p in PROMPTS]
    run_checked(engine)
    assert engine.stats().num_preemptions > 0
    for prompt, r in zip(PROMPTS, requests):
        assert r.state is RequestState.FINISHED
        assert r.completions[0].output_ids == mock_greedy(prompt.encode(), 30, VOCAB, keep_eos=True)[:30]


def test_preempted_n_completions_recompute_correctly(mock_dir):
    engine = mock_engine(mock_dir, n_ctx=70, max_num_batched_tokens=16)
    params = SamplingParams(n=2, max_tokens=20, ignore_eos=True, **GREEDY)
    requests = [engine.add_request(p, params) for p in ("abcdef", "ghijkl", "mnopqr")]
    run_checked(engine)
    assert engine.stats().num_preemptions > 0
    for r in requests:
        expected = mock_greedy(r.prompt.encode(), 20, VOCAB, keep_eos=True)
        assert [c.output_ids for c in r.completions] == [expected] * 2


def test_prompt_that_never_fits(mock_dir):
    engine = mock_engine(mock_dir, n_ctx=64)
    with pytest.raises(PromptTooLongError, match="64"):
        engine.add_request("x" * 64, SamplingParams())
    # Fits alone at first, but its three completions outgrow the whole cache: failed, not retried forever.
    doomed = engine.add_request("y" * 30, SamplingParams(n=3, max_tokens=30, ignore_eos=True, **GREEDY))
    fine = engine.add_request("ok", SamplingParams(max_tokens=5, **GREEDY))
    run_checked(engine)
    assert doomed.state is RequestState.FAILED and "KV cells" in doomed.error
    assert all(c.finish_reason == "abort" for c in doomed.completions)
    assert fine.state is RequestState.FINISHED


def test_bad_input_raises_naming_the_problem(mock_dir):
    llm = mock_llm(mock_dir)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([1, 2, VOCAB], use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate("", use_tqdm=False)
    with pytest.raises(ValueError, match="n .* exceeds max_num_seqs"):
        llm.generate("a", SamplingParams(n=9))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineArgs(max_num_seqs=8, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="messages"):
        llm.chat([])
    assert held_cells(llm.engine) == 0 and not llm.engine.has_unfinished_requests()


def test_request_lifecycle_and_abort(mock_dir):
    engine = mock_engine(mock_dir, max_num_seqs=1, max_num_batched_tokens=4)
    params = SamplingParams(max_tokens=50, ignore_eos=True, **GREEDY)
    a = engine.add_request("first", params, request_id="a")
    b = engine.add_request("second", params, request_id="b")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("again", params, request_id="a")
    assert a.state is b.state is RequestState.QUEUED
    engine.step()
    assert a.state is RequestState.RUNNING and b.state is RequestState.QUEUED  # one sequence slot
    out = engine.abort_request("a")
    assert out.finished and out.state == "cancelled" and a.completions[0].finish_reason == "abort"
    assert held_cells(engine) == 0 and engine.abort_request("a") is None
    engine.step()
    assert b.state is RequestState.RUNNING
    engine.abort_request("b")
    assert held_cells(engine) == 0 and not engine.has_unfinished_requests()
    stats = engine.stats()
    assert stats.finished_by_reason["abort"] == 2 and stats.num_running == stats.num_waiting == 0


def test_a_request_the_core_rejects_fails_alone(mock_dir, monkeypatch):
    from llaisys.core import InvalidArgumentError

    engine = mock_engine(mock_dir)
    params = SamplingParams(max_tokens=10, ignore_eos=True, **GREEDY)
    good = engine.add_request("good", params)
    bad = engine.add_request("bad", params)
    execute = engine.worker.execute

    def reject_bad(chunks):
        if any(ch.completion.request is bad for ch in chunks):
            raise InvalidArgumentError("decode: planted fault")
        return execute(chunks)

    monkeypatch.setattr(engine.worker, "execute", reject_bad)
    run_checked(engine)
    assert bad.state is RequestState.FAILED and "planted fault" in bad.error
    assert good.state is RequestState.FINISHED
    assert good.completions[0].output_ids == mock_greedy(b"good", 10, VOCAB, keep_eos=True)[:10]


def test_core_finding_no_room_preempts_instead_of_failing(mock_dir, monkeypatch):
    from llaisys.core import KVCacheFullError

    engine = mock_engine(mock_dir)
    params = SamplingParams(max_tokens=12, ignore_eos=True, **GREEDY)
    requests = [engine.add_request(p, params) for p in ("one", "two", "three")]
    execute = engine.worker.execute
    refusals = iter([False, False, True])  # the third step: the core answers 1 (no KV room)

    def refuse_once(chunks):
        if next(refusals, False):
            raise KVCacheFullError("decode: no room (planted)")
        return execute(chunks)

    monkeypatch.setattr(engine.worker, "execute", refuse_once)
    run_checked(engine)
    assert engine.stats().num_preemptions == 1 and requests[-1].metrics.num_preemptions == 1
    for r in requests:
        assert r.state is RequestState.FINISHED
        assert r.completions[0].output_ids == mock_greedy(r.prompt.encode(), 12, VOCAB, keep_eos=True)[:12]


def test_increments_concatenate_to_the_final_output(mock_dir):
    engine = mock_engine(mock_dir, max_num_batched_tokens=8)
    request = engine.add_request("stream me", SamplingParams(n=2, max_tokens=25, temperature=0.8, seed=3))
    texts, ids, finishes = {0: "", 1: ""}, {0: [], 1: []}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                texts[c.index] += c.text
                ids[c.index] += c.token_ids
                if c.finish_reason:
                    assert c.index not in finishes, "a finish was reported twice"
                    finishes[c.index] = c.finish_reason
    final = request.take_output(delta=False)
    assert [c.text for c in final.outputs] == [texts[0], texts[1]]
    assert [c.token_ids for c in final.outputs] == [ids[0], ids[1]]
    assert set(finishes) == {0, 1}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), n_ctx=st.integers(48, 200), budget=st.integers(8, 24))
def test_random_workloads_keep_every_invariant(mock_dir, seed, n_ctx, budget):
    """Random arrivals, lengths, n and aborts under a small cache: the cell count always matches the
    core, nothing leaks, and every greedy completion that ran to its end follows the oracle."""
    rng = random.Random(seed)
    engine = mock_engine(mock_dir, n_ctx=n_ctx, max_num_seqs=6, max_num_batched_tokens=budget)
    requests, aborted = [], set()
    for step in range(400):
        if step < 40 and rng.random() < 0.3:
            prompt = [rng.randrange(256) for _ in range(rng.randint(1, 40))]
            if requests and rng.random() < 0.5:  # a follow-up: part of an earlier request's tokens, then more
                base = rng.choice([r for r in requests if r.state.done] or requests)
                history = base.prompt_ids + base.completions[0].output_ids
                prompt = history[:rng.randint(1, len(history))] + prompt[:rng.randint(0, 8)]
            params = SamplingParams(n=rng.choice([1, 1, 2]), max_tokens=rng.randint(1, 30), **GREEDY)
            try:
                requests.append(engine.add_request(prompt, params))
            except PromptTooLongError:
                assert len(prompt) >= n_ctx
        if requests and rng.random() < 0.03:
            victim = rng.choice(requests)
            if engine.abort_request(victim.request_id) is not None:
                aborted.add(victim.request_id)
        if not engine.has_unfinished_requests() and step >= 40:
            break
        engine.step()
        check_kv(engine)
        assert engine.stats().last_step_seconds >= 0
    run_checked(engine)
    for r in requests:
        assert r.state.done
        if r.request_id in aborted or r.state is RequestState.FAILED:
            continue
        room = min(r.params.max_tokens, engine.max_model_len - len(r.prompt_ids))  # the context caps the output
        expected = mock_greedy(r.prompt_ids, room, VOCAB, keep_eos=True)
        assert all(c.output_ids == expected for c in r.completions), r.request_id


def test_chat_applies_the_template(mock_dir):
    llm = mock_llm(mock_dir)
    conversation = [{"role": "user", "content": "hi"}]
    out = llm.chat(conversation, SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)[0]
    assert out.prompt == "user: hi\nassistant: "
    two = llm.chat([conversation, conversation + [{"role": "assistant", "content": "yo"}]],
                   SamplingParams(max_tokens=5, **GREEDY), use_tqdm=False)
    assert len(two) == 2 and two[0].outputs[0].token_ids == out.outputs[0].token_ids


# The real default model: where truth matters.

REAL_PROMPTS = ["Who are you?", "Write a Python function that checks whether a number is prime.",
                "Explain what a hash map is in one paragraph."]


@pytest.fixture(scope="module")
def real_llm(default_model):
    return LLM(str(default_model), max_num_seqs=8, max_num_batched_tokens=256, n_ctx=2048)


@pytest.fixture(scope="module")
def hf_greedy(default_model):
    """Greedy token ids from transformers (float32) for each chat prompt, one prompt at a time."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(default_model), dtype=torch.float32).eval()
    def run(prompt_ids: list[int], steps: int) -> list[int]:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=steps, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        return out[0, len(prompt_ids):].tolist()

    return run


@pytest.mark.slow
def test_real_greedy_matches_transformers_generated_together(real_llm, hf_greedy):
    steps = 40
    prompts = [real_llm.engine.chat_prompt([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    outs = real_llm.generate(prompts, SamplingParams(max_tokens=steps, ignore_eos=True, **GREEDY), use_tqdm=False)
    for out in outs:
        assert out.outputs[0].token_ids == hf_greedy(out.prompt_token_ids, steps), out.prompt


@pytest.mark.slow
def test_real_alone_equals_batched_and_preempted(real_llm, default_model):
    params = SamplingParams(max_tokens=48, ignore_eos=True, **GREEDY)
    prompts = [real_llm.engine.chat_prompt([{"role": "user", "content": p}]) for p in REAL_PROMPTS]
    alone = [real_llm.generate(p, params, use_tqdm=False)[0].outputs[0] for p in prompts]
    together = real_llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in together] == [a.token_ids for a in alone]
    assert [o.outputs[0].text for o in together] == [a.text for a in alone]
    # A cache too small for all three at once: preemption and recomputation, same text.
    longest = max(len(o.prompt_token_ids) for o in together) + 48
    small = LLMEngine.from_engine_args(EngineArgs(model=str(default_model), max_num_seqs=4,
                                                  max_num_batched_tokens=64, n_ctx=longest + 40))
    requests = [small.add_request(p, params) for p in prompts]
    run_checked(small)
    assert small.stats().num_preemptions > 0
    assert [r.take_output(delta=False).outputs[0].text for r in requests] == [a.text for a in alone]


@pytest.mark.slow
def test_real_multi_turn_chat_with_and_without_the_prefix_cache(real_llm, default_model):
    """A chat's second turn reuses the first turn's cells and gives the same tokens as computing it all."""
    params = SamplingParams(max_tokens=32, **GREEDY)
    chat = [{"role": "user", "content": REAL_PROMPTS[0]}]
    plain = LLM(str(default_model), n_ctx=2048, max_num_seqs=2, enable_prefix_caching=False)
    outs = []
    for llm in (real_llm, plain):
        first = llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
        turn = chat + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Shorter, please."}]
        hits = llm.engine.stats().prefix_cache_hits
        outs.append((first.token_ids, llm.chat(turn, params, use_tqdm=False)[0].outputs[0].token_ids))
        if llm is real_llm:
            assert llm.engine.stats().prefix_cache_hits - hits > len(llm.engine.tokenize(llm.engine.chat_prompt(
                chat))[1])  # the whole first prompt and most of the reply
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_real_stop_string_and_chat(real_llm):
    conversation = [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}]
    free = real_llm.chat(conversation, SamplingParams(max_tokens=60, **GREEDY), use_tqdm=False)[0].outputs[0]
    assert free.text and free.finish_reason in ("stop", "length")
    words = [w for w in free.text.split() if len(w) > 3]
    stop = words[len(words) // 2]
    out = real_llm.chat(conversation, SamplingParams(max_tokens=60, stop=[stop], **GREEDY), use_tqdm=False)[0]
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == free.text[:free.text.index(stop)]
    assert np.all(np.asarray(c.token_ids) == np.asarray(free.token_ids[:len(c.token_ids)]))
