"""Qwen2 straight from a GGUF file: block tensors go into the core's slots as they are.

Everything but the weights (config.json, generation_config.json, the tokenizer files with the chat
template) is written once from the file's metadata by gguf_convert into a cache directory keyed by
that metadata; the adapter then reads them as from an HF directory. With RuntimeOptions.weight_dtype
set to a float type (f32, f16, bf16) every matrix is dequantized to that type instead, which
reproduces the converted HF directory of the same file; with "q8_0" every matrix becomes Q8_0.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from .. import core
from ..core import InvalidArgumentError, Model
from .base import ModelLoadError, RuntimeOptions, read_config
from .gguf_convert import (TIE_DISTANCE, GGUFConversionError, bits_per_weight, read_qwen2_gguf, slot_name,
                           tie_distance, write_model_files)
from .qwen2 import Qwen2Adapter, load_tokenizer, model_params
from .requantize import GGUF_BLOCK_TYPES, QUANTIZED_DTYPES, float_dtype_of, quantizes, to_blocks
from .safetensors_io import f32_to_bf16_bits

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
# GGUF tensor types the core holds as they are -> their llaisys dtype names.
BLOCK_TYPES = {gguf_type: name for name, gguf_type in GGUF_BLOCK_TYPES.items()}
# Rows of the embedding and output matrices compared to decide whether output.weight copies token_embd.
_TIE_SAMPLE_STEP = 16


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf" and Path(path).is_file()


def _f32(data: np.ndarray, tensor_type, shape: tuple[int, ...]) -> np.ndarray:
    """GGUF tensor data (its rows, any type) as f32 of the row-major shape."""
    if tensor_type in BLOCK_TYPES:
        return core.dequantize(data, BLOCK_TYPES[tensor_type], int(np.prod(shape))).reshape(shape)
    return gguf.quants.dequantize(data, tensor_type).reshape(shape).astype(np.float32)


def _shape(tensor) -> tuple[int, ...]:
    """Reversed GGUF dims: the row-major shape, [out, in] for a matrix."""
    return tuple(int(d) for d in reversed(tensor.shape))


def _sampled_rows(tensor) -> np.ndarray:
    rows = tensor.data[::_TIE_SAMPLE_STEP]
    return _f32(rows, tensor.tensor_type, (len(rows), _shape(tensor)[1]))


def _embedding_tensor(tensors: dict[str, Any]) -> tuple[Any, bool]:
    """The tensor for the token_embd slot and whether the logits reuse it (tied), decided as the
    HF conversion decides: an output matrix that copies the embedding is dropped, keeping the finer."""
    embed, head = tensors["token_embd.weight"], tensors.get("output.weight")
    if head is None:
        return embed, True
    distance = tie_distance(_sampled_rows(embed), _sampled_rows(head))
    if distance > TIE_DISTANCE:
        return embed, False
    finer = max((embed, head), key=bits_per_weight)
    log.info("output.weight copies token_embd.weight (relative distance %.3f on every %dth row): tying, keeping %s",
             distance, _TIE_SAMPLE_STEP, finer.name)
    return finer, True


def _model_files(gguf_path: Path, meta: dict[str, Any], vocab_size: int, tied: bool) -> Path:
    """The cached directory of config, generation config and tokenizer for this metadata."""
    from .default_model import model_cache_dir

    keyed = {k: v for k, v in meta.items() if k.startswith(("tokenizer.", "qwen2.", "general.architecture"))}
    digest = hashlib.sha256(json.dumps([keyed, vocab_size, tied], sort_keys=True, default=str).encode()).hexdigest()
    target = model_cache_dir() / "gguf-model-files" / digest[:24]
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        log.info("writing the config and tokenizer of %s to %s", gguf_path, target)
        write_model_files(meta, work, vocab_size, tied)
        try:
            os.rename(work, target)
        except OSError:  # another process wrote it first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def gguf_text_adapter(path: str | Path) -> Qwen2Adapter:
    """The GGUF's tokenizer and chat template without its weights (model is None): for a process
    that formats and tokenizes prompts for replicas that hold the model."""
    try:
        tensors, meta = read_qwen2_gguf(Path(path))
    except GGUFConversionError as e:
        raise ModelLoadError(str(e)) from e
    embedding, tied = _embedding_tensor({t.name: t for t in tensors})
    files = _model_files(Path(path), meta, int(embedding.shape[1]), tied)
    return Qwen2Adapter(files, read_config(files), None, load_tokenizer(files))


def load_gguf(path: str | Path, options: RuntimeOptions | None = None) -> Qwen2Adapter:
    """A Qwen2 adapter over the GGUF at path, its block tensors kept as blocks (see the module doc)."""
    path = Path(path)
    options = options or RuntimeOptions()
    try:
        tensors, meta = read_qwen2_gguf(path)
    except GGUFConversionError as e:
        raise ModelLoadError(str(e)) from e
    embedding, tied = _embedding_tensor({t.name: t for t in tensors})
    files = _model_files(path, meta, int(embedding.shape[1]), tied)
    config = read_config(files)
    wanted = options.weight_dtype
    float_dtype = float_dtype_of(wanted) if wanted else "f32"  # GGUF norms and biases are f32
    try:
        model = Model("qwen2", model_params(config, float_dtype, options))
    except InvalidArgumentError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    keep_blocks = wanted is None
    quantize_to = wanted if wanted in QUANTIZED_DTYPES else None
    log.info("loading %s from %s", "GGUF blocks" if keep_blocks else f"{wanted} weights", path)
    slots = set(model.weight_names())
    for tensor in tensors:
        if tensor.name in ("token_embd.weight", "output.weight") and tied:
            if tensor is not embedding:
                continue
            slot = "token_embd"
        else:
            slot = slot_name(tensor.name)
        if slot not in slots:
            raise ModelLoadError(f"{path}: unexpected tensor {tensor.name!r}")
        _write_tensor(model, slot, tensor, float_dtype, keep_blocks, quantize_to)
    missing = [name for name in model.weight_names() if not model.weight_is_set(name)]
    if missing:
        raise ModelLoadError(f"{path}: no tensor for slot {missing[0]!r} ({len(missing)} missing)")
    return Qwen2Adapter(files, config, model, load_tokenizer(files))


def _write_tensor(model: Model, slot: str, tensor, float_dtype: str, keep_blocks: bool,
                  quantize_to: str | None) -> None:
    shape = _shape(tensor)
    block_type = BLOCK_TYPES.get(tensor.tensor_type)
    try:
        if len(shape) == 2 and block_type and (keep_blocks or block_type == quantize_to):
            model.replace_weight(slot, tensor.data, block_type, shape=shape)
            return
        if quantize_to and quantizes(shape, quantize_to):
            model.replace_weight(slot, to_blocks(_f32(tensor.data, tensor.tensor_type, shape), quantize_to),
                                 quantize_to, shape=shape)
            return
        if keep_blocks and len(shape) == 2 and tensor.tensor_type not in (QT.F32, QT.F16, QT.BF16):
            log.warning("%s is %s, which the core does not hold: dequantized to %s", tensor.name,
                        tensor.tensor_type.name, float_dtype)
        values = _f32(tensor.data, tensor.tensor_type, shape)
        if float_dtype == "bf16":
            values = f32_to_bf16_bits(values)
        elif float_dtype == "f16":
            values = values.astype(np.float16)
        model.replace_weight(slot, values, float_dtype)
    except InvalidArgumentError as e:
        raise ModelLoadError(f"tensor {tensor.name!r}: {e}") from e
