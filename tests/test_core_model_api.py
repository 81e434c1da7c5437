"""The generic model API of the C core: creation parameters, weight slots, NULL safety and
the return codes of llaisysModelDecode (llaisys.h), through llaisys.core and the raw cffi lib.

Everything runs on the mock model (logits are a documented function of the cached tokens, see
c_core/src/mock.cpp); the "qwen2" type is only created to check its parameter validation and
its (never written) weight slots.
"""
from __future__ import annotations

import numpy as np
import pytest

from llaisys import core
from llaisys._core import ffi, lib
from llaisys.core import (Batch, DecodeAbortedError, InvalidArgumentError, KVCacheFullError, LlaisysError, Model,
                          ModelNotReadyError, ModelParams)

from mock_oracle import mock_row

V = 31  # mock vocabulary (prime, so the hash mod V moves with every token)



def make_mock(n_ctx=16, n_seq_max=4, n_batch=8, bias=None, **kw) -> Model:
    m = Model("mock", n_vocab=V, n_ctx=n_ctx, n_seq_max=n_seq_max, n_batch=n_batch, weight_dtype="f32", **kw)
    if bias is not False:
        m.replace_weight("logit_bias", default_bias() if bias is None else bias)
    return m


def default_bias() -> np.ndarray:
    return np.random.default_rng(7).standard_normal(V).astype(np.float32)


def snapshot(m: Model) -> dict:
    """Everything a failed call must leave untouched."""
    h = m.handle
    n_seq = m.params.n_seq_max
    out_ptr = lib.llaisysModelGetLogits(h)
    return {
        "used": m.kv_used,
        "pos_max": [m.kv_seq_pos_max(s) for s in range(n_seq)],
        "pos_min": [m.kv_seq_pos_min(s) for s in range(n_seq)],
        "n_outputs": m.n_outputs,
        "n_batch_tokens": lib.llaisysModelNBatchTokens(h),
        "output_ids": m.output_ids().tolist(),
        "has_logits": out_ptr != ffi.NULL,
        "logits": m.logits().copy().tolist(),
    }


def qwen2_params(**kw) -> ModelParams:
    base = dict(n_vocab=32, n_embd=32, n_layer=1, n_head=2, n_head_kv=1, head_dim=16, n_ff=64, n_ctx=8,
                rms_norm_eps=1e-6, rope_theta=10000.0)
    base.update(kw)
    return ModelParams(**base)


# --------------------------------------------------------------------------------------------
# creation parameters
# --------------------------------------------------------------------------------------------

def test_default_params_match_header():
    p = lib.llaisysModelDefaultParams()
    assert p.weight_dtype == lib.LLAISYS_DTYPE_BF16
    assert p.kv_dtype == lib.LLAISYS_DTYPE_F32
    assert (p.n_ctx, p.n_seq_max, p.n_batch, p.n_threads) == (4096, 1, 512, 0)
    assert (p.n_vocab, p.n_embd, p.n_layer) == (0, 0, 0)


def test_create_ok_clears_last_error_and_resolves_threads():
    with pytest.raises(InvalidArgumentError):
        Model("nope", n_vocab=V)
    assert core.last_error() != ""
    m = Model("mock", n_vocab=V, n_ctx=7, n_seq_max=3, n_batch=5, n_threads=0, weight_dtype="f16", kv_dtype="bf16")
    assert core.last_error() == ""
    p = m.params
    assert (p.n_vocab, p.n_ctx, p.n_seq_max, p.n_batch) == (V, 7, 3, 5)
    assert (p.weight_dtype, p.kv_dtype) == ("f16", "bf16")
    assert p.n_threads >= 1  # 0 = all cores, resolved to the real count
    assert m.kv_capacity == 7 and m.kv_used == 0
    m2 = Model("mock", n_vocab=V, n_threads=1)
    assert m2.params.n_threads == 1


