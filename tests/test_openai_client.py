"""The official `openai` client against the server on the real default model."""
from __future__ import annotations

import threading

import pytest

from server_process import post_json, running_server

openai = pytest.importorskip("openai")
KEY = "test-key"
QUESTION = [{"role": "user", "content": "Write a Python function that returns the square of a number."}]


@pytest.fixture(scope="module")
def server(default_model):
    with running_server(default_model, LLAISYS_API_KEY=KEY, LLAISYS_SERVED_MODEL_NAME="qwen") as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=300)


def test_real_chat_streams_the_same_greedy_text_as_the_offline_engine(client, default_model):
    reply = client.chat.completions.create(model="qwen", messages=QUESTION, temperature=0, max_tokens=48)
    (choice,) = reply.choices
    assert choice.message.role == "assistant" and "def" in choice.message.content
    assert choice.finish_reason in ("stop", "length") and reply.model == "qwen"
    assert reply.usage.completion_tokens <= 48 and reply.usage.total_tokens == (
        reply.usage.prompt_tokens + reply.usage.completion_tokens)

    chunks = list(client.chat.completions.create(model="qwen", messages=QUESTION, temperature=0, max_tokens=48,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        choice.finish_reason]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (
        reply.usage.prompt_tokens, reply.usage.completion_tokens)
    # The same prompt again: every prompt token but the last came from the prefix cache.
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1

    from llaisys import LLM, SamplingParams

    offline = LLM(str(default_model), n_ctx=1024, max_num_seqs=1).chat(
        QUESTION, SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)[0].outputs[0]
    assert offline.text == choice.message.content


def test_real_completions_and_sampling_fields(client):
    reply = client.completions.create(model="qwen", prompt="def fibonacci(n):", max_tokens=16, temperature=0,
                                      stop=["\n\n"], logprobs=2)
    (choice,) = reply.choices
    assert choice.text and "\n\n" not in choice.text
    assert len(choice.logprobs.tokens) == reply.usage.completion_tokens
    sampled = [client.chat.completions.create(model="qwen", messages=QUESTION, max_tokens=12, temperature=0.9,
                                              top_p=0.9, seed=3, presence_penalty=0.5,
                                              extra_body={"top_k": 40, "min_p": 0.05}).choices[0].message.content
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_real_errors_surface_as_the_clients_exception_types(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="qwen", messages=QUESTION, temperature=5)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="qwen", prompt="hi " * 40000, max_tokens=4)
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert [m.id for m in client.models.list()] == ["qwen"]


def test_real_tokenizing_from_many_threads_while_replies_stream(client, server):
    """/tokenize, /detokenize and chat rendering run in the server's threads while the engine steps
    (a fast tokenizer shared across threads fails with "Already borrowed"): no error, exact round trips."""
    text = "def area(r):\n    return 3.14159 * r * r  # ünïcödé ✓\n" * 30
    errors = []

    def tokenize_loop():
        try:
            for _ in range(15):
                status, body = post_json(f"{server}/tokenize", {"model": "qwen", "prompt": text})
                assert status == 200, body
                status, back = post_json(f"{server}/detokenize", {"model": "qwen", "tokens": body["tokens"]})
                assert status == 200 and back["prompt"] == text, back
                status, _ = post_json(f"{server}/tokenize", {"model": "qwen", "messages": QUESTION})
                assert status == 200
        except Exception as e:  # noqa: BLE001 - any error is the failure being tested for
            errors.append(e)

    def chat_loop():
        try:
            for i in range(2):
                stream = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": f"{i}"}],
                                                        max_tokens=24, stream=True)
                assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=f) for f in (tokenize_loop, tokenize_loop, chat_loop, chat_loop)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
