"""Infill latency: time to first token (TTFT) of an editor's fill-in-the-middle request with a long
prefix, alone and while chats stream, on llaisys and a peer (llama.cpp's llama-server) side by side.

Each round, for each server in turn (the order alternates per round):
- alone: one streamed /infill request ({input_prefix, input_suffix, n_predict, stream: true}, as
  llama.vscode sends it); TTFT = from sending it to its first piece of text;
- beside N chats: N streamed /v1/chat/completions requests (greedy, ignore_eos, --chat-tokens each)
  start; once every chat has streamed its first token, the same kind of infill is sent and its TTFT
  taken. The chats' largest gap between two pieces while the infill's prompt was computed shows what
  the infill cost them. The chats are then hung up on. When the chats end before the infill's first
  token, the infill waited for them: that is counted ("after chats").
With --endpoint completion the infill is sent instead as a /completion request whose prompt is the
FIM prompt written out (<|fim_prefix|>prefix<|fim_suffix|>suffix<|fim_middle|>), as Continue's and
Tabby's llama.cpp clients do. (llama-server never batches an /infill task with chat tasks, so its
/infill waits for every running chat to end; its /completion does not.)
A short infill warms each server up first. Every infill has its own prefix (a source file of about --prefix-tokens tokens that opens with a
different header), so no prompt cache serves it; its length is counted with llaisys's /tokenize.

    python benchmarks/bench_infill.py [--model PATH | --url URL] [--chats 4] [--prefix-tokens 1000]
        [--chat-tokens 1000] [--endpoint infill|completion] [--rounds 3] [--peer-cmd "..." | --peer-url URL]
        [--peer-name NAME]

The peer is llama-server built as benchmarks/bench_server.py describes, on the same Q4_K_M GGUF,
with llaisys's server limits (--no-repack: this build crashes repacking the weights on this machine):

    python benchmarks/bench_infill.py --peer-name llama.cpp --peer-cmd "/tmp/peer/build/bin/llama-server \\
        -m ~/.cache/llaisys/qwen2.5-coder-0.5b-instruct.gguf --host 127.0.0.1 --port {port} \\
        -c 16384 -np 32 --kv-unified -b 512 -ub 512 -t 2 -tb 2 --no-webui --no-repack"
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_server import Server, llaisys_server, num, peer_process
from tests.http_client import Connection
from tests.server_process import post_json

log = logging.getLogger("bench_infill")

FUNCTION = '''

def {name}(records, threshold={k}):
    """Return the records whose score is above the threshold, sorted by their key."""
    selected = []
    for record in records:
        if record.score > threshold and record.key not in SEEN_{k}:
            selected.append(record)
    selected.sort(key=lambda r: (r.key, -r.score))
    return selected[:{k}]
'''
SUFFIX = "\n    return result\n\n\nif __name__ == \"__main__\":\n    main()\n"
CHAT = "Write a long, detailed tutorial on Python's asyncio, with many code examples."


def prefix_of(tag: str, tokens: int, count) -> str:
    """A Python source prefix of about `tokens` tokens (counted by `count`), opening with tag, ending at a cursor
    inside a new function."""
    text, k = f"# {tag}\nimport os\nimport sys\n\nSEEN_0 = set()\n", 0
    while count(text) < tokens - 40:
        k += 1
        text += FUNCTION.format(name=f"select_{tag.replace(' ', '_')}_{k}", k=k)
    return text + "\n\ndef summarize(records):\n    "


@dataclasses.dataclass
class Sample:
    ttft: float  # seconds
    chat_gap: float = float("nan")  # the chats' longest gap while the infill's prompt was computed, seconds
    after_chats: bool = False  # the chats ended before the infill's first token


async def first_piece(server: Server, path: str, body: dict, pieces: list[float], started: asyncio.Event) -> None:
    """Stream one request; every piece of text's arrival time goes to pieces; started is set at the first."""
    conn = await Connection.open(server.base_url, "POST", path, body)
    try:
        if conn.status != 200:
            raise RuntimeError(f"{server.name}: {path} answered {conn.status}: {(await conn.body())[:300]!r}")
        async for event in conn.events():
            if event == "[DONE]" or event.get("stop"):
                return
            text = event.get("content") or "".join((c.get("delta") or {}).get("content") or ""
                                                   for c in event.get("choices") or [])
            if text:
                pieces.append(time.perf_counter())
                started.set()
    finally:
        conn.close()


async def infill_ttft(server: Server, prefix: str, endpoint: str) -> float:
    body = {"n_predict": 16, "temperature": 0, "stream": True}
    if endpoint == "infill":
        body.update(input_prefix=prefix, input_suffix=SUFFIX)
    else:
        body.update(prompt=f"<|fim_prefix|>{prefix}<|fim_suffix|>{SUFFIX}<|fim_middle|>")
    pieces: list[float] = []
    started = asyncio.Event()
    sent = time.perf_counter()
    task = asyncio.create_task(first_piece(server, f"/{endpoint}", body, pieces, started))
    await started.wait()
    await task
    return pieces[0] - sent