@pytest.mark.parametrize("model_type,overrides,needle", [
    ("nope", {}, "unknown model type 'nope'"),
    ("", {}, "unknown model type ''"),
    ("MOCK", {}, "unknown model type 'MOCK'"),
    ("mock", {"n_ctx": 0}, "n_ctx"),
    ("mock", {"n_ctx": -5}, "n_ctx"),
    ("mock", {"n_seq_max": 0}, "n_seq_max"),
    ("mock", {"n_seq_max": -1}, "n_seq_max"),
    ("mock", {"n_seq_max": 4097}, "n_seq_max"),
    ("mock", {"n_batch": 0}, "n_batch"),
    ("mock", {"n_batch": -3}, "n_batch"),
    ("mock", {"n_threads": -1}, "n_threads"),
    ("mock", {"n_vocab": 0}, "n_vocab"),
    ("mock", {"n_vocab": -2}, "n_vocab"),
])
def test_create_bad_params_raise_with_message(model_type, overrides, needle):
    params = dict(n_vocab=V)
    params.update(overrides)
    with pytest.raises(InvalidArgumentError) as info:
        Model(model_type, **params)
    assert needle in str(info.value)
    assert info.value.code == lib.LLAISYS_INVALID
    assert needle in core.last_error()


def test_unknown_type_message_lists_known_types():
    with pytest.raises(InvalidArgumentError) as info:
        Model("llama", n_vocab=V)
    assert "qwen2" in str(info.value) and "mock" in str(info.value)


@pytest.mark.parametrize("field", ["weight_dtype", "kv_dtype"])
def test_bad_dtype_names_rejected_in_python(field):
    with pytest.raises(InvalidArgumentError) as info:
        Model("mock", n_vocab=V, **{field: "f64"})
    assert field in str(info.value)


def _raw_params(**kw):
    p = ffi.new("llaisys_model_params *", lib.llaisysModelDefaultParams())
    p.n_vocab = V
    p.n_ctx = 8
    for k, v in kw.items():
        setattr(p, k, v)
    return p


@pytest.mark.parametrize("field,value", [("weight_dtype", 3), ("weight_dtype", -1), ("kv_dtype", 7),
                                         ("kv_dtype", -2)])
def test_raw_create_bad_dtype_returns_null(field, value):
    p = _raw_params(**{field: value})
    assert lib.llaisysModelCreate(b"mock", p) == ffi.NULL
    msg = core.last_error()
    assert field in msg and str(value) in msg


@pytest.mark.parametrize("kw,needle", [
    ({"n_ctx": 0}, "n_ctx"), ({"n_seq_max": 0}, "n_seq_max"), ({"n_batch": 0}, "n_batch"),
    ({"n_threads": -1}, "n_threads"), ({"n_vocab": 0}, "n_vocab"),
])
def test_raw_create_bad_params_returns_null(kw, needle):
    assert lib.llaisysModelCreate(b"mock", _raw_params(**kw)) == ffi.NULL
    assert needle in ffi.string(lib.llaisysGetLastError()).decode()


def test_raw_create_null_arguments():
    assert lib.llaisysModelCreate(ffi.NULL, _raw_params()) == ffi.NULL
    assert "type" in core.last_error() and "NULL" in core.last_error()
    assert lib.llaisysModelCreate(b"mock", ffi.NULL) == ffi.NULL
    assert "params" in core.last_error() and "NULL" in core.last_error()
    assert lib.llaisysModelCreate(b"nope", _raw_params()) == ffi.NULL
    assert "nope" in core.last_error()
    h = lib.llaisysModelCreate(b"mock", _raw_params())
    assert h != ffi.NULL
    assert core.last_error() == ""
    lib.llaisysModelDestroy(h)


@pytest.mark.parametrize("field", ["n_vocab", "n_embd", "n_layer", "n_head", "n_head_kv", "head_dim", "n_ff"])
@pytest.mark.parametrize("value", [0, -4])
def test_qwen2_missing_architecture_field(field, value):
    with pytest.raises(InvalidArgumentError) as info:
        Model("qwen2", qwen2_params(**{field: value}))
    assert field in str(info.value)
    assert str(value) in str(info.value)


def test_qwen2_all_architecture_fields_missing_names_a_field():
    # Default params carry no architecture: qwen2 must refuse them (mock would need only n_vocab).
    with pytest.raises(InvalidArgumentError) as info:
        Model("qwen2")
    assert "qwen2" in str(info.value) and "n_vocab" in str(info.value)


def test_qwen2_n_head_not_multiple_of_n_head_kv():
    with pytest.raises(InvalidArgumentError) as info:
        Model("qwen2", qwen2_params(n_head=6, n_head_kv=4))
    msg = str(info.value)
    assert "n_head" in msg and "n_head_kv" in msg and "multiple" in msg
    Model("qwen2", qwen2_params(n_head=8, n_head_kv=4)).close()  # a multiple is fine


