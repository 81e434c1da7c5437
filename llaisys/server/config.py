"""ServerConfig: what the server serves and its limits, from LLAISYS_* environment variables or flags."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Mapping, Optional

from ..engine import EngineArgs


def _flag(raw: str) -> bool:
    value = raw.lower()
    if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        raise ValueError(raw)
    return value in ("1", "true", "yes", "on")


# Environment variable -> (field, parser). `llaisys serve` sets the same fields from its flags.
ENV_VARS: dict[str, tuple[str, Callable[[str], object]]] = {
    "LLAISYS_MODEL": ("model", str),
    "LLAISYS_SERVED_MODEL_NAME": ("served_model_name", str),
    "LLAISYS_API_KEY": ("api_key", str),
    "LLAISYS_CORS_ORIGINS": ("cors_origins", str),
    "LLAISYS_MAX_NUM_SEQS": ("max_num_seqs", int),
    "LLAISYS_MAX_NUM_BATCHED_TOKENS": ("max_num_batched_tokens", int),
    "LLAISYS_CTX": ("n_ctx", int),
    "LLAISYS_MAX_MODEL_LEN": ("max_model_len", int),
    "LLAISYS_MAX_WAITING": ("max_waiting", int),
    "LLAISYS_THREADS": ("n_threads", int),
    "LLAISYS_KV_DTYPE": ("kv_dtype", str),
    "LLAISYS_WEIGHT_DTYPE": ("weight_dtype", str),
    "LLAISYS_REQUEST_TIMEOUT": ("request_timeout", float),
    "LLAISYS_PREFIX_CACHING": ("enable_prefix_caching", _flag),
    "LLAISYS_PREFIX_CACHE_MAX_CELLS": ("prefix_cache_max_cells", int),
    "LLAISYS_PREFIX_CACHE_SEQS": ("prefix_cache_seqs", int),
    "LLAISYS_SPECULATIVE": ("speculative", str),
    "LLAISYS_SPECULATIVE_TOKENS": ("num_speculative_tokens", int),
    "LLAISYS_SPECULATIVE_NGRAM_MIN": ("prompt_lookup_min", int),
    "LLAISYS_SPECULATIVE_NGRAM_MAX": ("prompt_lookup_max", int),
    "LLAISYS_SPECULATIVE_ADAPTIVE": ("speculative_adaptive", _flag),
    "LLAISYS_DRAFT_MODEL": ("draft_model", str),
    "LLAISYS_SPECULATIVE_P_MIN": ("speculative_p_min", float),
}
KINDS = {int: "an integer", float: "a number", _flag: "1/0, true/false, yes/no or on/off"}


@dataclasses.dataclass
class ServerConfig:
    """model:             an HF Qwen2 (or mock) model directory or a Qwen2 .gguf; None = the default model
                       (its GGUF, quantized blocks kept; weight_dtype="bf16" for the bf16 weights).
    served_model_name: the id clients pass as `model`; None = the model directory's name.
    api_key:           when set, every /v1/* request needs `Authorization: Bearer <key>`
                       (a comma-separated list allows several keys).
    cors_origins:      origins (comma-separated, or "*") whose browser pages may call the API; None = none.
    request_timeout:   seconds a request may run before it is aborted; 0 = no limit.
    enable_prefix_caching: keep computed prompts' and replies' KV cells for later requests that start
                       the same way (a shared system prompt, a chat's next turn; see the engine).
    The rest are the engine's limits (see EngineArgs).
    """

    model: Optional[str] = None
    served_model_name: Optional[str] = None
    api_key: Optional[str] = None
    cors_origins: Optional[str] = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    n_ctx: int = 16384
    max_model_len: Optional[int] = None
    max_waiting: int = 256
    n_threads: int = 0
    kv_dtype: str = "f32"
    weight_dtype: Optional[str] = None
    request_timeout: float = 600.0
    enable_prefix_caching: bool = True
    prefix_cache_max_cells: Optional[int] = None
    prefix_cache_seqs: int = 256
    speculative: str = "off"
    num_speculative_tokens: int = 4
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5
    speculative_adaptive: bool = True
    draft_model: Optional[str] = None
    speculative_p_min: float = 0.75

    def __post_init__(self) -> None:
        if self.request_timeout < 0:
            raise ValueError(f"request_timeout must be >= 0 seconds, got {self.request_timeout}")
        self.engine_args()  # the engine's own checks, before anything loads

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides) -> "ServerConfig":
        """Fields from LLAISYS_* variables (empty ones ignored), then the keyword overrides."""
        values = {}
        for var, (field, kind) in ENV_VARS.items():
            raw = environ.get(var, "").strip()
            if raw:
                try:
                    values[field] = kind(raw)
                except ValueError:
                    raise ValueError(f"{var} must be {KINDS[kind]}, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip().rstrip("/") for o in (self.cors_origins or "").split(",") if o.strip()]

    @property
    def api_keys(self) -> list[str]:
        return [k.strip() for k in (self.api_key or "").split(",") if k.strip()]

    def engine_args(self, model: Optional[Path] = None) -> EngineArgs:
        """The engine's arguments: every EngineArgs field has its namesake here."""
        limits = {f.name: getattr(self, f.name) for f in dataclasses.fields(EngineArgs) if f.name != "model"}
        model = model or self.model
        return EngineArgs(model=str(model) if model else None, **limits)
