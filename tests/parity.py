"""Step-by-step greedy parity of llaisys against transformers (float32) on the same weights."""
from __future__ import annotations

import numpy as np

from llaisys.core import Batch
from llaisys.models import RuntimeOptions
from llaisys.models.qwen2 import Qwen2Adapter


def reference_logits(hf_model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1].float().numpy()


def greedy_parity(model_dir, prompts: list[list[int]], steps: int, late_prompt: list[int] | None = None,
                  kv_dtype: str = "f32", weight_dtype: str | None = None):
    """Decode all prompts together in one batch, then one token per sequence per step.

    `late_prompt` joins as a new sequence at step 1, so that batch mixes its prefill rows with
    the others' decode rows. Returns the largest |logit difference| seen and the generated ids;
    asserts the same argmax as transformers at every step.
    """
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    n_seq = len(prompts) + (1 if late_prompt else 0)
    adapter = Qwen2Adapter.from_pretrained(model_dir, RuntimeOptions(n_ctx=1024, n_seq_max=n_seq, n_batch=256,
                                                                     kv_dtype=kv_dtype, weight_dtype=weight_dtype))
    model = adapter.model
    seqs = [list(p) for p in prompts]
    pending = {s: list(p) for s, p in enumerate(prompts)}  # tokens each sequence still has to feed
    worst = 0.0
    for step in range(steps):
        if step == 1 and late_prompt:
            seqs.append(list(late_prompt))
            pending[len(seqs) - 1] = list(late_prompt)
        tokens, seq_ids, out, order = [], [], [], []
        for s, todo in pending.items():
            tokens += todo
            seq_ids += [s] * len(todo)
            out += [0] * (len(todo) - 1) + [1]
            order.append(s)
        model.decode(Batch(tokens, seq_ids=seq_ids, logits=out))
        ours = model.logits().copy()
        pending = {}
        for row, s in enumerate(order):
            ref = reference_logits(hf, seqs[s])
            worst = max(worst, float(np.abs(ours[row] - ref).max()))
            assert int(ours[row].argmax()) == int(ref.argmax()), f"seq {s} step {step}: argmax differs"
            nxt = int(ours[row].argmax())
            seqs[s].append(nxt)
            pending[s] = [nxt]
    return worst, seqs
