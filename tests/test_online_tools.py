"""Tools over HTTP on the mock model: rendering through the chat template, the tool fields checked,
replies that are no call kept as content, and random tool bodies never a 500."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings

from llaisys.models.mock import write_mock_model

from fuzz_bodies import HISTORY, WEATHER, tool_bodies
from http_client import call
from server_process import post_fuzzed, running_server

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(write_mock_model(tmp_path_factory.mktemp("mock")), LLAISYS_CTX=4096,
                        LLAISYS_SERVED_MODEL_NAME="mock") as url:
        yield url


async def rendered(server, **body) -> str:
    status, reply = await call(server, "POST", "/tokenize", {"model": "mock", **body})
    assert status == 200, reply
    return bytes(reply["tokens"]).decode()


async def test_tools_and_the_tool_turns_go_through_the_chat_template(server):
    text = await rendered(server, messages=HISTORY, tools=[WEATHER])
    assert text.startswith("tools: " + json.dumps([WEATHER]))
    # The arguments reach the template as an object: rendered once, not as a string of JSON.
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert 'tool: {"temp_c": 21}' in text
    assert not (await rendered(server, messages=HISTORY, tools=[WEATHER], tool_choice="none")).startswith("tools:")


async def test_a_reply_that_calls_nothing_stays_content(server):
    body = {"model": "mock", "messages": HISTORY, "tools": [WEATHER], "max_tokens": 8, "temperature": 0}
    status, reply = await call(server, "POST", CHAT, body)
    assert status == 200, reply
    choice = reply["choices"][0]
    assert choice["finish_reason"] in ("stop", "length") and "tool_calls" not in choice["message"]
    assert isinstance(choice["message"]["content"], str)


@pytest.mark.parametrize("fields, param", [
    ({"tools": "x"}, "tools"),
    ({"tools": []}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
])
async def test_bad_tool_fields_get_400_naming_them(server, fields, param):
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    status, reply = await call(server, "POST", CHAT, body)
    assert status == 400 and reply["error"]["param"] == param, reply


def test_random_tool_bodies_never_give_a_500(server):
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=tool_bodies())
    def post(body):
        body["max_tokens"] = 3
        post_fuzzed(server + CHAT, body)

    post()
