"""Core speed: llaisys against transformers and llama.cpp on the same model, side by side in one run.

Engines (--engines, comma-separated; the first is the one the ratios are taken against):
  llaisys        the default model's bf16 directory (or --model DIR)
  llaisys-gguf   llaisys on --gguf FILE with its block weights kept
  transformers   torch bf16 on the bf16 directory
  llama.cpp      llama-batched-bench (--llama-bin DIR, built as bench_server.py documents) on --gguf FILE

Measures prefill tokens/s on one 512-token prompt and aggregate decode tokens/s with 1, 8 and 32
sequences decoding together (one row each), then prints the ratios. All use the same thread count.
Each figure is the best of --repeat rounds; a round runs every engine in turn, since the machine is
shared and noisy.

    python benchmarks/bench_core.py --gguf FILE --engines llaisys-gguf,llama.cpp [--threads N] [--steps N]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("bench_core")

PROMPT_LEN = 512
DECODE_PROMPT = 32  # tokens each decoding sequence starts from
BATCHES = (1, 8, 32)
PREFILL = f"prefill {PROMPT_LEN}"
CASES = [PREFILL] + [f"decode b={b}" for b in BATCHES]


class Llaisys:
    def __init__(self, name, model, threads):
        self.name = name
        from llaisys.models import RuntimeOptions, load_model

        self.adapter = load_model(model, RuntimeOptions(n_ctx=4096, n_seq_max=max(BATCHES),
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
    def __init__(self, name, model_dir, threads):
        import torch
        from transformers import AutoModelForCausalLM

        self.name = name
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


class InProcess:
    """Runs a round of the cases on an engine loaded in this process."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name

    def round(self, prompt, decode_prompts, steps):
        e = self.engine
        e.prefill(prompt[:16])  # warm up
        start = time.perf_counter()
        e.prefill(prompt)
        figures = {PREFILL: PROMPT_LEN / (time.perf_counter() - start)}
        for b in BATCHES:
            figures[f"decode b={b}"] = b * steps / e.decode(decode_prompts[b], steps)
        return figures


class LlamaCpp:
    """Runs a round with llama-batched-bench: one 512-token prefill, then 1, 8 and 32 sequences
    of 32-token prompts decoding `steps` tokens each (its speed_tg is aggregate tokens/s)."""

    name = "llama.cpp"

    def __init__(self, bin_dir, gguf, threads):
        self.tool = Path(bin_dir) / "llama-batched-bench"
        if not self.tool.exists():
            raise SystemExit(f"bench_core: {self.tool} not found (build it as bench_server.py documents)")
        self.common = [str(self.tool), "-m", str(gguf), "-t", str(threads), "-tb", str(threads),
                       "-c", "4096", "-b", "512", "-ub", "512", "--output-format", "jsonl"]

    def _run(self, *args):
        out = subprocess.run(self.common + list(args), capture_output=True, text=True, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def round(self, prompt, decode_prompts, steps):
        (pp,) = self._run("-npp", str(PROMPT_LEN), "-ntg", "1", "-npl", "1")
        figures = {PREFILL: pp["speed_pp"]}
        for row in self._run("-npp", str(DECODE_PROMPT), "-ntg", str(steps), "-npl", ",".join(map(str, BATCHES))):
            figures[f"decode b={row['pl']}"] = row["speed_tg"]
        return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: the default model)")
    parser.add_argument("--gguf", default=None, help="GGUF file for llaisys-gguf and llama.cpp")
    parser.add_argument("--engines", default="llaisys,transformers",
                        help="comma-separated; ratios are to the first (default: llaisys,transformers)")
    parser.add_argument("--llama-bin", default="/tmp/peer/build/bin", help="directory of llama-batched-bench")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    names = args.engines.split(",")
    if {"llaisys-gguf", "llama.cpp"} & set(names) and not args.gguf:
        parser.error("llaisys-gguf and llama.cpp need --gguf FILE")
    model_dir = None
    if {"llaisys", "transformers"} & set(names):
        from llaisys.cli import resolve_model

        model_dir = resolve_model(args.model)
    makers = {
        "llaisys": lambda: InProcess(Llaisys("llaisys", model_dir, args.threads)),
        "llaisys-gguf": lambda: InProcess(Llaisys("llaisys-gguf", args.gguf, args.threads)),
        "transformers": lambda: InProcess(Transformers("transformers", model_dir, args.threads)),
        "llama.cpp": lambda: LlamaCpp(args.llama_bin, args.gguf, args.threads),
    }
    unknown = [n for n in names if n not in makers]
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {sorted(makers)}")
    engines = [makers[n]() for n in names]
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 20000, PROMPT_LEN).tolist()
    decode_prompts = {b: [rng.integers(100, 20000, DECODE_PROMPT) for _ in range(b)] for b in BATCHES}
    best: dict[tuple[str, str], float] = {}
    for r in range(args.repeat):
        for engine in engines:
            for case, tokens_per_s in engine.round(prompt, decode_prompts, args.steps).items():
                best[(case, engine.name)] = max(best.get((case, engine.name), 0.0), tokens_per_s)
                log.info("round %d/%d %-12s %-13s %8.1f tokens/s", r + 1, args.repeat, case, engine.name,
                         tokens_per_s)

    ref = names[0]
    print(f"\n{', '.join(str(m) for m in (model_dir, args.gguf) if m)}; {args.threads} threads, "
          f"best of {args.repeat}; tokens/s, ratios {ref} / each other engine")
    print(f"{'case':<14}" + "".join(f"{n:>15}" for n in names) + "".join(f"{'/ ' + n:>16}" for n in names[1:]))
    for case in CASES:
        row = [best[(case, n)] for n in names]
        print(f"{case:<14}" + "".join(f"{v:>15.1f}" for v in row) + "".join(f"{row[0] / v:>15.2f}x" for v in row[1:]))


if __name__ == "__main__":
    main()
