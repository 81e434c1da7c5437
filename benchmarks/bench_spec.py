"""Speculative decoding: n-gram prompt lookup and a draft model against no speculation, in one run, greedy.

Two workloads, each at batch 1 (requests one at a time) and batch 8 (eight submitted at once):
(a) code edits: the prompt holds a function from this repository to rewrite with a small change,
    so the reply mostly copies it; (b) open chat: questions whose answers repeat nothing.
With --draft-model (case (c): the 1.5B target, --model, with the 0.5B default drafting) a draft-model
row joins the n-gram one; --adaptive both runs each drafter with adaptive k and with all k always
drafted (a drafter's own speed, whatever the rule decides). For each mode it prints generated
tokens/s (prefill included) and its ratio to off, the ratio of decode time alone (first to last token), the acceptance rate, the mean
accepted length (tokens per verify) and verifies per generated token, and checks that the outputs are
identical. The modes alternate per case, --rounds times, on one engine each in one process, and each
mode's fastest round counts (the machine is shared and noisy); every round's tokens/s is printed too.

    python benchmarks/bench_spec.py [--model PATH] [--draft-model PATH] [--k 4] [--requests 8] [--max-tokens 160] \
        [--rounds 3] [--adaptive on|off|both]
    python benchmarks/bench_spec.py --model ~/.cache/llaisys/qwen2.5-coder-1.5b-instruct.gguf \
        --draft-model ~/.cache/llaisys/qwen2.5-coder-0.5b-instruct.gguf --no-ngram --adaptive both   # case (c)
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import logging
import textwrap
import time
from pathlib import Path

log = logging.getLogger("bench_spec")

ROOT = Path(__file__).resolve().parents[1]
EDITS = ["Rename the variable `c` to `completion` everywhere in it.", "Add type hints where they are missing.",
         "Replace the docstring with a one-line comment above the function.", "Rename the function to `run`."]
QUESTIONS = ["Why is the sky blue?", "Tell me a short story about a lighthouse keeper.",
             "What should I pack for a week of hiking in the mountains?", "How do vaccines train the immune system?",
             "Describe the taste of a lemon to someone who has never had one.", "What are the causes of inflation?",
             "Give me three ideas for a birthday party for a ten year old.", "How does a bicycle stay upright?"]


def functions(limit: int) -> list[str]:
    """Functions of 12..40 lines from the engine's sources, in a fixed order."""
    found = []
    for path in sorted((ROOT / "llaisys" / "engine").glob("*.py")):
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and 12 <= node.end_lineno - node.lineno <= 40:
                found.append(textwrap.dedent(ast.get_source_segment(source, node, padded=True)))
    return found[:limit]


def prompts(engine, kind: str, n: int) -> list[str]:
    if kind == "code edit":
        messages = [f"{EDITS[i % len(EDITS)]} Reply with the whole function only.\n\n```python\n{f}\n```"
                    for i, f in enumerate(functions(n))]
    else:
        messages = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return [engine.chat_prompt([{"role": "user", "content": m}]) for m in messages]


