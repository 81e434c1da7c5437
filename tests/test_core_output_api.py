"""Output accessors of the core: GetLogits, GetLogitsIth, NOutputs, OutputIds, NBatchTokens
against the batch's output mask (llaisys.h), on the mock model."""
from __future__ import annotations

import numpy as np
import pytest

from llaisys._core import ffi, lib
from llaisys.core import Batch, InvalidArgumentError, Model

from mock_oracle import mock_row

V = 23



@pytest.fixture
def bias():
    return np.random.default_rng(5).standard_normal(V).astype(np.float32)


@pytest.fixture
def m(bias):
    model = Model("mock", n_vocab=V, n_ctx=64, n_seq_max=2, n_batch=16, weight_dtype="f32")
    model.replace_weight("logit_bias", bias)
    return model


TOKENS = [4, 8, 15, 16, 22, 1]


def expected_rows(bias, tokens, idx):
    hist = [(t, p) for p, t in enumerate(tokens)]
    return [mock_row(bias, hist, i) for i in idx]


def addr(ptr) -> int:
    return int(ffi.cast("uintptr_t", ptr))


def check_outputs(m: Model, bias, tokens, mask_idx):
    """Every accessor agrees with an output set `mask_idx` (batch indices, ascending)."""
    n = len(tokens)
    h = m.handle
    n_out = len(mask_idx)
    assert m.n_outputs == lib.llaisysModelNOutputs(h) == n_out
    assert lib.llaisysModelNBatchTokens(h) == n
    ids = [-1] * n
    for r, i in enumerate(mask_idx):
        ids[i] = r
    assert m.output_ids().tolist() == ids
    raw_ids = lib.llaisysModelOutputIds(h)
    assert raw_ids != ffi.NULL and [raw_ids[i] for i in range(n)] == ids
    rows = expected_rows(bias, tokens, mask_idx)
    all_rows = m.logits()
    assert all_rows.shape == (n_out, V)
    if n_out:
        np.testing.assert_array_equal(all_rows, np.stack(rows))
        base = addr(lib.llaisysModelGetLogits(h))
    for i in range(n):
        ptr = lib.llaisysModelGetLogitsIth(h, i)
        if ids[i] < 0:
            assert ptr == ffi.NULL, f"token {i} has no output but GetLogitsIth is not NULL"
            with pytest.raises(IndexError):
                m.logits_ith(i)
        else:
            assert addr(ptr) == base + 4 * V * ids[i]
            np.testing.assert_array_equal(m.logits_ith(i), rows[ids[i]])
    # negative: -k is the k-th output row from the end
    for k in range(1, n_out + 1):
        ptr = lib.llaisysModelGetLogitsIth(h, -k)
        assert addr(ptr) == base + 4 * V * (n_out - k)
        np.testing.assert_array_equal(m.logits_ith(-k), rows[n_out - k])
    for bad in (-n_out - 1, -n_out - 5, -(2 ** 31), n, n + 1, 2 ** 31 - 1):
        assert lib.llaisysModelGetLogitsIth(h, bad) == ffi.NULL, bad
        with pytest.raises(IndexError):
            m.logits_ith(bad)


def test_before_any_decode(m):
    h = m.handle
    assert m.n_outputs == 0
    assert lib.llaisysModelNBatchTokens(h) == 0
    assert lib.llaisysModelOutputIds(h) == ffi.NULL
    assert lib.llaisysModelGetLogits(h) == ffi.NULL
    for i in (0, 1, -1):
        assert lib.llaisysModelGetLogitsIth(h, i) == ffi.NULL
    assert m.logits().shape == (0, V)
    assert m.output_ids().size == 0


def test_mask_null_means_last_token_only(m, bias):
    m.decode(TOKENS)
    check_outputs(m, bias, TOKENS, [5])
    np.testing.assert_array_equal(m.logits_ith(-1), m.logits_ith(5))


def test_mask_all(m, bias):
    m.decode(TOKENS, logits=[1] * 6)
    check_outputs(m, bias, TOKENS, list(range(6)))


