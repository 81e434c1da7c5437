"""What every model adapter provides: a core model with its weights, a tokenizer, a chat template."""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

from ..core import Model


# Tokens that end a completion like EOS does: a FIM model emits them after the middle it was asked for.
FIM_END_TOKENS = ("<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")


class ModelLoadError(ValueError):
    """A model directory that cannot be loaded: the message names the file or weight at fault."""


@dataclasses.dataclass
class RuntimeOptions:
    """Core runtime parameters chosen by the caller, not by the checkpoint."""

    n_ctx: int = 4096  # KV cells shared by all sequences
    n_seq_max: int = 1
    n_batch: int = 512
    n_threads: int = 0  # 0 = all cores
    kv_dtype: str = "f32"
    # Weights in memory: None keeps the checkpoint's dtype; "f32" trades twice the memory of bf16
    # for exact f32 products (no bf16 rounding of activations).
    weight_dtype: str | None = None


def read_config(path: Path) -> dict[str, Any]:
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} has no config.json")
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config_path} is not valid JSON: {e}") from e


class ModelAdapter:
    """A loaded model: `model` (the core handle), `tokenizer`-backed encode/decode and chat formatting."""

    model_type: str = ""

    def __init__(self, path: Path, config: dict[str, Any], model: Model):
        self.path = Path(path)
        self.config = config
        self.model = model

    @classmethod
    def from_pretrained(cls, path: str | Path, options: RuntimeOptions | None = None) -> "ModelAdapter":
        raise NotImplementedError

    @property
    def eos_token_ids(self) -> set[int]:
        raise NotImplementedError

    @property
    def special_tokens(self) -> dict[str, int]:
        """The tokenizer's special tokens (hidden when decoding), by their text."""
        return {}

    @property
    def end_token_ids(self) -> set[int]:
        """The tokens that end a completion: EOS, and the FIM tokens that mean a fill is over."""
        special = self.special_tokens
        return set(self.eos_token_ids) | {special[t] for t in FIM_END_TOKENS if t in special}

    @property
    def max_context(self) -> int:
        """The longest sequence the checkpoint supports (further limited by n_ctx)."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def grammar_tokenizer(self):
        """The vocabulary as an llguidance LLTokenizer, for constrained decoding."""
        raise NotImplementedError(f"{type(self).__name__} has no grammar tokenizer")

    def chat_text(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                  tools: list[dict[str, Any]] | None = None) -> str:
        """A conversation formatted with the model's chat template, with the tools (OpenAI's shape) offered."""
        raise NotImplementedError

    @property
    def generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults from generation_config.json (temperature, top_p, top_k, min_p,
        repetition_penalty, max_tokens), for fields a request leaves open; empty when there is none."""
        path = self.path / "generation_config.json"
        try:
            config = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        names = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                 "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
        return {ours: config[theirs] for theirs, ours in names.items() if config.get(theirs) is not None}

    def with_own_tokenizer(self) -> "ModelAdapter":
        """The same adapter with a tokenizer of its own (same model), for a second thread: a fast
        tokenizer used from two threads at once fails ("Already borrowed")."""
        return copy.copy(self)

    def chat_token_ids(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation formatted with the model's chat template."""
        return self.encode(self.chat_text(messages, add_generation_prompt))