async def measure(server: Server, prefix: str, chats: int, chat_tokens: int, endpoint: str) -> Sample:
    if not chats:
        return Sample(await infill_ttft(server, prefix, endpoint))
    body = {"model": server.model, "messages": [{"role": "user", "content": CHAT}], "max_tokens": chat_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True}
    arrivals = [[] for _ in range(chats)]
    starts = [asyncio.Event() for _ in range(chats)]
    tasks = [asyncio.create_task(first_piece(server, "/v1/chat/completions", body, a, s))
             for a, s in zip(arrivals, starts)]
    try:
        await asyncio.gather(*(s.wait() for s in starts))
        sent = time.perf_counter()
        ttft = await infill_ttft(server, prefix, endpoint)
        for t in tasks:
            if t.done() and t.exception() is not None:
                raise t.exception()
        gaps = [b - a for times in arrivals for a, b in zip(times, times[1:]) if b > sent and a < sent + ttft]
        return Sample(ttft, max(gaps, default=float("nan")), all(t.done() for t in tasks))
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", default=None, help="an already running llaisys server")
    where.add_argument("--model", default=None, help="start llaisys on this model (default: the default model)")
    parser.add_argument("--chats", type=int, default=4, help="chats streaming beside the infill")
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--chat-tokens", type=int, default=1000, help="max_tokens of each chat")
    parser.add_argument("--endpoint", choices=["infill", "completion"], default="infill",
                        help="send the infill to /infill, or its FIM prompt to /completion")
    parser.add_argument("--rounds", type=int, default=3)
    peer = parser.add_mutually_exclusive_group()
    peer.add_argument("--peer-cmd", default=None, help="command line starting the peer's server, with {port}")
    peer.add_argument("--peer-url", default=None, help="an already running peer")
    parser.add_argument("--peer-name", default="peer")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with contextlib.ExitStack() as stack:
        servers = [Server("llaisys", stack.enter_context(llaisys_server(args)))]
        if args.peer_cmd or args.peer_url:
            servers.append(Server(args.peer_name, args.peer_url or stack.enter_context(peer_process(args.peer_cmd))))

        def count(text: str) -> int:
            status, body = post_json(f"{servers[0].base_url}/tokenize", {"prompt": text})
            if status != 200:
                raise RuntimeError(f"/tokenize answered {status}: {body}")
            return body["count"]

        for s in servers:  # a first request pays one-time costs (allocations, page faults)
            asyncio.run(measure(s, prefix_of(f"{s.name} warmup", 200, count), 0, args.chat_tokens, args.endpoint))
        samples: dict[tuple[str, int], list[Sample]] = {}
        prefix_tokens = []
        for r in range(args.rounds):
            for s in servers if r % 2 == 0 else servers[::-1]:
                for chats in (0, args.chats):
                    prefix = prefix_of(f"{s.name} round {r} chats {chats}", args.prefix_tokens, count)
                    prefix_tokens.append(count(prefix))
                    sample = asyncio.run(measure(s, prefix, chats, args.chat_tokens, args.endpoint))
                    log.info("round %d/%d: %s, %d chats: TTFT %.2f s (chats' longest gap %.2f s%s)", r + 1,
                             args.rounds, s.name, chats, sample.ttft, sample.chat_gap,
                             ", after the chats ended" if sample.after_chats else "")
                    samples.setdefault((s.name, chats), []).append(sample)

    print(f"\ninfill TTFT (streamed /{args.endpoint}, prefix {min(prefix_tokens)}-{max(prefix_tokens)} tokens, "
          f"{args.rounds} rounds; median and worst), alone and beside {args.chats} streaming chats of "
          f"{args.chat_tokens} tokens; gap = the chats' longest pause while the infill's prompt was computed; "
          f"after chats = infills that waited for the chats to end")
    print(f"{'server':<12} {'chats':>5} {'TTFT p50 s':>11} {'max s':>7} {'gap p50 s':>10} {'prefill tok/s':>14} "
          f"{'after chats':>11}")
    median = {}
    for (name, chats), got in samples.items():
        ttft = [x.ttft for x in got]
        median[name, chats] = statistics.median(ttft)
        gap = statistics.median([x.chat_gap for x in got]) if chats else float("nan")
        print(f"{name:<12} {chats:5d} {num(median[name, chats], 11, 2)} {num(max(ttft), 7, 2)} {num(gap, 10, 2)} "
              f"{num(statistics.median(prefix_tokens) / median[name, chats], 14, 0)} "
              f"{sum(x.after_chats for x in got):11d}")
    for name in [s.name for s in servers]:
        print(f"{name}: TTFT beside {args.chats} chats / alone = "
              f"{median[name, args.chats] / median[name, 0]:.2f}x")
    if len(servers) > 1:
        for chats in (0, args.chats):
            print(f"llaisys / {servers[1].name} TTFT, {chats} chats: "
                  f"{median['llaisys', chats] / median[servers[1].name, chats]:.2f}x (below 1 favours llaisys)")


if __name__ == "__main__":
    main()
