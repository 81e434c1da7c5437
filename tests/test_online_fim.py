"""Fill in the middle over HTTP: /infill, /completion and `suffix` on /v1/completions, on a mock model
whose tokenizer has FIM tokens (ids above the bytes), so every prompt and reply can be predicted."""
from __future__ import annotations

import json

import pytest

from llaisys.models.mock import write_mock_model

from http_client import Connection, call
from mock_oracle import mock_greedy
from server_process import running_server

SPECIAL = {"<|fim_prefix|>": 290, "<|fim_suffix|>": 291, "<|fim_middle|>": 292, "<|fim_pad|>": 293,
           "<|repo_name|>": 294, "<|file_sep|>": 295}
CTX = 2048


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory):
    model = write_mock_model(tmp_path_factory.mktemp("fim-mock"), special_tokens=SPECIAL)
    with running_server(model, LLAISYS_CTX=CTX, LLAISYS_SERVED_MODEL_NAME="mock") as url:
        yield url


@pytest.fixture(scope="module")
def plain_server(tmp_path_factory):
    with running_server(write_mock_model(tmp_path_factory.mktemp("mock")), LLAISYS_CTX=CTX,
                        LLAISYS_SERVED_MODEL_NAME="mock") as url:
        yield url


def fim_ids(prefix: str, suffix: str, prompt: str = "") -> list[int]:
    return [290, *prefix.encode(), 291, *suffix.encode(), 292, *prompt.encode()]


def greedy_text(prompt_ids: list[int], steps: int) -> tuple[str, list[int]]:
    """The mock's greedy reply up to an end token (EOS or a FIM end), as text and ids."""
    out = []
    for t in mock_greedy(prompt_ids, steps):
        if t in (293, 294, 295):
            break
        out.append(t)
    return bytes(t for t in out if t < 256).decode("utf-8", "replace"), out


def prefix_hitting(token: int, within: int) -> str:
    """A prefix whose infill's greedy reply emits `token` within `within` tokens, after at least one other."""
    for k in range(2000):
        prefix = f"def f{k}():\n    "
        out = mock_greedy(fim_ids(prefix, "\n    return x\n"), within)
        if token in out[1:]:
            return prefix
    raise AssertionError(f"no prefix makes the mock emit {token}")


INFILL = {"input_prefix": "def add(a, b):\n    ", "input_suffix": "\n    return c\n", "n_predict": 12,
          "temperature": 0}


async def test_infill_builds_the_fim_prompt_from_the_tokenizers_tokens(fim_server):
    status, reply = await call(fim_server, "POST", "/infill", {**INFILL, "prompt": "c ="})
    assert status == 200, reply
    ids = fim_ids(INFILL["input_prefix"], INFILL["input_suffix"], "c =")
    text, tokens = greedy_text(ids, 12)
    assert reply["tokens_evaluated"] == len(ids) and reply["content"] == text and reply["tokens"][:len(tokens)] == tokens
    assert reply["stop"] is True and reply["stop_type"] in ("eos", "limit") and reply["model"] == "mock"


async def test_input_extra_comes_first_in_the_repository_format(fim_server):
    extra = [{"filename": "util.py", "text": "X = 1\n"}]
    status, reply = await call(fim_server, "POST", "/infill", {**INFILL, "input_extra": extra})
    assert status == 200, reply
    repo = [294, *b"myproject\n", 295, *b"util.py\nX = 1\n", 295, *b"filename\n"]
    ids = repo + fim_ids(INFILL["input_prefix"], INFILL["input_suffix"])
    assert reply["tokens_evaluated"] == len(ids) and reply["content"] == greedy_text(ids, 12)[0]


