"""Model registries: the C core's model types (llaisysModelTypeCount / llaisysModelTypeName)."""
from __future__ import annotations

import pytest

from llaisys import core
from llaisys._core import ffi, lib
from llaisys.core import InvalidArgumentError, Model


# --------------------------------------------------------------------------------------------
# core registry (c_core/src/registry.cpp)
# --------------------------------------------------------------------------------------------

def test_core_registry_lists_qwen2_and_mock():
    n = lib.llaisysModelTypeCount()
    names = [ffi.string(lib.llaisysModelTypeName(i)).decode() for i in range(n)]
    assert n == 2
    assert names == ["qwen2", "mock"]
    assert core.model_types() == names


@pytest.mark.parametrize("i", [-1, -100, 2, 1000])
def test_core_registry_out_of_range_is_null(i):
    assert lib.llaisysModelTypeName(i) == ffi.NULL


def test_every_registered_type_can_be_created_by_name():
    # mock needs only n_vocab; qwen2 needs its architecture fields (no weights are written)
    arch = dict(n_vocab=32, n_embd=32, n_layer=1, n_head=2, n_head_kv=1, head_dim=16, n_ff=64, n_ctx=8)
    for name in core.model_types():
        m = Model(name, **arch)
        assert m.model_type == name
        assert m.params.n_vocab == 32 and m.kv_capacity == 8
        assert m.weight_names(), f"{name} has no weight slots"
        m.close()


def test_unregistered_type_is_rejected_with_the_known_list():
    with pytest.raises(InvalidArgumentError) as info:
        Model("qwen3", n_vocab=8)
    msg = str(info.value)
    assert "qwen3" in msg
    for name in core.model_types():
        assert name in msg


# --------------------------------------------------------------------------------------------
# Python adapter registry (llaisys/models/__init__.py): config.json's model_type -> adapter
# --------------------------------------------------------------------------------------------

def test_adapter_registry_routes_by_model_type(tiny_qwen2_dir, tmp_path):
    from llaisys.models import ADAPTERS, load_model
    from llaisys.models.mock import MockAdapter, write_mock_model
    from llaisys.models.qwen2 import Qwen2Adapter

    assert ADAPTERS["qwen2"] is Qwen2Adapter and ADAPTERS["mock"] is MockAdapter
    qwen = load_model(tiny_qwen2_dir)
    mock = load_model(write_mock_model(tmp_path / "mock"))
    assert type(qwen) is Qwen2Adapter and qwen.model.model_type == "qwen2"
    assert type(mock) is MockAdapter and mock.model.model_type == "mock"
