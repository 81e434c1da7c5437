"""Replicas under Ray Serve (llaisys.server.replicas): one local Ray instance for the module, 2 replicas of
1 thread each serving the mock model; test_real_* serves the default model through them once.

Skipped only when Ray cannot start here (not when it is missing: CI installs the serve extra).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from llaisys.models.mock import write_mock_model
from llaisys.server import ServerConfig

from http_client import Connection, call, stream
from server_process import free_port, running_server

CHAT = "/v1/chat/completions"
CTX = 4096


class RayServe:
    """The module's Ray instance and its Serve application; close() ends both (idempotent)."""

    def __init__(self, mock_dir: Path):
        import ray

        self.temp_dir = tempfile.mkdtemp(prefix="llr", dir="/tmp")  # short: Ray's socket paths must fit
        try:
            ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 << 20, _temp_dir=self.temp_dir,
                     logging_level="WARNING")
        except Exception as e:  # noqa: BLE001 - whatever stops Ray from starting here is a skip reason
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            pytest.skip(f"Ray cannot start on this machine: {type(e).__name__}: {e}")
        self.mock_dir = mock_dir
        self.port = free_port()  # Serve's proxy keeps the port it started on, whatever later deployments ask
        self.url = None
        self._served = None

    def serve(self, config: ServerConfig) -> str:
        """(Re)deploy the application for config: 2 replicas x 1 thread; its base URL."""
        from llaisys.server.replicas import serve_replicas

        self.stop_serving()
        self._served = serve_replicas(config, replicas=2, threads=1, port=self.port)
        self.url = self._served.__enter__()
        return self.url

    def stop_serving(self) -> None:
        if self._served is not None:
            served, self._served = self._served, None
            served.__exit__(None, None, None)

    def close(self) -> None:
        import ray

        self.stop_serving()
        if ray.is_initialized():
            from ray import serve

            serve.shutdown()
            ray.shutdown()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def mock_config(mock_dir: Path) -> ServerConfig:
    return ServerConfig(model=str(mock_dir), served_model_name="mock", n_ctx=CTX, max_num_seqs=8,
                        max_num_batched_tokens=256, max_waiting=32)


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
    return write_mock_model(tmp_path_factory.mktemp("mock-model"))


@pytest.fixture(scope="module")
def ray_serve(mock_dir):
    instance = RayServe(mock_dir)
    try:
        instance.serve(mock_config(mock_dir))
        yield instance
    finally:
        instance.close()


@pytest.fixture
def url(ray_serve):
    if ray_serve.url is None or ray_serve._served is None:
        ray_serve.serve(mock_config(ray_serve.mock_dir))
    return ray_serve.url


def metrics_text(url: str, replica: str | None = None) -> str:
    with urllib.request.urlopen(f"{url}/metrics" + (f"?replica={replica}" if replica else ""), timeout=20) as r:
        return r.read().decode()


def sample(text: str, name: str, labels: str = "") -> float:
    """The sum of a metric's samples whose label text contains `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m and labels in (m.group(1) or ""):
            total, found = total + float(m.group(2)), True
    assert found, f"{name}{{{labels}}} not in the metrics"
    return total


async def replica_ids(url: str) -> list[str]:
    status, body = await call(url, "GET", "/replicas")
    assert status == 200, body
    return [r["id"] for r in body["data"]]


def replica_metric(url: str, replica: str, name: str) -> float:
    return sample(metrics_text(url, replica), f"llaisys:{name}")


async def running_on(url: str) -> str:
    """The replica with a request running (waits for it)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for r in await replica_ids(url):
            if replica_metric(url, r, "num_requests_running") >= 1:
                return r
        await asyncio.sleep(0.05)
    raise AssertionError("no replica is running the request")


