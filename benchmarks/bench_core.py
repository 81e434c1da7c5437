"""Core speed: llaisys against transformers (torch bf16) on the same model, side by side in one run.

With --gguf FILE llaisys also runs that GGUF with its block weights kept (the default model's
GGUF is what its bf16 directory was converted from), as a third column.

Measures prefill tokens/s on one 512-token prompt and aggregate decode tokens/s with 1, 8 and 32
sequences decoding together (one row each), then prints the ratios. Both use the same thread count.
Each figure is the best of --repeat runs, taken alternately for the two engines, since the machine
is shared and noisy.

    python benchmarks/bench_core.py [--model DIR] [--gguf FILE] [--threads N] [--steps N] [--repeat N]
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import numpy as np

log = logging.getLogger("bench_core")

PROMPT_LEN = 512
DECODE_PROMPT = 32  # tokens each decoding sequence starts from
BATCHES = (1, 8, 32)


class Llaisys:
    def __init__(self, model_dir, threads, name="llaisys"):
        self.name = name
        from llaisys.models import RuntimeOptions, load_model

        self.adapter = load_model(model_dir, RuntimeOptions(n_ctx=4096, n_seq_max=max(BATCHES),
                                                            n_batch=max(PROMPT_LEN, max(BATCHES) * DECODE_PROMPT),
                                                            n_threads=threads))
        self.model = self.adapter.model

    def prefill(self, ids):
        from llaisys.core import Batch

        self.model.kv_clear()
        self.model.decode(Batch(ids))

    def decode(self, prompts, steps):
        from llaisys.core import Batch

        m = self.model
        m.kv_clear()
        b = len(prompts)
        m.decode(Batch(np.concatenate(prompts), seq_ids=np.repeat(np.arange(b), DECODE_PROMPT),
                       logits=np.tile([0] * (DECODE_PROMPT - 1) + [1], b)))
        start = time.perf_counter()
        for _ in range(steps):
            nxt = m.logits().argmax(axis=1)
            m.decode(Batch(nxt, seq_ids=np.arange(b), logits=np.ones(b)))
        return time.perf_counter() - start


class Transformers:
    name = "transformers"

    def __init__(self, model_dir, threads):
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16).eval()

    def prefill(self, ids):
        with self.torch.no_grad():
            self.model(self.torch.tensor([ids]), use_cache=True, logits_to_keep=1)

    def decode(self, prompts, steps):
        torch = self.torch
        with torch.no_grad():
            out = self.model(torch.tensor(np.stack(prompts)), use_cache=True, logits_to_keep=1)
            start = time.perf_counter()
            for _ in range(steps):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                out = self.model(nxt, past_key_values=out.past_key_values, use_cache=True)
            return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: the default model)")
    parser.add_argument("--gguf", default=None, help="also run llaisys on this GGUF file, its blocks kept")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from llaisys.cli import resolve_model

    model_dir = resolve_model(args.model)
    engines = [Llaisys(model_dir, args.threads)]
    if args.gguf:
        engines.append(Llaisys(args.gguf, args.threads, name="llaisys-gguf"))
    engines.append(Transformers(model_dir, args.threads))
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 20000, PROMPT_LEN).tolist()
    results: dict[tuple[str, str], float] = {}

    def record(case, engine, tokens_per_s):
        key = (case, engine.name)
        results[key] = max(results.get(key, 0.0), tokens_per_s)
        log.info("%-12s %-13s %8.1f tokens/s", case, engine.name, tokens_per_s)

    for _ in range(args.repeat):
        for engine in engines:
            engine.prefill(prompt[:16])  # warm up
            start = time.perf_counter()
            engine.prefill(prompt)
            record(f"prefill {PROMPT_LEN}", engine, PROMPT_LEN / (time.perf_counter() - start))
        for b in BATCHES:
            prompts = [rng.integers(100, 20000, DECODE_PROMPT) for _ in range(b)]
            for engine in engines:
                record(f"decode b={b}", engine, b * args.steps / engine.decode(prompts, args.steps))

    print(f"\nmodel {model_dir}{f' and {args.gguf}' if args.gguf else ''}, {args.threads} threads, "
          f"best of {args.repeat}; tokens/s, ratios to transformers")
    ours = [e.name for e in engines if e.name != "transformers"]
    print(f"{'case':<14}" + "".join(f"{name:>15}" for name in ours) + f"{'transformers':>15}" +
          "".join(f"{'ratio':>8}" for _ in ours))
    for case in [f"prefill {PROMPT_LEN}"] + [f"decode b={b}" for b in BATCHES]:
        ref = results[(case, "transformers")]
        print(f"{case:<14}" + "".join(f"{results[(case, name)]:>15.1f}" for name in ours) + f"{ref:>15.1f}" +
              "".join(f"{results[(case, name)] / ref:>7.2f}x" for name in ours))


if __name__ == "__main__":
    main()
