"""The async engine on the mock model: concurrency, streaming, cancellation, overload, states, stats."""
from __future__ import annotations

import time

import anyio
import pytest

from llaisys.engine import (AsyncLLM, EngineArgs, EngineClosedError, EngineOverloadedError, LLMEngine,
                            RequestFailedError, SamplingParams)
from llaisys.models.mock import write_mock_model

from mock_oracle import held_cells, mock_greedy

VOCAB = 300
GREEDY = dict(temperature=0.0)


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return write_mock_model(tmp_path_factory.mktemp("mock"), vocab_size=VOCAB)


def make_engine(mock_dir, step_delay: float = 0.0, **args) -> AsyncLLM:
    """An async engine on the mock; step_delay slows every step down so that requests overlap."""
    engine = LLMEngine.from_engine_args(EngineArgs(model=str(mock_dir), **{
        "max_num_seqs": 8, "max_num_batched_tokens": 32, "n_ctx": 1024, **args}))
    if step_delay:
        step = engine.step

        def slow_step():
            time.sleep(step_delay)
            return step()

        engine.step = slow_step
    return AsyncLLM(engine)


async def wait_until(predicate, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.005)


async def test_concurrent_generate_matches_the_oracle(mock_dir):
    prompts = [f"prompt number {i}" for i in range(20)]
    async with make_engine(mock_dir) as engine:
        results = {}

        async def one(p):
            results[p] = await engine.generate(p, SamplingParams(max_tokens=24, **GREEDY))

        async with anyio.create_task_group() as tg:
            for p in prompts:
                tg.start_soon(one, p)
        assert held_cells(engine.engine) == 0
        stats = engine.stats()
    for p in prompts:
        out = results[p]
        assert out.finished and out.state == "finished"
        assert out.outputs[0].token_ids == mock_greedy(p.encode(), 24, VOCAB, keep_eos=True)
    assert stats.num_running == stats.num_waiting == 0
    assert stats.generation_tokens_total == sum(len(r.outputs[0].token_ids) for r in results.values())
    assert stats.prompt_tokens_total == sum(len(p) for p in prompts)
    assert stats.num_steps > 0 and stats.step_seconds_total > 0


async def test_stream_pieces_concatenate_to_the_final_text(mock_dir):
    params = SamplingParams(max_tokens=40, temperature=0.9, seed=11)
    async with make_engine(mock_dir) as engine:
        pieces, ids, last = [], [], None
        async for delta in engine.stream("tell me a story", params):
            for c in delta.outputs:
                pieces.append(c.text)
                ids += c.token_ids
            last = delta
        final = await engine.generate("tell me a story", params)
    assert last.finished and last.outputs[0].finish_reason in ("stop", "length")
    assert "".join(pieces) == final.outputs[0].text
    assert ids == final.outputs[0].token_ids
    assert len(pieces) > 1


async def test_cancelling_the_awaiting_task_frees_cells_within_a_step(mock_dir):
    async with make_engine(mock_dir, step_delay=0.01) as engine:
        core = engine.engine
        with anyio.move_on_after(0.2):
            await engine.generate("x" * 10, SamplingParams(max_tokens=10_000, ignore_eos=True, **GREEDY),
                                  request_id="victim")
        steps_at_cancel = core.stats().num_steps
        await wait_until(lambda: held_cells(core) == 0)
        assert core.stats().num_steps - steps_at_cancel <= 1
        assert "victim" not in core.requests
        assert core.stats().finished_by_reason["abort"] == 1


async def test_leaving_the_stream_early_cancels_the_request(mock_dir):
    async with make_engine(mock_dir, step_delay=0.005) as engine:
        core = engine.engine
        n = 0
        async for delta in engine.stream("abc", SamplingParams(max_tokens=10_000, ignore_eos=True, **GREEDY),
                                         request_id="early"):
            n += len(delta.outputs[0].token_ids)
            if n >= 5:
                break
        await wait_until(lambda: "early" not in core.requests and held_cells(core) == 0)
        assert core.stats().finished_by_reason["abort"] == 1