async def assert_idle(url: str, replica: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = [replica_metric(url, replica, m) for m in ("num_requests_running", "num_requests_waiting",
                                                           "kv_cache_used_cells")]
        if state == [0, 0, 0]:
            return
        assert time.monotonic() < deadline, f"replica {replica}: running, waiting, KV cells in use: {state}"
        await asyncio.sleep(0.05)


def chat(messages: list[dict], **fields) -> dict:
    return {"model": "mock", "messages": messages, "temperature": 0, "max_tokens": 16, **fields}


def conversation(i: int) -> list[dict]:
    if i % 2:
        return [{"role": "user", "content": f"conversation {i} starts here"}]
    return [{"role": "system", "content": f"system prompt {i}"}, {"role": "user", "content": f"hello {i}"}]


async def test_follow_up_turns_land_on_their_replica(url):
    before = metrics_text(url)
    counts = {o: sample(before, "llaisys:routing_requests_total", f'outcome="{o}"') for o in ("hit", "moved", "new")}
    replicas = await replica_ids(url)
    assert len(replicas) == 2
    served_before = {r: replica_metric(url, r, "request_success_total") for r in replicas}
    conversations, turns = 6, 3
    for i in range(conversations):
        messages = conversation(i)
        user = {"user": f"user-{i}"} if i % 3 == 0 else {}
        for turn in range(turns):
            status, reply = await call(url, "POST", CHAT, chat(messages, **user))
            assert status == 200, reply
            messages = messages + [reply["choices"][0]["message"], {"role": "user", "content": f"turn {turn}"}]
    after = metrics_text(url)
    delta = {o: sample(after, "llaisys:routing_requests_total", f'outcome="{o}"') - counts[o] for o in counts}
    assert delta == {"hit": conversations * (turns - 1), "moved": 0, "new": conversations}
    assert sample(after, "llaisys:routing_hit_rate") > 0
    served = {r: replica_metric(url, r, "request_success_total") - served_before[r] for r in replicas}
    assert sum(served.values()) == conversations * turns
    assert all(n >= turns for n in served.values()), f"one replica took every conversation: {served}"
    # Each follow-up found its conversation's earlier turns in its replica's prefix cache.
    assert all(replica_metric(url, r, "prefix_cache_hits_total") > 0 for r in replicas)


async def test_outputs_match_a_single_server(url, mock_dir):
    bodies = [chat(conversation(i), max_tokens=24, seed=i, temperature=0 if i % 2 else 0.8) for i in range(4)]
    bodies.append({"model": "mock", "prompt": ["abc", "xyz"], "n": 2, "max_tokens": 12, "temperature": 0})
    paths = [CHAT] * 4 + ["/v1/completions"]

    async def answers(base: str) -> list:
        out = []
        for path, body in zip(paths, bodies):
            status, reply = await call(base, "POST", path, body)
            assert status == 200, reply
            out.append([c.get("message", c.get("text")) for c in reply["choices"]])
            events = await stream(base, path, {**body, "stream": True})
            assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1])
            out.append(sorted((ch["index"], ch.get("delta", {}).get("content") or ch.get("text") or "")
                              for e in events[:-1] for ch in e["choices"]))
        return out

    through_replicas = await answers(url)
    with running_server(mock_dir, LLAISYS_CTX=CTX, LLAISYS_SERVED_MODEL_NAME="mock") as single:
        assert await answers(single) == through_replicas


async def test_cancelling_across_the_hop_frees_the_replicas_cells(url):
    conn = await Connection.open(url, "POST", CHAT, chat(conversation(1), user="cancel-me", max_tokens=CTX - 200,
                                                         ignore_eos=True, stream=True))
    events = conn.events()
    for _ in range(5):
        await events.__anext__()
    replica = await running_on(url)
    generated = replica_metric(url, replica, "generation_tokens_total")
    conn.close()
    await assert_idle(url, replica)
    assert replica_metric(url, replica, "generation_tokens_total") - generated < CTX // 4  # stopped long before


