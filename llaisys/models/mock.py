"""The mock adapter: the core's "mock" model with a byte tokenizer, for fast engine tests.

A mock model directory holds only config.json: {"model_type": "mock", "vocab_size": V} with V > 256,
optionally "special_tokens": {text: id} naming ids in 256..V-2.
Token ids 0..255 are bytes, V - 1 is end-of-sequence; logits follow the formula in c_core/src/mock.cpp.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from ..core import Model, ModelParams
from .base import ModelAdapter, ModelLoadError, RuntimeOptions, read_config


def write_mock_model(path: str | Path, vocab_size: int = 300, special_tokens: dict[str, int] | None = None) -> Path:
    """Create a mock model directory (used by tests and demos); special_tokens names ids above the bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "mock", "vocab_size": vocab_size}
    if special_tokens:
        config["special_tokens"] = special_tokens
    (path / "config.json").write_text(json.dumps(config))
    return path


class MockAdapter(ModelAdapter):
    model_type = "mock"

    @classmethod
    def from_pretrained(cls, path, options: RuntimeOptions | None = None) -> "MockAdapter":
        path = Path(path)
        options = options or RuntimeOptions()
        config = read_config(path)
        vocab = config.get("vocab_size", 0)
        if not isinstance(vocab, int) or vocab <= 256:
            raise ModelLoadError(f"{path}: a mock model needs vocab_size > 256, got {vocab!r}")
        params = ModelParams(n_vocab=vocab, weight_dtype="f32", n_ctx=options.n_ctx, n_seq_max=options.n_seq_max,
                             n_batch=options.n_batch, n_threads=options.n_threads, kv_dtype=options.kv_dtype)
        model = Model("mock", params)
        model.replace_weight("logit_bias", np.asarray(config.get("logit_bias", np.zeros(vocab)), dtype=np.float32))
        return cls(path, config, model)

    @property
    def eos_token_ids(self) -> set[int]:
        return {self.config["vocab_size"] - 1}

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self.config.get("special_tokens", {}))

    @property
    def max_context(self) -> int:
        return self.model.params.n_ctx

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def grammar_tokenizer(self):
        import llguidance

        return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_ByteVocabulary(self)))

    def chat_text(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        text = f"tools: {json.dumps(tools)}\n" if tools else ""
        text += "".join(f"{m['role']}: {m['content']}{_calls(m)}\n" for m in messages)
        return text + ("assistant: " if add_generation_prompt else "")


def _calls(message) -> str:
    """An assistant message's tool calls, as Qwen2.5 writes them."""
    return "".join(f"<tool_call>{json.dumps(c['function'])}</tool_call>" for c in message.get("tool_calls") or ())


class _ByteVocabulary:
    """The mock's vocabulary as llguidance reads a tokenizer: bytes, then the special and unused ids."""

    bos_token_id = None

    def __init__(self, adapter: MockAdapter):
        names = {i: t for t, i in adapter.special_tokens.items()}
        size = adapter.config["vocab_size"]
        self.eos_token_id = size - 1
        self.tokens = [bytes([i]) for i in range(256)] + [names.get(i, f"<|unused{i}|>").encode()
                                                          for i in range(256, size)]
        self.special_token_ids = list(range(256, size))

    def __call__(self, text: bytes) -> list[int]:
        return list(text)
