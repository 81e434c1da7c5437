"""Tool calls in a model's reply: Qwen2.5's `<tool_call>{"name", "arguments"}</tool_call>`, or the bare
JSON object (or several, or an array of them) or fenced JSON block that coder models often answer
with instead.

One incremental parser reads a reply as it streams and gives content and call pieces in order;
parsing a whole reply is the same parser fed once, so a stream assembles to the whole answer
whatever its pieces. A call is streamed as OpenAI does: a first piece with the call's id and name
once its name has been read, then its arguments' text as the model writes it (a reply that opens
with a JSON array is held and read whole at the end). Anything that does not read as a call of an
offered function stays content, tag and all: a model's malformed output is never an error. Once a
call's name has gone out it stands; arguments the model breaks off or garbles end where they stopped
being JSON (such a call is incomplete: the reply's finish reason is then not tool_calls). Content is
the reply's text outside its calls, without leading or trailing whitespace.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import re
import uuid
from typing import Any, Optional, Union

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FENCE = "```"
FENCED = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.S)
ARGUMENT_KEYS = ("arguments", "parameters")  # some models name them after the schema's field
WHITESPACE = " \t\n\r"


@dataclasses.dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    complete: bool = True  # False: the arguments were cut off or broke off

    def as_dict(self, index: Optional[int] = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclasses.dataclass
class CallPiece:
    """A streamed part of call `index`: its first piece carries id and name, every piece a run of arguments."""

    index: int
    arguments: str
    id: Optional[str] = None
    name: Optional[str] = None

    def as_dict(self) -> dict[str, Any]:
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        return {"index": self.index, "id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


Piece = Union[str, CallPiece]  # content, or a part of a call


def parse_tool_calls(text: str, names: set[str], parallel: bool = True) -> tuple[Optional[str], list[ToolCall]]:
    """(content, calls) of a whole reply; content is None when the reply is only calls."""
    parser = ToolCallParser(names, parallel)
    parser.feed(text)
    parser.finish()
    return (parser.content or None) if parser.calls else parser.content, parser.calls


class Mode(enum.Enum):
    START = "start"  # only whitespace so far: the reply may be a bare or fenced call
    HELD = "held"  # the reply opens with a JSON array: read whole at the end
    CONTENT = "content"
    BODY = "body"  # a call's JSON
    AFTER_BODY = "after body"  # the call's JSON read: its closing tag or fence (if any) is dropped
    SKIP = "skip"  # the call's arguments broke off: everything up to the closing tag is dropped


class ToolCallParser:
    """One reply's text, fed as it comes: feed() and finish() return the content and call pieces
    that may go out, in order."""

    def __init__(self, names: set[str], parallel: bool = True):
        self.names, self.parallel = names, parallel
        self.text = ""
        self.pos = 0  # text before this is decided
        self.mode = Mode.START
        self.eof = False
        self.calls: list[ToolCall] = []
        self.content = ""  # what went out as content
        self._blank = ""  # whitespace after the content, waiting for more content
        self._out: list[Piece] = []
        self._scan: Optional[CallScanner] = None
        self._close = ""  # what ends the current call: CLOSE, FENCE, or nothing for a bare object
        self._resume = 0  # where content goes on when a bare or fenced object is no call
        self._call: Optional[ToolCall] = None  # the current call, once its name went out
        self._silent = False  # the current call is dropped (a second one without parallel_tool_calls)
        self._sent: Optional[int] = 0  # characters of the current call's arguments that went out; None: all

    def feed(self, piece: str) -> list[Piece]:
        self.text += piece
        return self._advance()

    def finish(self) -> list[Piece]:
        self.eof = True
        return self._advance()

    @property
    def complete(self) -> bool:
        """Every call's arguments were read whole."""
        return all(c.complete for c in self.calls)

    def _advance(self) -> list[Piece]:
        step = {Mode.START: self._start, Mode.HELD: self._held, Mode.CONTENT: self._content,
                Mode.BODY: self._body, Mode.AFTER_BODY: self._after_body, Mode.SKIP: self._skip}
        while step[self.mode]():
            pass
        out, self._out = self._out, []
        return out

    # Each step moves on and returns True, or returns False to wait for more text.
    def _start(self) -> bool:
        kind, at = _opening(self.text, len(self.text) - len(self.text[self.pos:].lstrip(WHITESPACE)))
        if kind is None and not self.eof:
            return False
        if kind in ("bare", "fenced"):
            self._begin_body(at, FENCE if kind == "fenced" else "", self.pos)
        else:
            self.mode = Mode.HELD if kind == "array" else Mode.CONTENT
        return True

    def _held(self) -> bool:
        if not self.eof:
            return False
        body = self.text.strip()
        fenced = FENCED.match(body)
        calls = _bare(fenced.group(1) if fenced else body)
        if calls and all(c is not None and c.name in self.names for c in calls):
            for call in calls if self.parallel else calls[:1]:
                self._out.append(CallPiece(len(self.calls), call.arguments, call.id, call.name))
                self.calls.append(call)
            return False
        self.mode = Mode.CONTENT  # not calls: read again as text
        return True

    def _content(self) -> bool:
        at = self.text.find(OPEN, self.pos)
        if at >= 0:
            self._say(self.text[self.pos:at])
            self._begin_body(at + len(OPEN), CLOSE, at + len(OPEN))
            return True
        end = len(self.text)
        if not self.eof:  # a tail that may begin a tag waits
            end -= next((k for k in range(min(len(OPEN) - 1, end - self.pos), 0, -1)
                         if self.text.endswith(OPEN[:k])), 0)
        self._say(self.text[self.pos:end])
        self.pos = end
        return False

    def _begin_body(self, start: int, close: str, resume: int) -> None:
        self.pos, self._close, self._resume = start, close, resume
        self.mode, self._scan, self._call, self._sent = Mode.BODY, CallScanner(start), None, 0

    def _body(self) -> bool:
        scan = self._scan
        scan.feed(self.text)
        if self._call is None:
            verdict = scan.verdict(self.names)
            if verdict is None and not (scan.failed or scan.done or self.eof):
                return False
            if not verdict:  # no call: the tag is content and what follows it is read again (or all of it)
                if self._close == CLOSE:
                    self._say(OPEN)
                self.pos, self.mode = self._resume, Mode.CONTENT
                return True
            name, arguments = verdict
            self._silent = bool(self.calls) and not self.parallel
            self._call = ToolCall(name, "")
            if not self._silent:
                self.calls.append(self._call)
                self._out.append(CallPiece(len(self.calls) - 1, "", self._call.id, name))
            if arguments is not None:  # whole already (double-encoded, or none given)
                self._arguments(arguments)
                self._sent = None
        if self._sent is not None:
            self._arguments(scan.arguments()[self._sent:])
            self._sent = None if scan.arguments_done else len(scan.arguments())
        if scan.done or scan.failed:
            self._call.complete = self._sent is None
            self.pos = scan.pos
            self.mode = Mode.AFTER_BODY if self._call.complete else Mode.SKIP
            return True
        if self.eof:
            self._call.complete = self._sent is None
            self.pos = len(self.text)
        return False

    def _arguments(self, text: str) -> None:
        self._call.arguments += text
        if text and not self._silent:
            last = self._out[-1] if self._out else None
            if isinstance(last, CallPiece) and last.index == len(self.calls) - 1:
                last.arguments += text
            else:
                self._out.append(CallPiece(len(self.calls) - 1, text))

    def _after_body(self) -> bool:
        start = len(self.text) - len(self.text[self.pos:].lstrip(WHITESPACE))
        tail = self.text[start:start + len(self._close)]
        if self._close and tail == self._close:
            self.pos, self.mode = start + len(self._close), Mode.CONTENT
            return True
        if tail == self.text[start:] and self._close.startswith(tail):  # only whitespace or the end's start
            if self.eof:
                self.pos = len(self.text)
            return False
        if not self._close and self.text[start] == "{":  # bare calls one after another
            self._begin_body(start, "", start)
            return True
        self.mode = Mode.CONTENT  # no closing tag or fence: what follows is content
        return True

    def _skip(self) -> bool:
        at = self.text.find(CLOSE, self.pos)
        if at < 0:
            self.pos = max(self.pos, len(self.text) - len(CLOSE) + 1)
            return False
        self.pos, self.mode = at + len(CLOSE), Mode.CONTENT
        return True

    def _say(self, text: str) -> None:
        """Content, trimmed as a whole: leading whitespace dropped, trailing whitespace held back."""
        if not self.content:
            text = text.lstrip(WHITESPACE)
        body = text.rstrip(WHITESPACE)
        if body:
            piece = self._blank + body
            self.content += piece
            self._blank = text[len(body):]
            if self._out and isinstance(self._out[-1], str):
                self._out[-1] += piece
            else:
                self._out.append(piece)
        elif self.content:
            self._blank += text


