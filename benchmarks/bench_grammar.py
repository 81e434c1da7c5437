"""Constrained decoding's cost per step against a decode step, at batch 1 and 16 (the default model).

For each batch size: B completions under a JSON-schema grammar draw tokens from random logits
through the real sampler; per step it times the masks (sync + allowed: llguidance's bitmask, unpacked)
and the sampler with and without them, and a real decode step of B sequences for scale.

    python benchmarks/bench_grammar.py [--model DIR] [--steps N] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
                "required": ["city", "zip"]}}, "required": ["name", "age", "tags", "address"]}


def mask_costs(adapter, batch: int, steps: int) -> tuple[float, float, float]:
    """Median ms per step: masks, sampling with them, sampling without."""
    from llguidance import LLMatcher

    from llaisys.engine import SamplingParams
    from llaisys.engine.grammar import GrammarState, GrammarTokenizers
    from llaisys.engine.sampler import SamplingRow, sample

    tokenizers = GrammarTokenizers(adapter.grammar_tokenizer)
    grammar = LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    vocab = adapter.model.n_vocab
    ends = set(adapter.end_token_ids)
    states = [GrammarState(grammar, tokenizers, vocab) for _ in range(batch)]
    outputs: list[list[int]] = [[] for _ in range(batch)]
    params = SamplingParams(temperature=1.0)
    gens = [np.random.default_rng(i) for i in range(batch)]
    rng = np.random.default_rng(0)
    masks, masked, plain = [], [], []
    tokenizers.get()  # built once per engine: not a per-step cost
    for _ in range(steps):
        logits = rng.standard_normal((batch, vocab), dtype=np.float32) * 3
        t0 = time.perf_counter()
        allowed = []
        for s, out in zip(states, outputs):
            s.sync(out, ends)
            allowed.append(s.allowed(ends))
        t1 = time.perf_counter()
        rows = [SamplingRow(params, g, [], out, allowed=a) for g, out, a in zip(gens, outputs, allowed)]
        tokens = sample(logits, rows).token_ids
        t2 = time.perf_counter()
        sample(logits, [SamplingRow(params, g, [], out) for g, out in zip(gens, outputs)])
        t3 = time.perf_counter()
        masks.append(t1 - t0)
        masked.append(t2 - t1)
        plain.append(t3 - t2)
        for i, t in enumerate(tokens.tolist()):
            if states[i].done or t in ends:  # a finished value: start the next one
                states[i], outputs[i] = GrammarState(grammar, tokenizers, vocab), []
            else:
                outputs[i].append(t)
    return tuple(1000 * statistics.median(x) for x in (masks, masked, plain))


def decode_ms(adapter, batch: int, steps: int) -> float:
    from llaisys.core import Batch

    m = adapter.model
    m.kv_clear()
    m.decode(Batch(np.tile(np.arange(16), batch), seq_ids=np.repeat(np.arange(batch), 16),
                   logits=np.tile([0] * 15 + [1], batch)))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        m.decode(Batch(m.logits().argmax(axis=1), seq_ids=np.arange(batch), logits=np.ones(batch)))
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the default model)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    from llaisys.models import RuntimeOptions, load_model
    from llaisys.models.default_model import fetch_model

    adapter = load_model(args.model or fetch_model(), RuntimeOptions(n_ctx=1024, n_seq_max=16, n_threads=args.threads))
    start = time.perf_counter()
    adapter.grammar_tokenizer()
    print(f"grammar tokenizer build: {time.perf_counter() - start:.2f} s")
    print("batch  masks ms  sample+mask ms  sample ms  decode step ms  mask share")
    for batch in (1, 16):
        masks, masked, plain = mask_costs(adapter, batch, args.steps)
        step = decode_ms(adapter, batch, min(args.steps, 10))
        extra = masks + masked - plain
        print(f"{batch:5d}  {masks:8.2f}  {masked:14.2f}  {plain:9.2f}  {step:14.1f}  {100 * extra / step:9.1f}%")


if __name__ == "__main__":
    main()