def run(engine, texts: list[str], batch: int, max_tokens: int):
    """Seconds, generated tokens, decode seconds (first to last token, summed over the groups) and the
    outputs of the prompts, `batch` of them at a time."""
    from llaisys import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    start, outputs, generated, decoding = time.perf_counter(), [], 0, 0.0
    for i in range(0, len(texts), batch):
        requests = [engine.add_request(t, params) for t in texts[i:i + batch]]
        while engine.has_unfinished_requests():
            engine.step()
        outputs += [r.completions[0].output_ids for r in requests]
        generated += sum(len(o) for o in outputs[-len(requests):])
        decoding += max(r.metrics.last_token_time for r in requests) - min(r.metrics.first_token_time
                                                                           for r in requests)
    return time.perf_counter() - start, generated, decoding, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path.home() / ".cache/llaisys/qwen2.5-coder-0.5b-instruct.gguf"))
    parser.add_argument("--draft-model", default=None, help="add the draft-model mode with this draft")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--requests", type=int, default=8, help="prompts per workload")
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--workloads", default="code edit,open chat", help="comma-separated")
    parser.add_argument("--batches", default="1,8", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per case; each mode's best counts")
    parser.add_argument("--no-ngram", action="store_true", help="leave the n-gram mode out")
    parser.add_argument("--adaptive", choices=["on", "off", "both"], default="on",
                        help="speculative_adaptive; off always drafts all k; both runs each drafter both ways")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from llaisys.engine import EngineArgs, LLMEngine

    common = dict(model=args.model, max_num_seqs=8, n_ctx=8192, n_threads=args.threads, enable_prefix_caching=False)
    drafters = {} if args.no_ngram else {"n-gram": dict(speculative="ngram")}
    if args.draft_model:
        drafters["draft model"] = dict(speculative="draft", draft_model=args.draft_model)
    adaptive = {"on": [True], "off": [False], "both": [True, False]}[args.adaptive]
    modes = {"off": {}}
    for name, drafter in drafters.items():
        for on in adaptive:
            label = name if args.adaptive != "both" else f"{name}, adaptive {'on' if on else 'off'}"
            modes[label] = dict(drafter, num_speculative_tokens=args.k, speculative_adaptive=on)
    engines = {mode: LLMEngine.from_engine_args(EngineArgs(**common, **extra)) for mode, extra in modes.items()}
    print(f"model {args.model}, draft {args.draft_model}, k = {args.k}, adaptive {args.adaptive}, "
          f"{args.requests} prompts per workload, max_tokens {args.max_tokens}")
    print(f"best of {args.rounds} rounds per mode, alternating")
    print("| workload | batch | mode | tok/s | ratio | decode-only ratio | acceptance | mean accepted length "
          "| verifies per token | tok/s of each round |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for kind in args.workloads.split(","):
        texts = prompts(engines["off"], kind, args.requests)
        for batch in map(int, args.batches.split(",")):
            rounds = {mode: [] for mode in modes}
            for _ in range(args.rounds):  # the modes alternate; each keeps its fastest round
                for mode, engine in engines.items():
                    rounds[mode].append(measure(engine, texts, batch, args.max_tokens))
            best = {mode: min(done, key=lambda m: m.seconds) for mode, done in rounds.items()}
            off = best["off"]
            print(f"| {kind} | {batch} | off | {off.tokens / off.seconds:.1f} | | | | | | {tok_s(rounds['off'])} |",
                  flush=True)
            for mode in list(modes)[1:]:
                on = best[mode]
                if any(m.outputs != off.outputs for m in rounds[mode] + rounds["off"]):
                    raise SystemExit(f"{kind}, batch {batch}: the outputs differ with {mode} speculation")
                print(f"| {kind} | {batch} | {mode} | {on.tokens / on.seconds:.1f} | {off.seconds / on.seconds:.2f}x "
                      f"| {off.decoding / on.decoding:.2f}x | {on.acceptance:.2f} | {on.mean_length:.2f} "
                      f"| {on.verifies / on.tokens:.2f} | {tok_s(rounds[mode])} |", flush=True)


@dataclasses.dataclass
class Measure:
    """One run of a workload: seconds, generated tokens, decode seconds, outputs and what verification did."""

    seconds: float
    tokens: int
    decoding: float
    outputs: list
    acceptance: float  # accepted / drafted
    mean_length: float  # tokens per verify
    verifies: int


def measure(engine, texts: list[str], batch: int, max_tokens: int) -> Measure:
    before = engine.stats().spec_decode
    seconds, tokens, decoding, outputs = run(engine, texts, batch, max_tokens)
    after = engine.stats().spec_decode
    drafted = after.num_draft_tokens - before.num_draft_tokens
    accepted = after.num_accepted_tokens - before.num_accepted_tokens
    verifies = after.num_drafts - before.num_drafts
    return Measure(seconds, tokens, decoding, outputs, accepted / drafted if drafted else 0.0,
                   1 + accepted / verifies if verifies else 0.0, verifies)


def tok_s(rounds: list[Measure]) -> str:
    return " ".join(f"{m.tokens / m.seconds:.1f}" for m in rounds)

if __name__ == "__main__":
    main()
