"""EngineArgs: how the engine is built and how much it takes on at once."""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class EngineArgs:
    """model: an HF Qwen2 directory (or a mock model directory); None = the default model.

    max_num_seqs:           completions running at once (the core's sequence slots).
    max_num_batched_tokens: tokens per step (prefill chunks and decode rows together).
    n_ctx:                  KV cells shared by all sequences.
    max_model_len:          longest prompt + output of one completion; None = the model's limit,
                            capped by n_ctx.
    max_waiting:            requests allowed to wait for a slot before submissions are refused
                            (the async engine's bound); None = no bound.
    n_threads:              core worker threads; 0 = all cores.
    kv_dtype, weight_dtype: see llaisys.models.RuntimeOptions.
    enable_prefix_caching:  keep finished sequences' cells for later requests that start with the
                            same tokens (see prefix_cache.py).
    """

    model: Optional[str] = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    n_ctx: int = 8192
    max_model_len: Optional[int] = None
    max_waiting: Optional[int] = 256
    n_threads: int = 0
    kv_dtype: str = "f32"
    weight_dtype: Optional[str] = None
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "n_ctx"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_model_len", "max_waiting"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs})")
