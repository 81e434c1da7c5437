"""EngineArgs: how the engine is built and how much it takes on at once."""
from __future__ import annotations

import dataclasses
from typing import Optional

MAX_SEQS = 4096  # the core's limit on sequence ids (running slots and cache sequences together)
MAX_SPEC_TOKENS = 32  # drafts per verify (vLLM's MAX_SPEC_LEN)
SPECULATIVE = ("off", "ngram", "draft")


@dataclasses.dataclass
class EngineArgs:
    """model: an HF Qwen2 directory, a Qwen2 .gguf file (or a mock model directory); None = the default model.

    max_num_seqs:           completions running at once (the core's sequence slots).
    max_num_batched_tokens: tokens per step (prefill chunks and decode rows together).
    n_ctx:                  KV cells shared by all sequences.
    max_model_len:          longest prompt + output of one completion; None = the model's limit,
                            capped by n_ctx.
    max_waiting:            requests allowed to wait for a slot before submissions are refused
                            (the async engine's bound); None = no bound.
    n_threads:              core worker threads; 0 = all cores.
    kv_dtype, weight_dtype: see llaisys.models.RuntimeOptions.
    enable_prefix_caching:  keep computed tokens' cells for later requests that start with the
                            same tokens (see radix_cache.py).
    prefix_cache_max_cells: cells the prefix cache may keep that no running request uses; None = as
                            many as are free (cached cells always give way to running work).
    prefix_cache_seqs:      core sequences for the prefix cache's nodes, apart from max_num_seqs
                            (a full cache evicts a node for a new one; it never blocks admission).
    speculative:            "ngram": draft tokens by prompt lookup and verify them in the decode
                            batch (spec_decode.py; the output is the same as with "off"); "draft":
                            draft them with the draft model (draft_model.py).
    draft_model:            the draft model (a path as for model) with the target's tokenizer.
    speculative_p_min:      the draft model stops drafting at a token it gives less probability.
    num_speculative_tokens: most drafts per verify (k).
    prompt_lookup_min, prompt_lookup_max: the n-gram lengths matched (longest first).
    speculative_adaptive:   draft only as many tokens as measured acceptance and step cost make
                            worth it (none on busy batches or text without matches); False = always
                            all the drafter finds, up to k.
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
        for name in ("max_num_seqs", "max_num_batched_tokens", "n_ctx"):
            _check_int(name, getattr(self, name), 1)
        for name in ("max_model_len", "max_waiting"):
            _check_int(name, getattr(self, name), 1, optional=True)
        _check_int("prefix_cache_max_cells", self.prefix_cache_max_cells, 0, optional=True)
        _check_int("prefix_cache_seqs", self.prefix_cache_seqs, 1, MAX_SEQS - self.max_num_seqs)
        if self.speculative not in SPECULATIVE:
            raise ValueError(f"speculative must be one of {', '.join(SPECULATIVE)}, got {self.speculative!r}")
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError("speculative='draft' needs a draft_model, and a draft_model needs speculative='draft'"
                             f" (got speculative={self.speculative!r}, draft_model={self.draft_model!r})")
        p_min = self.speculative_p_min
        if isinstance(p_min, bool) or not isinstance(p_min, (int, float)) or not 0.0 <= p_min <= 1.0:
            raise ValueError(f"speculative_p_min must be a number in [0, 1], got {p_min!r}")
        _check_int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPEC_TOKENS)
        _check_int("prompt_lookup_min", self.prompt_lookup_min, 1)
        _check_int("prompt_lookup_max", self.prompt_lookup_max, self.prompt_lookup_min)
        if not isinstance(self.speculative_adaptive, bool):
            raise ValueError(f"speculative_adaptive must be a bool, got {self.speculative_adaptive!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                             f"max_num_seqs ({self.max_num_seqs})")

    @property
    def n_seq_max(self) -> int:
        """Core sequences: the running slots, then the prefix cache's."""
        return self.max_num_seqs + (self.prefix_cache_seqs if self.enable_prefix_caching else 0)


def _check_int(name: str, value, minimum: int, maximum: Optional[int] = None, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, {maximum}]" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"{name} must be an integer {bound}{' or None' if optional else ''}, got {value!r}")
