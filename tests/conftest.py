"""Shared fixtures: a tiny random Qwen2 checkpoint made with transformers, and the default model when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

TINY_CONFIG = dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True)


def make_tiny_qwen2(path: Path, seed: int = 0, dtype: str = "bfloat16", **overrides) -> Path:
    """Save a randomly initialised Qwen2ForCausalLM (weights only, no tokenizer) to path."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**{**TINY_CONFIG, **overrides})
    model = Qwen2ForCausalLM(config).to(getattr(torch, dtype))
    # Random init leaves biases at zero; give them values so the bias path is checked.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    pytest.importorskip("torch")
    return make_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2"))


def default_model_dir() -> Path | None:
    """The converted default model, from LLAISYS_TEST_MODEL or the cache; None when absent."""
    env = os.environ.get("LLAISYS_TEST_MODEL")
    if env:
        return Path(env)
    from llaisys.models.default_model import default_model_path, is_model_fetched

    return default_model_path() if is_model_fetched() else None


@pytest.fixture(scope="session")
def default_model():
    path = default_model_dir()
    if path is None:
        pytest.skip("the default model is not converted yet (llaisys fetch-model)")
    return path