def _opening(text: str, i: int) -> tuple[Optional[str], Optional[int]]:
    """How a reply whose first non-blank character is text[i] opens: ("bare", i) with a JSON object,
    ("fenced", where its object starts) with a fenced one, ("array", None), ("text", None); (None, None)
    while it cannot be told."""
    head = text[i:]
    if head[:1] in ("{", "["):
        return ("bare", i) if head[0] == "{" else ("array", None)
    if not head.startswith(FENCE):
        return (None, None) if FENCE.startswith(head) else ("text", None)
    j = i + len(FENCE)
    if text.startswith("json", j):
        j += len("json")
    elif "json".startswith(text[j:j + 4]) and j + 4 > len(text):
        return None, None
    while j < len(text) and text[j] in WHITESPACE:
        j += 1
    if j == len(text):
        return None, None
    return {"{": ("fenced", j), "[": ("array", None)}.get(text[j], ("text", None))


def _bare(text: str) -> list[Optional[ToolCall]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return []
    values = value if isinstance(value, list) else [value]
    return [_from_object(v) for v in values]


def _from_object(value: Any) -> Optional[ToolCall]:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    args = _object_text(value.get("arguments", value.get("parameters", {})))
    return None if args is None else ToolCall(value["name"], args)


def _object_text(args: Any) -> Optional[str]:
    """Arguments as the text of a JSON object; None when they are no object (nor a string of one)."""
    if isinstance(args, str):  # some models double-encode
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    return json.dumps(args, ensure_ascii=False) if isinstance(args, dict) else None


class Scan(enum.Enum):
    VALUE = "value"
    FIRST_ITEM = "first item"  # after [: a value or ]
    FIRST_KEY = "first key"  # after {: a key or }
    KEY = "key"
    COLON = "colon"
    AFTER = "after"  # after a value: , or the container's end
    STRING = "string"
    NUMBER = "number"
    LITERAL = "literal"


# JSON numbers, one character at a time: state -> (characters, next state) in order of trial.
NUMBER_STEPS = {
    "": (("-", "-"), ("0", "0"), ("123456789", "int")),
    "-": (("0", "0"), ("123456789", "int")),
    "0": ((".", "."), ("eE", "e")),
    "int": (("0123456789", "int"), (".", "."), ("eE", "e")),
    ".": (("0123456789", "frac"),),
    "frac": (("0123456789", "frac"), ("eE", "e")),
    "e": (("+-", "sign"), ("0123456789", "exp")),
    "sign": (("0123456789", "exp"),),
    "exp": (("0123456789", "exp"),),
}
NUMBER_ENDS = {"0", "int", "frac", "exp"}
HEX = set("0123456789abcdefABCDEF")


class CallScanner:
    """Reads a call's JSON object one character at a time from text[start:], checking it is JSON,
    and notes where its top-level name and arguments values start and end."""

    def __init__(self, start: int):
        self.pos = start  # next character to read
        self.failed = False  # text[pos] is not JSON here
        self.done = False  # the object is closed (pos is just past it)
        self._text = ""
        self._stack: list[str] = []
        self._state, self._number, self._literal = Scan.VALUE, "", ""
        self._escape, self._hex, self._is_key = False, 0, False
        self._token_start = 0
        self._key: Optional[str] = None  # the top-level key whose value is being read
        self.values: dict[str, tuple[int, Optional[int]]] = {}  # top-level key -> its value's [start, end)

    def feed(self, text: str) -> None:
        self._text = text
        while self.pos < len(text) and not (self.failed or self.done):
            if self._step(text[self.pos]):
                self.pos += 1
            else:
                self.failed = True

    def verdict(self, names: set[str]) -> Union[None, bool, tuple[str, Optional[str]]]:
        """(name, the whole arguments' text, or None when they are to be streamed) once this reads as a
        call of one of names; False once it cannot; None while it cannot be told."""
        name = self._value("name")
        if name is not None and not (isinstance(name, str) and name in names):
            return False
        key = self._arguments_key
        if key is None:
            return (name, "{}") if self.done and name is not None else None
        first = self._text[self.values[key][0]]
        if first == "{":
            return None if name is None else (name, None)
        if first != '"':
            return False
        value = self._value(key)
        if value is None:
            return None
        arguments = _object_text(value)
        if arguments is None:
            return False
        return None if name is None else (name, arguments)

    def arguments(self) -> str:
        """The streamed arguments' text read so far."""
        start, end = self.values[self._arguments_key]
        return self._text[start:self.pos if end is None else end]

    @property
    def arguments_done(self) -> bool:
        key = self._arguments_key
        return key is not None and self.values[key][1] is not None

    @property
    def _arguments_key(self) -> Optional[str]:
        """The first of the argument keys to appear: the one read, whatever follows."""
        return next((k for k in self.values if k in ARGUMENT_KEYS), None)

    def _value(self, key: str) -> Any:
        """A top-level value, decoded; None while unread or unfinished."""
        start, end = self.values.get(key, (0, None))
        return None if end is None else json.loads(self._text[start:end])

    def _step(self, ch: str) -> bool:
        state = self._state
        if state is Scan.STRING:
            return self._string(ch)
        if state is Scan.LITERAL:
            if ch != self._literal[0]:
                return False
            self._literal = self._literal[1:]
            if not self._literal:
                self._value_end(self.pos + 1)
            return True
        if state is Scan.NUMBER:
            following = next((nxt for chars, nxt in NUMBER_STEPS[self._number] if ch in chars), None)
            if following is not None:
                self._number = following
                return True
            if self._number not in NUMBER_ENDS:
                return False
            self._value_end(self.pos)  # the number ends before ch, which is read as what follows it
            state = self._state
        if ch in WHITESPACE:
            return True
        if state is Scan.FIRST_KEY and ch == "}" or state is Scan.FIRST_ITEM and ch == "]":
            return self._close()
        if state in (Scan.VALUE, Scan.FIRST_ITEM):
            return self._value_start(ch)
        if state in (Scan.KEY, Scan.FIRST_KEY):
            if ch != '"':
                return False
            self._state, self._is_key, self._token_start = Scan.STRING, True, self.pos
            return True
        if state is Scan.COLON:
            self._state = Scan.VALUE
            return ch == ":"
        if ch == ",":
            self._state = Scan.KEY if self._stack[-1] == "{" else Scan.VALUE
            return True
        return ch == {"{": "}", "[": "]"}[self._stack[-1]] and self._close()

    def _string(self, ch: str) -> bool:
        if self._hex:
            self._hex -= 1
            return ch in HEX
        if self._escape:
            self._escape, self._hex = False, 4 if ch == "u" else 0
            return ch in '"\\/bfnrtu'
        if ch == "\\":
            self._escape = True
        elif ch == '"':
            if self._is_key:
                if len(self._stack) == 1:
                    self._key = json.loads(self._text[self._token_start:self.pos + 1])
                self._state = Scan.COLON
            else:
                self._value_end(self.pos + 1)
        return ch >= " "

    def _value_start(self, ch: str) -> bool:
        if not self._stack and ch != "{":
            return False  # a call is an object
        if len(self._stack) == 1 and self._key not in self.values:
            self.values[self._key] = (self.pos, None)
        if ch in "{[":
            self._stack.append(ch)
            self._state = Scan.FIRST_KEY if ch == "{" else Scan.FIRST_ITEM
        elif ch == '"':
            self._state, self._is_key = Scan.STRING, False
        elif ch in "-0123456789":
            self._state = Scan.NUMBER
            self._number = next(nxt for chars, nxt in NUMBER_STEPS[""] if ch in chars)
        elif ch in "tfn":
            self._state, self._literal = Scan.LITERAL, {"t": "rue", "f": "alse", "n": "ull"}[ch]
        else:
            return False
        return True

    def _close(self) -> bool:
        self._stack.pop()
        if not self._stack:
            self.done = True
        self._value_end(self.pos + 1)
        return True

    def _value_end(self, end: int) -> None:
        """A value ends at end: a top-level one is noted."""
        if len(self._stack) == 1 and self._key in self.values and self.values[self._key][1] is None:
            self.values[self._key] = (self.values[self._key][0], end)
        self._state = Scan.AFTER
