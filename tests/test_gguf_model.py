"""Qwen2 GGUF files loaded directly (llaisys/models/gguf_model.py): block tensors kept as blocks,
tokenizer and chat template from the metadata.

The fast tests use test_default_model's tiny synthetic GGUF (Q8_0, F16 and F32 tensors); the slow
ones the default model's GGUF (Q5_0 / Q8_0 / Q4_K / Q6_K), against its converted bf16 directory,
teacher-forced over tests/data/teacher_forcing.txt: the first 1,024 tokens of docs/engine.md,
docs/server.md, README.md and llaisys/engine/scheduler.py as they stood on 2026-12-05 (prose,
tables and code), frozen so that the figures below stay comparable as the docs change.

Measured (default model, those 4,096 tokens): GGUF blocks mean KL divergence 0.00066, top-1 98.75%;
`--weight-dtype q8_0` mean KLD 0.00079, top-1 98.49%; 32 of 32 greedy tokens identical to the bf16
directory.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from llaisys.core import Batch
from llaisys.models import ModelLoadError, RuntimeOptions, load_model
from llaisys.models.gguf_convert import convert_gguf_to_hf

from test_default_model import tiny_weights, write_tiny_gguf

REPO = Path(__file__).resolve().parents[1]
OPTIONS = RuntimeOptions(n_ctx=1024, n_seq_max=3, n_batch=512)


def all_logits(adapter, ids: list[int]) -> np.ndarray:
    model = adapter.model
    model.kv_clear()
    model.decode(Batch(ids, logits=[1] * len(ids)))
    return model.logits().astype(np.float64)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def teacher_forced_against(reference, others: dict, chunk: int = 512) -> dict[str, tuple[float, float]]:
    """Mean KL(reference || other) and top-1 agreement for each of `others` over the frozen text,
    `chunk` tokens per window; the reference's logits are computed once per window for all of them."""
    text = (REPO / "tests" / "data" / "teacher_forcing.txt").read_text()
    ids = reference.encode(text)[:4096]
    klds, agree = {name: [] for name in others}, {name: [] for name in others}
    for name, other in others.items():
        assert other.encode(text)[:4096] == ids, name
    for start in range(0, len(ids), chunk):
        window = ids[start:start + chunk]
        p = log_softmax(all_logits(reference, window))
        for name, other in others.items():
            q = log_softmax(all_logits(other, window))
            klds[name].append((np.exp(p) * (p - q)).sum(axis=1))
            agree[name].append(p.argmax(axis=1) == q.argmax(axis=1))
    return {name: (float(np.concatenate(klds[name]).mean()), float(np.concatenate(agree[name]).mean()))
            for name in others}


def greedy(adapter, prompt: list[int], steps: int) -> list[int]:
    model = adapter.model
    model.kv_clear()
    model.decode(Batch(prompt))
    out = []
    for _ in range(steps):
        out.append(int(model.logits()[-1].argmax()))
        model.decode(Batch(out[-1:]))
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def tiny(request, tmp_path_factory):
    """(GGUF path, its converted HF directory), the model files cached in a directory of their own."""
    root = tmp_path_factory.mktemp("tiny-gguf")
    path = write_tiny_gguf(root / "tiny.gguf", tiny_weights(request.param))
    return path, convert_gguf_to_hf(path, root / "hf")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LLAISYS_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tiny_gguf_dequantized_to_bf16_is_its_converted_directory(tiny):
    gguf_path, hf_dir = tiny
    ids = list(range(3, 40))
    as_bf16 = load_model(gguf_path, RuntimeOptions(n_ctx=64, weight_dtype="bf16"))
    np.testing.assert_array_equal(all_logits(as_bf16, ids), all_logits(load_model(hf_dir, OPTIONS), ids))


def test_tiny_gguf_blocks_close_to_bf16_with_the_same_tokenizer(tiny, cache):
    gguf_path, hf_dir = tiny
    blocks, reference = load_model(gguf_path, OPTIONS), load_model(hf_dir, OPTIONS)
    ids = list(range(3, 40))
    got, want = all_logits(blocks, ids), all_logits(reference, ids)
    assert np.max(np.abs(got - want)) <= 0.02 * np.max(np.abs(want))
    messages = [{"role": "user", "content": "hello world"}]
    assert blocks.chat_text(messages) == reference.chat_text(messages)
    assert blocks.chat_token_ids(messages) == reference.chat_token_ids(messages)
    assert blocks.eos_token_ids == reference.eos_token_ids
    # The model files are written once per metadata and reused.
    load_model(gguf_path, OPTIONS)
    assert len(list((cache / "gguf-model-files").iterdir())) == 1


def test_q8_0_at_load_quantizes_the_matrices_of_a_directory_and_of_a_gguf(tiny):
    gguf_path, hf_dir = tiny
    ids = list(range(3, 40))
    want = all_logits(load_model(hf_dir, OPTIONS), ids)
    q8_0 = RuntimeOptions(n_ctx=64, weight_dtype="q8_0")
    for source in (hf_dir, gguf_path):
        got = all_logits(load_model(source, q8_0), ids)
        # Not the float weights (so quantized), and close to them.
        assert 0 < np.max(np.abs(got - want)) <= 0.02 * np.max(np.abs(want)), source


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture is 'llama'"):
        load_model(tmp_path / "llama.gguf", OPTIONS)


