"""OpenAI's Responses API (`/v1/responses`), stateless: a body is turned into a chat completion's, and
the chat answer (whole, or its stream chunks) into a response object or its typed stream events.

Nothing is stored: `previous_response_id` is refused, `store` is accepted and has no effect.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from ..engine import RequestOutput
from .errors import bad_request
from .protocol import check_fields
from .responses import ResponseBuilder, usage

FIELDS = {"model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "stream", "tools",
          "tool_choice", "parallel_tool_calls", "text", "store", "user", "metadata", "previous_response_id",
          "truncation", "include"}


def chat_body(body: dict[str, Any]) -> dict[str, Any]:
    """The /v1/chat/completions body that asks the same; 400 naming a field that cannot be honoured."""
    check_fields(body, FIELDS)
    if body.get("previous_response_id") is not None:
        raise bad_request("'previous_response_id' needs stored responses; this server keeps none: send the "
                          "whole conversation in 'input'", param="previous_response_id")
    if body.get("truncation") not in (None, "disabled"):
        raise bad_request("'truncation' other than disabled is not supported", param="truncation")
    if body.get("include"):
        raise bad_request("'include' is not supported", param="include")
    messages = [] if body.get("instructions") is None else [{"role": "system", "content": body["instructions"]}]
    messages += _messages(body.get("input"))
    chat = {"messages": messages, "stream": body.get("stream", False)}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("user", "user"), ("model", "model")):
        if body.get(theirs) is not None:
            chat[ours] = body[theirs]
    if body.get("tools") is not None:
        chat["tools"] = [_tool(i, t) for i, t in enumerate(body["tools"])] if isinstance(body["tools"], list) \
            else body["tools"]
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        chat["tool_choice"] = choice
    fmt = body.get("text", {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        chat["response_format"] = {"type": "json_schema", "json_schema": {"name": fmt.get("name"),
                                                                          "schema": fmt.get("schema")}}
    elif fmt is not None:
        chat["response_format"] = fmt
    return chat


def _messages(items: Any) -> list[dict[str, Any]]:
    if isinstance(items, str) and items:
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_request("'input' must be a non-empty string or array of items", param="input")
    messages: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            messages.append({"role": item.get("role"), "content": _text(i, item.get("content"))})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)  # parallel calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text(i, output)})
        else:
            raise bad_request(f"input[{i}] must be a message, function_call or function_call_output item",
                              param=f"input[{i}]")
    return messages


def _text(i: int, content: Any) -> Any:
    """Input and output text parts as plain text; anything else is left for the chat checks to refuse."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") in ("input_text", "output_text")
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    if isinstance(content, list):
        raise bad_request(f"input[{i}].content parts must be input_text or output_text; only text is supported",
                          param=f"input[{i}].content")
    return content


