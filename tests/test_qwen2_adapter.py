"""The qwen2 adapter: HF weight names map onto every core slot; bad checkpoints fail naming the weight."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from llaisys.core import Batch
from llaisys.models import ModelLoadError, RuntimeOptions, load_model
from llaisys.models.qwen2 import Qwen2Adapter, weight_map
from llaisys.models.safetensors_io import open_safetensors, write_safetensors

pytest.importorskip("torch")


def checkpoint(path):
    st = open_safetensors(path / "model.safetensors")
    return {name: (st.dtype(name), st.shape(name), np.array(st[name])) for name in st}


def rewrite(src, dst, edit):
    """Copy the model directory src to dst with its tensors passed through edit(dict)."""
    shutil.copytree(src, dst)
    tensors = checkpoint(src)
    edit(tensors)
    write_safetensors(dst / "model.safetensors", tensors)
    return dst


def last_logits(path):
    adapter = load_model(path, RuntimeOptions(n_ctx=64))
    adapter.model.decode(Batch([1, 2, 3, 4]))
    return adapter.model.logits_ith(-1).copy()


def test_mapping_covers_every_slot_once(tiny_qwen2_dir):
    config = json.loads((tiny_qwen2_dir / "config.json").read_text())
    adapter = Qwen2Adapter.from_pretrained(tiny_qwen2_dir)
    mapping = weight_map(config)
    assert sorted(mapping.values()) == sorted(adapter.model.weight_names())
    assert len(set(mapping.values())) == len(mapping)
    assert set(mapping) == set(checkpoint(tiny_qwen2_dir))  # tied: no lm_head.weight in the file
    assert all(adapter.model.weight_is_set(n) for n in adapter.model.weight_names())


def test_missing_weight_is_named(tiny_qwen2_dir, tmp_path):
    path = rewrite(tiny_qwen2_dir, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing weight 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(path)


def test_unexpected_weight_is_named(tiny_qwen2_dir, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.extra.weight"] = ("BF16", (2, 2), np.zeros(4, np.uint16))

    path = rewrite(tiny_qwen2_dir, tmp_path / "m", add)
    with pytest.raises(ModelLoadError, match=r"unexpected weight 'model\.layers\.0\.self_attn\.extra\.weight'"):
        load_model(path)


def test_misshaped_weight_is_named(tiny_qwen2_dir, tmp_path):
    def shrink(t):
        dtype, shape, array = t["model.layers.0.self_attn.k_proj.weight"]
        t["model.layers.0.self_attn.k_proj.weight"] = (dtype, (shape[0] - 1, shape[1]), array[:-1])

    path = rewrite(tiny_qwen2_dir, tmp_path / "m", shrink)
    with pytest.raises(ModelLoadError, match=r"k_proj\.weight.*shape \[31, 64\].*expects \[32, 64\]"):
        load_model(path)


def test_unsupported_dtype_is_named(tiny_qwen2_dir, tmp_path):
    def to_i32(t):
        dtype, shape, array = t["model.norm.weight"]
        t["model.norm.weight"] = ("I32", shape, np.zeros(array.size, np.int32))

    path = rewrite(tiny_qwen2_dir, tmp_path / "m", to_i32)
    with pytest.raises(ModelLoadError, match=r"model\.norm\.weight.*I32"):
        load_model(path)


def test_missing_config_field_is_named(tiny_qwen2_dir, tmp_path):
    path = tmp_path / "m"
    shutil.copytree(tiny_qwen2_dir, path)
    config = json.loads((path / "config.json").read_text())
    del config["intermediate_size"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="intermediate_size"):
        load_model(path)


def test_unknown_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="'llama' is not supported"):
        load_model(tmp_path)


def test_sharded_checkpoint_loads_the_same(tiny_qwen2_dir, tmp_path):
    path = tmp_path / "sharded"
    shutil.copytree(tiny_qwen2_dir, path)
    tensors = checkpoint(tiny_qwen2_dir)
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map_json = {}
    for shard, shard_names in shards.items():
        write_safetensors(path / shard, {n: tensors[n] for n in shard_names})
        weight_map_json.update({n: shard for n in shard_names})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map_json}))
    np.testing.assert_array_equal(last_logits(path), last_logits(tiny_qwen2_dir))


def test_untied_checkpoint_uses_lm_head(tiny_qwen2_dir, tmp_path):
    path = rewrite(tiny_qwen2_dir, tmp_path / "untied",
                   lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"]))
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(config))
    adapter = load_model(path)
    assert "output" in adapter.model.weight_names()
    np.testing.assert_array_equal(last_logits(path), last_logits(tiny_qwen2_dir))
    # Untied but without lm_head.weight: the missing weight is named.
    broken = rewrite(path, tmp_path / "broken", lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ModelLoadError, match="missing weight 'lm_head.weight'"):
        load_model(broken)