@pytest.mark.parametrize("head_dim", [8, 24, 40, 17, 48, 96, 512])
def test_qwen2_head_dim_unsupported(head_dim):
    with pytest.raises(InvalidArgumentError) as info:
        Model("qwen2", qwen2_params(head_dim=head_dim))
    assert "head_dim" in str(info.value) and "16, 32, 64, 128 or 256" in str(info.value)


@pytest.mark.parametrize("field", ["rope_theta", "rms_norm_eps"])
def test_qwen2_nonpositive_float_fields(field):
    with pytest.raises(InvalidArgumentError) as info:
        Model("qwen2", qwen2_params(**{field: 0.0}))
    assert field in str(info.value)


def test_qwen2_generic_params_checked_too():
    with pytest.raises(InvalidArgumentError) as info:
        Model("qwen2", qwen2_params(n_ctx=0))
    assert "n_ctx" in str(info.value)


# --------------------------------------------------------------------------------------------
# weight slots
# --------------------------------------------------------------------------------------------

def test_qwen2_weight_slots_names_and_shapes():
    m = Model("qwen2", qwen2_params(n_layer=2))
    names = m.weight_names()
    assert names[0] == "token_embd"
    assert names[-2:] == ["output_norm", "output"]
    assert len(names) == 1 + 12 * 2 + 2
    assert len(set(names)) == len(names)
    assert "blk.1.ffn_down" in names and "blk.2.attn_q" not in names
    assert m.weight_shape("token_embd") == (32, 32)
    assert m.weight_shape("blk.0.attn_q") == (32, 32)       # n_head * head_dim x n_embd
    assert m.weight_shape("blk.0.attn_k") == (16, 32)       # n_head_kv * head_dim x n_embd
    assert m.weight_shape("blk.1.attn_v_bias") == (16,)
    assert m.weight_shape("blk.0.attn_output") == (32, 32)
    assert m.weight_shape("blk.0.ffn_gate") == (64, 32)
    assert m.weight_shape("blk.0.ffn_down") == (32, 64)
    assert m.weight_shape("output") == (32, 32)
    assert not any(m.weight_is_set(n) for n in names)
    tied = Model("qwen2", qwen2_params(tie_embeddings=True))
    assert "output" not in tied.weight_names() and len(tied.weight_names()) == 1 + 12 + 1


def test_qwen2_decode_before_weights_not_ready():
    m = Model("qwen2", qwen2_params())
    with pytest.raises(ModelNotReadyError) as info:
        m.decode([1, 2, 3])
    assert info.value.code == lib.LLAISYS_NOT_READY == -2
    assert "token_embd" in str(info.value)
    assert m.kv_used == 0 and m.kv_seq_pos_max(0) == -1 and m.n_outputs == 0


def test_mock_weight_slot():
    m = make_mock(bias=False)
    assert m.weight_names() == ["logit_bias"]
    assert lib.llaisysModelWeightCount(m.handle) == 1
    assert m.weight_shape("logit_bias") == (V,)
    assert m.weight_is_set("logit_bias") is False
    assert lib.llaisysModelWeightName(m.handle, 1) == ffi.NULL
    assert lib.llaisysModelWeightName(m.handle, -1) == ffi.NULL
    m.replace_weight("logit_bias", np.zeros(V, np.float32))
    assert m.weight_is_set("logit_bias") is True


