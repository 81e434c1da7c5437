"""Engine speed: continuous batching against serving the same requests one at a time, in one run.

A fixed, seeded set of requests (chat-like mixed lengths: prompts of 16..256 tokens, outputs of
32..384, half greedy, half sampled) is submitted at once. "batched" runs them through the engine
with up to --concurrency sequences at a time (continuous batching: a waiting request takes the
slot of one that finishes); "one-at-a-time" runs the same requests through the same engine, each
alone, in submission order. For both it prints generated tokens/s, time to first token (from
submission) and inter-token latency (p50/p99), then the throughput ratio. With --rounds > 1 the
modes alternate and the best throughput of each is kept, since the machine is shared and noisy.

    python benchmarks/bench_engine.py [--model DIR] [--requests 32] [--concurrency 16] [--rounds N]
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import random
import time

import numpy as np

log = logging.getLogger("bench_engine")


@dataclasses.dataclass
class Spec:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    seed: int


def make_specs(engine, n: int, seed: int) -> list[Spec]:
    """n requests: prompts cut from a fixed text (16..256 tokens), outputs of 32..384 tokens."""
    from pathlib import Path

    rng = random.Random(seed)
    source = (Path(__file__).resolve().parents[1] / "llaisys" / "engine" / "scheduler.py").read_text()
    corpus = engine.adapter.encode(source * 4)
    specs = []
    for i in range(n):
        length = rng.randint(16, 256)
        start = rng.randrange(len(corpus) - length)
        specs.append(Spec(corpus[start:start + length], rng.randint(32, 384), rng.choice([0.0, 0.8]), seed + i))
    return specs


@dataclasses.dataclass
class Result:
    seconds: float
    generated: int
    ttft: list[float]
    itl: list[float]

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds


def run(engine, specs: list[Spec], batched: bool) -> Result:
    from llaisys import SamplingParams

    def params(s: Spec):
        return SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=0.95, seed=s.seed,
                              ignore_eos=True)

    submitted = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    itl: list[float] = []
    generated = 0
    groups = [specs] if batched else [[s] for s in specs]
    for group in groups:
        for s in group:
            engine.add_request(s.prompt_ids, params(s))
        while engine.has_unfinished_requests():
            outputs = engine.step()
            now = time.perf_counter()
            for out in outputs:
                n = len(out.outputs[0].token_ids) if out.outputs else 0
                if not n:
                    continue
                generated += n
                rid = out.request_id
                if rid in last:
                    itl.append(now - last[rid])
                else:
                    first[rid] = now - submitted
                last[rid] = now
    return Result(time.perf_counter() - submitted, generated, list(first.values()), itl)


def percentiles(values: list[float]) -> str:
    p50, p99 = np.percentile(values, [50, 99]) * 1000
    return f"{p50:8.1f} {p99:8.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16, help="sequences running at once (max_num_seqs)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    from llaisys.engine import EngineArgs, LLMEngine

    engine = LLMEngine.from_engine_args(EngineArgs(model=args.model, max_num_seqs=args.concurrency,
                                                   max_num_batched_tokens=512, n_ctx=8192, n_threads=args.threads))
    specs = make_specs(engine, args.requests, args.seed)
    log.info("%d requests: prompts %d..%d tokens, outputs %d..%d tokens, %d generated in all", len(specs),
             min(len(s.prompt_ids) for s in specs), max(len(s.prompt_ids) for s in specs),
             min(s.max_tokens for s in specs), max(s.max_tokens for s in specs), sum(s.max_tokens for s in specs))
    best: dict[str, Result] = {}
    for r in range(args.rounds):
        for name, batched in (("batched", True), ("one-at-a-time", False)):
            log.info("round %d/%d: %s ...", r + 1, args.rounds, name)
            result = run(engine, specs, batched)
            log.info("round %d/%d: %s %.1f tok/s in %.1f s", r + 1, args.rounds, name, result.tokens_per_second,
                     result.seconds)
            if name not in best or result.tokens_per_second > best[name].tokens_per_second:
                best[name] = result
    print(f"\n{len(specs)} requests submitted at once, {args.concurrency} at a time when batched, "
          f"best of {args.rounds} round(s)")
    print(f"{'mode':<15} {'tok/s':>8} {'seconds':>8} {'TTFT p50':>9} {'p99 ms':>8} {'ITL p50':>8} {'p99 ms':>8}")
    for name, res in best.items():
        print(f"{name:<15} {res.tokens_per_second:8.1f} {res.seconds:8.1f} {percentiles(res.ttft)} "
              f"{percentiles(res.itl)}")
    ratio = best["batched"].tokens_per_second / best["one-at-a-time"].tokens_per_second
    print(f"\nthroughput ratio batched / one-at-a-time: {ratio:.2f}x (floor 4x at 16 concurrent)")


if __name__ == "__main__":
    main()
