"""The server over real HTTP: hypercorn in a child process on 127.0.0.1, spoken to by a raw asyncio client.

Most tests serve the mock model (fast, deterministic); test_real_* serve the default model.
"""
from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llaisys.models.mock import write_mock_model

from http_client import Connection, call, stream
from server_process import get_json, metric, poll_health, post_fuzzed, running_server, start_server, stop_server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
CTX = 4096


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return write_mock_model(tmp_path_factory.mktemp("mock-model"))


def mock_server(mock_dir, **env):
    return running_server(mock_dir, LLAISYS_CTX=CTX, LLAISYS_SERVED_MODEL_NAME="mock", **env)


@pytest.fixture(scope="module")
def server(mock_dir):
    with mock_server(mock_dir) as url:
        yield url


async def wait_for(url: str, name: str, value: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while metric(url, f"llaisys:{name}") != value:
        assert time.monotonic() < deadline, f"{name} did not reach {value}"
        await asyncio.sleep(0.01)


def chat_body(content: str = "Hello there", **fields) -> dict:
    return {"model": "mock", "messages": [{"role": "user", "content": content}], "temperature": 0,
            "max_tokens": 24, **fields}


async def assert_idle(url: str, timeout: float = 5.0) -> None:
    """Nothing running or waiting and every KV cell free (polls: an abort lands between engine steps).

    Asynchronous so that the event loop runs meanwhile: asyncio closes a socket on its next iteration.
    """
    deadline = time.monotonic() + timeout
    while True:
        state = [metric(url, f"llaisys:{m}") for m in ("num_requests_running", "num_requests_waiting",
                                                      "kv_cache_used_cells")]
        if state == [0, 0, 0]:
            return
        assert time.monotonic() < deadline, f"running, waiting, KV cells in use: {state}"
        await asyncio.sleep(0.02)


def stream_text(events: list, index: int = 0, chat: bool = True) -> str:
    key = (lambda ch: ch["delta"].get("content", "")) if chat else (lambda ch: ch["text"])
    return "".join(key(ch) for e in events[:-1] for ch in e["choices"] if ch["index"] == index)


# shapes
async def test_health_models_and_a_chat_reply(server):
    assert await call(server, "GET", "/health") == (200, {"status": "ok"})
    status, models = await call(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["mock"]
    assert models["data"][0]["max_model_len"] == CTX
    status, reply = await call(server, "POST", CHAT, chat_body())
    assert status == 200, reply
    assert reply["id"].startswith("chatcmpl-") and reply["object"] == "chat.completion"
    assert reply["model"] == "mock" and abs(reply["created"] - time.time()) < 60
    (choice,) = reply["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    status, tokens = await call(server, "POST", "/tokenize", {"messages": chat_body()["messages"]})
    usage = reply["usage"]
    assert usage["prompt_tokens"] == tokens["count"] and 1 <= usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_stream_pieces_concatenate_to_the_non_streamed_text(server):
    body = chat_body("Tell me a story", max_tokens=64)
    _, whole = await call(server, "POST", CHAT, body)
    events = await stream(server, CHAT, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert stream_text(events) == whole["choices"][0]["message"]["content"]
    finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finish == [whole["choices"][0]["finish_reason"]]
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and {**usage, "prompt_tokens_details": None} == {
        **whole["usage"], "prompt_tokens_details": None}
    # The same prompt again: every prompt token but the last comes from the prefix cache.
    assert usage["prompt_tokens_details"] == {"cached_tokens": usage["prompt_tokens"] - 1}
    assert all(c["usage"] is None for c in chunks[:-1])
    # Without include_usage: no usage chunk and no usage field.
    plain = await stream(server, CHAT, {**body, "stream": True})
    assert stream_text(plain) == stream_text(events) and all("usage" not in c for c in plain[:-1])


async def test_completions_take_strings_lists_and_token_ids(server):
    body = {"model": "mock", "temperature": 0, "max_tokens": 12}
    _, one = await call(server, "POST", COMPLETIONS, {**body, "prompt": "abc"})
    assert one["object"] == "text_completion" and one["usage"]["prompt_tokens"] == 3
    _, ids = await call(server, "POST", COMPLETIONS, {**body, "prompt": [97, 98, 99]})
    assert ids["choices"][0]["text"] == one["choices"][0]["text"]
    _, many = await call(server, "POST", COMPLETIONS, {**body, "prompt": ["abc", "xyz"], "n": 2})
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == many["choices"][1]["text"] == one["choices"][0]["text"]
    _, xyz = await call(server, "POST", COMPLETIONS, {**body, "prompt": "xyz"})
    assert many["choices"][2]["text"] == xyz["choices"][0]["text"]
    _, lists = await call(server, "POST", COMPLETIONS, {**body, "prompt": [[97, 98, 99], [120, 121, 122]]})
    assert [c["text"] for c in lists["choices"]] == [one["choices"][0]["text"], xyz["choices"][0]["text"]]
    assert many["usage"]["prompt_tokens"] == 6
    events = await stream(server, COMPLETIONS, {**body, "prompt": ["abc", "xyz"], "n": 2, "stream": True})
    assert [stream_text(events, i, chat=False) for i in range(4)] == [c["text"] for c in many["choices"]]


async def test_many_concurrent_streamed_and_non_streamed_requests(server):
    bodies = [chat_body(f"request number {i} " * (1 + i % 5), max_tokens=8 + 5 * i, seed=i,
                        temperature=0 if i % 2 else 0.8) for i in range(24)]
    alone = [(await call(server, "POST", CHAT, b))[1]["choices"][0]["message"]["content"] for b in bodies]

    async def one(i: int) -> str:
        if i % 3:
            return stream_text(await stream(server, CHAT, {**bodies[i], "stream": True}))
        status, reply = await call(server, "POST", CHAT, bodies[i])
        assert status == 200, reply
        return reply["choices"][0]["message"]["content"]

    together = await asyncio.gather(*(one(i) for i in range(24)))
    assert together == alone  # greedy and seeded sampling do not depend on batch mates
    await assert_idle(server)


async def test_tokenize_and_detokenize_round_trip(server):
    status, tokens = await call(server, "POST", "/tokenize", {"prompt": "héllo"})
    assert status == 200 and tokens["tokens"] == list("héllo".encode()) and tokens["count"] == 6
    assert tokens["max_model_len"] == CTX
    assert await call(server, "POST", "/detokenize", {"tokens": tokens["tokens"]}) == (200, {"prompt": "héllo"})


async def test_logprobs_in_chat_and_completions(server):
    _, reply = await call(server, "POST", CHAT, chat_body(max_tokens=6, logprobs=True, top_logprobs=3))
    content = reply["choices"][0]["logprobs"]["content"]
    assert len(content) == reply["usage"]["completion_tokens"]
    for step in content:
        assert len(step["top_logprobs"]) == 3 and step["logprob"] <= 0
        assert step["top_logprobs"][0]["logprob"] == step["logprob"]  # greedy picks the most likely token
        assert step["bytes"] == list(step["token"].encode())
    _, reply = await call(server, "POST", COMPLETIONS, {"prompt": "abc", "max_tokens": 5, "temperature": 0,
                                                         "logprobs": 2})
    lp = reply["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 5
    assert all(len(top) <= 2 for top in lp["top_logprobs"])


async def test_seeded_sampling_repeats_and_seeds_differ(server):
    body = chat_body(temperature=1.0, max_tokens=32)
    texts = [(await call(server, "POST", CHAT, {**body, "seed": s}))[1]["choices"][0]["message"]["content"]
             for s in (7, 7, 8)]
    assert texts[0] == texts[1] != texts[2]


async def test_metrics_count_tokens_and_latencies(server):
    before = {m: metric(server, f"llaisys:{m}") for m in (
        "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count",
        "e2e_request_latency_seconds_count", "inter_token_latency_seconds_count", "request_success_total")}
    _, reply = await call(server, "POST", CHAT, chat_body(max_tokens=10, ignore_eos=True))
    after = {m: metric(server, f"llaisys:{m}") for m in before}
    assert after["prompt_tokens_total"] - before["prompt_tokens_total"] == reply["usage"]["prompt_tokens"]
    assert after["generation_tokens_total"] - before["generation_tokens_total"] == 10
    assert after["time_to_first_token_seconds_count"] - before["time_to_first_token_seconds_count"] == 1
    assert after["e2e_request_latency_seconds_count"] - before["e2e_request_latency_seconds_count"] == 1
    assert after["inter_token_latency_seconds_count"] - before["inter_token_latency_seconds_count"] == 9
    assert after["request_success_total"] - before["request_success_total"] == 1
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_cached_cells",
                 "request_queue_time_seconds_count", "request_prompt_tokens_count", "request_failure_total"):
        metric(server, f"llaisys:{name}")
    answered = 'llaisys:http_requests_total{method="POST",route="/v1/chat/completions",status="%d"}'
    await call(server, "POST", CHAT, {"messages": []})  # the 400 series exists from its first answer on
    counts = [metric(server, answered % status) for status in (200, 400)]
    await call(server, "POST", CHAT, {"messages": []})
    assert [metric(server, answered % status) for status in (200, 400)] == [counts[0], counts[1] + 1]


async def test_the_models_generation_config_fills_fields_the_request_leaves_open(tmp_path):

    model = write_mock_model(tmp_path / "mock")
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 5}))
    with mock_server(model) as url:
        body = {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True}
        replies = [(await call(url, "POST", CHAT, body))[1] for _ in range(2)]
        assert [r["usage"]["completion_tokens"] for r in replies] == [5, 5]  # max_new_tokens
        assert replies[0]["choices"] == replies[1]["choices"]  # temperature 0: greedy
        _, longer = await call(url, "POST", CHAT, {**body, "max_tokens": 7, "temperature": 1.0, "seed": 1})
        assert longer["usage"]["completion_tokens"] == 7


async def test_a_chats_next_turn_reuses_the_cells_of_the_last(server, mock_dir):
    chat = [{"role": "user", "content": "Tell me about caches " * 8}]
    _, tokens = await call(server, "POST", "/tokenize", {"messages": chat})
    _, first = await call(server, "POST", CHAT, {"messages": chat, "max_tokens": 8, "temperature": 0})
    hits = metric(server, "llaisys:prefix_cache_hits_total")
    chat += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
             {"role": "user", "content": "And then?"}]
    status, second = await call(server, "POST", CHAT, {"messages": chat, "max_tokens": 8, "temperature": 0})
    assert status == 200 and metric(server, "llaisys:prefix_cache_hits_total") - hits >= tokens["count"]
    with mock_server(mock_dir, LLAISYS_PREFIX_CACHING="off") as plain:
        for body in ({"messages": chat[:1]}, {"messages": chat}):
            status, reply = await call(plain, "POST", CHAT, {**body, "max_tokens": 8, "temperature": 0})
            assert reply["choices"] == (first if len(body["messages"]) == 1 else second)["choices"]
        assert metric(plain, "llaisys:prefix_cache_hits_total") == 0


