"""Weights and contexts (llama.cpp's llama_model / llama_context): Model.share() gives a second model
over the same weights, never copied, with its own KV cells, scratch and logits. Shared weights are
read-only, live until the last model using them is gone, and decode the same from any context,
alone, interleaved or from two threads at once."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from llaisys._core import ffi, lib
from llaisys.core import Batch, InvalidArgumentError, Model, ModelNotReadyError

from test_core_verify_rows import mock, qwen2
from test_quant_kernels import qwen2_params

PROMPT = [3, 7, 11, 5, 2, 40, 9, 1, 30]


def logits_of(m: Model, tokens: list[int], seq: int = 0) -> np.ndarray:
    m.decode(Batch(tokens, seq_ids=[seq] * len(tokens), logits=[1] * len(tokens)))
    return m.logits().copy()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("weight_dtype", ["f32", "bf16", "q8_0", "q4_k"])
def test_shared_context_decodes_bit_identically(weight_dtype):
    source = qwen2(weight_dtype, "f32")
    other = source.share(n_ctx=32, n_seq_max=2)
    assert other.params.n_ctx == 32 and other.params.n_seq_max == 2 and other.params.n_embd == source.params.n_embd
    assert all(other.weight_is_set(n) for n in other.weight_names())
    expected = logits_of(source, PROMPT)
    np.testing.assert_array_equal(logits_of(other, PROMPT), expected)
    # each context keeps its own cells: the source's cache is untouched by the other's decode
    assert source.kv_used == other.kv_used == len(PROMPT)
    other.kv_clear()
    assert source.kv_used == len(PROMPT) and other.kv_used == 0
    np.testing.assert_array_equal(logits_of(source, [4], seq=0)[0], logits_of(other, PROMPT + [4])[-1])


def test_shared_weights_are_read_only_until_the_sharer_is_gone():
    source = mock("f32", "f32")
    other = source.share()
    bias = np.zeros(48, np.float32)
    for m in (source, other):
        with pytest.raises(InvalidArgumentError, match="logit_bias.*shared with another model.*read-only"):
            m.replace_weight("logit_bias", bias)
    before = logits_of(source, PROMPT)
    other.close()
    source.kv_clear()
    np.testing.assert_array_equal(logits_of(source, PROMPT), before)  # the failed writes changed nothing
    source.replace_weight("logit_bias", bias)  # alone again: writable
    source.kv_clear()
    assert not np.array_equal(logits_of(source, PROMPT), before)


def test_weights_outlive_the_source():
    source = qwen2("q5_0", "f16")
    expected = logits_of(source, PROMPT)
    other = source.share()
    source.close()
    np.testing.assert_array_equal(logits_of(other, PROMPT), expected)


def test_unwritten_slots_stay_not_ready_in_every_context():
    source = Model("mock", n_vocab=48, weight_dtype="f32")
    other = source.share()
    assert not other.weight_is_set("logit_bias")
    with pytest.raises(ModelNotReadyError, match="logit_bias"):
        other.decode([1])


@pytest.mark.parametrize("field, value", [("n_vocab", 47), ("n_embd", 128), ("n_layer", 3), ("n_head", 2),
                                          ("n_head_kv", 4), ("head_dim", 32), ("n_ff", 256), ("rope_theta", 5e5),
                                          ("rms_norm_eps", 1e-5), ("tie_embeddings", True), ("weight_dtype", "bf16")])
def test_sharing_needs_the_same_architecture(field, value):
    source = Model("qwen2", qwen2_params())
    with pytest.raises(InvalidArgumentError, match=f"needs the source's {field}"):
        source.share(**{field: value})


def test_sharing_checks_runtime_fields_and_null_arguments():
    source = Model("qwen2", qwen2_params())
    with pytest.raises(InvalidArgumentError, match="n_seq_max"):
        source.share(n_seq_max=0)
    assert lib.llaisysModelCreateShared(ffi.NULL, ffi.NULL) == ffi.NULL
    assert "source model is NULL" in ffi.string(lib.llaisysGetLastError()).decode()
    same = lib.llaisysModelCreateShared(source.handle, ffi.NULL)  # NULL params: the source's
    assert same != ffi.NULL
    assert lib.llaisysModelGetParams(same).n_ctx == source.params.n_ctx
    lib.llaisysModelDestroy(same)


def test_contexts_decode_at_once_from_two_threads():
    source = qwen2("q6_k", "f32")
    contexts = [source, source.share(n_threads=1), source.share(n_threads=1)]
    prompts = [PROMPT, PROMPT[::-1], PROMPT[2:] + PROMPT[:2]]
    alone = [logits_of(source.share(), p) for p in prompts]
    results: list = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, logits_of(contexts[i], prompts[i])))
               for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, alone):
        np.testing.assert_array_equal(got, want)


def test_sharing_does_not_copy_the_weights():
    params = qwen2_params(n_embd=512, n_ff=2048, n_layer=4, n_ctx=16)
    source = Model("qwen2", params)
    rng = np.random.default_rng(0)
    for name in source.weight_names():
        source.replace_weight(name, rng.standard_normal(source.weight_shape(name)).astype(np.float32))
    weight_bytes = 4 * sum(int(np.prod(source.weight_shape(n))) for n in source.weight_names())
    assert weight_bytes > 20 << 20
    before = rss_bytes()
    others = [source.share() for _ in range(4)]
    grown = rss_bytes() - before
    assert grown < weight_bytes / 4, f"4 contexts grew RSS by {grown} bytes; the weights are {weight_bytes}"
    assert all(o.weight_is_set("token_embd") for o in others)
