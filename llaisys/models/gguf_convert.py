"""Convert a Qwen2 GGUF file into a Hugging Face model directory.

The result is what ``Qwen2ForCausalLM.from_pretrained`` expects: config.json,
generation_config.json, a bf16 model.safetensors and the tokenizer files.
Quantized GGUF tensors are dequantized with ``gguf.quants.dequantize`` and
rounded to bfloat16, so the converted model reproduces the quantized model's
weights (up to bf16 rounding), not the original full-precision checkpoint.

GGUF lists dimensions innermost first (``ne[0]`` = row length), while the
reader's numpy arrays are row-major with the reversed shape; for a Linear
layer that reversed shape is exactly HF's ``[out_features, in_features]``, so
no transpose is needed.  llama.cpp's converter does not permute Qwen2's q/k
projections (only LLaMA-style models get the rotary permutation), so they are
copied as they are.

Needs numpy, gguf and (for the tokenizer) transformers; not torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .gguf_file import GGUFFormatError, GGUFTensor, read_gguf
from .qwen2 import GLOBAL_WEIGHTS, LAYER_WEIGHTS
from .safetensors_io import bf16_bits_to_f32, f32_to_bf16_bits, write_safetensors

__all__ = ["GGUFConversionError", "TIE_DISTANCE", "bits_per_weight", "convert_gguf_to_hf", "read_qwen2_gguf",
           "slot_name", "tie_distance", "write_model_files"]

logger = logging.getLogger(__name__)


class GGUFConversionError(ValueError):
    """The GGUF file is not a Qwen2 model this converter understands."""


def _gguf_tensor_name(slot: str) -> str:
    """The GGUF tensor name of a core weight slot: the slots are named after GGUF's tensors."""
    return slot.removesuffix("_bias") + ".bias" if slot.endswith("_bias") else slot + ".weight"


# GGUF tensor name -> HF name, for tensors outside the transformer blocks.
_GLOBAL_NAMES = {_gguf_tensor_name(slot): hf for hf, slot in GLOBAL_WEIGHTS.items()}
# "blk.N.<suffix>" -> "model.layers.N.<hf suffix>".
_LAYER_NAMES = {_gguf_tensor_name(slot): hf for hf, slot in LAYER_WEIGHTS.items()}

_QWEN2_PRETOKENIZER = "qwen2"


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Convert the Qwen2 GGUF at *gguf_path* into a HF model directory *out_dir*.

    *out_dir* is created if needed; files in it are overwritten.  Returns
    *out_dir* as a Path.  Raises :class:`GGUFConversionError` for GGUF files
    that are not a complete Qwen2 model.
    """
    out_dir = Path(out_dir)
    tensors, meta = read_qwen2_gguf(gguf_path)
    # The embedding may have more rows than the tokenizer has tokens (the
    # vocabulary is padded for efficiency); the model's vocab_size is the rows.
    vocab_size = int({t.name: t for t in tensors}["token_embd.weight"].shape[1])
    converted = _dequantize(tensors)
    tied = _tie_embeddings(converted, {_hf_name(t.name): bits_per_weight(t) for t in tensors})
    config = write_model_files(meta, out_dir, vocab_size, tied)
    _write_weights(converted, _expected_hf_names(config), out_dir / "model.safetensors")
    return out_dir


def read_qwen2_gguf(gguf_path: str | Path) -> tuple[list[GGUFTensor], dict[str, Any]]:
    """The tensors and metadata of a Qwen2 GGUF; GGUFConversionError for another architecture or no embedding."""
    logger.info("reading %s", gguf_path)
    try:
        meta, tensors = read_gguf(gguf_path)
    except GGUFFormatError as e:
        raise GGUFConversionError(str(e)) from e
    arch = meta.get("general.architecture")
    if arch != "qwen2":
        raise GGUFConversionError(f"{gguf_path}: architecture is {arch!r}, expected 'qwen2'")
    if not any(t.name == "token_embd.weight" for t in tensors):
        raise GGUFConversionError(f"{gguf_path}: no token_embd.weight tensor")
    return tensors, meta


def write_model_files(meta: dict[str, Any], out_dir: Path, vocab_size: int, tied: bool) -> dict[str, Any]:
    """Everything of the HF directory but the weights: config.json, generation_config.json and the
    tokenizer files (with the chat template). Returns the config."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _hf_config(meta, vocab_size, tied)
    logger.info(
        "%s: %d layers, hidden %d, vocab %d, %s embeddings",
        meta.get("general.name", "unnamed model"),
        config["num_hidden_layers"],
        config["hidden_size"],
        vocab_size,
        "tied" if tied else "untied",
    )
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", _generation_config(meta))
    _write_tokenizer(meta, out_dir, vocab_size, config["max_position_embeddings"])
    return config