async def test_usage_reports_the_cached_prompt_tokens_on_chat_and_completions(server):
    """usage.prompt_tokens_details.cached_tokens, streamed or not; the metrics count the same tokens."""
    system = "You answer in one line. " * 12
    prompt = [ord(c) for c in system]  # the mock's tokens are bytes
    queries, hits = (metric(server, f"llaisys:prefix_cache_{m}_total") for m in ("queries", "hits"))
    _, first = await call(server, "POST", COMPLETIONS, {"prompt": prompt + [1, 2], "max_tokens": 4})
    _, again = await call(server, "POST", COMPLETIONS, {"prompt": prompt + [3], "max_tokens": 4})
    events = await stream(server, COMPLETIONS, {"prompt": prompt + [4, 5], "max_tokens": 4, "stream": True,
                                                "stream_options": {"include_usage": True}})
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < len(prompt)
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": len(prompt)}
    assert events[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": len(prompt)}
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in (first["usage"], again["usage"],
                                                                         events[-2]["usage"]))
    assert metric(server, "llaisys:prefix_cache_hits_total") - hits == cached
    assert metric(server, "llaisys:prefix_cache_queries_total") - queries == 3 * len(prompt) + 5
    chat = [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]
    _, tokens = await call(server, "POST", "/tokenize", {"messages": chat})
    await call(server, "POST", CHAT, {"messages": chat, "max_tokens": 4})
    for streamed in (False, True):
        body = {"messages": chat[:1] + [{"role": "user", "content": "yo" if streamed else "ok"}], "max_tokens": 4}
        if streamed:
            events = await stream(server, CHAT, {**body, "stream": True, "stream_options": {"include_usage": True}})
            usage = events[-2]["usage"]
        else:
            usage = (await call(server, "POST", CHAT, body))[1]["usage"]
        # The system prompt and the template up to the user's message, in the mock's chat format.
        assert usage["prompt_tokens_details"]["cached_tokens"] == len(tokens["tokens"]) - len("hi\nassistant: ")
    assert 0 < metric(server, "llaisys:prefix_cache_hit_rate") <= 1
    assert metric(server, "llaisys:prefix_cache_cells") >= len(prompt)


