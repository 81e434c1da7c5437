"""Replicas under Ray Serve: N engines behind one OpenAI API, each conversation kept on its replica.

    from llaisys.server import ServerConfig
    from llaisys.server.replicas import serve_replicas

    with serve_replicas(ServerConfig(model=path), replicas=2, threads=1, port=8000) as url:
        ...  # the same API and chat page as `llaisys serve`, at url

`llaisys serve --replicas N [--address ADDR]` does the same until SIGINT/SIGTERM.

Layout: Ray Serve's HTTP proxy -> the ingress deployment (the Quart app of create_app, over a
RemoteEngine that formats and tokenizes prompts itself) -> deployment handle with the
ConversationRouter -> LlaisysReplica deployments, each owning an AsyncLLM with its own cores.
The proxy hands the ingress bytes, so routing by content happens on the ingress's handle hop.

Routing: a conversation is the request's `user` field, else its system prompt + first user message;
it stays on the replica that served it last (whose prefix cache holds it) unless that replica has
more than `imbalance` requests in flight beyond the least-loaded one, or is full (then it moves to
the least-loaded), or is gone (then it moves, and only it). A request no replica has room for gets
the 429 of the least-loaded replica's engine, as from a single server.
Needs the `serve` extra (`pip install 'llaisys[serve]'`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import collections
import copy
import contextlib
import contextvars
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Optional

import anyio
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from quart import Response, g, request

from ..engine import AsyncLLM, EngineClosedError, EngineOverloadedError, EngineStats, RequestOutput
from ..engine.llm_engine import chat_text, check_ids, prompt_ids
from ..engine.outputs import CompletionOutput, OutputAccumulator, RequestMetrics
from .app import create_app
from .config import ServerConfig
from .errors import APIError
from .metrics import ServerMetrics
from .service import ModelService

log = logging.getLogger(__name__)

APP_NAME = "llaisys"
DEFAULT_IMBALANCE = 4  # requests in flight beyond the least-loaded replica before a conversation moves
MAX_CONVERSATIONS = 100_000  # remembered conversation -> replica entries (least recently used dropped)


# --- routing ---------------------------------------------------------------------------------------

def conversation_key(body: Any) -> Optional[str]:
    """A request's conversation: its `user`, else a hash of its system prompt and first user message
    (chat), else of its prompt's start; None when the body names none."""
    if not isinstance(body, dict):
        return None
    user = body.get("user")
    if isinstance(user, str) and user:
        return f"user:{user}"
    messages = body.get("messages")
    if isinstance(messages, list):
        system = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") in ("system", "developer")]
        first = next((m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"), None)
        seed = json.dumps([system[:1], first], sort_keys=True, default=str)
    elif isinstance(body.get("prompt"), str):
        seed = body["prompt"][:1024]  # a completion's later turns extend its prompt
    else:
        return None
    return "conv:" + hashlib.sha256(seed.encode()).hexdigest()[:32]


class RoutingStats:
    """Whether each conversation's requests reached the replica of its previous one, as seen by the
    ingress (whatever router chose): the figure a prefix cache per replica depends on."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()  # "hit" (its replica), "moved" (another), "new", "unkeyed"
        self.last: collections.OrderedDict[str, str] = collections.OrderedDict()  # conversation -> replica

    def observe(self, key: Optional[str], replica: str) -> None:
        with self.lock:
            if key is None:
                self.counts["unkeyed"] += 1
                return
            before = self.last.get(key)
            self.counts["new" if before is None else "hit" if before == replica else "moved"] += 1
            self.last[key] = replica
            self.last.move_to_end(key)
            if len(self.last) > MAX_CONVERSATIONS:
                self.last.popitem(last=False)

    @property
    def hit_rate(self) -> float:
        """Follow-up requests that reached the replica of their conversation's last request."""
        with self.lock:
            follow_ups = self.counts["hit"] + self.counts["moved"]
            return self.counts["hit"] / follow_ups if follow_ups else 0.0

    def collect(self):
        counter = CounterMetricFamily("llaisys:routing_requests", "Requests routed to replicas, by outcome: hit "
                                      "(the conversation's replica), moved (another), new, unkeyed.",
                                      labels=["outcome"])
        with self.lock:
            for outcome in ("hit", "moved", "new", "unkeyed"):
                counter.add_metric([outcome], self.counts[outcome])
        yield counter
        gauge = GaugeMetricFamily("llaisys:routing_hit_rate", "Follow-up requests routed to their conversation's "
                                  "replica / all follow-ups, since start.")
        gauge.add_metric([], self.hit_rate)
        yield gauge


ROUTING = RoutingStats()


def replica_ids() -> list[str]:
    """The replicas this process's routers know, by unique id."""
    # Imported here, by name: Serve may ship this module's functions by value, with copies of its globals.
    from llaisys.server.ray_router import ROUTERS

    return sorted({rid.unique_id for router in ROUTERS for rid in router.curr_replicas})


# --- the replica -----------------------------------------------------------------------------------

class LlaisysReplica:
    """One engine. The model loads in the constructor, so Serve routes nothing here before it is ready."""

    def __init__(self, config: ServerConfig):
        from ray import serve

        self.replica_id = serve.get_replica_context().replica_id.unique_id
        model = config.model
        if model is None:
            from ..models.default_model import fetch_gguf

            model = fetch_gguf()
        self.llm = AsyncLLM.from_engine_args(config.engine_args(Path(model)))
        self.metrics = ServerMetrics(config.served_model_name or Path(model).resolve().name, self.llm.stats)
        self._started: Optional[asyncio.Event] = None
        log.info("replica %s: %d KV cells, %d threads", self.replica_id, self.llm.stats().kv_capacity,
                 config.n_threads)

    async def _engine(self) -> AsyncLLM:
        """The engine, its loop started on first use (inside the replica's event loop)."""
        if self._started is None:
            self._started = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(self._started))
        await self._started.wait()
        return self.llm

    async def _run(self, started: asyncio.Event) -> None:
        async with self.llm:
            started.set()
            await asyncio.Event().wait()  # until the replica's actor ends

    async def info(self, replica: Optional[str] = None) -> dict[str, Any]:
        llm = await self._engine()
        return {"replica": self.replica_id, "max_model_len": llm.max_model_len, "vocab_size": llm.vocab_size,
                "max_num_seqs": llm.max_num_seqs, "generation_defaults": llm.generation_defaults}

    async def metrics_text(self, replica: Optional[str] = None) -> str:
        await self._engine()
        return self.metrics.render().decode()

    async def engine_stats(self, replica: Optional[str] = None) -> EngineStats:
        return (await self._engine()).stats()

    async def generate(self, prompt: dict, params, request_id: str, route_key: Optional[str] = None
                       ) -> AsyncIterator[Any]:
        """First (replica id, the request's output before it ran), then lists of increments: all
        that arrived while the previous message was in transit, so a slow hop carries bigger batches.
        Cancelling the call (the client left) cancels the request."""
        llm = await self._engine()
        stream = llm.stream(prompt, params, request_id)
        async with stream:
            # A snapshot: Serve may serialize a yielded value after the generator has moved on, and
            # the stream's output object keeps accumulating (the first token would arrive twice).
            yield self.replica_id, copy.deepcopy(stream.output())
            async for delta in stream:
                yield [delta, *stream.take_ready()]


# --- the ingress's engine --------------------------------------------------------------------------

def replica_error(e: BaseException) -> APIError:
    """A replica's failure as the API error a client sees."""
    if isinstance(e, EngineOverloadedError):
        return APIError(429, str(e), code="queue_full")
    if isinstance(e, EngineClosedError):
        return APIError(503, "the server is shutting down", code="shutting_down")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(503, f"the replica serving this request failed ({type(e).__name__}); retry the request",
                    code="replica_failed")


class RemoteStream:
    """A request running on a replica, read like AsyncLLM's RequestStream (see app.watched)."""

    def __init__(self, owner: "RemoteEngine", generator, initial: RequestOutput, route_key: Optional[str]):
        self._owner = owner
        self._route_key = route_key
        self._generator = generator
        self.request_id = initial.request_id
        self._output = initial  # replaced by the replica's own initial output, then accumulated
        self._ready: collections.deque[RequestOutput] = collections.deque()
        self._started = False
        self.replica: Optional[str] = None

    @property
    def finished(self) -> bool:
        return self._output.finished

    def output(self) -> RequestOutput:
        return self._output

    def __aiter__(self) -> "RemoteStream":
        return self

    async def _receive(self) -> Any:
        """The replica's next message; its failure as the API error a client sees."""
        try:
            return await self._generator.__anext__()
        except StopAsyncIteration:
            raise replica_error(RuntimeError("the replica's stream ended early")) from None
        except asyncio.CancelledError:
            self.cancel()
            raise
        except Exception as e:
            log.warning("request %s on replica %s: %s: %s", self.request_id, self.replica, type(e).__name__, e)
            raise replica_error(e) from e

    async def admitted(self) -> None:
        """Once a replica has taken the request (its first message: replica id and initial output);
        APIError 429 when its queue is full, as a single server answers before a stream starts."""
        if not self._started:
            self.replica, self._output = await self._receive()
            ROUTING.observe(self._route_key, self.replica)
            self._accumulator = OutputAccumulator(self._output)
            self._started = True

    async def __anext__(self) -> RequestOutput:
        await self.admitted()
        while not self._ready:
            if self.finished:
                raise StopAsyncIteration
            self._ready.extend(await self._receive())
        delta = self._ready.popleft()
        self._accumulator.add(delta)
        return delta

    def cancel(self) -> None:
        if not self.finished:
            self._generator.cancel()
        self._owner._streams.pop(self.request_id, None)

    async def aclose(self) -> None:
        self.cancel()


class RemoteEngine:
    """The AsyncLLM interface the app uses, over replicas: prompts are formatted and tokenized here
    (a tokenizer without weights), requests run on the replica the router picks."""

    def __init__(self, handle, config: ServerConfig, info: dict[str, Any]):
        from ..models import load_text_adapter

        model = config.model
        if model is None:
            from ..models.default_model import fetch_gguf

            model = fetch_gguf()
        self._handle = handle.options(stream=True)
        self._text = load_text_adapter(model)
        self._text_lock = threading.Lock()
        self.max_model_len = info["max_model_len"]
        self.vocab_size = info["vocab_size"]
        self.max_num_seqs = info["max_num_seqs"]
        self.generation_defaults = info["generation_defaults"]
        self.special_tokens = dict(self._text.special_tokens)
        self._streams: dict[str, RemoteStream] = {}

    def stream(self, prompt: dict, params, request_id: str) -> RemoteStream:
        key = g.get("llaisys_route_key")
        generator = contextvars.copy_context().run(self._call, prompt, params, request_id, key)
        initial = RequestOutput(request_id, prompt.get("prompt"), prompt["prompt_token_ids"], [CompletionOutput(i, "", []) for i in range(params.n)], False,
                                "queued", RequestMetrics(arrival_time=time.time()))
        stream = self._streams[request_id] = RemoteStream(self, generator, initial, key)
        return stream

    def _call(self, prompt: dict, params, request_id: str, key: Optional[str]):
        """The replica call, under a Serve request context of its own (run in a copied context)."""
        from ray.serve import context

        # Serve's router pairs a routed call with its pending request by the proxy's request id, which
        # all calls of one HTTP request share: two prompts in one request would hang the second.
        current = context._get_serve_request_context()
        context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=request_id))
        return self._handle.generate.remote(prompt, params, request_id, route_key=key)

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.cancel()

    def stats(self) -> None:
        return None  # the engines' figures are the replicas' (/metrics?replica=ID)

    def tokenize(self, prompt) -> tuple[Optional[str], list[int]]:
        with self._text_lock:
            return prompt_ids(prompt, self._text.encode, self.vocab_size)

    def detokenize(self, ids: list[int]) -> str:
        with self._text_lock:
            return self._text.decode(check_ids(ids, self.vocab_size))

    def chat_prompt(self, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        with self._text_lock:
            return chat_text(messages, lambda m: self._text.chat_text(m, tools=tools))

    def close(self) -> None:
        for stream in list(self._streams.values()):
            stream.cancel()


class RemoteService(ModelService):
    """ModelService for the ingress: ready once a replica answers and the tokenizer has loaded."""

    def __init__(self, config: ServerConfig, handle):
        super().__init__(config)
        self.handle = handle

    async def _run(self) -> None:
        try:
            info = await self.handle.info.remote()
            engine = await anyio.to_thread.run_sync(RemoteEngine, self.handle, self.config, info)
        except Exception as e:
            log.exception("reaching the replicas failed")
            self.load_error = str(e) or type(e).__name__
            return
        self.defaults = engine.generation_defaults
        self.engine = engine
        log.info("serving %s through replicas (max model length %d)", self.model_name, engine.max_model_len)
        try:
            await self._stop.wait()
        finally:
            self.engine = None
            engine.close()


def ingress_app(config: ServerConfig, handle):
    """create_app over a RemoteService, plus the routing key of each request, /replicas and
    /metrics?replica=ID (that replica's own metrics; without it: the ingress's, routing included)."""
    service = RemoteService(config, handle)
    app = create_app(config, service)
    app.extensions["llaisys_metrics"].registry.register(ROUTING)

    @app.before_request
    async def route_and_select() -> Optional[Response]:
        if request.method == "POST":
            body = await request.get_json(force=True, silent=True)
            g.llaisys_route_key = conversation_key(body)
            return None
        replica = request.args.get("replica")
        if request.path == "/metrics" and replica is not None:
            if replica not in replica_ids():
                raise APIError(404, f"no replica {replica!r}; known: {', '.join(replica_ids()) or 'none yet'}",
                               code="replica_not_found")
            text = await handle.metrics_text.remote(replica=replica)
            return Response(text, content_type=CONTENT_TYPE_LATEST)
        return None

    @app.get("/replicas")
    async def replicas():
        service.ready()
        return {"object": "list", "data": [{"id": r} for r in replica_ids()], "routing_hit_rate": ROUTING.hit_rate}

    return app


# --- deployment ------------------------------------------------------------------------------------

class LlaisysIngress:
    """The ingress deployment's class: the app is built in the replica (late-bound `serve.ingress()`)."""

    def __init__(self, config: ServerConfig, handle):
        self.config = config
        self.handle = handle

    def __serve_build_asgi_app__(self):
        return ingress_app(self.config, self.handle)


def build_application(config: ServerConfig, replicas: int, threads: int, router: str = "conversation",
                      imbalance: int = DEFAULT_IMBALANCE):
    """The Serve application: the ingress over `replicas` engines of `threads` threads (and as many
    CPUs) each. router: "conversation" (ConversationRouter) or "pow2" (Ray's default, for comparison)."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    if replicas < 1 or threads < 1:
        raise ValueError(f"replicas and threads must be at least 1, got {replicas} and {threads}")
    if router not in ("conversation", "pow2"):
        raise ValueError(f"router must be 'conversation' or 'pow2', got {router!r}")
    replica_config = dataclasses.replace(config, n_threads=threads)
    capacity = config.max_num_seqs + config.max_waiting  # requests a replica's engine admits at once
    routing = RequestRouterConfig(request_router_class="llaisys.server.ray_router.ConversationRouter",
                                  request_router_kwargs={"imbalance": imbalance, "capacity": capacity}) \
        if router == "conversation" else RequestRouterConfig()
    # Twice the capacity: Serve hands the excess on rather than queueing it, and the replica's engine
    # refuses it (a 429 before the answer starts, as a single server gives).
    replica = serve.deployment(LlaisysReplica, name="LlaisysReplica", num_replicas=replicas,
                               ray_actor_options={"num_cpus": threads}, max_ongoing_requests=2 * capacity,
                               request_router_config=routing, health_check_period_s=2,
                               graceful_shutdown_timeout_s=5)
    ingress = serve.deployment(serve.ingress()(LlaisysIngress), name="LlaisysIngress",
                               ray_actor_options={"num_cpus": 0}, max_ongoing_requests=2 * replicas * capacity)
    return ingress.bind(replica_config, replica.bind(replica_config))


@contextlib.contextmanager
def serve_replicas(config: ServerConfig, replicas: int = 2, threads: Optional[int] = None, host: str = "127.0.0.1",
                   port: int = 8000, address: Optional[str] = None, router: str = "conversation",
                   imbalance: int = DEFAULT_IMBALANCE, ray_temp_dir: Optional[str] = None,
                   ready_timeout: float = 300.0) -> Iterator[str]:
    """Serve the API through `replicas` replicas until the block ends; yields the base URL.

    Connects to the Ray cluster at `address`, else uses the Ray this process already started, else
    starts a local one with replicas x threads CPUs (and stops it, and only it, at the end).
    threads: per replica; default config.n_threads, else the cores shared out.
    """
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise RuntimeError(f"replicas need Ray Serve: pip install 'llaisys[serve]' ({e})") from e

    threads = threads or config.n_threads or max(1, (os.cpu_count() or 1) // replicas)
    started = not ray.is_initialized()
    if started:
        if address is None and replicas * threads > (os.cpu_count() or 1):
            log.warning("%d replicas x %d threads oversubscribe the %d cores", replicas, threads, os.cpu_count())
        log.info("starting %s", f"a connection to Ray at {address}" if address else "a local Ray instance")
        # "local": a Ray of our own even where someone's `ray start` left a cluster to auto-join.
        ray.init(address=address or "local", num_cpus=None if address else replicas * threads,
                 include_dashboard=False, object_store_memory=None if address else 128 << 20, _temp_dir=ray_temp_dir,
                 logging_level=logging.WARNING, log_to_driver=True)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(config, replicas, threads, router, imbalance), name=APP_NAME, route_prefix="/")
        url = f"http://{host}:{port}"
        _wait_ready(url, ready_timeout)
        log.info("%d replicas x %d threads serving at %s/", replicas, threads, url)
        yield url
    finally:
        if started:
            serve.shutdown()
            ray.shutdown()
        else:
            serve.delete(APP_NAME)


def _wait_ready(url: str, timeout: float) -> None:
    """Until the ingress's /health answers 200 (its engine reached a replica)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError) as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the replicas did not become ready at {url} within {timeout:g} s: {e}") from e
        time.sleep(0.2)


def run_replicas(config: ServerConfig, replicas: int, threads: Optional[int], host: str, port: int,
                 address: Optional[str], router: Optional[str] = None) -> None:
    """`llaisys serve --replicas N`: serve until SIGINT or SIGTERM."""
    import signal

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with serve_replicas(config, replicas, threads, host, port, address, router or "conversation") as url:
        log.info("chat page and API at %s/", url)
        stop.wait()
        log.info("shutting down the replicas")