async def test_a_long_prefix_keeps_its_end_and_the_suffix_its_start(fim_server):
    body = {**INFILL, "input_prefix": "a" * 3000 + "END", "input_suffix": "START" + "b" * 3000, "n_predict": 8}
    status, reply = await call(fim_server, "POST", "/infill", body)
    assert status == 200, reply
    room = CTX - 8 - 3
    assert reply["tokens_evaluated"] == room + 3
    prefix = body["input_prefix"][-(room * 3 // 4):]
    ids = fim_ids(prefix, body["input_suffix"][:room - len(prefix)])
    assert reply["content"] == greedy_text(ids, 8)[0]


async def test_suffix_on_v1_completions_is_the_same_fill(fim_server):
    status, native = await call(fim_server, "POST", "/infill", INFILL)
    body = {"model": "mock", "prompt": INFILL["input_prefix"], "suffix": INFILL["input_suffix"], "max_tokens": 12,
            "temperature": 0}
    status, reply = await call(fim_server, "POST", "/v1/completions", body)
    assert status == 200, reply
    assert reply["choices"][0]["text"] == native["content"]
    assert reply["usage"]["prompt_tokens"] == native["tokens_evaluated"]


async def test_fim_end_tokens_end_the_completion_like_eos(fim_server):
    prefix = prefix_hitting(295, 40)  # <|file_sep|>
    body = {**INFILL, "input_prefix": prefix, "input_suffix": "\n    return x\n", "n_predict": 40}
    status, reply = await call(fim_server, "POST", "/infill", body)
    assert status == 200, reply
    out = mock_greedy(fim_ids(prefix, "\n    return x\n"), 40)
    ends = min(out.index(t) for t in (293, 294, 295) if t in out)
    assert reply["stop_type"] == "eos" and reply["tokens"] == out[:ends + 1]


async def test_a_stop_string_naming_a_special_token_matches_it(fim_server):
    prefix = prefix_hitting(292, 30)  # <|fim_middle|>: not an end token, its text never decoded
    base = {**INFILL, "input_prefix": prefix, "input_suffix": "\n    return x\n", "n_predict": 30}
    out = mock_greedy(fim_ids(prefix, "\n    return x\n"), 30)
    cut = out.index(292, 1)
    if any(t in (293, 294, 295) for t in out[:cut]):
        pytest.skip("the mock ends before the special token")
    status, reply = await call(fim_server, "POST", "/infill", {**base, "stop": ["<|fim_middle|>"]})
    assert status == 200, reply
    assert reply["stop_type"] == "word" and reply["stopping_word"] == "<|fim_middle|>"
    assert reply["tokens"] == out[:cut + 1]


async def test_native_completion_streams_pieces_then_a_final_object_without_done(fim_server):
    body = {"prompt": "hello", "n_predict": 10, "temperature": 0, "stream": True, "cache_prompt": True}
    conn = await Connection.open(fim_server, "POST", "/completion", body)
    try:
        assert conn.status == 200 and conn.headers["content-type"].startswith("text/event-stream")
        events = [e async for e in conn.events()]
    finally:
        conn.close()
    assert "[DONE]" not in events and events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
    status, whole = await call(fim_server, "POST", "/completion", {**body, "stream": False})
    assert "".join(e["content"] for e in events) == whole["content"]
    assert events[-1]["tokens_predicted"] == whole["tokens_predicted"]


async def test_a_model_without_fim_tokens_gets_a_clear_400(plain_server):
    status, reply = await call(plain_server, "POST", "/infill", INFILL)
    assert status == 400 and "fill-in-the-middle" in reply["error"]["message"], reply
    status, reply = await call(plain_server, "POST", "/v1/completions",
                               {"prompt": "a", "suffix": "b", "max_tokens": 3})
    assert status == 400 and "<|fim_prefix|>" in reply["error"]["message"], reply


@pytest.mark.parametrize("path, body, param", [
    ("/infill", {**INFILL, "input_extra": [{"filename": "a"}]}, "input_extra[0]"),
    ("/infill", {**INFILL, "input_prefix": 3}, "input_prefix"),
    ("/infill", {**INFILL, "n_predict": 0}, "n_predict"),
    ("/infill", {**INFILL, "typical_p": 0.5}, "typical_p"),
    ("/completion", {"prompt": ""}, "prompt"),
    ("/completion", {"prompt": "a", "repeat_penalty": -1}, "repeat_penalty"),
    ("/v1/completions", {"prompt": ["a", "b"], "suffix": "c"}, "suffix"),
    ("/v1/completions", {"prompt": "a", "frobnicate": 1}, "frobnicate"),
])
async def test_bad_fim_bodies_get_400_naming_the_field(fim_server, path, body, param):
    status, reply = await call(fim_server, "POST", path, body)
    assert status == 400 and reply["error"]["param"] == param, reply


async def test_openai_bookkeeping_fields_and_the_speculation_opt_out_are_accepted(fim_server):
    body = {"prompt": "a", "max_tokens": 3, "temperature": 0}
    _, plain = await call(fim_server, "POST", "/v1/completions", body)
    status, reply = await call(fim_server, "POST", "/v1/completions",
                               {**body, "store": False, "metadata": {"k": "v"}, "service_tier": "auto",
                                "user": "u", "speculative": False})
    assert status == 200 and reply["choices"][0]["text"] == plain["choices"][0]["text"], reply
    status, reply = await call(fim_server, "POST", "/v1/completions", {**body, "speculative": "no"})
    assert status == 400 and reply["error"]["param"] == "speculative", reply


async def test_many_stop_strings_are_accepted(fim_server):
    stops = [f"never{i}" for i in range(40)]
    status, reply = await call(fim_server, "POST", "/v1/completions", {"prompt": "a", "stop": stops, "max_tokens": 3})
    assert status == 200, reply


async def test_native_json_schema_and_gbnf_grammar_constrain_the_reply(fim_server):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    status, reply = await call(fim_server, "POST", "/completion", {"prompt": "x", "n_predict": 20, "temperature": 0,
                                                                   "json_schema": schema})
    assert status == 200 and json.loads(reply["content"]) in ({"ok": True}, {"ok": False}), reply
    status, reply = await call(fim_server, "POST", "/completion", {"prompt": "x", "n_predict": 20, "temperature": 0,
                                                                   "grammar": 'root ::= "yes" | "no"'})
    assert status == 200 and reply["content"] in ("yes", "no") and reply["stop_type"] == "eos", reply
    status, reply = await call(fim_server, "POST", "/completion", {"prompt": "x", "grammar": "root ::= ("})
    assert status == 400 and reply["error"]["param"] == "grammar" and "GBNF" in reply["error"]["message"]
