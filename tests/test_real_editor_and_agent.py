"""The default model through the official openai client, as editors and agents use it: a weather-tool
round trip (call, result, answer) streamed and not, json_schema replies that validate, infills
that join a signature and a return, and random tool and response_format bodies that never give a
500. Few and short: the machine is slow."""
from __future__ import annotations

import ast
import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_bodies import response_formats, tool_bodies
from server_process import post_fuzzed, post_json, running_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city name"}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"language": {"enum": ["python", "rust", "go"]}}, "required": ["language"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "reason": {"type": "string", "maxLength": 20}},
     "required": ["ok", "reason"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"], "additionalProperties": False}},
     "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "maxItems": 3}}, "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"status": {"enum": ["open", "closed"]}, "count": {"type": "integer",
                                                                                        "minimum": 0}},
     "required": ["status", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer"}, "roles": {"type": "array", "items": {"enum": ["admin", "dev"]}, "maxItems": 2}},
        "required": ["id", "roles"], "additionalProperties": False}}, "required": ["user"],
     "additionalProperties": False},
    {"type": "object", "properties": {"price": {"type": "number"}, "currency": {"enum": ["EUR", "USD"]}},
     "required": ["price", "currency"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 16},
                                      "done": {"type": "boolean"}, "priority": {"enum": [1, 2, 3]}},
     "required": ["title", "done", "priority"], "additionalProperties": False},
]
INFILL_PREFIX = "def average(numbers):\n    "
INFILL_SUFFIX = "\n    return total / len(numbers)\n"


@pytest.fixture(scope="module")
def server(default_model):
    with running_server(default_model, LLAISYS_SERVED_MODEL_NAME="qwen", LLAISYS_CTX=4096) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=600)


def answer_with_the_result(client, call, stream: bool) -> str:
    history = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                     {"role": "tool", "tool_call_id": call["id"], "content": json.dumps({"temp_c": 21, "sky": "sunny"})}]
    body = dict(model="qwen", messages=history, tools=[WEATHER], temperature=0, max_tokens=40)
    if not stream:
        return client.chat.completions.create(**body).choices[0].message.content
    return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **body)
                   if c.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_real_weather_tool_round_trip(client, stream):
    body = dict(model="qwen", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=40)
    if stream:
        with client.beta.chat.completions.stream(**body) as s:
            events = list(s)
            reply = s.get_final_completion()
        # The call streams in pieces (its name, then its arguments as the model writes them), no markup.
        assert sum(e.type == "tool_calls.function.arguments.delta" for e in events) > 2, events
        assert not any(e.type == "content.delta" and e.delta for e in events), events
    else:
        reply = client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and "paris" in json.loads(call.function.arguments)["city"].lower()
    final = answer_with_the_result(client, call.model_dump(include={"id", "type", "function"}), stream)
    assert "21" in final, final


def test_real_json_schema_replies_validate(client):
    def ask(schema):
        reply = client.chat.completions.create(
            model="qwen", temperature=0, max_tokens=60,
            messages=[{"role": "user", "content": "Give an example JSON value for this schema: " + json.dumps(schema)}],
            response_format={"type": "json_schema", "json_schema": {"name": "example", "schema": schema}})
        return reply.choices[0]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # batched: one decode step serves all ten
        choices = list(pool.map(ask, SCHEMAS))
    for schema, choice in zip(SCHEMAS, choices):
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_real_infill_joins_the_signature_and_the_return(server, client):
    status, native = post_json(f"{server}/infill", {"input_prefix": INFILL_PREFIX, "input_suffix": INFILL_SUFFIX,
                                                    "n_predict": 32, "temperature": 0})
    assert status == 200, native
    reply = client.completions.create(model="qwen", prompt=INFILL_PREFIX, suffix=INFILL_SUFFIX, max_tokens=32,
                                      temperature=0)
    assert native["content"] == reply.choices[0].text
    middle = native["content"]
    # The instruct model writes the body, then repeats the suffix and runs on: editors cut a completion
    # where it meets the text after the cursor, and so does this check.
    end = middle.find(INFILL_SUFFIX.strip())
    body = middle if end < 0 else middle[:end]
    assert "total" in body and "return" not in body, middle
    ast.parse(INFILL_PREFIX + body + INFILL_SUFFIX)  # the middle completes the function


def test_real_random_tool_and_response_format_bodies_never_give_a_500(server):
    """The mock's checks again on the real model: its chat template renders the odd tool turns, and
    llguidance builds masks over its vocabulary."""
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=tool_bodies(), fmt=st.none() | response_formats())
    def post(body, fmt):
        if fmt is not None:
            body["response_format"] = fmt
        post_fuzzed(f"{server}/v1/chat/completions", dict(body, model="qwen", max_tokens=2), timeout=300)

    post()