async def test_abort_by_id_and_the_states_seen_on_the_way(mock_dir):
    async with make_engine(mock_dir, step_delay=0.005, max_num_seqs=1) as engine:
        core = engine.engine
        params = SamplingParams(max_tokens=10_000, ignore_eos=True, **GREEDY)
        first = engine.stream("first", params, request_id="first")
        second = engine.stream("second", params, request_id="second")
        seen = []
        async for delta in first:
            seen.append(delta.state)
            if len(seen) == 3:
                await wait_until(lambda: core.requests["second"].state.value == "queued")
                engine.abort("first")
        assert seen[:3] == ["running"] * 3 and seen[-1] == "cancelled"
        async for delta in second:  # the freed slot lets the second run
            if delta.state == "running":
                engine.abort("second")
        assert delta.state == "cancelled" and delta.outputs[0].finish_reason == "abort"
        await wait_until(lambda: held_cells(core) == 0 and not core.has_unfinished_requests())


async def test_full_waiting_queue_raises_overloaded(mock_dir):
    async with make_engine(mock_dir, step_delay=0.01, max_num_seqs=1, max_waiting=2) as engine:
        params = SamplingParams(max_tokens=10_000, ignore_eos=True, **GREEDY)
        streams = [engine.stream("a", params), engine.stream("b", params)]
        with pytest.raises(EngineOverloadedError, match="overloaded"):
            engine.stream("c", params)
        assert engine.stats().num_waiting == 2
        for s in streams:
            await s.aclose()
        await wait_until(lambda: engine.stats().num_waiting == engine.stats().num_running == 0)
        await engine.generate("d", SamplingParams(max_tokens=3))  # room again
        assert held_cells(engine.engine) == 0


async def test_submission_errors_are_raised_at_once(mock_dir):
    async with make_engine(mock_dir) as engine:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await engine.generate([VOCAB + 5])
        with pytest.raises(ValueError, match="too|context"):
            engine.stream("z" * 2000)
        await engine.generate("ok", SamplingParams(max_tokens=2), request_id="dup")
        assert engine.stats().num_waiting == 0
    with pytest.raises(EngineClosedError):
        await engine.generate("closed")


async def test_a_failing_request_does_not_stop_the_loop(mock_dir, monkeypatch):
    from llaisys.core import InvalidArgumentError

    async with make_engine(mock_dir) as engine:
        worker = engine.engine.worker
        execute = worker.execute

        def reject(chunks):
            if any(ch.completion.request.request_id == "bad" for ch in chunks):
                raise InvalidArgumentError("decode: planted fault")
            return execute(chunks)

        monkeypatch.setattr(worker, "execute", reject)
        params = SamplingParams(max_tokens=8, ignore_eos=True, **GREEDY)
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.generate, "good", params)
            with pytest.raises(RequestFailedError, match="planted fault"):
                await engine.generate("bad", params, request_id="bad")
        out = await engine.generate("after", params)
        assert out.outputs[0].token_ids == mock_greedy(b"after", 8, VOCAB, keep_eos=True)
        assert engine.stats().requests_failed == 1 and held_cells(engine.engine) == 0


async def test_the_event_loop_stays_responsive_while_stepping(mock_dir):
    async with make_engine(mock_dir, step_delay=0.05) as engine:
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await anyio.sleep(0.005)
                ticks += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await engine.generate("abc", SamplingParams(max_tokens=6, ignore_eos=True, **GREEDY))
            tg.cancel_scope.cancel()
        assert ticks >= 20  # ~0.3 s of blocking steps, run in a worker thread


async def test_shutdown_cancels_what_is_in_flight(mock_dir):
    engine = make_engine(mock_dir, step_delay=0.01)
    results = []

    async def consume():
        async for delta in engine.stream("abc", SamplingParams(max_tokens=10_000, ignore_eos=True, **GREEDY)):
            results.append(delta)

    async with anyio.create_task_group() as tg:
        async with engine:
            tg.start_soon(consume)
            await wait_until(lambda: len(results) >= 2)
    assert results[-1].finished and results[-1].state == "cancelled"
    assert held_cells(engine.engine) == 0


async def test_a_dropped_stream_cancels_its_request(mock_dir):
    async with make_engine(mock_dir, step_delay=0.005) as engine:
        core = engine.engine
        stream = engine.stream("abc", SamplingParams(max_tokens=10_000, ignore_eos=True, **GREEDY),
                               request_id="dropped")
        await wait_until(lambda: "dropped" in core.requests)
        del stream  # never iterated
        await wait_until(lambda: "dropped" not in core.requests and held_cells(core) == 0)
