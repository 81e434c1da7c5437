"""Reliability runs against one llaisys server (the default model unless --model), run in this process
so that afterwards its KV accounting can be checked against the core itself: no cell held by a
request that is gone (tests/mock_oracle.check_kv and held_cells). Not tests: run by hand, one at a
time under the benchmark lock, with the figures recorded in docs/reliability.md.

    flock /tmp/llaisys-bench.lock python benchmarks/reliability.py soak [--clients 64] [--duration 600]
    flock /tmp/llaisys-bench.lock python benchmarks/reliability.py storm [--requests 1000]

soak: --clients streaming chat clients (bench_server's seeded conversations of 1-3 turns) for
--duration seconds against a server with a queue limit (--max-num-seqs running, and as many
waiting as there are clients, so that no client can be refused even when the scheduler lags):
every request must succeed. The process's RSS is sampled every 10 s (start = the end of --warmup,
end = the end of the run). Then, above the limit, a burst of limit + --over simultaneous streams:
at least --over of them must get a 429 (queue_full) before their stream starts, every other one
must finish. After each phase no cell may be held.

storm: --requests requests, --concurrency at a time, each cancelled (the client hangs up) at a
random point: before its answer starts (tokenizing or queued: 8 sequences run at once, so many
wait), after the answer started but before the first token (long prompts: mid-prefill), or after
1..40 tokens (mid-decode; speculation is on, prompt lookup over code, so decode steps verify
drafts: mid-verify). A tenth are not streamed and hang up at a random time. Then no cell may be
held and the server must answer a request as before the storm (the same greedy text).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # mock_oracle imports its siblings
from benchmarks.bench_server import Server, load, summarize
from tests.http_client import Connection, call
from tests.mock_oracle import check_kv, held_cells
from tests.server_process import free_port, get_json

from llaisys.server import ServerConfig, create_app

log = logging.getLogger("reliability")


class InProcessServer:
    """create_app(config) under hypercorn on a thread and event loop of its own; `with` gives its URL."""

    def __init__(self, config: ServerConfig):
        self.app = create_app(config)
        self.url = f"http://127.0.0.1:{free_port()}"
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), name="server", daemon=True)

    async def _serve(self) -> None:
        from hypercorn.asyncio import serve
        from hypercorn.config import Config

        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        hyper = Config()
        hyper.bind = [self.url.removeprefix("http://")]
        hyper.errorlog = logging.getLogger("hypercorn.error")
        self._ready.set()
        await serve(self.app, hyper, shutdown_trigger=self._stop.wait)

    def __enter__(self) -> "InProcessServer":
        self._thread.start()
        self._ready.wait()
        deadline = time.monotonic() + 300
        while True:
            try:
                if get_json(f"{self.url}/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not become ready in 300 s")
            time.sleep(0.2)

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(120)

    @property
    def engine(self):
        """The LLMEngine under the server's AsyncLLM."""
        return self.app.extensions["llaisys"].engine.engine

    def settle_and_check(self, what: str, timeout: float = 120.0) -> dict:
        """Once nothing runs or waits: the KV manager agrees with the core and no request holds a cell."""
        engine = self.engine
        deadline = time.monotonic() + timeout
        while engine.scheduler.running or engine.scheduler.waiting:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: still {len(engine.scheduler.running)} running, "
                                     f"{len(engine.scheduler.waiting)} waiting after {timeout:g} s")
            time.sleep(0.1)
        time.sleep(0.5)  # the engine thread applies the last aborts after its step
        check_kv(engine)
        state = {"core cells in use": engine.worker.kv_used, "prefix-cache cells (free for reuse)": engine.kv.evictable,
                 "cells held by requests": held_cells(engine), "scheduler kv_used": engine.scheduler.kv_used}
        log.info("%s: %s", what, state)
        assert state["cells held by requests"] == 0 == state["scheduler kv_used"], f"{what}: cells leaked: {state}"
        return state


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssSampler(threading.Thread):
    """The process's RSS every `every` seconds, as (seconds since start, MiB)."""

    def __init__(self, every: float = 10.0):
        super().__init__(name="rss", daemon=True)
        self.every, self.samples, self.start_time = every, [], time.monotonic()
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic() - self.start_time, rss_mib()))
            self._stop_event.wait(self.every)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def at(self, t: float) -> float:
        """The first sample at or after t seconds."""
        return next((mib for s, mib in self.samples if s >= t), self.samples[-1][1])


# --- soak -----------------------------------------------------------------------------------------

