"""Engine outputs in OpenAI's response shapes: chat.completion(.chunk) and text_completion."""
from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Optional

from ..engine import CompletionOutput, RequestOutput
from .tool_calls import CallPiece, ToolCall, ToolCallParser, parse_tool_calls
from .tools import ToolSpec


class ResponseBuilder:
    """The answer to one API call, whole or as stream chunks. Choice index = prompt index * n + completion index.

    chat: True for /v1/chat/completions, False for /v1/completions. With tools, a chat reply's tool
    calls become message.tool_calls (streamed: delta.tool_calls pieces as the calls are read).
    """

    done_marker = True  # a stream ends with `data: [DONE]`

    def __init__(self, chat: bool, model: str, n: int, top_logprobs: Optional[int], include_usage: bool = False,
                 tools: Optional[ToolSpec] = None):
        self.chat = chat
        self.model = model
        self.n = n
        self.top_logprobs = top_logprobs
        self.include_usage = include_usage
        self.tools = tools
        self._parsers: dict[int, ToolCallParser] = {}  # choice -> its tool-call parser (streams with tools)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._text_offsets: dict[int, int] = {}  # choice -> characters streamed so far (completion logprobs)

    def index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    # whole answers
    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        choices = []
        for p, out in enumerate(outputs):
            for c in out.outputs:
                choice: dict[str, Any] = {"index": self.index(p, c)}
                finish_reason = c.finish_reason
                if self.chat:
                    choice["message"] = {"role": "assistant", "content": c.text}
                    if self.tools is not None:
                        content, calls = parse_tool_calls(c.text, self.tools.names, self.tools.parallel)
                        choice["message"]["content"] = content
                        if calls:
                            choice["message"]["tool_calls"] = [call.as_dict() for call in calls]
                            finish_reason = tool_calls_finish(calls, finish_reason)
                else:
                    choice["text"] = c.text
                choice["logprobs"] = self._logprobs(self.index(p, c), c)
                choice["finish_reason"] = finish_reason
                if c.stop_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                choices.append(choice)
        choices.sort(key=lambda ch: ch["index"])
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": usage(outputs),
                "system_fingerprint": None}

    # stream events
    def stream_start(self, num_prompts: int) -> list[dict[str, Any]]:
        """A chat stream opens with each choice's role."""
        if not self.chat:
            return []
        return [self.chunk([self.role_choice(i)], include_usage=self.include_usage)
                for i in range(num_prompts * self.n)]

    def stream_delta(self, prompt_index: int, delta: RequestOutput) -> list[dict[str, Any]]:
        events = []
        for c in delta.outputs:
            index = self.index(prompt_index, c)
            if self.tools is not None:
                events += self._tool_stream_delta(index, c)
                continue
            if c.text or (self.top_logprobs is not None and c.token_ids):
                events.append(self.chunk([self.piece_choice(index, c)], include_usage=self.include_usage))
            if c.finished:
                events.append(self.chunk([self.finish_choice(index, c)], include_usage=self.include_usage))
        return events

    def _tool_stream_delta(self, index: int, c: CompletionOutput) -> list[dict[str, Any]]:
        """A chat choice with tools: its content and tool-call pieces as the parser lets them out, the
        step's logprobs on the first of them."""
        parser = self._parsers.setdefault(index, ToolCallParser(self.tools.names, self.tools.parallel))
        pieces = parser.feed(c.text) + (parser.finish() if c.finished else [])
        if not pieces and self.top_logprobs is not None and c.token_ids:
            pieces = [""]
        events = []
        for i, piece in enumerate(pieces):
            choice = self.piece_choice(index, dataclasses.replace(
                c, text=piece if isinstance(piece, str) else "", logprobs=c.logprobs if i == 0 else None))
            if isinstance(piece, CallPiece):
                choice["delta"] = {"tool_calls": [piece.as_dict()]}
            events.append(self.chunk([choice], include_usage=self.include_usage))
        if c.finished:
            finish_reason = tool_calls_finish(parser.calls, c.finish_reason) if parser.calls else c.finish_reason
            events.append(self.chunk([self.finish_choice(index, dataclasses.replace(c, finish_reason=finish_reason))],
                                     include_usage=self.include_usage))
        return events

    def stream_end(self, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
        return [self.chunk([], usage(outputs), include_usage=True)] if self.include_usage else []

    def chunk(self, choices: list[dict[str, Any]], usage_: Optional[dict[str, int]] = None,
              include_usage: bool = False) -> dict[str, Any]:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if include_usage:
            body["usage"] = usage_
        return body

    def role_choice(self, index: int) -> dict[str, Any]:
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def piece_choice(self, index: int, piece: CompletionOutput) -> dict[str, Any]:
        """The new text (and logprobs) of one completion; without its finish reason."""
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {"content": piece.text}
        else:
            choice["text"] = piece.text
        choice["logprobs"] = self._logprobs(index, piece)
        choice["finish_reason"] = None
        return choice

    def finish_choice(self, index: int, piece: CompletionOutput) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index}
        if self.chat:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        choice.update(logprobs=None, finish_reason=piece.finish_reason)
        if piece.stop_reason is not None:
            choice["stop_reason"] = piece.stop_reason
        return choice

    def _logprobs(self, index: int, c: CompletionOutput) -> Optional[dict[str, Any]]:
        if self.top_logprobs is None or c.logprobs is None:
            return None
        steps = [(step[token], sorted((lp for lp in step.values() if lp.rank <= self.top_logprobs),
                                      key=lambda lp: lp.rank))
                 for token, step in zip(c.token_ids, c.logprobs)]
        if self.chat:
            return {"content": [dict(_token(chosen), top_logprobs=[_token(lp) for lp in top])
                                for chosen, top in steps]}
        offsets, offset = [], self._text_offsets.get(index, 0)
        for chosen, _ in steps:
            offsets.append(offset)
            offset += len(chosen.decoded_token)
        self._text_offsets[index] = offset
        return {"tokens": [chosen.decoded_token for chosen, _ in steps],
                "token_logprobs": [chosen.logprob for chosen, _ in steps],
                "top_logprobs": [{lp.decoded_token: lp.logprob for lp in top} for _, top in steps],
                "text_offset": offsets}


def tool_calls_finish(calls: list[ToolCall], finish_reason: Optional[str]) -> Optional[str]:
    """A reply with calls ends for tool_calls, unless a call's arguments were cut off (then its own reason)."""
    return "tool_calls" if all(call.complete for call in calls) else finish_reason


def usage(outputs: list[RequestOutput]) -> dict[str, Any]:
    """OpenAI's usage: token counts, with the prompt tokens whose KV came from the prefix cache."""
    prompt = sum(len(out.prompt_token_ids) for out in outputs)
    completion = sum(out.metrics.num_generated_tokens for out in outputs)
    cached = sum(out.metrics.num_cached_tokens for out in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _token(lp) -> dict[str, Any]:
    return {"token": lp.decoded_token, "logprob": lp.logprob, "bytes": list(lp.decoded_token.encode("utf-8"))}