# errors: status, OpenAI's error shape, the field named; the server stays up and leaks nothing
BAD_CHAT = [
    ("messages missing", {"model": "mock"}, "messages"),
    ("messages empty", {"messages": []}, "messages"),
    ("messages not a list", {"messages": "hi"}, "messages"),
    ("message not an object", {"messages": ["hi"]}, "messages[0]"),
    ("unknown role", {"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ("content not text", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("image content", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ("max_tokens a string", chat_body(max_tokens="x"), "max_tokens"),
    ("max_tokens zero", chat_body(max_tokens=0), "max_tokens"),
    ("max_completion_tokens negative", chat_body(max_completion_tokens=-3), "max_tokens"),
    ("temperature too high", chat_body(temperature=3), "temperature"),
    ("temperature a string", chat_body(temperature="hot"), "temperature"),
    ("top_p zero", chat_body(top_p=0), "top_p"),
    ("top_k below -1", chat_body(top_k=-2), "top_k"),
    ("min_p above 1", chat_body(min_p=1.5), "min_p"),
    ("n zero", chat_body(n=0), "n"),
    ("n above the running slots", chat_body(n=100), "n"),
    ("n a float", chat_body(n=1.5), "n"),
    ("presence_penalty out of range", chat_body(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty a bool", chat_body(frequency_penalty=True), "frequency_penalty"),
    ("seed a string", chat_body(seed="x"), "seed"),
    ("stop a number", chat_body(stop=5), "stop"),
    ("stop with an empty string", chat_body(stop=[""]), "stop"),
    ("top_logprobs without logprobs", chat_body(top_logprobs=2), "top_logprobs"),
    ("top_logprobs above 20", chat_body(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("stream not a bool", chat_body(stream="yes"), "stream"),
    ("stream_options without stream", chat_body(stream_options={"include_usage": True}), "stream_options"),
    ("include_usage not a bool", chat_body(stream=True, stream_options={"include_usage": 1}), "include_usage"),
    ("model not a string", chat_body(model=3), "model"),
    ("prompt longer than the context", chat_body("x" * (CTX + 10)), "messages"),
    ("prompt plus max_tokens beyond the context", chat_body("x" * (CTX - 100), max_tokens=500), "max_tokens"),
    ("prompt too many characters to tokenize", chat_body("x" * (256 * CTX + 1)), "messages"),
]
BAD_COMPLETIONS = [
    ("prompt missing", {"max_tokens": 3}, "prompt"),
    ("prompt empty", {"prompt": ""}, "prompt"),
    ("prompt a number", {"prompt": 5}, "prompt"),
    ("prompt a mixed list", {"prompt": ["a", 1]}, "prompt"),
    ("token id outside the vocabulary", {"prompt": [1, 2, 100000]}, "prompt"),
    ("token id negative", {"prompt": [-1]}, "prompt"),
    ("logprobs above 20", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("echo", {"prompt": "a", "echo": True}, "echo"),
    ("best_of", {"prompt": "a", "best_of": 3}, "best_of"),
]


@pytest.mark.parametrize("path, body, param", [(CHAT, b, p) for _, b, p in BAD_CHAT] +
                         [(COMPLETIONS, b, p) for _, b, p in BAD_COMPLETIONS],
                         ids=[f"chat: {n}" for n, _, _ in BAD_CHAT] + [f"completions: {n}" for n, _, _ in BAD_COMPLETIONS])
async def test_bad_requests_get_400_naming_the_field(server, path, body, param):
    status, reply = await call(server, "POST", path, body)
    assert status == 400, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"]
    for streamed in (True, False):  # a streamed request is refused the same way, before any event
        if path == CHAT and "stream" not in body and "stream_options" not in body:
            assert (await call(server, "POST", path, {**body, "stream": streamed}))[0] == 400


@pytest.mark.parametrize("raw, message", [(b"{not json", "not valid JSON"), (b"[1, 2]", "JSON object"),
                                          (b"\xff\xfe", "not valid JSON"), (b"", "not valid JSON")])
async def test_malformed_bodies_get_400(server, raw, message):
    status, reply = await call(server, "POST", CHAT, raw=raw)
    assert status == 400 and message in reply["error"]["message"]


async def test_unknown_model_path_and_method(server):
    status, reply = await call(server, "POST", CHAT, chat_body(model="gpt-9"))
    assert status == 404 and reply["error"]["code"] == "model_not_found" and "gpt-9" in reply["error"]["message"]
    status, reply = await call(server, "GET", "/v1/nothing-here")
    assert status == 404 and "error" in reply
    status, reply = await call(server, "GET", CHAT)
    assert status == 405 and reply["error"]["type"] == "invalid_request_error"
    conn = await Connection.open(server, "POST", COMPLETIONS, raw=b'{"prompt": "', content_length=17 << 20)
    try:
        assert conn.status == 413 and json.loads(await conn.body())["error"]["type"] == "invalid_request_error"
    finally:
        conn.close()
    status, reply = await call(server, "POST", "/detokenize", {"tokens": [1, 99999]})
    assert status == 400 and reply["error"]["param"] == "tokens"


async def test_errors_leave_the_server_serving_and_leak_nothing(server):
    await asyncio.gather(*(call(server, "POST", CHAT, b) for _, b, _ in BAD_CHAT))
    await assert_idle(server)
    assert (await call(server, "POST", CHAT, chat_body()))[0] == 200


def test_no_body_crashes_the_server_or_leaks_cells(server):
    """Random bodies mixing valid and invalid fields: always a 200 or a 4xx in OpenAI's shape, never a 500."""
    scalar = st.one_of(st.none(), st.booleans(), st.integers(-3, 40), st.floats(allow_nan=True),
                       st.text(max_size=8), st.just(""), st.just([]), st.just({}))
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x", 3]),
                                     "content": st.one_of(st.text(max_size=30), scalar)})
    fields = {"model": st.sampled_from(["mock", "other", None, 5]),
              "messages": st.one_of(st.lists(st.one_of(message, scalar), max_size=3), scalar),
              "prompt": st.one_of(st.text(max_size=20), st.lists(st.integers(-5, 400), max_size=5),
                                  st.lists(st.text(max_size=5), max_size=3), scalar),
              "max_tokens": st.one_of(st.integers(-1, 6), scalar), "temperature": scalar, "top_p": scalar,
              "top_k": scalar, "min_p": scalar, "n": st.one_of(st.integers(-1, 3), scalar), "seed": scalar,
              "stop": st.one_of(st.lists(st.text(max_size=3), max_size=3), scalar), "stream": scalar,
              "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": scalar}), scalar),
              "logprobs": scalar, "top_logprobs": scalar, "presence_penalty": scalar, "frequency_penalty": scalar}
    bodies = st.fixed_dictionaries({}, optional=fields)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from([CHAT, COMPLETIONS]), body=bodies)
    def post(path, body):
        body.setdefault("max_tokens", 4)
        post_fuzzed(server + path, body)

    post()
    asyncio.run(assert_idle(server))


# cancellation
async def test_disconnecting_a_stream_aborts_it_and_frees_its_cells(server):
    aborted = metric(server, "llaisys:request_success_total")
    conn = await Connection.open(server, "POST", CHAT, chat_body(max_tokens=CTX - 100, ignore_eos=True,
                                                                 stream=True))
    events = conn.events()
    for _ in range(5):
        await events.__anext__()
    assert metric(server, "llaisys:num_requests_running") == 1
    generated = metric(server, "llaisys:generation_tokens_total")
    conn.close()
    await assert_idle(server)
    assert metric(server, "llaisys:generation_tokens_total") - generated < CTX // 4  # stopped long before the end
    assert metric(server, "llaisys:request_success_total") == aborted + 1


async def test_disconnecting_a_plain_request_aborts_it_and_frees_its_cells(server):
    task = asyncio.ensure_future(call(server, "POST", CHAT, chat_body(max_tokens=CTX - 100, ignore_eos=True)))
    await wait_for(server, "num_requests_running", 1)
    task.cancel()  # the client hangs up before any answer
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_idle(server)


async def test_a_request_timeout_stops_the_request(mock_dir):
    with mock_server(mock_dir, LLAISYS_REQUEST_TIMEOUT="0.5") as url:
        status, reply = await call(url, "POST", CHAT, chat_body(max_tokens=CTX - 100, ignore_eos=True))
        assert status == 504 and "0.5 s" in reply["error"]["message"]
        events = await stream(url, CHAT, chat_body(max_tokens=CTX - 100, ignore_eos=True, stream=True))
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "timeout"
        await assert_idle(url)
        assert (await call(url, "POST", CHAT, chat_body(max_tokens=4)))[0] == 200


async def test_a_full_queue_answers_429(mock_dir):
    with mock_server(mock_dir, LLAISYS_MAX_NUM_SEQS=1, LLAISYS_MAX_NUM_BATCHED_TOKENS=64,
                     LLAISYS_MAX_WAITING=1) as url:
        long = chat_body(max_tokens=CTX - 100, ignore_eos=True, stream=True)
        running = await Connection.open(url, "POST", CHAT, long)
        await wait_for(url, "num_requests_running", 1)
        waiting = await Connection.open(url, "POST", CHAT, long)
        await wait_for(url, "num_requests_waiting", 1)
        status, reply = await call(url, "POST", CHAT, chat_body())
        assert status == 429 and reply["error"]["type"] == "rate_limit_error"
        assert (await call(url, "POST", COMPLETIONS, {"prompt": ["a", "b"]}))[0] == 429
        refused = await Connection.open(url, "POST", CHAT, chat_body(stream=True))  # before the stream starts
        assert refused.status == 429 and json.loads(await refused.body())["error"]["code"] == "queue_full"
        refused.close()
        running.close()
        waiting.close()
        await assert_idle(url)
        assert (await call(url, "POST", CHAT, chat_body()))[0] == 200


# the API key
async def test_the_api_key_guards_v1_only(mock_dir):
    with mock_server(mock_dir, LLAISYS_API_KEY="secret,other") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
            status, reply = await call(url, "GET", "/v1/models", headers=headers)
            assert status == 401 and reply["error"]["type"] == "authentication_error", headers
        status, _ = await call(url, "POST", CHAT, chat_body(), headers={"Authorization": "Bearer wrong"})
        assert status == 401
        for key in ("secret", "other"):
            assert (await call(url, "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"}))[0] == 200
        assert (await call(url, "POST", CHAT, chat_body(model=None),
                           headers={"Authorization": "Bearer secret"}))[0] == 200
        assert (await call(url, "GET", "/health"))[0] == 200
        assert (await call(url, "POST", "/tokenize", {"prompt": "a"}))[0] == 200
        assert metric(url, "llaisys:num_requests_running") == 0