def test_unknown_slot_queries():
    m = make_mock(bias=False)
    with pytest.raises(InvalidArgumentError) as info:
        m.weight_shape("nope")
    assert "nope" in str(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        m.weight_is_set("nope")
    assert "nope" in str(info.value)
    shape = ffi.new("int64_t[4]")
    assert lib.llaisysModelWeightShape(m.handle, b"nope", shape) == -1
    assert lib.llaisysModelWeightIsSet(m.handle, b"nope") == -1
    assert lib.llaisysModelWeightShape(m.handle, ffi.NULL, shape) == -1
    assert lib.llaisysModelWeightIsSet(m.handle, ffi.NULL) == -1
    assert lib.llaisysModelWeightShape(m.handle, b"logit_bias", ffi.NULL) == 1  # ndim only


@pytest.mark.parametrize("name,array,needles", [
    ("nope", np.zeros(V, np.float32), ["nope"]),
    ("logit_bias", np.zeros(V, np.float16), ["logit_bias", "f16", "f32"]),
    ("logit_bias", np.zeros(V, np.uint16), ["logit_bias", "bf16"]),
    ("logit_bias", np.zeros(V + 1, np.float32), ["logit_bias", str(V + 1), str(V)]),
    ("logit_bias", np.zeros(V - 1, np.float32), ["logit_bias", str(V - 1)]),
    ("logit_bias", np.zeros((1, V), np.float32), ["logit_bias", f"[1, {V}]"]),
    ("logit_bias", np.zeros((), np.float32), ["logit_bias"]),
])
def test_replace_weight_rejects(name, array, needles):
    m = make_mock(bias=False)
    with pytest.raises(InvalidArgumentError) as info:
        m.replace_weight(name, array)
    assert info.value.code == -1
    for needle in needles:
        assert needle in str(info.value)
    assert m.weight_is_set("logit_bias") is False


def test_replace_weight_raw_null_shape_or_data():
    m = make_mock(bias=False)
    data = np.zeros(V, np.float32)
    shape = ffi.new("int64_t[]", [V])
    assert lib.llaisysModelReplaceWeight(m.handle, b"logit_bias", 0, ffi.NULL, 1, ffi.from_buffer(data)) == -1
    assert "logit_bias" in core.last_error()
    assert lib.llaisysModelReplaceWeight(m.handle, b"logit_bias", 0, shape, 1, ffi.NULL) == -1
    assert "logit_bias" in core.last_error()
    assert lib.llaisysModelReplaceWeight(m.handle, ffi.NULL, 0, shape, 1, ffi.from_buffer(data)) == -1
    assert lib.llaisysModelReplaceWeight(m.handle, b"logit_bias", 0, shape, 0, ffi.from_buffer(data)) == -1
    assert lib.llaisysModelReplaceWeight(m.handle, b"logit_bias", 0, shape, -1, ffi.from_buffer(data)) == -1
    assert m.weight_is_set("logit_bias") is False
    assert lib.llaisysModelReplaceWeight(m.handle, b"logit_bias", 0, shape, 1, ffi.from_buffer(data)) == 0
    assert m.weight_is_set("logit_bias") is True


def test_replace_twice_uses_second_and_failed_replace_keeps_old():
    rng = np.random.default_rng(1)
    b1 = rng.standard_normal(V).astype(np.float32)
    b2 = rng.standard_normal(V).astype(np.float32)
    m = make_mock(bias=b1)
    m.decode([3])
    np.testing.assert_array_equal(m.logits_ith(0), mock_row(b1, [(3, 0)], 0))
    m.replace_weight("logit_bias", b2)
    m.decode([4])
    np.testing.assert_array_equal(m.logits_ith(0), mock_row(b2, [(3, 0), (4, 1)], 1))
    with pytest.raises(InvalidArgumentError):
        m.replace_weight("logit_bias", np.ones(V + 1, np.float32))
    m.decode([5])
    np.testing.assert_array_equal(m.logits_ith(0), mock_row(b2, [(3, 0), (4, 1), (5, 2)], 2))


def test_replace_weight_copies_caller_data():
    bias = default_bias()
    original = bias.copy()
    m = make_mock(bias=bias)
    bias[:] = 100.0  # the core must have copied the data
    m.decode([2])
    np.testing.assert_array_equal(m.logits_ith(0), mock_row(original, [(2, 0)], 0))


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_half_precision_bias(dtype):
    rng = np.random.default_rng(3)
    f = rng.standard_normal(V).astype(np.float32)
    if dtype == "f16":
        data = f.astype(np.float16)
        as_f32 = data.astype(np.float32)
    else:
        data = (f.view(np.uint32) >> 16).astype(np.uint16)  # truncation: exact bf16 values
        as_f32 = (data.astype(np.uint32) << 16).view(np.float32)
    m = Model("mock", n_vocab=V, n_ctx=8, weight_dtype=dtype)
    with pytest.raises(InvalidArgumentError):
        m.replace_weight("logit_bias", f)  # f32 data into a half model
    m.replace_weight("logit_bias", data, dtype=dtype)
    m.decode([5, 6])
    np.testing.assert_array_equal(m.logits_ith(1), mock_row(as_f32, [(5, 0), (6, 1)], 1))


def test_mock_decode_before_weights_not_ready_changes_nothing():
    m = make_mock(bias=False)
    before = snapshot(m)
    with pytest.raises(ModelNotReadyError) as info:
        m.decode([1, 2, 3])
    assert info.value.code == -2
    assert "logit_bias" in str(info.value)
    assert snapshot(m) == before
    assert before["used"] == 0 and before["has_logits"] is False
    assert lib.llaisysModelOutputIds(m.handle) == ffi.NULL
    bias = default_bias()
    m.replace_weight("logit_bias", bias)
    assert m.decode([1, 2, 3]) == 1  # the failed call left the cache empty: positions start at 0
    np.testing.assert_array_equal(m.logits_ith(2), mock_row(bias, [(1, 0), (2, 1), (3, 2)], 2))


# --------------------------------------------------------------------------------------------
# NULL handles
# --------------------------------------------------------------------------------------------

def test_null_model_handle_everywhere():
    N = ffi.NULL
    lib.llaisysModelDestroy(N)
    p = lib.llaisysModelGetParams(N)
    assert p.n_ctx == 4096 and p.n_batch == 512  # the defaults
    assert lib.llaisysModelWeightCount(N) == 0
    assert lib.llaisysModelWeightName(N, 0) == N
    shape = ffi.new("int64_t[4]")
    assert lib.llaisysModelWeightShape(N, b"logit_bias", shape) == -1
    assert "NULL" in core.last_error()
    assert lib.llaisysModelWeightIsSet(N, b"logit_bias") == -1
    data = np.zeros(V, np.float32)
    dims = ffi.new("int64_t[]", [V])
    assert lib.llaisysModelReplaceWeight(N, b"logit_bias", 0, dims, 1, ffi.from_buffer(data)) == -1
    lib.llaisysModelSetAbortCallback(N, N, N)
    batch = Batch([1, 2])
    assert lib.llaisysModelDecode(N, batch.to_c()[0]) == -1
    assert "model is NULL" in core.last_error()
    assert lib.llaisysModelGetLogits(N) == N
    assert lib.llaisysModelGetLogitsIth(N, 0) == N
    assert lib.llaisysModelGetLogitsIth(N, -1) == N
    assert lib.llaisysModelNOutputs(N) == 0
    assert lib.llaisysModelOutputIds(N) == N
    assert lib.llaisysModelNBatchTokens(N) == 0
    assert lib.llaisysModelKvSeqRm(N, 0, -1, -1) == -1
    assert lib.llaisysModelKvSeqRm(N, -1, -1, -1) == -1
    assert lib.llaisysModelKvSeqCp(N, 0, 1, -1, -1) == -1
    assert lib.llaisysModelKvSeqKeep(N, 0) == -1
    assert lib.llaisysModelKvSeqAdd(N, 0, -1, -1, 1) == -1
    assert lib.llaisysModelKvSeqPosMax(N, 0) == -1
    assert lib.llaisysModelKvSeqPosMin(N, 0) == -1
    lib.llaisysModelKvClear(N)
    assert lib.llaisysModelKvUsedCells(N) == 0
    assert lib.llaisysModelKvCapacity(N) == 0


def test_null_pointers_inside_batch():
    m = make_mock()
    m.decode([1, 2])
    before = snapshot(m)
    # n_tokens > 0 but token NULL
    b = ffi.new("llaisys_batch *")
    b.n_tokens = 2
    assert lib.llaisysModelDecode(m.handle, b[0]) == -1
    assert "token" in core.last_error()
    # n_seq_id set, seq_id NULL (and the reverse)
    for which in ("n_seq_id", "seq_id"):
        batch = Batch([3], seq_ids=[0])
        c = batch.to_c()
        setattr(c, which, ffi.NULL)
        assert lib.llaisysModelDecode(m.handle, c[0]) == -1
        assert "n_seq_id" in core.last_error() and "seq_id" in core.last_error()
    # a token row whose seq_id pointer is NULL
    batch = Batch([3], seq_ids=[0])
    c = batch.to_c()
    c.seq_id[0] = ffi.NULL
    assert lib.llaisysModelDecode(m.handle, c[0]) == -1
    # n_seq_id 0: the token belongs to no sequence
    batch = Batch([3], seq_ids=[0])
    c = batch.to_c()
    c.n_seq_id[0] = 0
    assert lib.llaisysModelDecode(m.handle, c[0]) == -1
    assert "no sequence" in core.last_error()
    batch = Batch([3], seq_ids=[0])
    c = batch.to_c()
    c.n_seq_id[0] = -1
    assert lib.llaisysModelDecode(m.handle, c[0]) == -1
    assert snapshot(m) == before


# --------------------------------------------------------------------------------------------
# decode return codes
# --------------------------------------------------------------------------------------------

def test_decode_ok_returns_zero_raw():
    m = make_mock()
    batch = Batch([1, 2, 3])
    assert lib.llaisysModelDecode(m.handle, batch.to_c()[0]) == lib.LLAISYS_OK == 0
    assert core.last_error() == ""
    assert m.n_outputs == 1 and m.kv_used == 3 and m.kv_seq_pos_max(0) == 2


def test_decode_kv_full_changes_nothing():
    bias = default_bias()
    m = make_mock(n_ctx=8, n_batch=8, bias=bias)
    m.decode([1, 2, 3, 4, 5, 6], logits=[0, 1, 0, 0, 0, 1])
    before = snapshot(m)
    with pytest.raises(KVCacheFullError) as info:
        m.decode([7, 8, 9])
    assert info.value.code == lib.LLAISYS_NO_KV_SPACE == 1
    assert "KV" in str(info.value)
    assert snapshot(m) == before
    assert before["used"] == 6 and before["pos_max"][0] == 5
    # the same in another sequence: shares nothing, still does not fit
    with pytest.raises(KVCacheFullError):
        m.decode([7, 8, 9], seq_ids=1)
    assert snapshot(m) == before
    # a smaller batch fits, and its positions continue at the unchanged max + 1
    m.decode([7, 8])
    hist = [(t, i) for i, t in enumerate([1, 2, 3, 4, 5, 6, 7, 8])]
    np.testing.assert_array_equal(m.logits_ith(1), mock_row(bias, hist, 7))
    assert m.kv_used == 8 == m.kv_capacity
    with pytest.raises(KVCacheFullError):
        m.decode([1])


def test_decode_batch_larger_than_cache_is_kv_full():
    m = make_mock(n_ctx=4, n_batch=8)
    with pytest.raises(KVCacheFullError):
        m.decode([1, 2, 3, 4, 5])
    assert m.kv_used == 0 and m.kv_seq_pos_max(0) == -1 and m.n_outputs == 0
    m.decode([1, 2, 3, 4])
    assert m.kv_used == 4


def _expect_invalid(m: Model, batch: Batch, needle: str | None = None):
    before = snapshot(m)
    keep = batch.to_c()
    assert lib.llaisysModelDecode(m.handle, keep[0]) == lib.LLAISYS_INVALID
    msg = core.last_error()
    if needle:
        assert needle in msg, msg
    assert snapshot(m) == before
    with pytest.raises(InvalidArgumentError):
        m.decode(batch)
    assert snapshot(m) == before


@pytest.fixture
def primed():
    """A mock with seq 0 = tokens 1,2,3 at 0..2 and seq 1 = token 9 at 0, last decode with 2 outputs."""
    m = make_mock(n_ctx=16, n_seq_max=4, n_batch=4)
    m.decode([1, 2, 3, 9], pos=[0, 1, 2, 0], seq_ids=[0, 0, 0, 1], logits=[0, 0, 1, 1])
    return m


def test_invalid_n_tokens_zero(primed):
    before = snapshot(primed)
    b = ffi.new("llaisys_batch *")  # n_tokens 0, every pointer NULL
    assert lib.llaisysModelDecode(primed.handle, b[0]) == -1
    assert "0 tokens" in core.last_error()
    tok = ffi.new("llaisys_token[]", [1])
    b.token = tok
    b.n_tokens = -1
    assert lib.llaisysModelDecode(primed.handle, b[0]) == -1
    assert snapshot(primed) == before


def test_invalid_n_tokens_above_n_batch(primed):
    _expect_invalid(primed, Batch([4, 5, 6, 7, 8]), "5 tokens")


@pytest.mark.parametrize("bad", [V, V + 100, -1, -(2 ** 31)])
def test_invalid_token_outside_vocab(primed, bad):
    _expect_invalid(primed, Batch([4, bad, 6]), str(bad))


@pytest.mark.parametrize("bad", [4, 100, -1])
def test_invalid_seq_id_out_of_range(primed, bad):
    _expect_invalid(primed, Batch([4], seq_ids=[bad]), f"seq_id {bad}")
    _expect_invalid(primed, Batch([4, 5], seq_ids=[[0], [1, bad]]), f"seq_id {bad}")


def test_invalid_repeated_seq_id_in_one_token(primed):
    _expect_invalid(primed, Batch([4], seq_ids=[[2, 2]]), "repeated")
    _expect_invalid(primed, Batch([4], pos=[3], seq_ids=[[0, 2, 0]]), "repeated")


@pytest.mark.parametrize("pos,seq", [
    ([4], 0),      # gap after cached max 2
    ([2], 0),      # overlaps the cached max
    ([0], 0),      # restarts
    ([1], 2),      # empty sequence must start at 0
    ([3], 1),      # seq 1 holds only position 0
])
def test_invalid_positions_not_starting_at_cached_max_plus_one(primed, pos, seq):
    _expect_invalid(primed, Batch([4], pos=pos, seq_ids=seq), "must be")


def test_invalid_negative_position(primed):
    _expect_invalid(primed, Batch([4], pos=[-1], seq_ids=2), "outside [0, 2147483646]")


@pytest.mark.parametrize("pos", [[3, 5], [3, 3], [3, 4, 3], [3, 2]])
def test_invalid_positions_not_consecutive_in_batch(primed, pos):
    _expect_invalid(primed, Batch([4] * len(pos), pos=pos, seq_ids=0), "consecutive")


def test_invalid_positions_interleaved_sequences(primed):
    # seq 0 continues 3, 4 but seq 1's second token skips a position
    _expect_invalid(primed, Batch([4, 5, 6, 7], pos=[3, 1, 4, 3], seq_ids=[0, 1, 0, 1]), "must be")


def test_shared_token_pos_max_differs(primed):
    # seq 0 ends at 2, seq 1 at 0: no position can continue both
    _expect_invalid(primed, Batch([4], pos=[3], seq_ids=[[0, 1]]))
    _expect_invalid(primed, Batch([4], pos=[1], seq_ids=[[0, 1]]))
    _expect_invalid(primed, Batch([4], seq_ids=[[1, 0]]))  # auto position from seq 1 = 1, seq 0 needs 3


def _diverged(kind: str) -> Model:
    """Sequences 0 and 1 with the same cached max position but different histories."""
    m = make_mock(n_ctx=16, n_seq_max=4, n_batch=4)
    if kind == "pos_min_differs":           # seq 0 holds 0..2, seq 1 only 1..2 (shared cells)
        m.decode([1, 2, 3])
        m.kv_seq_cp(0, 1)
        m.kv_seq_rm(1, 0, 1)
    elif kind == "hole_in_positions":       # seq 0 holds 0..2, seq 1 holds 0 and 2
        m.decode([1, 2, 3])
        m.kv_seq_cp(0, 1)
        m.kv_seq_rm(1, 1, 2)
    elif kind == "different_cells":         # same positions 0..2, different tokens (distinct cells)
        m.decode([1, 2, 3], seq_ids=0)
        m.decode([4, 5, 6], seq_ids=1)
    assert m.kv_seq_pos_max(0) == m.kv_seq_pos_max(1) == 2
    return m


@pytest.mark.parametrize("kind", ["pos_min_differs", "hole_in_positions", "different_cells"])
def test_invalid_shared_token_with_diverged_histories(kind):
    """llaisys.h: a token in several sequences is stored once and shared (a common prompt); those
    sequences must hold the same positions so far. Coupling two diverged sequences is an invalid
    batch (-1, nothing changed) even when their cached max positions agree.
      pos_min_differs:   violates the header, and llama.cpp rejects it too (its batch allocator
                         compares seq_pos_min and seq_pos_max of coupled sequences: "sequence %d is
                         coupled to %d in the input batch, but have divereged").
      hole_in_positions: violates the header's "same positions" (llama.cpp's min/max check would miss it).
      different_cells:   same positions, different tokens: the histories differ, so one shared K/V
                         cell cannot be right for both (the brief's rule; stricter than the header's wording)."""
    m = _diverged(kind)
    _expect_invalid(m, Batch([7], pos=[3], seq_ids=[[0, 1]]))
    _expect_invalid(m, Batch([7], seq_ids=[[1, 0]]))


def test_shared_token_with_identical_histories_is_valid():
    bias = default_bias()
    m = make_mock(n_seq_max=3, bias=bias)
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    m.decode([7], seq_ids=[[1, 0]])
    row = mock_row(bias, [(1, 0), (2, 1), (3, 2), (7, 3)], 3)
    np.testing.assert_array_equal(m.logits_ith(0), row)
    assert m.kv_used == 4


def test_abort_callback_returns_code_2_and_changes_nothing():
    bias = default_bias()
    m = make_mock(bias=bias)
    m.decode([1, 2, 3], logits=[1, 1, 1])
    before = snapshot(m)
    calls = []

    def stop():
        calls.append(1)
        return True

    m.set_abort_callback(stop)
    with pytest.raises(DecodeAbortedError) as info:
        m.decode([4, 5])
    assert info.value.code == lib.LLAISYS_ABORTED == 2
    assert calls, "the abort callback was never called"
    assert snapshot(m) == before
    # raw call too
    batch = Batch([4, 5])
    assert lib.llaisysModelDecode(m.handle, batch.to_c()[0]) == 2
    assert snapshot(m) == before
    # a callback that says "go on" is called and the decode proceeds
    calls.clear()
    m.set_abort_callback(lambda: calls.append(1) or False)
    m.decode([4, 5])
    assert calls
    np.testing.assert_array_equal(m.logits_ith(1), mock_row(bias, [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)], 4))
    # removing it works
    m.set_abort_callback(stop)
    m.set_abort_callback(None)
    calls.clear()
    m.decode([6])
    assert not calls and m.kv_used == 6


