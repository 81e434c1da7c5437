"""The Quart app: OpenAI-compatible routes over the async engine, /health, /metrics and the chat page.

Routes only translate protocol: request JSON -> protocol.parse_* -> AsyncLLM.stream -> responses.
A client that disconnects cancels its handler task, which aborts its engine requests.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Optional

import anyio
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Quart, Response, request, send_from_directory
from werkzeug.exceptions import HTTPException

from ..engine import AsyncLLM, EngineClosedError, EngineOverloadedError, RequestOutput
from ..engine.async_llm import RequestStream
from .config import ServerConfig
from .cors import Cors
from .errors import APIError, bad_request
from .fim import FimUnsupportedError, Infill, infill_ids
from .metrics import RequestTimer, ServerMetrics
from .native import NativeBuilder, parse_infill, parse_native_completion
from .protocol import (GenerationRequest, check_body, check_model, field, parse_chat, parse_completion,
                       parse_token_ids)
from .responses import ResponseBuilder
from .responses_api import ResponsesBuilder, chat_body
from .service import ModelService

log = logging.getLogger(__name__)
request_log = logging.getLogger("llaisys.server.requests")  # one line per engine request

# Twice the longest Qwen2 token (128 characters): a prompt longer than this many characters per
# context token cannot fit, and is refused without spending seconds tokenizing it.
MAX_CHARS_PER_TOKEN = 256

# The page loads and talks only to its own origin, and no other site may frame it.
PAGE_POLICY = ("default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'none'; "
               "frame-ancestors 'none'")


def webui_dir() -> Path:
    """The chat page's files: packaged next to the code in a wheel, at the repository root otherwise."""
    packaged = Path(__file__).resolve().parents[1] / "webui"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "webui"


