"""Model adapters: a registry from config.json's model_type to the adapter that loads it, and
Qwen2 GGUF files loaded directly."""
from __future__ import annotations

import gc
from pathlib import Path

from .base import ModelAdapter, ModelLoadError, RuntimeOptions, read_config
from .gguf_model import gguf_text_adapter, is_gguf, load_gguf
from .mock import MockAdapter
from .qwen2 import Qwen2Adapter, load_tokenizer

ADAPTERS: dict[str, type[ModelAdapter]] = {}


def register(adapter: type[ModelAdapter]) -> type[ModelAdapter]:
    ADAPTERS[adapter.model_type] = adapter
    return adapter


register(Qwen2Adapter)
register(MockAdapter)


def load_model(path: str | Path, options: RuntimeOptions | None = None) -> ModelAdapter:
    """Load a .gguf file (Qwen2, its block weights kept), or a model directory with the adapter its
    config.json's model_type names."""
    if is_gguf(path):
        adapter = load_gguf(path, options)
    else:
        config = read_config(Path(path))
        model_type = config.get("model_type")
        if model_type not in ADAPTERS:
            raise ModelLoadError(f"{path}: model_type {model_type!r} is not supported (known: {sorted(ADAPTERS)})")
        adapter = ADAPTERS[model_type].from_pretrained(path, options)
    # A tokenizer holds millions of Python objects that live as long as the model; moving them out
    # of the collector's generations keeps every later collection from walking them.
    gc.freeze()
    return adapter


def load_text_adapter(path: str | Path) -> ModelAdapter:
    """A model's tokenizer and chat template without its weights (the adapter's model is None)."""
    if is_gguf(path):
        return gguf_text_adapter(path)
    config = read_config(Path(path))
    model_type = config.get("model_type")
    if model_type == Qwen2Adapter.model_type:
        return Qwen2Adapter(Path(path), config, None, load_tokenizer(Path(path)))
    if model_type == MockAdapter.model_type:
        return MockAdapter(Path(path), config, None)
    raise ModelLoadError(f"{path}: model_type {model_type!r} is not supported (known: {sorted(ADAPTERS)})")


__all__ = ["ADAPTERS", "ModelAdapter", "ModelLoadError", "RuntimeOptions", "gguf_text_adapter", "is_gguf", "load_gguf",
           "load_model", "load_text_adapter", "register"]
