"""Speculative verification's premise in the core: row j of a (k+1)-row verify batch (a sequence's
last token and k drafts, logits on every row) is bit-identical to decoding the same tokens one row at
a time, for every weight dtype (float and GGUF blocks) and KV dtype, alone and inside a batch with
other sequences; and after kv_seq_rm cuts the rejected drafts, decoding goes on bit-identically.
Without this, a seeded or greedy request could change its text when speculation is on.
"""
from __future__ import annotations

import numpy as np
import pytest

from llaisys.core import BLOCK_DTYPES, FLOAT_DTYPES, Batch, Model

from test_quant_kernels import qwen2_params, random_matrix

PROMPT = [3, 7, 11, 5, 2, 40, 9, 1, 30]
DRAFT = [4, 17, 4, 22, 8, 13, 0, 6]  # k = 8; shorter drafts are its prefixes


def half(values: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "f16":
        return values.astype(np.float16)
    if dtype == "bf16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values


def qwen2(weight_dtype: str, kv_dtype: str, seed: int = 0) -> Model:
    """A random qwen2: float slots in weight_dtype, or (a block type) every matrix in blocks."""
    rng = np.random.default_rng(seed)
    floats = weight_dtype if weight_dtype in FLOAT_DTYPES else "f32"
    m = Model("qwen2", qwen2_params(weight_dtype=floats, kv_dtype=kv_dtype, n_seq_max=4))
    for name in m.weight_names():
        shape = m.weight_shape(name)
        if len(shape) == 2 and weight_dtype in BLOCK_DTYPES:
            m.replace_weight(name, random_matrix(weight_dtype, shape[0], shape[1], rng), weight_dtype, shape=shape)
            continue
        scale, offset = (0.1, 1.0) if "norm" in name else (0.1, 0.0)
        m.replace_weight(name, half((offset + scale * rng.standard_normal(shape)).astype(np.float32), floats), floats)
    return m


def mock(weight_dtype: str, kv_dtype: str) -> Model:
    bias = np.random.default_rng(1).standard_normal(48).astype(np.float32)
    m = Model("mock", n_vocab=48, n_ctx=64, n_seq_max=4, n_batch=64, weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    m.replace_weight("logit_bias", half(bias, weight_dtype), weight_dtype)
    return m


def one_row_decodes(m: Model, seq: int, tokens: list[int], start: int) -> np.ndarray:
    rows = []
    for i, t in enumerate(tokens):
        m.decode(Batch([t], pos=[start + i], seq_ids=[seq]))
        rows.append(m.logits()[0].copy())
    return np.stack(rows)


def check_verify_rows(m: Model, k: int) -> None:
    """Seq 0 verifies [last] + k drafts in one batch beside seq 2's prefill chunk; seq 1 decodes the
    same tokens one at a time. Then both cut the drafts after the first and decode on."""
    head, last, n = PROMPT[:-1], PROMPT[-1], len(PROMPT) - 1
    m.decode(Batch(head + head, seq_ids=[0] * n + [1] * n, logits=[0] * (2 * n)))
    verify = [last] + DRAFT[:k]
    other = [5, 6, 7, 8, 9]
    m.decode(Batch(other[:2] + verify + other[2:], pos=[0, 1] + list(range(n, n + k + 1)) + [2, 3, 4],
                   seq_ids=[2, 2] + [0] * (k + 1) + [2, 2, 2], logits=[0, 1] + [1] * (k + 1) + [0, 0, 1]))
    batched = m.logits()[1:k + 2].copy()
    alone = one_row_decodes(m, 1, verify, n)
    np.testing.assert_array_equal(batched.view(np.uint32), alone.view(np.uint32))
    # The target rejected every draft after the first: both sequences drop those cells and go on.
    for seq in (0, 1):
        m.kv_seq_rm(seq, n + 2, -1)
    assert m.kv_seq_pos_max(0) == m.kv_seq_pos_max(1) == n + 1
    np.testing.assert_array_equal(one_row_decodes(m, 0, [29, 31], n + 2).view(np.uint32),
                                  one_row_decodes(m, 1, [29, 31], n + 2).view(np.uint32))


WEIGHTS = list(FLOAT_DTYPES) + list(BLOCK_DTYPES)


@pytest.mark.parametrize("kv_dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("weight_dtype", WEIGHTS)
@pytest.mark.parametrize("k", [1, 4, 8])
def test_qwen2_verify_rows_equal_one_row_decodes(weight_dtype, kv_dtype, k):
    check_verify_rows(qwen2(weight_dtype, kv_dtype), k)


@pytest.mark.parametrize("kv_dtype", list(FLOAT_DTYPES))
@pytest.mark.parametrize("weight_dtype", list(FLOAT_DTYPES))
def test_mock_verify_rows_equal_one_row_decodes(weight_dtype, kv_dtype):
    check_verify_rows(mock(weight_dtype, kv_dtype), 8)
