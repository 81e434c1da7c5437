"""Quantizing float matrices into GGUF blocks at load (weight_dtype "q8_0"), with gguf's numpy quantizer.

Only matrices whose rows are whole blocks are quantized; vectors (norms, biases) stay float.
"""
from __future__ import annotations

from typing import Sequence

import gguf
import numpy as np

_QT = gguf.GGMLQuantizationType
# The GGUF block types the core holds, by their llaisys dtype names.
GGUF_BLOCK_TYPES = {"q8_0": _QT.Q8_0, "q4_0": _QT.Q4_0, "q5_0": _QT.Q5_0, "q4_k": _QT.Q4_K, "q6_k": _QT.Q6_K}
# weight_dtype names that quantize at load (with gguf's quantizer).
QUANTIZED_DTYPES = ("q8_0",)
# The float dtype the quantized models keep their vectors in.
VECTOR_DTYPE = "f32"


def float_dtype_of(weight_dtype: str) -> str:
    """The model's float dtype for weight_dtype: itself, or f32 for a type that quantizes at load."""
    return VECTOR_DTYPE if weight_dtype in QUANTIZED_DTYPES else weight_dtype


def quantizes(shape: Sequence[int], dtype: str) -> bool:
    """Whether a tensor of this shape is quantized to dtype: a matrix whose rows are whole blocks."""
    block = gguf.GGML_QUANT_SIZES[GGUF_BLOCK_TYPES[dtype]][0]
    return len(shape) == 2 and shape[1] % block == 0


def to_blocks(values: np.ndarray, dtype: str) -> np.ndarray:
    """f32 matrix -> its rows as GGUF blocks of dtype (uint8, one row of blocks per matrix row)."""
    return gguf.quants.quantize(np.ascontiguousarray(values, dtype=np.float32), GGUF_BLOCK_TYPES[dtype])
