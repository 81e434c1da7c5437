"""GGUF block types in the core: dequantization against the gguf package, the int8 matmul kernels
against a numpy reference, batch invariance, and ReplaceWeight's checks (llaisys.h, c_core/src/quant.*).

Random blocks are random bytes with every f16 scale field set from a list of edge values (zero,
signed zero, the largest f16, subnormals, negatives), so every bit pattern of the quantized
fields is exercised.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest

from llaisys import core
from llaisys.core import Batch, InvalidArgumentError, Model, ModelParams

QT = gguf.GGMLQuantizationType
TYPES = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q5_0": QT.Q5_0, "q4_k": QT.Q4_K, "q6_k": QT.Q6_K}
# Byte offsets of the f16 scale fields in each block (ggml-common.h).
F16_FIELDS = {"q8_0": [0], "q4_0": [0], "q5_0": [0], "q4_k": [0, 2], "q6_k": [208]}
EDGE_F16 = np.array([0.0, -0.0, 65504.0, -65504.0, 2.0**-24, -(2.0**-24), 2.0**-14, 1.0, -0.5, 3.0e-3],
                    dtype=np.float16)


def block_size(dtype: str) -> tuple[int, int]:
    return gguf.GGML_QUANT_SIZES[TYPES[dtype]]


def random_blocks(dtype: str, n_blocks: int, rng, scales: np.ndarray | None = None) -> np.ndarray:
    """n_blocks random blocks as (n_blocks, block bytes) uint8; scale fields from `scales` (default: edges)."""
    _, type_size = block_size(dtype)
    blocks = rng.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    pool = EDGE_F16 if scales is None else scales.astype(np.float16)
    for offset in F16_FIELDS[dtype]:
        values = pool[rng.integers(0, len(pool), n_blocks)]
        blocks[:, offset:offset + 2] = values.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def random_matrix(dtype: str, n: int, k: int, rng) -> np.ndarray:
    """An n x k matrix of blocks with moderate scales (no overflow in products), as raw bytes."""
    elems, _ = block_size(dtype)
    scales = rng.uniform(-0.02, 0.02, 64)
    return random_blocks(dtype, n * k // elems, rng, scales).reshape(n, -1)


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """x as the core quantizes it per 32 columns (Q8_0 rule: d = max|x| / 127, round half away), dequantized."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = (np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    scaled = blocks * inv
    q = np.sign(scaled) * np.floor(np.abs(scaled) + np.float32(0.5))
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