async def burst(url: str, model: str, n: int) -> dict[str, int]:
    """n streams sent at once: how many were refused (429 queue_full) and how many finished cleanly."""
    async def one(i: int) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": f"Burst request {i}: name a prime number."}],
                "max_tokens": 32, "temperature": 0, "stream": True}
        conn = await Connection.open(url, "POST", "/v1/chat/completions", body)
        try:
            if conn.status == 429:
                code = json.loads(await conn.body())["error"]["code"]
                return "429 queue_full" if code == "queue_full" else f"429 {code}"
            if conn.status != 200:
                return f"HTTP {conn.status}"
            events = [e async for e in conn.events()]
            ok = events and events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            return "200 finished" if ok else "200 with an error or cut"
        finally:
            conn.close()

    outcomes = await asyncio.gather(*(one(i) for i in range(n)))
    return {k: outcomes.count(k) for k in sorted(set(outcomes))}


def soak(args) -> None:
    config = ServerConfig(model=args.model, max_num_seqs=args.max_num_seqs, max_waiting=args.clients)
    limit = config.max_num_seqs + config.max_waiting
    sampler = RssSampler()
    with InProcessServer(config) as server:
        sampler.start()
        target = Server("llaisys", server.url)
        log.info("soak: %d clients for %g s, queue limit %d running + %d waiting", args.clients, args.duration,
                 config.max_num_seqs, config.max_waiting)
        records, t0, t1 = asyncio.run(load(target, args.clients, 0.0, args.duration, args.seed, 0.0, args.timeout,
                                           (1, 3)))
        run_end = time.monotonic() - sampler.start_time
        res = summarize("llaisys", args.clients, records, t0, t1)
        idle = server.settle_and_check("after the soak")
        over = asyncio.run(burst(server.url, target.model, limit + args.over))
        idle_after_burst = server.settle_and_check("after the burst above the limit")
        sampler.stop()
    errors = {k: v for k, v in res.errors.items()}
    warm = sampler.at(args.warmup)
    after = [mib for s, mib in sampler.samples if args.warmup <= s <= run_end]
    print(f"\nsoak: {args.clients} streaming clients, {args.duration:g} s, limit {config.max_num_seqs} running + "
          f"{config.max_waiting} waiting, default sampling: temperature 0, 1-3 turns per conversation")
    print(f"  requests: {len(records)} ({res.completed} finished in the window), errors: {errors or 0}")
    print(f"  tokens/s {res.tokens_per_s:.1f}, requests/s {res.requests_per_s:.2f}")
    print(f"  RSS (MiB): start (after {args.warmup:g} s warmup) {warm:.0f}, end {sampler.at(run_end):.0f}, "
          f"min {min(after):.0f}, max {max(after):.0f} after warmup; {sampler.samples[0][1]:.0f} at the start")
    print(f"  after the run: {idle}")
    print(f"  burst of {limit + args.over} streams at once (limit {limit}): {over}")
    print(f"  after the burst: {idle_after_burst}")
    if errors or set(over) != {"200 finished", "429 queue_full"} or over["429 queue_full"] < args.over:
        raise SystemExit(f"soak FAILED: errors {errors}, burst {over} (at least {args.over} 429s expected, "
                         f"every other stream finished)")


# --- disconnect storm -----------------------------------------------------------------------------

CODE = '''def {name}(items):
    """Return the {what} of items."""
    result = []
    for item in items:
        if item is not None:
            result.append(item)
    return result
'''


def storm_prompt(rng: random.Random, kind: str) -> str:
    if kind == "long":  # about 1,500 tokens, unique from its first words: a prefill the cache cannot skip
        words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma"]) for _ in range(1400))
        return f"Request {rng.randrange(10**9)}. Count the words: {words}"
    names = [f"f{rng.randrange(10**6)}_{k}" for k in range(3)]
    code = "".join(CODE.format(name=n, what=rng.choice(["sum", "list", "copy"])) for n in names)
    return f"Rewrite these functions with type hints, keeping them otherwise the same:\n{code}"


