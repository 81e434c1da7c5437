"""Greedy chat inference: llaisys token ids must equal transformers' (float32, same weights).

Also a script, as the course's harness is:
    python tests/test_infer.py --model DIR --test [--prompt TEXT] [--max_steps N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

DEFAULT_PROMPT = "Who are you?"


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_steps: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=max_steps, do_sample=False, top_k=None,
                          top_p=None, temperature=None)
    return out[0, len(prompt_ids):].tolist()


def llaisys_greedy(model_dir: Path, prompt_ids: list[int], max_steps: int) -> tuple[list[int], set[int]]:
    """Generated ids through the engine (temperature 0; a final end-of-sequence token dropped) and the EOS ids."""
    from llaisys import LLM, SamplingParams

    llm = LLM(str(model_dir), max_num_seqs=1, n_ctx=len(prompt_ids) + max_steps + 8)
    out = llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=max_steps), use_tqdm=False)[0]
    ids, eos_ids = out.outputs[0].token_ids, llm.engine.eos_ids
    return (ids[:-1] if ids and ids[-1] in eos_ids else ids), eos_ids


def compare(model_dir: Path, prompt: str, max_steps: int) -> tuple[list[int], list[int], str]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    prompt_ids = tok.encode(text)
    start = time.perf_counter()
    ours, eos_ids = llaisys_greedy(model_dir, prompt_ids, max_steps)
    ours_time = time.perf_counter() - start
    start = time.perf_counter()
    ref = hf_greedy(model_dir, prompt_ids, max_steps)
    ref_time = time.perf_counter() - start
    # transformers keeps the EOS token it stopped on; llaisys stops before yielding it.
    if len(ours) < max_steps and ref and ref[-1] in eos_ids and len(ref) == len(ours) + 1:
        ref = ref[:-1]
    print(f"llaisys {len(ours)} tokens in {ours_time:.1f} s, transformers {len(ref)} in {ref_time:.1f} s")
    return ours, ref, tok.decode(ref, skip_special_tokens=True)


@pytest.mark.slow
def test_infer_matches_transformers(default_model):
    pytest.importorskip("torch")
    ours, ref, text = compare(default_model, DEFAULT_PROMPT, 128)
    print(text)
    assert ours == ref


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, type=Path)
    parser.add_argument("--test", action="store_true", help="assert llaisys and transformers agree")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max_steps", type=int, default=128)
    args = parser.parse_args()
    ours, ref, text = compare(args.model, args.prompt, args.max_steps)
    print(text)
    print("llaisys     :", ours)
    print("transformers:", ref)
    if args.test:
        assert ours == ref, "token ids differ"
        print("Test passed: token ids identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