async def test_killing_a_replica_mid_stream_ends_it_with_an_error_and_others_go_on(url):
    import ray

    conn = await Connection.open(url, "POST", CHAT, chat(conversation(3), user="victim", max_tokens=CTX - 200,
                                                         ignore_eos=True, stream=True))
    events = conn.events()
    for _ in range(3):
        await events.__anext__()
    victim = await running_on(url)
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim)]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    rest = [e async for e in events]
    conn.close()
    assert rest[-1] == "[DONE]"
    errors = [e for e in rest[:-1] if "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "replica_failed", rest[-3:]
    # Meanwhile new requests succeed (the victim's conversation included), then the replacement serves too.
    for i in range(6):
        status, reply = await call(url, "POST", CHAT, chat(conversation(i), user="victim" if i == 0 else f"after-{i}"))
        assert status == 200, reply
    deadline = time.monotonic() + 60
    while victim in await replica_ids(url) or len(await replica_ids(url)) < 2:
        assert time.monotonic() < deadline, "Ray Serve did not replace the killed replica"
        await asyncio.sleep(0.5)


async def test_a_full_queue_answers_429_before_a_stream_starts(ray_serve):
    """As from a single server: when no replica has room, a stream is refused with a 429, not an event."""
    config = dataclasses.replace(mock_config(ray_serve.mock_dir), max_num_seqs=1, max_waiting=1)
    url = ray_serve.serve(config)
    try:
        long = [await Connection.open(url, "POST", CHAT, chat(conversation(i), max_tokens=CTX - 200, ignore_eos=True,
                                                               stream=True)) for i in range(4)]
        assert [c.status for c in long] == [200] * 4
        replicas = await replica_ids(url)
        deadline = time.monotonic() + 20
        while [replica_metric(url, r, m) for r in replicas for m in ("num_requests_running", "num_requests_waiting")
               ] != [1] * 4:
            assert time.monotonic() < deadline, "the four requests did not fill both replicas"
            await asyncio.sleep(0.05)
        # (a request queued in Serve's router instead would never answer: the wait ends that)
        refused = await asyncio.wait_for(Connection.open(url, "POST", CHAT, chat(conversation(9), stream=True)), 20)
        assert refused.status == 429 and refused.headers["content-type"] == "application/json"
        assert json.loads(await refused.body())["error"]["code"] == "queue_full"
        refused.close()
        status, reply = await call(url, "POST", "/v1/completions", {"model": "mock", "prompt": ["a", "b"]})
        assert status == 429 and reply["error"]["type"] == "rate_limit_error"
        for c in long:
            c.close()
        for r in replicas:
            await assert_idle(url, r)
        assert (await call(url, "POST", CHAT, chat(conversation(9))))[0] == 200
    finally:
        ray_serve.stop_serving()  # the next test serves the module's configuration again


async def test_bad_input_gets_openai_shaped_errors_through_the_ingress(url):
    status, body = await call(url, "POST", CHAT, {"model": "mock", "messages": "not a list"})
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = await call(url, "GET", "/metrics?replica=no-such-replica")
    assert status == 404 and body["error"]["code"] == "replica_not_found"


@pytest.mark.slow
async def test_real_default_model_through_replicas_matches_a_single_server(ray_serve, default_model):
    config = ServerConfig(model=str(default_model), n_ctx=2048, max_num_seqs=4, max_waiting=16)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 24}
    try:
        base = ray_serve.serve(config)
        status, replicated = await call(base, "POST", CHAT, body)
        assert status == 200, replicated
        events = await stream(base, CHAT, {**body, "stream": True})
    finally:
        ray_serve.stop_serving()
    text = "".join(ch["delta"].get("content", "") for e in events[:-1] for ch in e["choices"])
    with running_server(default_model, LLAISYS_CTX=2048, LLAISYS_THREADS=1) as single:
        status, alone = await call(single, "POST", CHAT, body)
    assert text and replicated["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"] == text


def ray_processes(marker: str) -> list[str]:
    """Command lines of live processes that mention marker (this module's Ray session directory)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and int(pid) != os.getpid():
            found.append(cmdline)
    return found


def test_shutdown_leaves_no_ray_process_behind(ray_serve):
    assert ray_processes(ray_serve.temp_dir), "the check would pass vacuously: no Ray process names the session"
    ray_serve.close()
    deadline = time.monotonic() + 30
    while ray_processes(ray_serve.temp_dir):
        assert time.monotonic() < deadline, f"left behind: {ray_processes(ray_serve.temp_dir)[:3]}"
        time.sleep(0.5)