def test_mask_none(m, bias):
    assert m.decode(TOKENS, logits=[0] * 6) == 0
    check_outputs(m, bias, TOKENS, [])
    assert lib.llaisysModelGetLogitsIth(m.handle, -1) == ffi.NULL
    assert lib.llaisysModelGetLogitsIth(m.handle, 0) == ffi.NULL
    with pytest.raises(IndexError):
        m.logits_ith(-1)
    # the tokens are cached nonetheless
    assert m.kv_used == 6 and m.kv_seq_pos_max(0) == 5


@pytest.mark.parametrize("mask_idx", [[0], [0, 3, 5], [1, 2], [2, 4], [0, 5], [3]])
def test_mask_scattered(m, bias, mask_idx):
    mask = [1 if i in mask_idx else 0 for i in range(6)]
    m.decode(TOKENS, logits=mask)
    check_outputs(m, bias, TOKENS, mask_idx)


def test_mask_any_nonzero_byte_is_an_output(m, bias):
    mask = np.array([0, -1, 0, 2, 127, 0], dtype=np.int8)
    m.decode(Batch(TOKENS, logits=mask))
    check_outputs(m, bias, TOKENS, [1, 3, 4])


def test_outputs_follow_the_latest_decode(m, bias):
    m.decode(TOKENS, logits=[1] * 6)
    m.decode([3, 3], logits=[1, 0])
    assert m.n_outputs == 1
    assert m.output_ids().tolist() == [0, -1]
    assert lib.llaisysModelNBatchTokens(m.handle) == 2
    hist = [(t, p) for p, t in enumerate(TOKENS + [3, 3])]
    np.testing.assert_array_equal(m.logits_ith(0), mock_row(bias, hist, 6))
    np.testing.assert_array_equal(m.logits_ith(-1), mock_row(bias, hist, 6))
    assert lib.llaisysModelGetLogitsIth(m.handle, 1) == ffi.NULL
    assert lib.llaisysModelGetLogitsIth(m.handle, 2) == ffi.NULL  # beyond the new batch
    assert lib.llaisysModelGetLogitsIth(m.handle, -2) == ffi.NULL


def test_failed_decode_keeps_outputs(m, bias):
    m.decode(TOKENS, logits=[0, 1, 0, 1, 0, 0])
    with pytest.raises(InvalidArgumentError):
        m.decode([V, 1, 2], logits=[1, 1, 1])
    check_outputs(m, bias, TOKENS, [1, 3])


def test_multi_sequence_rows_in_batch_order(m, bias):
    tokens = [3, 9, 4, 10, 5]
    seqs = [1, 0, 1, 0, 1]
    m.decode(tokens, seq_ids=seqs, logits=[1, 0, 1, 1, 1])
    assert m.output_ids().tolist() == [0, -1, 1, 2, 3]
    s1 = [(3, 0), (4, 1), (5, 2)]
    s0 = [(9, 0), (10, 1)]
    expected = [mock_row(bias, s1, 0), mock_row(bias, s1, 1), mock_row(bias, s0, 1), mock_row(bias, s1, 2)]
    np.testing.assert_array_equal(m.logits(), np.stack(expected))
    np.testing.assert_array_equal(m.logits_ith(3), expected[2])
    np.testing.assert_array_equal(m.logits_ith(-1), expected[3])
    np.testing.assert_array_equal(m.logits_ith(-4), expected[0])
    with pytest.raises(IndexError):
        m.logits_ith(1)
    with pytest.raises(IndexError):
        m.logits_ith(-5)


def test_logits_view_is_a_view_of_core_memory(m):
    m.decode(TOKENS, logits=[1] * 6)
    view = m.logits()
    assert addr(lib.llaisysModelGetLogits(m.handle)) == view.__array_interface__["data"][0]
    assert view.shape == (6, V) and view.dtype == np.float32


def test_kv_ops_do_not_touch_outputs(m, bias):
    m.decode(TOKENS, logits=[1, 0, 0, 0, 0, 1])
    before = m.logits().copy()
    m.kv_seq_rm(0, 2, -1)
    m.kv_seq_add(0, -1, -1, 3)
    m.kv_clear()
    np.testing.assert_array_equal(m.logits(), before)
    check_outputs(m, bias, TOKENS, [0, 5])