def _tool(i: int, tool: Any) -> Any:
    """A Responses function tool ({type, name, parameters}) in chat's shape ({type, function: {...}})."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request(f"tools[{i}] must be a function tool; built-in tools are not supported", param=f"tools[{i}]")
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters") if k in tool}}


class ResponsesBuilder:
    """Response objects and stream events, from the chat builder's answers and chunks."""

    done_marker = False

    def __init__(self, chat: ResponseBuilder, body: dict[str, Any]):
        self.chat = chat
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.body = body
        self._seq = 0
        self._message_id = f"msg_{uuid.uuid4().hex}"
        self._items: list[dict[str, Any]] = []  # output items done
        self._open: Optional[dict[str, Any]] = None  # the output item being streamed
        self._finish_reason: Optional[str] = None

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        answer = self.chat.response(outputs)
        choice = answer["choices"][0]
        message = choice["message"]
        items = [self._message(message["content"])] if message.get("content") else []
        items += [self._call(c) for c in message.get("tool_calls", [])]
        return self._object("completed", items, choice["finish_reason"], answer["usage"])

    def stream_start(self, num_prompts: int) -> list[dict[str, Any]]:
        pending = self._object("in_progress", [], None, None)
        return [self._event("response.created", response=pending), self._event("response.in_progress",
                                                                               response=pending)]

    def stream_delta(self, prompt_index: int, delta: RequestOutput) -> list[dict[str, Any]]:
        events = []
        for chunk in self.chat.stream_delta(prompt_index, delta):
            for choice in chunk["choices"]:
                d = choice["delta"]
                if d.get("content"):
                    events += self._text_delta(d["content"])
                for piece in d.get("tool_calls", []):
                    events += self._call_piece(piece)
                if choice.get("finish_reason"):
                    self._finish_reason = choice["finish_reason"]
        return events

    def stream_end(self, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
        events = self._close()
        final = self._object("completed", self._items, self._finish_reason, usage(outputs))
        return events + [self._event("response.completed", response=final)]

    # One output item is streamed at a time: a message, or a function call (its pieces come together).
    def _text_delta(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self._open is None or self._open["type"] != "message":
            events += self._close()
            self._open = {**self._message(""), "status": "in_progress", "id": f"msg_{uuid.uuid4().hex}"}
            events += [self._event("response.output_item.added", output_index=len(self._items),
                                   item={**self._open, "content": []}),
                       self._event("response.content_part.added", item_id=self._open["id"],
                                   output_index=len(self._items), content_index=0, part=dict(self._open["content"][0]))]
        part = self._open["content"][0]
        part["text"] += text
        return events + [self._event("response.output_text.delta", item_id=self._open["id"],
                                     output_index=len(self._items), content_index=0, delta=text)]

    def _call_piece(self, piece: dict[str, Any]) -> list[dict[str, Any]]:
        """A streamed tool-call piece: the first of a call opens its function_call item; each adds arguments."""
        events = []
        if "id" in piece:
            events += self._close()
            self._open = {**self._call({**piece, "function": {**piece["function"], "arguments": ""}}),
                          "status": "in_progress"}
            events.append(self._event("response.output_item.added", output_index=len(self._items), item=dict(self._open)))
        arguments = piece["function"].get("arguments") or ""
        if arguments:
            self._open["arguments"] += arguments
            events.append(self._event("response.function_call_arguments.delta", item_id=self._open["id"],
                                      output_index=len(self._items), delta=arguments))
        return events

    def _close(self) -> list[dict[str, Any]]:
        """The open item's closing events; it joins the output."""
        item, self._open, index = self._open, None, len(self._items)
        if item is None:
            return []
        item = {**item, "status": "completed"}
        self._items.append(item)
        if item["type"] == "function_call":
            return [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=index, item=item)]
        part = item["content"][0]
        return [self._event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                            text=part["text"]),
                self._event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                            part=part),
                self._event("response.output_item.done", output_index=index, item=item)]

    def _message(self, text: str) -> dict[str, Any]:
        return {"type": "message", "id": self._message_id, "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    @staticmethod
    def _call(call: dict[str, Any]) -> dict[str, Any]:
        return {"type": "function_call", "id": f"fc_{call['id']}", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}

    def _object(self, status: str, items: list[dict[str, Any]], finish_reason: Optional[str],
                usage_: Optional[dict[str, Any]]) -> dict[str, Any]:
        incomplete = finish_reason == "length"
        body = self.body
        return {"id": self.id, "object": "response", "created_at": self.created, "model": self.chat.model,
                "status": "incomplete" if incomplete and status == "completed" else status,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None, "error": None,
                "output": items, "instructions": body.get("instructions"),
                "max_output_tokens": body.get("max_output_tokens"), "temperature": body.get("temperature"),
                "top_p": body.get("top_p"), "tools": body.get("tools") or [], "tool_choice": body.get("tool_choice", "auto"),
                "parallel_tool_calls": body.get("parallel_tool_calls", True), "previous_response_id": None,
                "store": False, "text": body.get("text") or {"format": {"type": "text"}}, "truncation": "disabled",
                "metadata": body.get("metadata") or {}, "usage": None if usage_ is None else _usage(usage_)}

    def _event(self, kind: str, **fields) -> dict[str, Any]:
        self._seq += 1
        return {"type": kind, "sequence_number": self._seq - 1, **fields}


def _usage(chat: dict[str, Any]) -> dict[str, Any]:
    return {"input_tokens": chat["prompt_tokens"], "output_tokens": chat["completion_tokens"],
            "total_tokens": chat["total_tokens"],
            "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens_details": {"reasoning_tokens": 0}}
