"""The Qwen2 adapter: any HF Qwen2 directory -> a core "qwen2" model, tokenizer and chat template.

Weights are read from (single or sharded) safetensors without torch and written into the core's
slots in their stored dtype (bf16, f16 or f32), in the float dtype asked for, or with weight_dtype
"q8_0" every matrix quantized to Q8_0 blocks at load (norms and biases in f32).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..core import InvalidArgumentError, Model, ModelParams
from .base import ModelAdapter, ModelLoadError, RuntimeOptions, read_config
from .requantize import QUANTIZED_DTYPES, float_dtype_of, quantizes, to_blocks
from .safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits, iter_checkpoint_tensors

log = logging.getLogger(__name__)

CHECKPOINT_DTYPES = {"BF16": "bf16", "F16": "f16", "F32": "f32"}

# HF name (after "model.layers.N.") -> core slot suffix (after "blk.N.").
LAYER_WEIGHTS = {
    "input_layernorm.weight": "attn_norm",
    "self_attn.q_proj.weight": "attn_q",
    "self_attn.q_proj.bias": "attn_q_bias",
    "self_attn.k_proj.weight": "attn_k",
    "self_attn.k_proj.bias": "attn_k_bias",
    "self_attn.v_proj.weight": "attn_v",
    "self_attn.v_proj.bias": "attn_v_bias",
    "self_attn.o_proj.weight": "attn_output",
    "post_attention_layernorm.weight": "ffn_norm",
    "mlp.gate_proj.weight": "ffn_gate",
    "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
}
GLOBAL_WEIGHTS = {
    "model.embed_tokens.weight": "token_embd",
    "model.norm.weight": "output_norm",
    "lm_head.weight": "output",
}


def weight_map(config: dict[str, Any]) -> dict[str, str]:
    """Every HF weight name the checkpoint must hold -> its core slot."""
    mapping = {hf: core for hf, core in GLOBAL_WEIGHTS.items() if not (core == "output" and tied(config))}
    for layer in range(config["num_hidden_layers"]):
        for hf, core in LAYER_WEIGHTS.items():
            mapping[f"model.layers.{layer}.{hf}"] = f"blk.{layer}.{core}"
    return mapping


def tied(config: dict[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def model_params(config: dict[str, Any], weight_dtype: str, options: RuntimeOptions) -> ModelParams:
    """Core parameters from config.json plus the runtime options."""
    try:
        n_head = config["num_attention_heads"]
        return ModelParams(
            n_vocab=config["vocab_size"],
            n_embd=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=n_head,
            n_head_kv=config.get("num_key_value_heads", n_head),
            head_dim=config.get("head_dim") or config["hidden_size"] // n_head,
            n_ff=config["intermediate_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
            tie_embeddings=tied(config),
            weight_dtype=weight_dtype,
            n_ctx=options.n_ctx,
            n_seq_max=options.n_seq_max,
            n_batch=options.n_batch,
            n_threads=options.n_threads,
            kv_dtype=options.kv_dtype,
        )
    except KeyError as e:
        raise ModelLoadError(f"config.json lacks {e.args[0]!r}") from e


def _convert(array: np.ndarray, src: str, dst: str) -> np.ndarray:
    """Convert raw checkpoint data between f32, f16 and bf16 bits (mixed-dtype checkpoints)."""
    values = bf16_bits_to_f32(array) if src == "bf16" else array.astype(np.float32)
    return f32_to_bf16_bits(values) if dst == "bf16" else values.astype(np.float16 if dst == "f16" else np.float32)


def checkpoint_dtype(path: Path) -> str:
    """The dtype of the embedding tensor, which the model's weights are kept in."""
    for name, dtype, _, _ in iter_checkpoint_tensors(path):
        if name == "model.embed_tokens.weight":
            if dtype not in CHECKPOINT_DTYPES:
                raise ModelLoadError(f"{name} has dtype {dtype}; supported: {sorted(CHECKPOINT_DTYPES)}")
            return CHECKPOINT_DTYPES[dtype]
    raise ModelLoadError(f"{path}: missing weight 'model.embed_tokens.weight'")


