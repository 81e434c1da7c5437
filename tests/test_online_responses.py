"""/v1/responses (stateless) through the official openai client, CORS, and /v1/models, on the mock model."""
from __future__ import annotations

import json
import time

import jsonschema
import pytest

from llaisys.models.mock import write_mock_model

from http_client import Connection, call
from server_process import running_server

openai = pytest.importorskip("openai")
ORIGIN = "https://editor.example"
TIME = {"type": "function", "name": "get_time", "description": "The time in a zone", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(write_mock_model(tmp_path_factory.mktemp("mock")), LLAISYS_CTX=4096,
                        LLAISYS_SERVED_MODEL_NAME="mock", LLAISYS_CORS_ORIGINS=ORIGIN) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60)


def test_a_response_says_what_the_chat_says(client):
    reply = client.responses.create(model="mock", instructions="Be brief.", input="Hello", max_output_tokens=10,
                                    temperature=0)
    chat = client.chat.completions.create(model="mock", max_tokens=10, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}])
    assert reply.object == "response" and reply.id.startswith("resp_")
    assert reply.output_text == chat.choices[0].message.content
    assert reply.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert reply.usage.input_tokens == chat.usage.prompt_tokens and reply.usage.output_tokens == chat.usage.completion_tokens


def test_a_streamed_response_has_typed_events_and_the_same_text(client):
    body = dict(model="mock", input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
                max_output_tokens=12, temperature=0)
    events = list(client.responses.create(stream=True, **body))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == client.responses.create(**body).output_text == events[-1].response.output_text


def test_a_forced_function_call_and_its_result_in_the_next_input(client):
    reply = client.responses.create(model="mock", input="What time is it?", tools=[TIME], tool_choice="required",
                                    max_output_tokens=120, temperature=0)
    (call_item,) = [item for item in reply.output if item.type == "function_call"]
    assert call_item.name == "get_time"
    jsonschema.validate(json.loads(call_item.arguments), TIME["parameters"])
    with client.responses.stream(model="mock", input="What time is it?", tools=[TIME], tool_choice="required",
                                 max_output_tokens=120, temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [(i.type, i.name, i.arguments) for i in added] == [("function_call", "get_time", "")]
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 3 and "".join(deltas) == call_item.arguments  # the arguments stream as they are written
    assert [(i.name, i.arguments) for i in final.output if i.type == "function_call"] == [
        (call_item.name, call_item.arguments)]
    follow = client.responses.create(model="mock", tools=[TIME], max_output_tokens=5, temperature=0, input=[
        {"role": "user", "content": "What time is it?"},
        {"type": "function_call", "call_id": call_item.call_id, "name": "get_time", "arguments": call_item.arguments},
        {"type": "function_call_output", "call_id": call_item.call_id, "output": "12:00"}])
    assert follow.status in ("completed", "incomplete")


@pytest.mark.parametrize("fields, param", [({"previous_response_id": "resp_1"}, "previous_response_id"),
                                           ({"input": []}, "input"), ({"input": [{"type": "image"}]}, "input[0]"),
                                           ({"tools": [{"type": "web_search"}]}, "tools[0]"),
                                           ({"reasoning": {"effort": "low"}}, "reasoning")])
async def test_responses_refusals_name_the_field(server, fields, param):
    status, reply = await call(server, "POST", "/v1/responses", {"input": "hi", **fields})
    assert status == 400 and reply["error"]["param"] == param, reply


async def test_cors_preflight_and_answers_name_the_allowed_origin(server):
    asked = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os, x-stainless-retry-count"}
    conn = await Connection.open(server, "OPTIONS", "/v1/chat/completions", headers=asked)
    conn.close()
    assert conn.status == 204 and conn.headers["access-control-allow-origin"] == ORIGIN
    assert "x-stainless-os" in conn.headers["access-control-allow-headers"]
    assert "POST" in conn.headers["access-control-allow-methods"]
    for headers in ({**asked, "Origin": "https://evil.example"}, {**asked, "Access-Control-Request-Headers": "x-evil"}):
        conn = await Connection.open(server, "OPTIONS", "/v1/chat/completions", headers=headers)
        conn.close()
        assert conn.status == 403 and "access-control-allow-origin" not in conn.headers
    conn = await Connection.open(server, "GET", "/v1/models", headers={"Origin": ORIGIN})
    conn.close()
    assert conn.status == 200 and conn.headers["access-control-allow-origin"] == ORIGIN


async def test_cors_is_off_by_default(tmp_path):
    with running_server(write_mock_model(tmp_path / "mock"), LLAISYS_SERVED_MODEL_NAME="mock") as url:
        conn = await Connection.open(url, "OPTIONS", "/v1/models", headers={
            "Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        conn.close()
        assert conn.status == 403
        conn = await Connection.open(url, "GET", "/v1/models", headers={"Origin": ORIGIN})
        conn.close()
        assert "access-control-allow-origin" not in conn.headers


async def test_models_list_the_fields_clients_read(server):
    status, reply = await call(server, "GET", "/v1/models")
    (model,) = reply["data"]
    assert model["id"] == "mock" and model["object"] == "model" and model["owned_by"] == "llaisys"
    assert abs(model["created"] - time.time()) < 600 and model["max_model_len"] == 4096