# start-up
def test_health_says_503_with_the_reason_when_the_model_fails_to_load(tmp_path):
    broken = write_mock_model(tmp_path / "broken", vocab_size=10)  # a mock needs vocab_size > 256
    proc, url = start_server(broken)
    try:
        status, body = poll_health(proc, url, until=503)[-1]
        deadline = time.monotonic() + 60
        while body["error"]["code"] == "model_loading":  # loading, then failed
            assert time.monotonic() < deadline
            status, body = get_json(f"{url}/health")
        assert status == 503 and body["error"]["code"] == "model_load_failed" and "vocab_size" in body["error"]["message"]
        status, body = get_json(f"{url}/v1/models")
        assert status == 503 and "vocab_size" in body["error"]["message"]
    finally:
        stop_server(proc)


async def test_llaisys_serve_ends_every_stream_cleanly_on_sigterm(mock_dir):
    proc, url = start_server(mock_dir, cli=True, LLAISYS_SERVED_MODEL_NAME="mock", LLAISYS_CTX=CTX)
    try:
        poll_health(proc, url)
        conn = await Connection.open(url, "POST", CHAT, chat_body(max_tokens=CTX - 100, ignore_eos=True, stream=True))
        events = conn.events()
        for _ in range(3):
            await events.__anext__()
        proc.send_signal(signal.SIGTERM)
        rest = [e async for e in events]
        assert rest[-1] == "[DONE]" and rest[-2]["error"]["code"] == "shutting_down"
        assert await asyncio.to_thread(proc.wait, 30) == 0
    finally:
        stop_server(proc)


def test_real_health_answers_503_until_the_model_is_loaded(default_model):
    proc, url = start_server(default_model)
    try:
        seen = poll_health(proc, url)
        assert seen[0][0] == 503 and seen[0][1]["error"]["code"] == "model_loading"
    finally:
        stop_server(proc)