@pytest.mark.parametrize("dtype", TYPES)
def test_dequantize_is_bit_identical_to_gguf(dtype):
    rng = np.random.default_rng(1)
    elems, _ = block_size(dtype)
    blocks = random_blocks(dtype, 400, rng)
    expected = gguf.quants.dequantize(blocks, TYPES[dtype]).reshape(-1)
    got = core.dequantize(blocks, dtype, 400 * elems)
    np.testing.assert_array_equal(got.view(np.uint32), expected.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("dtype", TYPES)
def test_row_bytes_and_bad_lengths(dtype):
    elems, type_size = block_size(dtype)
    assert core.dtype_row_bytes(dtype, 3 * elems) == 3 * type_size
    with pytest.raises(InvalidArgumentError, match="not whole"):
        core.dtype_row_bytes(dtype, elems + 16)
    with pytest.raises(InvalidArgumentError):
        core.dequantize(np.zeros(type_size, np.uint8), dtype, elems // 2)


@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("n", [16, 37])  # 37: a panel of 16 rows only partly filled
def test_matmul_matches_numpy_reference(dtype, n):
    """The kernel's integer dot products are exact: only f32 rounding of scales and sums remains."""
    rng = np.random.default_rng(2)
    elems, _ = block_size(dtype)
    k = 2 * max(elems, 64)
    w = random_matrix(dtype, n, k, rng)
    x = rng.standard_normal((7, k)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero activation block (scale 0)
    got = core.matmul(w, dtype, n, k, x)
    w_f = gguf.quants.dequantize(w, TYPES[dtype]).reshape(n, k).astype(np.float64)
    xq = quantize_activations(x)
    expected = xq @ w_f.T
    bound = 1e-5 * (np.abs(xq) @ np.abs(w_f).T) + 1e-30
    assert np.all(np.abs(got - expected) <= bound), np.max(np.abs(got - expected) / bound)
    # Against unquantized activations: the int8 rounding of x costs under 1% of the magnitude here.
    exact = x.astype(np.float64) @ w_f.T
    assert np.max(np.abs(got - exact)) <= 0.01 * np.max(np.abs(x) @ np.abs(w_f).T)


@pytest.mark.parametrize("dtype", TYPES)
@pytest.mark.parametrize("k", [0, 1536])  # 1536: batches unpack it in three chunks of 512 columns
def test_matmul_rows_identical_alone_batched_and_threaded(dtype, k):
    rng = np.random.default_rng(3)
    elems, _ = block_size(dtype)
    n, k = 48, k or 2 * max(elems, 64)
    w = random_matrix(dtype, n, k, rng)
    x = rng.standard_normal((13, k)).astype(np.float32)
    batched = core.matmul(w, dtype, n, k, x, n_threads=2)
    for i in range(len(x)):
        np.testing.assert_array_equal(core.matmul(w, dtype, n, k, x[i:i + 1], n_threads=1)[0], batched[i])


def qwen2_params(**kw) -> ModelParams:
    base = dict(n_vocab=48, n_embd=256, n_layer=2, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_ctx=64,
                n_seq_max=3, n_batch=64, weight_dtype="f32")
    base.update(kw)
    return ModelParams(**base)


def quantized_qwen2(dtype: str, seed: int = 0) -> tuple[Model, Model]:
    """A random qwen2 with every matrix in dtype, and the same model with those matrices dequantized to f32."""
    rng = np.random.default_rng(seed)
    quantized, reference = Model("qwen2", qwen2_params()), Model("qwen2", qwen2_params())
    for name in quantized.weight_names():
        shape = quantized.weight_shape(name)
        if len(shape) == 2:
            blocks = random_matrix(dtype, shape[0], shape[1], rng)
            quantized.replace_weight(name, blocks, dtype, shape=shape)
            reference.replace_weight(name, gguf.quants.dequantize(blocks, TYPES[dtype]).reshape(shape))
        else:
            values = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32) if "norm" in name else \
                (0.1 * rng.standard_normal(shape)).astype(np.float32)
            quantized.replace_weight(name, values)
            reference.replace_weight(name, values)
    return quantized, reference


@pytest.mark.parametrize("dtype", TYPES)
def test_qwen2_with_block_weights_close_to_dequantized_and_batch_invariant(dtype):
    quantized, reference = quantized_qwen2(dtype)
    prompt = [3, 7, 11, 5, 2, 40]
    reference.decode(Batch(prompt, logits=[1] * len(prompt)))
    quantized.decode(Batch(prompt, logits=[1] * len(prompt)))
    want, got = reference.logits().copy(), quantized.logits().copy()
    # Only the int8 rounding of activations separates them.
    assert np.max(np.abs(got - want)) <= 0.05 * np.max(np.abs(want)), np.max(np.abs(got - want))
    # The same sequence batched with two others: bit-identical logits.
    quantized.kv_clear()
    other_a, other_b = [9, 9, 1], list(range(10, 30))
    quantized.decode(Batch(other_a + prompt + other_b, seq_ids=[1] * 3 + [0] * len(prompt) + [2] * len(other_b),
                           logits=[0] * 3 + [1] * len(prompt) + [0] * len(other_b)))
    np.testing.assert_array_equal(quantized.logits(), got)


def test_replace_weight_rejects_what_a_slot_cannot_take():
    m = Model("qwen2", qwen2_params(n_layer=1))
    q8 = np.zeros((512, 256 // 32 * 34), np.uint8)
    m.replace_weight("blk.0.ffn_gate", q8, "q8_0", shape=(512, 256))
    assert m.weight_is_set("blk.0.ffn_gate")
    with pytest.raises(InvalidArgumentError, match="slot takes f32$"):  # norms stay float
        m.replace_weight("blk.0.attn_norm", np.zeros(34 * 8, np.uint8), "q8_0", shape=(256,))
    narrow = Model("qwen2", qwen2_params(n_layer=1, n_embd=96, n_head=2, n_head_kv=1, head_dim=16))
    narrow.replace_weight("blk.0.attn_q", np.zeros((32, 3 * 34), np.uint8), "q8_0", shape=(32, 96))
    with pytest.raises(InvalidArgumentError, match="rows of 96 elements are not whole q4_k blocks of 256"):
        narrow.replace_weight("blk.0.attn_q", np.zeros(32 * 144, np.uint8), "q4_k", shape=(32, 96))
    raw = core.lib.llaisysModelReplaceWeight(m.handle, b"blk.0.ffn_up", 99, core.ffi.new("int64_t[]", [512, 256]),
                                             2, core.ffi.from_buffer(q8))
    assert raw == core.lib.LLAISYS_INVALID and "not a llaisys_dtype" in core.last_error()
    params = qwen2_params().to_c()
    params.weight_dtype = core.lib.LLAISYS_DTYPE_Q8_0  # block types go per matrix slot
    assert core.lib.llaisysModelCreate(b"qwen2", params) == core.ffi.NULL
    assert "not a float dtype" in core.last_error()