def create_app(config: Optional[ServerConfig] = None, service: Optional[ModelService] = None) -> Quart:
    """The server app; config defaults to ServerConfig.from_env(). The model loads when serving starts.

    service: what runs the engine, default a ModelService of config; Ray Serve's ingress passes one
    whose engine forwards to replicas (llaisys.server.replicas).
    """
    config = config or ServerConfig.from_env()
    service = service or ModelService(config)
    metrics = ServerMetrics(service.model_name, lambda: service.engine.stats() if service.engine else None)
    static = webui_dir()
    cors = Cors(config.cors_origin_list)
    started = int(time.time())  # the models' `created`: when this server started
    tokenizing = anyio.CapacityLimiter(1)  # prompts are tokenized off the event loop, one at a time
    app = Quart(__name__, static_folder=None)
    app.config["RESPONSE_TIMEOUT"] = None  # streams may run for minutes
    app.config["SEND_FILE_MAX_AGE_DEFAULT"] = None  # no Expires: the page's files are revalidated by ETag
    app.extensions["llaisys"] = service  # for a host that ends requests before its connections (llaisys serve)
    app.extensions["llaisys_metrics"] = metrics  # for a host that adds collectors (the replicas' ingress)

    @app.before_serving
    async def start_model() -> None:
        await service.start()

    @app.after_serving
    async def stop_model() -> None:
        await service.stop()

    @app.before_request
    async def answer_preflight() -> Optional[Response]:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        headers = cors.preflight(origin, request.headers.get("Access-Control-Request-Headers", "")) \
            if cors.allows(origin) else None
        return Response("", status=204 if headers else 403, headers=headers or {})

    @app.before_request
    async def check_api_key() -> Optional[Response]:
        keys = config.api_keys
        if not keys or not request.path.startswith("/v1") or request.method == "OPTIONS":
            return None
        given = request.headers.get("Authorization", "")
        token = given[7:].strip() if given[:7].lower() == "bearer " else ""
        if not any(hmac.compare_digest(token.encode(), k.encode()) for k in keys):
            message = "a valid API key is required: send 'Authorization: Bearer <key>'" if not token else \
                "the API key is not valid"
            return error_response(APIError(401, message, code="invalid_api_key"))
        return None

    @app.after_request
    async def count_response(response: Response) -> Response:
        origin = request.headers.get("Origin")
        if cors.allows(origin) and request.method != "OPTIONS":
            response.headers.update(cors.headers(origin))
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.http_requests.labels(request.method, route, str(response.status_code)).inc()
        return response

    @app.errorhandler(APIError)
    async def api_error(e: APIError) -> Response:
        return error_response(e)

    @app.errorhandler(HTTPException)
    async def http_error(e: HTTPException) -> Response:
        return error_response(APIError(e.code or 500, f"{e.name}: {e.description}"))

    @app.errorhandler(Exception)
    async def internal_error(e: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(APIError(500, f"internal error: {type(e).__name__}: {e}"))

    # The page's files get one route each, so that any other path is a 404 and a GET on an API path a 405.
    for path in sorted(static.glob("*.*")):
        app.add_url_rule("/" if path.name == "index.html" else f"/{path.name}", f"webui:{path.name}",
                         _static_view(static, path.name))

    @app.get("/health")
    async def health():
        service.ready()
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), content_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        engine = service.ready()
        return {"object": "list", "data": [{"id": service.model_name, "object": "model", "created": started,
                                            "owned_by": "llaisys", "max_model_len": engine.max_model_len}]}

    async def model_call() -> tuple[AsyncLLM, dict[str, Any]]:
        """The running engine and the checked JSON body of a call that names (or defaults) the model."""
        engine = service.ready()
        body = await json_body()
        check_model(body, service.model_name)
        return engine, body

    @app.post("/v1/chat/completions")
    async def chat_completions():
        engine, body = await model_call()
        return await generate(engine, parse_chat(body, service.defaults, lambda m, t: chat_prompt(engine, m, t)),
                              chat=True)

    @app.post("/v1/completions")
    async def completions():
        engine, body = await model_call()
        return await generate(engine, parse_completion(body, service.defaults), chat=False)

    @app.post("/v1/responses")
    async def responses():
        engine, body = await model_call()
        chat = chat_body(body)
        gen = parse_chat(chat, service.defaults, lambda m, t: chat_prompt(engine, m, t))
        builder = ResponseBuilder(True, service.model_name, 1, None, False, gen.tools)
        return await run(engine, gen, ResponsesBuilder(builder, body), "input")

    @app.post("/completion")
    async def native_completion():
        engine, body = await model_call()
        gen = parse_native_completion(body, service.defaults)
        return await run(engine, gen, NativeBuilder(service.model_name, f"cmpl-{uuid.uuid4().hex}"), "prompt")

    @app.post("/infill")
    async def infill():
        engine, body = await model_call()
        gen = parse_infill(body, service.defaults)
        return await run(engine, gen, NativeBuilder(service.model_name, f"cmpl-{uuid.uuid4().hex}"), "input_prefix")

    @app.post("/tokenize")
    async def tokenize():
        engine, body = await model_call()
        if "messages" in body:
            text = parse_chat(body, service.defaults, lambda m, t: chat_prompt(engine, m, t)).prompts[0]["prompt"]
        else:
            text = field(body, "prompt", str)
            if not text:
                raise bad_request("'prompt' (a non-empty string) or 'messages' is required", param="prompt")
        _, ids = await tokenized(engine, text, "prompt")
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize():
        engine, body = await model_call()
        try:
            ids = parse_token_ids(body)
            return {"prompt": await anyio.to_thread.run_sync(engine.detokenize, ids, limiter=tokenizing)}
        except ValueError as e:
            raise bad_request(str(e), param="tokens")

    async def generate(engine: AsyncLLM, gen: GenerationRequest, chat: bool):
        builder = ResponseBuilder(chat, service.model_name, gen.params.n, gen.top_logprobs, gen.include_usage, gen.tools)
        return await run(engine, gen, builder, "messages" if chat else "prompt")

    async def run(engine: AsyncLLM, gen: GenerationRequest, builder, prompt_param: str):
        """Tokenize, check, submit and answer (whole, or as server-sent events) through the builder."""
        beyond = [t for t in gen.params.logit_bias if t >= engine.vocab_size]
        if beyond:
            raise bad_request(f"'logit_bias' names token {beyond[0]}, outside the vocabulary [0, {engine.vocab_size})",
                              param="logit_bias")
        if gen.params.n > engine.max_num_seqs:
            raise bad_request(f"'n' ({gen.params.n}) exceeds the {engine.max_num_seqs} sequences this "
                              f"server runs at once", param="n")
        if gen.infill is not None:
            prompts = [await infill_prompt(engine, gen.infill, gen.params.max_tokens, prompt_param)]
        else:
            prompts = [await tokenized(engine, p, prompt_param) for p in gen.prompts]
        for _, ids in prompts:
            check_length(len(ids), gen.params.max_tokens, engine.max_model_len, prompt_param)
        streams = await submit(engine, gen, prompts, builder.id)
        if gen.stream:
            return Response(sse_events(builder, streams), content_type="text/event-stream",
                            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        async for _ in watched(streams, config.request_timeout, metrics):
            pass
        return builder.response([s.output() for s in streams])

    async def tokenized(engine: AsyncLLM, prompt, param: str) -> tuple[Optional[str], list[int]]:
        """A prompt's text and ids, tokenized in a worker thread (one at a time) so that a long prompt
        never stalls the event loop and the streams it serves."""
        text = prompt.get("prompt") if isinstance(prompt, dict) else prompt
        limit = MAX_CHARS_PER_TOKEN * engine.max_model_len
        if isinstance(text, str) and len(text) > limit:
            raise bad_request(f"the prompt has {len(text)} characters, more than the {engine.max_model_len}-"
                              f"token context could hold ({limit})", param=param)
        try:
            return await anyio.to_thread.run_sync(engine.tokenize, prompt, limiter=tokenizing)
        except ValueError as e:
            raise bad_request(str(e), param=param)

    async def infill_prompt(engine: AsyncLLM, fill: Infill, max_tokens: Optional[int],
                            param: str) -> tuple[Optional[str], list[int]]:
        """A fill-in-the-middle prompt's ids, cut to leave max_tokens (a quarter of the context when
        unbounded) for the middle; 400 for a model without FIM tokens."""
        texts = [fill.prefix, fill.suffix, fill.prompt, *(f"{n}{t}" for n, t in fill.extra)]
        limit = MAX_CHARS_PER_TOKEN * engine.max_model_len
        if sum(map(len, texts)) > limit:
            raise bad_request(f"the infill prompt has more than the {limit} characters the {engine.max_model_len}-"
                              f"token context could hold", param=param)
        room = engine.max_model_len - (max_tokens or engine.max_model_len // 4)
        try:
            ids = await anyio.to_thread.run_sync(infill_ids, fill, engine.special_tokens,
                                                 lambda text: engine.tokenize(text)[1], room, limiter=tokenizing)
        except FimUnsupportedError as e:
            raise bad_request(str(e), param=param)
        return None, ids

    async def submit(engine: AsyncLLM, gen: GenerationRequest, prompts: list[tuple[Optional[str], list[int]]],
                     call_id: str) -> list[RequestStream]:
        """One engine request per tokenized prompt, each admitted before the answer starts (so that a
        full queue is a 429 for streams too); all or none (a refused one cancels those already submitted)."""
        streams: list[RequestStream] = []
        try:
            for i, (text, ids) in enumerate(prompts):
                streams.append(engine.stream({"prompt": text, "prompt_token_ids": ids}, gen.params,
                                             request_id=f"{call_id}-{i}"))
            for s in streams:
                await s.admitted()
        except BaseException as e:
            for s in streams:
                engine.abort(s.request_id)
            if isinstance(e, EngineOverloadedError):
                raise APIError(429, str(e), code="queue_full")
            if isinstance(e, EngineClosedError):
                raise APIError(503, "the server is shutting down", code="shutting_down")
            raise
        return streams

    async def sse_events(builder, streams: list[RequestStream]) -> AsyncIterator[bytes]:
        for event in builder.stream_start(len(streams)):
            yield sse(event)
        try:
            async for i, delta in watched(streams, config.request_timeout, metrics):
                for event in builder.stream_delta(i, delta):
                    yield sse(event)
            for event in builder.stream_end([s.output() for s in streams]):
                yield sse(event)
        except APIError as e:  # the status line is long gone: the error travels as an event
            yield sse(e.body())
        if builder.done_marker:
            yield b"data: [DONE]\n\n"

    return app


async def watched(streams: list[RequestStream], timeout: float, metrics: ServerMetrics
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, increment) from all streams as they come, with metrics observed.

    Raises APIError for a failed request (500) or when the call outlives `timeout` seconds (504,
    0 = never); leaving early (error, cancellation, disconnect) aborts every request still running.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout else None
    timers = [RequestTimer(metrics) for _ in streams]
    pending = {asyncio.ensure_future(s.__anext__()): i for i, s in enumerate(streams)}
    outcome = "abandoned by the client"
    try:
        while pending:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            done, _ = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if not done:
                raise APIError(504, f"the request took longer than the server's limit of {timeout:g} s and was "
                               f"stopped", code="timeout")
            for task in sorted(done, key=pending.get):
                i = pending.pop(task)
                try:
                    delta = task.result()
                except StopAsyncIteration:
                    continue
                timers[i].observe(delta)
                if delta.state == "failed":
                    raise APIError(500, delta.error or "the request failed", code="request_failed")
                if delta.state == "cancelled":
                    raise APIError(503, "the request was cancelled: the server is shutting down",
                                   code="shutting_down")
                pending[asyncio.ensure_future(streams[i].__anext__())] = i
                yield i, delta
        outcome = "finished"
    except APIError as e:
        outcome = f"ended with {e.status} ({e.code})"
        raise
    finally:
        for task in pending:
            task.cancel()
        for s in streams:
            await s.aclose()
            out = s.output()
            request_log.info("request %s %s: %d prompt + %d generated tokens in %.2f s", s.request_id, outcome,
                             len(out.prompt_token_ids), out.metrics.num_generated_tokens,
                             time.time() - out.metrics.arrival_time)


def _static_view(folder: Path, name: str):
    async def view():
        response = await send_from_directory(folder, name)
        # Revalidate every time (ETag), so an upgraded server never mixes old and new page files.
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = PAGE_POLICY
        return response
    return view


def check_length(prompt_tokens: int, max_tokens: Optional[int], max_model_len: int, prompt_param: str) -> None:
    if prompt_tokens >= max_model_len or (max_tokens is not None and prompt_tokens + max_tokens > max_model_len):
        raise bad_request(f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                          f"{prompt_tokens + (max_tokens or 1)} tokens ({prompt_tokens} in the prompt, "
                          f"{max_tokens or 1} for the completion). Please reduce the prompt or max_tokens.",
                          param="max_tokens" if prompt_tokens < max_model_len else prompt_param)


def chat_prompt(engine: AsyncLLM, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]]) -> str:
    try:
        return engine.chat_prompt(messages, tools)
    except TemplateError as e:
        raise bad_request(f"the chat template rejected the messages: {e}", param="messages")


async def json_body() -> dict[str, Any]:
    raw = await request.get_data()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}")
    return check_body(body)


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def error_response(e: APIError) -> Response:
    return Response(json.dumps(e.body()), status=e.status, content_type="application/json")