@pytest.fixture(scope="module")
def default_gguf(default_model):
    from llaisys.models.default_model import DEFAULT_MODEL, model_cache_dir

    path = model_cache_dir() / f"{DEFAULT_MODEL}.gguf"
    if not path.is_file():
        pytest.skip(f"no {path} (llaisys fetch-model)")
    return path, default_model


@pytest.fixture(scope="module")
def default_pair(default_gguf):
    path, hf_dir = default_gguf
    return load_model(path, OPTIONS), load_model(hf_dir, OPTIONS)


@pytest.fixture(scope="module")
def agreement_with_bf16(default_pair, default_model):
    """Teacher-forced agreement of the GGUF blocks and of `--weight-dtype q8_0` with the bf16 directory."""
    blocks, bf16 = default_pair
    q8_0 = load_model(default_model, dataclasses.replace(OPTIONS, weight_dtype="q8_0"))
    return teacher_forced_against(bf16, {"blocks": blocks, "q8_0": q8_0})


@pytest.mark.slow
def test_default_gguf_blocks_against_bf16_directory(default_pair, agreement_with_bf16):
    blocks, bf16 = default_pair
    kld, top1 = agreement_with_bf16["blocks"]
    print(f"GGUF blocks against bf16: mean KLD {kld:.5f}, top-1 {top1:.4f}")
    assert kld <= 0.002, kld  # measured 0.00066
    assert top1 >= 0.98, top1  # measured 0.9875
    prompt = blocks.chat_token_ids([{"role": "user", "content": "Write a Python function that reverses a string."}])
    ours, theirs = greedy(blocks, prompt, 32), greedy(bf16, prompt, 32)
    assert ours[:16] == theirs[:16]  # measured: all 32 identical


@pytest.mark.slow
def test_default_directory_as_q8_0_against_bf16(agreement_with_bf16):
    kld, top1 = agreement_with_bf16["q8_0"]
    print(f"q8_0 against bf16: mean KLD {kld:.5f}, top-1 {top1:.4f}")
    assert kld <= 0.002, kld  # the bars for Q8_0; measured 0.00079
    assert top1 >= 0.98, top1  # measured 0.9849


@pytest.mark.slow
def test_default_gguf_logits_identical_alone_and_batched(default_pair):
    model = default_pair[0].model
    a, b, c = [11, 12, 13, 14, 15], [21, 22], list(range(30, 70))
    model.kv_clear()
    model.decode(Batch(a, seq_ids=0))
    model.decode(Batch([16], seq_ids=0))
    alone = model.logits().copy()
    model.kv_clear()
    model.decode(Batch(b + a + c, seq_ids=[1] * len(b) + [0] * len(a) + [2] * len(c)))
    model.decode(Batch([23, 16, 70], seq_ids=[1, 0, 2], logits=[1, 1, 1]))
    np.testing.assert_array_equal(model.logits()[1], alone[0])


def test_default_model_is_served_from_its_gguf(default_gguf, monkeypatch, capsys):
    from llaisys import cli
    from llaisys.models.default_model import default_model_path, fetch_gguf

    path, _ = default_gguf
    monkeypatch.setenv("LLAISYS_CACHE_DIR", str(path.parent))  # the real cache, not this module's
    assert fetch_gguf() == path
    assert cli.resolve_model(None) == path  # serve and generate run the blocks unless told otherwise
    assert cli.main(["fetch-model", "--gguf-only"]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert cli.main(["fetch-model"]) == 0
    assert capsys.readouterr().out.strip() == str(default_model_path())


def gguf_reader_view(path: Path) -> tuple[dict, list[tuple]]:
    """What gguf's own reader makes of a file, in read_gguf's terms."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, [(t.name, t.tensor_type, tuple(t.shape.tolist()), t.n_bytes, t.data) for t in reader.tensors]


def assert_same_as_gguf_reader(path: Path) -> None:
    from llaisys.models.gguf_file import read_gguf

    meta, tensors = read_gguf(path)
    want_meta, want_tensors = gguf_reader_view(path)
    assert meta == want_meta and [type(v) for v in meta.values()] == [type(v) for v in want_meta.values()]
    assert len(tensors) == len(want_tensors)
    for t, (name, kind, shape, n_bytes, data) in zip(tensors, want_tensors):
        assert (t.name, t.tensor_type, t.shape, t.n_bytes) == (name, kind, shape, n_bytes)
        assert t.data.dtype == data.dtype
        np.testing.assert_array_equal(t.data, data)


def test_fast_reader_reads_what_gguf_reads(tiny):
    assert_same_as_gguf_reader(tiny[0])


@pytest.mark.slow
def test_fast_reader_reads_the_default_models_gguf_as_gguf_does():
    path = Path.home() / ".cache/llaisys/qwen2.5-coder-0.5b-instruct.gguf"
    if not path.is_file():
        pytest.skip("the default model's GGUF is not assembled yet")
    assert_same_as_gguf_reader(path)


@pytest.mark.parametrize("cut", [3, 40, -100])
def test_a_cut_or_foreign_file_is_a_load_error_naming_it(tiny, tmp_path, cut):
    data = Path(tiny[0]).read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[:cut] if cut > 3 or cut < 0 else b"PK\x03\x04" + data[4:])
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_model(bad, OPTIONS)