def slot_name(gguf_name: str) -> str:
    """The core weight slot of a GGUF tensor name (the inverse of _gguf_tensor_name)."""
    if gguf_name.endswith(".bias"):
        return gguf_name.removesuffix(".bias") + "_bias"
    return gguf_name.removesuffix(".weight")


def _require(meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise GGUFConversionError(f"GGUF metadata lacks {key}")
    return meta[key]


def _as_float32_decimal(value: float) -> float:
    """The shortest decimal of a float32 value (GGUF stores 1e-6 as 9.99999997e-07)."""
    return float(str(np.float32(value)))


def _hf_config(meta: dict[str, Any], vocab_size: int, tied: bool) -> dict[str, Any]:
    hidden = int(_require(meta, "qwen2.embedding_length"))
    heads = int(_require(meta, "qwen2.attention.head_count"))
    layers = int(_require(meta, "qwen2.block_count"))
    context = int(_require(meta, "qwen2.context_length"))
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "intermediate_size": int(_require(meta, "qwen2.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta.get("qwen2.attention.head_count_kv", heads)),
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": context,
        "rms_norm_eps": _as_float32_decimal(_require(meta, "qwen2.attention.layer_norm_rms_epsilon")),
        "rope_theta": _as_float32_decimal(meta.get("qwen2.rope.freq_base", 10000.0)),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "sliding_window": context,
        "max_window_layers": layers,
        # Older transformers read torch_dtype, newer ones dtype.
        "torch_dtype": "bfloat16",
        "dtype": "bfloat16",
    }


def _eos_token_ids(meta: dict[str, Any]) -> list[int]:
    """Every id that ends a turn: the GGUF eos/eot ids plus <|endoftext|>.

    Qwen2.5 instruct models end replies with <|im_end|> (the GGUF eos) but
    may also emit <|endoftext|>; their generation config lists both.
    """
    ids = [meta[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if key in meta]
    tokens = meta.get("tokenizer.ggml.tokens", [])
    if "<|endoftext|>" in tokens:
        ids.append(tokens.index("<|endoftext|>"))
    return list(dict.fromkeys(int(i) for i in ids))


def _generation_config(meta: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {"eos_token_id": _eos_token_ids(meta)}
    optional_ids = {"bos_token_id": "tokenizer.ggml.bos_token_id", "pad_token_id": "tokenizer.ggml.padding_token_id"}
    for hf_key, gguf_key in optional_ids.items():
        if gguf_key in meta:
            config[hf_key] = int(meta[gguf_key])
    return config


def _write_tokenizer(meta: dict[str, Any], out_dir: Path, vocab_size: int, max_length: int) -> None:
    """Write vocab.json, merges.txt and tokenizer_config.json, then let
    transformers load them and save a tokenizer.json next to them."""
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFConversionError(f"tokenizer model is {model!r}, expected byte-level BPE 'gpt2'")
    pre = meta.get("tokenizer.ggml.pre", _QWEN2_PRETOKENIZER)
    if pre != _QWEN2_PRETOKENIZER:
        logger.warning("tokenizer pre-tokenizer is %r; Qwen2Tokenizer will use the qwen2 one", pre)
    tokens: list[str] = _require(meta, "tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    merges: list[str] = _require(meta, "tokenizer.ggml.merges")
    if len(tokens) > vocab_size:
        raise GGUFConversionError(f"{len(tokens)} tokens but only {vocab_size} embedding rows")
    if len(tokens) < vocab_size:
        logger.info("tokenizer has %d tokens for %d embedding rows", len(tokens), vocab_size)

    vocab: dict[str, int] = {}
    added: dict[str, dict[str, Any]] = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        if token_type in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED):
            added[str(token_id)] = {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": token_type == gguf.TokenType.CONTROL,
            }
        elif token_type != gguf.TokenType.UNUSED:
            # UNUSED entries are llama.cpp's "[PAD123]" fillers: no real token.
            vocab[token] = token_id

    def token_at(key: str) -> str | None:
        return tokens[meta[key]] if key in meta else None

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added,
        # Qwen2 never prepends a BOS token; bos_token stays unset as upstream.
        "add_bos_token": add_bos,
        "bos_token": token_at("tokenizer.ggml.bos_token_id") if add_bos else None,
        "eos_token": token_at("tokenizer.ggml.eos_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": max_length,
        "split_special_tokens": False,
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        tokenizer_config["chat_template"] = template
    else:
        logger.warning("GGUF has no chat template; the tokenizer will have none")

    _write_json(out_dir / "vocab.json", vocab)
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)

    # Imported here: transformers is slow to import and only this step needs it.
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(out_dir).save_pretrained(out_dir)
    logger.info("tokenizer written: %d tokens, %d added/special", len(vocab), len(added))


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    prefix, _, rest = gguf_name.partition(".")
    layer, _, suffix = rest.partition(".")
    if prefix == "blk" and layer.isdigit() and suffix in _LAYER_NAMES:
        return f"model.layers.{layer}.{_LAYER_NAMES[suffix]}"
    raise GGUFConversionError(f"unexpected tensor {gguf_name!r} in a Qwen2 GGUF")


def _expected_hf_names(config: dict[str, Any]) -> set[str]:
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        names.add("lm_head.weight")
    for layer in range(config["num_hidden_layers"]):
        names.update(f"model.layers.{layer}.{suffix}" for suffix in _LAYER_NAMES.values())
    return names


def bits_per_weight(tensor) -> float:
    block_size, type_size = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    return 8.0 * type_size / block_size


# Relative L2 distance below which output.weight counts as a requantized copy of token_embd.
TIE_DISTANCE = 0.05


def tie_distance(embed: np.ndarray, head: np.ndarray) -> float:
    """Relative L2 distance of the output matrix from the embedding (inf for different shapes)."""
    if embed.shape != head.shape:
        return float("inf")
    return float(np.linalg.norm(embed - head) / max(np.linalg.norm(embed), 1e-30))


def _tie_embeddings(converted: dict[str, tuple[str, tuple[int, ...], np.ndarray]], bits: dict[str, float]) -> bool:
    """Tie the embeddings when the GGUF has no output matrix or one that copies the embedding.

    Converters export tied Qwen2 models with the shared matrix twice, quantized to different
    types; tying keeps the finer copy and saves reading the other at every decode step.
    """
    if "lm_head.weight" not in converted:
        return True
    distance = tie_distance(bf16_bits_to_f32(converted["model.embed_tokens.weight"][2]),
                            bf16_bits_to_f32(converted["lm_head.weight"][2]))
    if distance > TIE_DISTANCE:
        return False
    finer = max(("model.embed_tokens.weight", "lm_head.weight"), key=lambda n: bits[n])
    logger.info("output.weight copies token_embd.weight (relative distance %.3f): tying, keeping %s", distance, finer)
    if finer == "lm_head.weight":
        converted["model.embed_tokens.weight"] = converted["lm_head.weight"]
    del converted["lm_head.weight"]
    return True


def _dequantize(gguf_tensors: list[GGUFTensor]) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """Every tensor dequantized to bf16 bits, by HF name."""
    converted: dict[str, tuple[str, tuple[int, ...], np.ndarray]] = {}
    total = len(gguf_tensors)
    log_every = max(1, total // 10)
    for done, tensor in enumerate(gguf_tensors, start=1):
        name = _hf_name(tensor.name)
        # Reversed GGUF dims = numpy row-major shape = HF's [out, in].
        shape = tuple(int(d) for d in reversed(tensor.shape))
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        converted[name] = ("BF16", shape, f32_to_bf16_bits(values))
        if done % log_every == 0 or done == total:
            logger.info("dequantized %d/%d tensors", done, total)
    return converted


def _write_weights(converted: dict[str, tuple[str, tuple[int, ...], np.ndarray]], expected: set[str],
                   out_path: Path) -> None:
    """Check every expected tensor is there and write them to *out_path*."""
    missing = expected - converted.keys()
    if missing:
        raise GGUFConversionError(f"GGUF lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    logger.info("writing %s", out_path)
    write_safetensors(out_path, converted, metadata={"format": "pt"})


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