def load_weights(model: Model, path: Path, config: dict[str, Any], quantize_to: str | None = None) -> None:
    """Write every checkpoint tensor into its slot (matrices quantized to the block type quantize_to,
    when given); fail naming any missing, unexpected or mis-shaped weight."""
    mapping = weight_map(config)
    weight_dtype = model.params.weight_dtype
    written = set()
    log_every = max(1, len(mapping) // 10)
    for name, dtype, shape, array in iter_checkpoint_tensors(path):
        if name not in mapping:
            if name == "lm_head.weight" and tied(config):
                continue  # some tied checkpoints also store the shared matrix
            if name.endswith("rotary_emb.inv_freq"):
                continue  # a buffer older exports saved, recomputed by the core
            raise ModelLoadError(f"unexpected weight {name!r} {list(shape)} in {path}")
        if dtype not in CHECKPOINT_DTYPES:
            raise ModelLoadError(f"weight {name!r} has dtype {dtype}; supported: {sorted(CHECKPOINT_DTYPES)}")
        src = CHECKPOINT_DTYPES[dtype]
        try:
            if quantize_to and quantizes(shape, quantize_to):
                values = array if src == "f32" else _convert(array, src, "f32")
                model.replace_weight(mapping[name], to_blocks(values, quantize_to), quantize_to, shape=shape)
            else:
                data = array if src == weight_dtype else _convert(array, src, weight_dtype)
                model.replace_weight(mapping[name], data, weight_dtype)
        except InvalidArgumentError as e:
            raise ModelLoadError(f"weight {name!r}: {e}") from e
        written.add(name)
        if quantize_to and len(written) % log_every == 0:
            log.info("quantized %d of %d weights to %s", len(written), len(mapping), quantize_to)
    missing = [name for name in mapping if name not in written]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"missing weight {missing[0]!r}{more} in {path}")


class Qwen2Adapter(ModelAdapter):
    model_type = "qwen2"

    def __init__(self, path: Path, config: dict[str, Any], model: Model, tokenizer):
        super().__init__(path, config, model)
        self.tokenizer = tokenizer
        self._eos = self._read_eos_ids()

    @classmethod
    def from_pretrained(cls, path, options: RuntimeOptions | None = None) -> "Qwen2Adapter":
        path = Path(path)
        options = options or RuntimeOptions()
        config = read_config(path)
        wanted = options.weight_dtype or checkpoint_dtype(path)
        quantize_to = wanted if wanted in QUANTIZED_DTYPES else None
        try:
            model = Model("qwen2", model_params(config, float_dtype_of(wanted), options))
        except InvalidArgumentError as e:
            raise ModelLoadError(f"{path}: {e}") from e
        log.info("loading %s weights from %s", wanted, path)
        load_weights(model, path, config, quantize_to)
        return cls(path, config, model, load_tokenizer(path))

    def _read_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen_path = self.path / "generation_config.json"
        for source in (self.config, json.loads(gen_path.read_text()) if gen_path.is_file() else {}):
            eos = source.get("eos_token_id")
            ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    @property
    def eos_token_ids(self) -> set[int]:
        return self._eos

    @property
    def special_tokens(self) -> dict[str, int]:
        if self.tokenizer is None:
            return {}
        return {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}

    @property
    def max_context(self) -> int:
        return min(self.config.get("max_position_embeddings", 32768), self.model.params.n_ctx)

    def with_own_tokenizer(self) -> "Qwen2Adapter":
        clone = super().with_own_tokenizer()
        clone.tokenizer = copy.deepcopy(self.tokenizer)
        return clone

    def _need_tokenizer(self):
        if self.tokenizer is None:
            raise ModelLoadError(f"{self.path} has no tokenizer files")
        return self.tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._need_tokenizer().encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._need_tokenizer().decode(list(ids), skip_special_tokens=True)

    def grammar_tokenizer(self):
        from llguidance.hf import from_tokenizer

        return from_tokenizer(self._need_tokenizer(), n_vocab=self.model.n_vocab)

    def chat_text(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        return self._need_tokenizer().apply_chat_template(messages, tools=tools, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)


def load_tokenizer(path: Path):
    """The HF tokenizer of the directory, or None when it ships none (weights-only tests).

    With a tokenizer.json the fast tokenizer class is loaded directly: AutoTokenizer would first
    load the model config, whose module imports torch whenever torch is installed.
    """
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
        return None
    # Imported late: transformers is slow to import and only the tokenizer is needed.
    if (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(str(path))
    from transformers import AutoTokenizer

    log.info("%s has no tokenizer.json: loading through AutoTokenizer", path)
    return AutoTokenizer.from_pretrained(str(path))