async def storm_request(url: str, model: str, rng: random.Random, counts: dict[str, int]) -> None:
    point = rng.choices(["before the answer", "before the first token", "after tokens", "not streamed"],
                        [3, 2, 4, 1])[0]
    prompt = storm_prompt(rng, "long" if point == "before the first token" else "code")
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 256, "temperature": 0,
            "stream": point != "not streamed"}
    if point in ("before the answer", "not streamed"):
        delay = rng.uniform(0, 0.3) if point == "before the answer" else rng.uniform(0, 3)
        conn = await Connection.send(url, "POST", "/v1/chat/completions", body)
        try:
            await asyncio.wait_for(conn.read_head(), delay)
            seen = "hung up after the answer started" if point == "before the answer" else "answered"
        except asyncio.TimeoutError:
            seen = "hung up before the answer"
        finally:
            conn.close()
        counts[f"{point}: {seen}"] = counts.get(f"{point}: {seen}", 0) + 1
        return
    conn = await Connection.open(url, "POST", "/v1/chat/completions", body)
    try:
        if conn.status != 200:
            counts[f"HTTP {conn.status}"] = counts.get(f"HTTP {conn.status}", 0) + 1
            return
        tokens, goal = 0, rng.randint(1, 40) if point == "after tokens" else 0
        deadline = time.monotonic() + rng.uniform(0, 1.5)
        events = conn.events()
        while True:
            if point == "before the first token" and time.monotonic() > deadline:
                break
            try:
                event = await asyncio.wait_for(events.__anext__(), max(0.01, deadline - time.monotonic())
                                               if point == "before the first token" else 60)
            except asyncio.TimeoutError:
                break
            except StopAsyncIteration:
                break
            if event == "[DONE]":
                break
            if "error" in event:
                counts["error event"] = counts.get("error event", 0) + 1
                return
            if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                tokens += 1
                if point == "before the first token" or tokens >= goal:
                    break
        seen = "after 1+ tokens" if tokens else "before the first token"
        counts[f"{point}: hung up {seen}"] = counts.get(f"{point}: hung up {seen}", 0) + 1
    finally:
        conn.close()


async def storm_load(url: str, model: str, n: int, concurrency: int, seed: int) -> dict[str, int]:
    rng, counts, sent = random.Random(seed), {}, 0
    limit = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        nonlocal sent
        async with limit:
            await storm_request(url, model, random.Random(rng.randrange(2**32) + i), counts)
            sent += 1
            if sent % 100 == 0:
                log.info("storm: %d/%d requests cancelled", sent, n)

    await asyncio.gather(*(one(i) for i in range(n)))
    return counts


async def reference(url: str, model: str) -> str:
    body = {"model": model, "max_tokens": 64, "temperature": 0, "messages": [
        {"role": "user", "content": storm_prompt(random.Random(1), "code")}]}
    status, reply = await call(url, "POST", "/v1/chat/completions", body)
    assert status == 200, reply
    return reply["choices"][0]["message"]["content"]


def storm(args) -> None:
    config = ServerConfig(model=args.model, max_num_seqs=8, max_waiting=256, speculative="ngram")
    with InProcessServer(config) as server:
        model = Server("llaisys", server.url).model
        before = asyncio.run(reference(server.url, model))
        spec0 = server.engine.stats().spec_decode
        start = time.monotonic()
        counts = asyncio.run(storm_load(server.url, model, args.requests, args.concurrency, args.seed))
        took = time.monotonic() - start
        idle = server.settle_and_check("after the storm")
        stats = server.engine.stats()
        spec = stats.spec_decode
        after = asyncio.run(reference(server.url, model))
    print(f"\ndisconnect storm: {args.requests} requests, {args.concurrency} at a time, {took:.0f} s; 8 run at once "
          f"(the rest queue), speculation by prompt lookup")
    for k, v in sorted(counts.items()):
        print(f"  {k}: {v}")
    print(f"  verifies during the storm: {spec.num_drafts - spec0.num_drafts} "
          f"({spec.num_draft_tokens - spec0.num_draft_tokens} drafted tokens, "
          f"{spec.num_accepted_tokens - spec0.num_accepted_tokens} accepted); finished by reason: "
          f"{stats.finished_by_reason}; failed: {stats.requests_failed}")
    print(f"  after the storm: {idle}")
    print(f"  a request before and after the storm: {'the same' if before == after else 'DIFFERENT'} greedy text "
          f"({len(after)} characters)")
    bad = {k: v for k, v in counts.items() if k.startswith("HTTP") or k == "error event"}
    if bad or not after:
        raise SystemExit(f"storm FAILED: {bad}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory or GGUF (default: the default model's GGUF)")
    parser.add_argument("--seed", type=int, default=0)
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("soak")
    s.add_argument("--clients", type=int, default=64)
    s.add_argument("--duration", type=float, default=600.0)
    s.add_argument("--warmup", type=float, default=120.0, help="seconds before the RSS start figure")
    s.add_argument("--max-num-seqs", type=int, default=32, help="requests running at once")
    s.add_argument("--over", type=int, default=16, help="streams beyond the limit in the final burst")
    s.add_argument("--timeout", type=float, default=900.0, help="seconds one request may take")
    s.set_defaults(func=soak)
    t = sub.add_parser("storm")
    t.add_argument("--requests", type=int, default=1000)
    t.add_argument("--concurrency", type=int, default=24)
    t.set_defaults(func=storm)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.model is None:
        from llaisys.models.default_model import fetch_gguf

        args.model = str(fetch_gguf())
    args.func(args)


if __name__ == "__main__":
    main()
