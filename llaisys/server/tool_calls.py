"""Tool calls in a model's reply: Qwen2.5's `<tool_call>{"name", "arguments"}</tool_call>`, or the fenced
JSON block or bare JSON object (or array of them) that coder models often answer with instead.

Anything that does not parse into calls of the offered functions stays plain content: a model's
malformed output is never an error.
"""
from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any, Optional

OPEN, CLOSE = "<tool_call>", "</tool_call>"
TAGGED = re.compile(re.escape(OPEN) + r"(.*?)(?:" + re.escape(CLOSE) + r"|$)", re.S)
FENCED = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self, index: Optional[int] = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parse_tool_calls(text: str, names: set[str], parallel: bool = True) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a whole reply; content is None when the reply is only calls."""
    if OPEN in text:
        calls = [_call(m.group(1)) for m in TAGGED.finditer(text)]
        content = TAGGED.sub("", text).strip()
    else:
        body = text.strip()
        fenced = FENCED.match(body)
        calls = _bare(fenced.group(1) if fenced else body) if body[:1] in "{[" or fenced else []
        content = ""
    if not calls or any(c is None or c.name not in names for c in calls):
        return text, []
    return content or None, calls if parallel else calls[:1]


def _bare(text: str) -> list[Optional[ToolCall]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    values = value if isinstance(value, list) else [value]
    return [_from_object(v) for v in values]


def _call(body: str) -> Optional[ToolCall]:
    try:
        return _from_object(json.loads(body))
    except json.JSONDecodeError:
        return None


def _from_object(value: Any) -> Optional[ToolCall]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(value["name"], json.dumps(args, ensure_ascii=False))


class StreamingToolParser:
    """One streamed choice's text: content passes through as it comes, tool calls are held back and
    parsed when the choice ends. A reply that opens like JSON (or a fence) is held whole; otherwise
    text is held from the first `<tool_call>` on (and any tail that may be its start)."""

    def __init__(self, names: set[str], parallel: bool):
        self.names, self.parallel = names, parallel
        self.text = ""  # everything so far
        self.emitted = 0  # characters of text passed on as content
        self.holding = False  # from here on, nothing more is passed on until the end

    def feed(self, piece: str) -> str:
        """The content that may be streamed now."""
        self.text += piece
        if self.holding:
            return ""
        pending = self.text[self.emitted:]
        if not self.text[:self.emitted].strip():  # nothing but whitespace streamed: the reply may be JSON
            start = pending.lstrip()
            if not start:
                return ""
            if start[0] in "{[" or "```".startswith(start[:3]) or OPEN.startswith(start[:len(OPEN)]):
                self.holding = True
                return ""
        at = pending.find(OPEN)
        if at >= 0:
            self.holding = True
            return self._emit(pending[:at])
        keep = next((k for k in range(min(len(pending), len(OPEN) - 1), 0, -1) if OPEN.startswith(pending[-k:])), 0)
        return self._emit(pending[:len(pending) - keep])

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the content not yet streamed, the calls) once the choice has ended."""
        _, calls = parse_tool_calls(self.text, self.names, self.parallel)
        if not calls:
            return self.text[self.emitted:], []
        if OPEN not in self.text:  # a bare or fenced call, held whole: no content
            return "", calls
        # What was streamed is the start of the text before the first call: the rest of the content follows.
        return TAGGED.sub("", self.text)[self.emitted:].strip(), calls

    def _emit(self, piece: str) -> str:
        self.emitted += len(piece)
        return piece
