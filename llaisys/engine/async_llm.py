"""AsyncLLM: the engine behind an anyio event loop, for servers and concurrent callers.

One background task runs engine steps while requests wait; each blocking step runs in a worker
thread so the event loop stays responsive. Submissions and aborts are queued by the event loop
and applied between steps, so the engine itself is only ever touched by one thread at a time.
Callers get copies: streams rebuild each request's output from its increments, and the client
methods (tokenize, detokenize, chat_prompt, the limits) use a tokenizer of their own behind a
lock, so a server may call them from any thread while the engine steps.

    async with AsyncLLM.from_engine_args(EngineArgs(model=path)) as engine:
        final = await engine.generate("Hello", SamplingParams(max_tokens=32))
        async for delta in engine.stream("Hi", SamplingParams(max_tokens=32)):
            print(delta.outputs[0].text, end="")
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Optional

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from .config import EngineArgs
from .errors import EngineClosedError, EngineOverloadedError, RequestFailedError
from .llm_engine import EngineStats, LLMEngine, PromptType, chat_text, check_ids, prompt_ids
from .outputs import OutputAccumulator, RequestOutput
from .request import Request, RequestState
from .sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncLLM:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.max_waiting = engine.args.max_waiting
        self._text = engine.adapter.with_own_tokenizer()  # fast tokenizers must not be shared across threads
        self._text_lock = threading.Lock()
        self._pending: list[Request] = []  # submitted, not yet handed to the engine
        self._aborts: list[str] = []
        self._streams: dict[str, MemoryObjectSendStream[RequestOutput]] = {}
        self._wake = anyio.Event()
        self._task_group: Optional[anyio.abc.TaskGroup] = None
        self._stats = engine.stats()
        self._generation_defaults = engine.adapter.generation_defaults
        self._special_tokens = dict(engine.special_tokens)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(LLMEngine.from_engine_args(args))

    # lifecycle
    async def __aenter__(self) -> "AsyncLLM":
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._task_group.start_soon(self._loop, name="llaisys engine loop")
        return self

    async def __aexit__(self, *exc) -> Optional[bool]:
        task_group, self._task_group = self._task_group, None
        if task_group is None:
            raise EngineClosedError("the engine is not running")
        task_group.cancel_scope.cancel()
        try:
            return await task_group.__aexit__(*exc)
        finally:
            self._cancel_everything()

    @property
    def running(self) -> bool:
        return self._task_group is not None

    # requests
    async def generate(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                       request_id: Optional[str] = None) -> RequestOutput:
        """The request's final output. Cancelling the awaiting task cancels the request.

        Raises ValueError (bad prompt or parameters), EngineOverloadedError (queue full),
        RequestFailedError (the engine could not finish it).
        """
        stream = self.stream(prompt, params, request_id)
        async with stream:
            async for _ in stream:
                pass
        out = stream.output()
        if out.state == RequestState.FAILED.value:
            raise RequestFailedError(f"request {out.request_id} failed: {out.error}")
        return out

    def stream(self, prompt: PromptType, params: Optional[SamplingParams] = None,
               request_id: Optional[str] = None) -> "RequestStream":
        """Increments of the request as they are produced (see RequestOutput); the last has finished=True.

        Submission errors are raised here, before any iteration. Cancelling the consuming task,
        closing the stream (aclose, or `async with`), or dropping it after leaving the loop
        cancels the request.
        """
        request, receive = self._submit(prompt, params, request_id)
        return RequestStream(self, request, receive)

    def abort(self, request_id: str) -> None:
        """Cancel a request; it finishes as cancelled (cells freed) before the next step starts."""
        self._aborts.append(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step, with the current queue length."""
        return dataclasses.replace(self._stats, num_waiting=self._stats.num_waiting + len(self._pending))

    # the client interface: safe from any thread
    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """A prompt's text (None when given as ids) and its checked ids; ValueError naming the problem."""
        with self._text_lock:
            return prompt_ids(prompt, self._text.encode, self.engine.vocab_size)

    def detokenize(self, ids: list[int]) -> str:
        with self._text_lock:
            return self._text.decode(check_ids(ids, self.engine.vocab_size))

    def chat_prompt(self, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        """A conversation in the model's chat template (with the tools offered), ready for generation."""
        with self._text_lock:
            return chat_text(messages, lambda m: self._text.chat_text(m, tools=tools))

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.vocab_size

    @property
    def max_num_seqs(self) -> int:
        return self.engine.args.max_num_seqs

    @property
    def special_tokens(self) -> dict[str, int]:
        """The tokenizer's special tokens by their text (FIM markers among them, for a FIM model)."""
        return dict(self._special_tokens)

    @property
    def generation_defaults(self) -> dict:
        """The model's generation-config sampling defaults."""
        return dict(self._generation_defaults)

    def _submit(self, prompt, params, request_id) -> tuple[Request, MemoryObjectReceiveStream]:
        if not self.running:
            raise EngineClosedError("the engine is not running (use `async with engine:`)")
        if self.max_waiting is not None and len(self.engine.scheduler.waiting) + len(self._pending) >= self.max_waiting:
            raise EngineOverloadedError(f"the server is overloaded: {self.max_waiting} requests are already "
                                        f"waiting; try again later")
        text, ids = self.tokenize(prompt)
        request = self.engine.make_request({"prompt": text, "prompt_token_ids": ids}, params, request_id)
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        send, receive = anyio.create_memory_object_stream[RequestOutput](math.inf)
        self._streams[request.request_id] = send
        self._pending.append(request)
        self._wake.set()
        return request, receive

    def _abort_unless_done(self, stream: "RequestStream") -> None:
        # Only a list append: this may run from a finalizer, outside the event loop. The loop is
        # stepping while the request is unfinished, so it sees the abort before its next step.
        if not (stream.finished or stream.request.state.done) and self.running:
            self._aborts.append(stream.request_id)

    # the loop
    async def _loop(self) -> None:
        while True:
            self._apply_submissions()
            if not self.engine.has_unfinished_requests():
                self._wake = anyio.Event()
                if not (self._pending or self._aborts):
                    await self._wake.wait()
                continue
            try:
                outputs = await anyio.to_thread.run_sync(self._step)
            except Exception as e:  # a bug outside the per-request guards: fail what is in flight, keep serving
                log.exception("engine step failed")
                outputs = [self.engine.abort_request(rid, error=f"internal error: {e}") for rid in
                           list(self.engine.requests)]
            self._deliver(outputs)

    def _step(self) -> list[RequestOutput]:
        outputs = self.engine.step()
        self._stats = self.engine.stats()
        return outputs

    def _apply_submissions(self) -> None:
        pending, self._pending = self._pending, []
        for request in pending:
            self.engine.add(request)
        aborts, self._aborts = self._aborts, []
        outputs = [self.engine.abort_request(rid) for rid in aborts]
        self._deliver([o for o in outputs if o is not None])
        if pending or aborts:
            self._stats = self.engine.stats()

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            send = self._streams.get(out.request_id)
            if send is None:
                continue
            try:
                send.send_nowait(out)
            except anyio.BrokenResourceError:  # the caller stopped listening; its abort is queued
                pass
            if out.finished:
                send.close()
                del self._streams[out.request_id]

    def _cancel_everything(self) -> None:
        """At shutdown: cancel every request and end every stream."""
        for request in self._pending:
            request.end(RequestState.CANCELLED, "abort")
        self._deliver([request.take_output(delta=True) for request in self._pending])
        self._pending = []
        outputs = [self.engine.abort_request(rid) for rid in list(self.engine.requests)]
        self._deliver([o for o in outputs if o is not None])
        for send in self._streams.values():
            send.close()
        self._streams.clear()


class RequestStream:
    """The increments of one request, for `async for`; see AsyncLLM.stream."""

    def __init__(self, owner: AsyncLLM, request: Request, receive: MemoryObjectReceiveStream):
        self._owner = owner
        self.request = request  # the engine's: only its id and whether it is done are read here
        self.request_id = request.request_id
        self._accumulator = OutputAccumulator(request.take_output(delta=False))  # before the engine has it
        self._receive = receive

    @property
    def finished(self) -> bool:
        return self._accumulator.output.finished

    def output(self) -> RequestOutput:
        """Everything the request produced so far, as received (cumulative, not an increment)."""
        return self._accumulator.output

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            delta = await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None
        except BaseException:  # cancelled while waiting: the request goes too
            self._owner._abort_unless_done(self)
            raise
        self._accumulator.add(delta)
        return delta

    async def admitted(self) -> None:
        """Returns once the engine has taken the request: at once here (stream() admits or raises);
        a remote engine's stream waits for its replica, which may refuse it (EngineOverloadedError)."""

    def take_ready(self) -> list[RequestOutput]:
        """The increments already delivered, without waiting: for a caller that forwards them in
        batches over a slower hop (a replica to its ingress)."""
        ready = []
        while True:
            try:
                delta = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                return ready
            self._accumulator.add(delta)
            ready.append(delta)

    async def aclose(self) -> None:
        self._owner._abort_unless_done(self)
        self._receive.close()

    async def __aenter__(self) -> "RequestStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self._owner._abort_unless_done(self)
