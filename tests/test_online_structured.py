"""Structured output and forced tool calls over HTTP on the mock model, through the official openai
client: response_format enforced, unsupported schema features refused by name, forced calls that the
client assembles streamed or not, logit_bias, and random response_format bodies never a 500."""
from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llaisys.models.mock import write_mock_model

from fuzz_bodies import response_formats
from http_client import call
from server_process import post_fuzzed, running_server

openai = pytest.importorskip("openai")
CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                          "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
          "required": ["name", "pets"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                     "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(write_mock_model(tmp_path_factory.mktemp("mock")), LLAISYS_CTX=4096,
                        LLAISYS_SERVED_MODEL_NAME="mock") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(client, temperature):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    reply = client.chat.completions.create(model="mock", messages=HELLO, response_format=fmt, max_tokens=100,
                                           temperature=temperature, seed=1, n=3)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PERSON)


def test_json_object_output_is_an_object(client):
    reply = client.chat.completions.create(model="mock", messages=HELLO, response_format={"type": "json_object"},
                                           max_tokens=200, temperature=0)
    content = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert content.startswith("{")


def weather_calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]


@pytest.mark.parametrize("choice, names", [("required", {"get_weather", "get_time"}),
                                           ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})])
def test_a_forced_call_is_a_valid_call_streamed_or_not(client, choice, names):
    body = dict(model="mock", messages=HELLO, tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120,
                temperature=0, parallel_tool_calls=False)
    reply = client.chat.completions.create(**body)
    (c,) = reply.choices
    assert c.finish_reason == "tool_calls" and c.message.content is None
    ((name, args),) = weather_calls(c.message)
    assert name in names and c.message.tool_calls[0].id.startswith("call_")
    jsonschema.validate(args, (WEATHER if name == "get_weather" else TIME)["function"]["parameters"])
    with client.beta.chat.completions.stream(**body) as stream:  # the client assembles delta.tool_calls
        final = stream.get_final_completion()
    assert weather_calls(final.choices[0].message) == [(name, args)]
    assert final.choices[0].finish_reason == "tool_calls"
    # Streamed in pieces: the first names the call, the rest carry its arguments as they are written.
    chunks = list(client.chat.completions.create(stream=True, **body))
    pieces = [p for ch in chunks for c in ch.choices for p in c.delta.tool_calls or []]
    assert pieces[0].id.startswith("call_") and pieces[0].type == "function" and pieces[0].function.name == name
    assert len(pieces) > 3 and all(p.index == 0 and p.id is None and p.function.name is None for p in pieces[1:])
    assert json.loads("".join(p.function.arguments for p in pieces)) == args
    assert not any(c.delta.content for ch in chunks for c in ch.choices)


def test_parallel_forced_calls_may_be_several(client):
    reply = client.chat.completions.create(model="mock", messages=HELLO, tools=[WEATHER, TIME], tool_choice="required",
                                           max_tokens=200, temperature=1.0, seed=4, n=4)
    for c in reply.choices:
        if c.finish_reason == "tool_calls":
            assert all(name in ("get_weather", "get_time") for name, _ in weather_calls(c.message))


def test_logit_bias_moves_the_greedy_pick(client):
    reply = client.chat.completions.create(model="mock", messages=HELLO, max_tokens=3, temperature=0,
                                           logit_bias={str(ord("Z")): 100})
    assert reply.choices[0].message.content == "ZZZ"


@pytest.mark.parametrize("fields, param, named", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}},
     "response_format.json_schema", "not"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "color"}}}}, "response_format.json_schema", "color"),
    ({"response_format": {"type": "yaml"}}, "response_format", ""),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}},
     "response_format.json_schema", ""),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}], "tool_choice": "required"},
     "tools", "not"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format", ""),
    ({"logit_bias": {"x": 1}}, "logit_bias", ""),
    ({"logit_bias": {"5": 300}}, "logit_bias", ""),
    ({"logit_bias": {"100000": 1}}, "logit_bias", "100000"),
])
async def test_unenforceable_requests_get_400_naming_the_problem(server, fields, param, named):
    status, reply = await call(server, "POST", CHAT, {"messages": HELLO, "max_tokens": 2, **fields})
    assert status == 400 and reply["error"]["param"] == param and named in reply["error"]["message"], reply


def test_random_response_format_bodies_never_give_a_500(server):
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(fmt=response_formats(), stream=st.booleans())
    def post(fmt, stream):
        post_fuzzed(server + CHAT, {"messages": HELLO, "response_format": fmt, "max_tokens": 4, "stream": stream})

    post()
