"""A real llaisys server for online tests: hypercorn in a child process on 127.0.0.1."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

STARTUP_TIMEOUT = 300.0  # seconds; the real model loads in a few seconds, a cold editable build takes longer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10.0) -> tuple[int, dict]:
    """GET url; (status, parsed JSON body) for success and HTTP errors alike."""
    return _json_exchange(urllib.request.Request(url), timeout)


def post_json(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    """POST a JSON body to url; (status, parsed JSON body) for success and HTTP errors alike."""
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return _json_exchange(request, timeout)


def post_fuzzed(url: str, body: dict, timeout: float = 60.0) -> None:
    """POST a (fuzzed) JSON body: the answer is a 200 or a 400/404 in OpenAI's error shape, never a 500;
    a 200 stream ends with [DONE] and carries no error event."""
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    assert status in (200, 400, 404), (status, text)
    if status != 200:
        assert set(json.loads(text)["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert text.endswith("data: [DONE]\n\n") and '"error"' not in text


def _json_exchange(request: urllib.request.Request, timeout: float) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def metric(base_url: str, name: str) -> float:
    """The value of one unlabelled sample in /metrics (summed over its labels otherwise)."""
    with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and line[len(name):len(name) + 1] in (" ", "{")]
    if not values:
        raise KeyError(f"metric {name} not in /metrics")
    return sum(values)


def start_server(model_dir: str | Path, cli: bool = False, **env: str) -> tuple[subprocess.Popen, str]:
    """Launch `hypercorn llaisys.app:app` (or with cli, `llaisys serve`) serving model_dir on a free port;
    returns at once (process, base URL).

    Extra keyword arguments are environment variables for the server (LLAISYS_API_KEY=..., ...).
    The server's output goes to this process's stderr, so pytest shows it for a failing test.
    """
    port = free_port()
    child_env = {**os.environ, "LLAISYS_MODEL": str(model_dir), **{k: str(v) for k, v in env.items()}}
    command = (["-m", "llaisys.cli", "serve", "--port", str(port)] if cli else
               ["-m", "hypercorn", "llaisys.app:app", "--bind", f"127.0.0.1:{port}"])
    proc = subprocess.Popen([sys.executable, *command], env=child_env, stdin=subprocess.DEVNULL)
    return proc, f"http://127.0.0.1:{port}"


def poll_health(proc: subprocess.Popen, base_url: str, until: int = 200) -> list[tuple[int, dict]]:
    """Every /health answer (status, body) until one has status `until`; the port may not be open at first."""
    seen: list[tuple[int, dict]] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not seen or seen[-1][0] != until:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before /health said {until}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"/health did not say {until} within {STARTUP_TIMEOUT:.0f} s (last: {seen[-1:]})")
        try:
            seen.append(get_json(f"{base_url}/health", timeout=2))
        except (OSError, ValueError):
            time.sleep(0.05)
    return seen


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def running_server(model_dir: str | Path, **env: str) -> Iterator[str]:
    """A server for model_dir (see start_server); yields its base URL once /health says 200."""
    proc, base_url = start_server(model_dir, **env)
    try:
        poll_health(proc, base_url)
        yield base_url
    finally:
        stop_server(proc)