def test_abort_callback_raising_is_an_abort():
    m = make_mock()
    m.decode([1])
    before = snapshot(m)

    def boom():
        raise RuntimeError("boom")

    m.set_abort_callback(boom)
    with pytest.raises(DecodeAbortedError):
        m.decode([2])
    assert snapshot(m) == before


def test_failed_decodes_leave_previous_logits_readable():
    bias = default_bias()
    m = make_mock(n_ctx=6, n_batch=4, bias=bias)
    m.decode([1, 2, 3], logits=[1, 0, 1])
    expected = np.stack([mock_row(bias, [(1, 0)], 0), mock_row(bias, [(1, 0), (2, 1), (3, 2)], 2)])
    failing = [
        lambda: m.decode([V]),                                   # -1 token
        lambda: m.decode([1, 2, 3, 4, 5]),                       # -1 n_batch
        lambda: m.decode([1], pos=[7]),                          # -1 position
        lambda: m.decode([1, 2, 3, 4]),                          # 1 KV full
    ]
    for fail in failing:
        with pytest.raises(LlaisysError):
            fail()
        np.testing.assert_array_equal(m.logits(), expected)
        np.testing.assert_array_equal(m.logits_ith(2), expected[1])
        np.testing.assert_array_equal(m.logits_ith(-2), expected[0])
        assert m.output_ids().tolist() == [0, -1, 1]
    m.set_abort_callback(lambda: True)
    with pytest.raises(DecodeAbortedError):
        m.decode([4])
    np.testing.assert_array_equal(m.logits(), expected)


def test_position_overflow_is_rejected_and_leaks_no_cell():
    """A sequence shifted up to the largest position (INT32_MAX - 1) cannot continue past it.
    The decode must be invalid (-1) and, whatever happens, dropping everything must free every cell."""
    m = make_mock(n_ctx=8)
    m.decode([1, 2, 3])
    m.kv_seq_add(0, -1, -1, 2 ** 31 - 4)
    assert (m.kv_seq_pos_min(0), m.kv_seq_pos_max(0)) == (2 ** 31 - 4, 2 ** 31 - 2)
    assert m.kv_used == 3
    before = snapshot(m)
    with pytest.raises(InvalidArgumentError):
        m.decode([4])
    assert snapshot(m) == before
    m.kv_seq_keep(1)  # seq 1 is empty: keeping it drops every cell
    assert m.kv_used == 0
