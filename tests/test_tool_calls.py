"""Tool calls parsed out of replies: the tagged, fenced and bare shapes, whole and streamed, and
malformed replies kept as content."""
from __future__ import annotations

import json
from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llaisys.server.tool_calls import CallScanner, ToolCallParser, parse_tool_calls

NAMES = {"get_weather", "get_time"}
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def calls_of(text: str, parallel: bool = True):
    content, calls = parse_tool_calls(text, NAMES, parallel)
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize("text, content", [
    (f"<tool_call>\n{CALL}\n</tool_call>", None),
    (f"Let me look.\n<tool_call>\n{CALL}\n</tool_call>", "Let me look."),
    (f"<tool_call>\n{CALL}", None),  # cut off before the closing tag
    (f"```json\n{CALL}\n```", None),
    (f"  {CALL}\n", None),
    ('{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}', None),  # arguments double-encoded
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
])
def test_each_shape_gives_the_call(text, content):
    assert calls_of(text) == (content, [("get_weather", {"city": "Paris"})])


def test_several_calls_and_parallel_off():
    two = f"<tool_call>{CALL}</tool_call>\n<tool_call>" + '{"name": "get_time", "arguments": {}}</tool_call>'
    assert [n for n, _ in calls_of(two)[1]] == ["get_weather", "get_time"]
    assert [n for n, _ in calls_of(two, parallel=False)[1]] == ["get_weather"]
    assert [n for n, _ in calls_of(f"[{CALL}, {CALL}]")[1]] == ["get_weather", "get_weather"]


@pytest.mark.parametrize("text", [
    "The weather is fine.", "<tool_call>{not json</tool_call>", '{"name": "launch_rockets", "arguments": {}}',
    '{"name": "get_weather", "arguments": [1]}', '{"city": "Paris"}', "```json\n{broken\n```", "[]", "{}",
    "<tool_call>nope</tool_call>", '<tool_call>{"name": "launch_rockets", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": 3}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": "[1]"}</tool_call>', "```python\nprint(1)\n```",
    '<tool_call>{"name": "get_weather", "argu',  # cut off before the name could be told a call
])
def test_anything_else_stays_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def test_each_call_stands_or_falls_alone():
    content, calls = calls_of(f"<tool_call>{CALL}</tool_call> <tool_call>nope</tool_call>")
    assert content == "<tool_call>nope</tool_call>" and calls == [("get_weather", {"city": "Paris"})]
    # A missing closing tag or outer brace (small models drop them) still gives the call.
    assert calls_of(f"<tool_call>{CALL[:-1]}</tool_call> Done.") == ("Done.", [("get_weather", {"city": "Paris"})])
    assert calls_of(f"<tool_call>{CALL}\nDone.") == ("Done.", [("get_weather", {"city": "Paris"})])
    assert calls_of('<tool_call>{"arguments": {"x": [1, -2.5e3, true, null]}, "name": "get_time"}</tool_call>') == (
        None, [("get_time", {"x": [1, -2500.0, True, None]})])
    assert calls_of('<tool_call>{"name": "get_time"}</tool_call>') == (None, [("get_time", {})])


def test_arguments_that_break_off_end_the_call_incomplete():
    for text, arguments in [(f"<tool_call>{CALL[:-6]}", '{"city": "Pa'),
                            ('<tool_call>{"name": "get_weather", "arguments": {"city": Paris}}</tool_call> ok',
                             '{"city": ')]:
        parser = ToolCallParser(NAMES)
        parser.feed(text)
        parser.finish()
        assert [(c.name, c.arguments) for c in parser.calls] == [("get_weather", arguments)]
        assert not parser.complete and "<tool_call>" not in parser.content


def assemble(pieces) -> tuple[str, dict[int, dict]]:
    """What a client makes of streamed pieces: the content, and each call (by index) from its pieces."""
    content, calls = "", {}
    for piece in pieces:
        if isinstance(piece, str):
            content += piece
        elif piece.id is not None:
            assert piece.index == len(calls) and piece.name
            calls[piece.index] = {"id": piece.id, "name": piece.name, "arguments": piece.arguments}
        else:
            assert piece.name is None
            calls[piece.index]["arguments"] += piece.arguments
    return content, calls


def stream(pieces: list[str]) -> tuple[str, list, bool]:
    parser = ToolCallParser(NAMES, True)
    out = [p for piece in pieces for p in parser.feed(piece)] + parser.finish()
    content, calls = assemble(out)
    assert [c["id"] for c in calls.values()] == [c.id for c in parser.calls]
    return content, [(c["name"], c["arguments"]) for c in calls.values()], parser.complete


def whole(text: str) -> tuple[str, list, bool]:
    parser = ToolCallParser(NAMES, True)
    parser.feed(text)
    parser.finish()
    return parser.content, [(c.name, c.arguments) for c in parser.calls], parser.complete


def test_a_tagged_call_streams_its_name_then_its_arguments_as_they_come():
    parser = ToolCallParser(NAMES, True)
    assert parser.feed("Let me ") == ["Let me"]  # trailing whitespace waits for more content
    assert parser.feed("look <tool") == [" look"]  # what may start a tag waits
    assert parser.feed('_call>\n{"name": "get_wea') == []
    (head,) = parser.feed('ther", "arguments": {"ci')
    assert (head.index, head.name, head.arguments) == (0, "get_weather", '{"ci') and head.id.startswith("call_")
    assert [(p.index, p.id, p.arguments) for p in parser.feed('ty": "Pa')] == [(0, None, 'ty": "Pa')]
    assert [p.arguments for p in parser.feed('ris"}}\n</tool_')] == ['ris"}']
    assert parser.feed("call>") == [] and parser.finish() == []
    assert parser.content == "Let me look" and parser.complete


def test_bare_and_fenced_calls_stream_too_and_an_array_is_held_whole():
    for opening in ("", "```json\n", "```\n"):
        parser = ToolCallParser(NAMES, True)
        assert parser.feed("\n") == [] and parser.feed(opening + '{"name": "get_weather", "argu') == []
        (head,) = parser.feed('ments": {"city": ')
        assert head.name == "get_weather" and head.arguments == '{"city": '
        assert [p.arguments for p in parser.feed('"Paris"}}' + ("\n```" if opening else ""))] == ['"Paris"}']
        assert parser.finish() == [] and parser.content == "" and parser.complete
    parser = ToolCallParser(NAMES, True)
    assert parser.feed(f"[{CALL}, ") == [] and parser.feed(CALL + "]") == []
    assert [(p.index, p.name) for p in parser.finish()] == [(0, "get_weather"), (1, "get_weather")]


def test_what_follows_a_bare_call_is_another_or_content():
    assert calls_of(f"{CALL}\n{CALL}") == (None, [("get_weather", {"city": "Paris"})] * 2)
    assert calls_of(f"{CALL}\nIt is sunny.") == ("It is sunny.", [("get_weather", {"city": "Paris"})])
    assert calls_of(f"```json\n{CALL}\n```\nDone.") == ("Done.", [("get_weather", {"city": "Paris"})])
    assert calls_of(f'{CALL}\n{{"city": 1}}') == ('{"city": 1}', [("get_weather", {"city": "Paris"})])


TEXTS = [f"Sure. <tool_call>{CALL}</tool_call>", f"```json\n{CALL}\n```", "plain <tool text", "{not a call}",
         f"<tool_call>{CALL}", "a < b <tool_call> broken", f"<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n"
         '{"name": "get_time", "arguments": {"zone": "CET", "at": [1.5e-3, {"s": "\\"\\u00e9"}]}}\n</tool_call>',
         f"<tool_call>{CALL[:-1]}</tool_call> then text", f"<tool_call>{CALL[:-9]}", f"A\n\n<tool_call>{CALL}\nB",
         '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": 1}"}</tool_call>',
         '<tool_call>{"name": "nope", "arguments": {}}</tool_call> <tool_call>{"name": "get_time"}</tool_call>',
         '<tool_call>{"name": "get_weather", "arguments": {"a": tru}}</tool_call> x', "  ```js\nx\n```  ",
         f"{CALL}\n{CALL}", f"```json\n{CALL}\n```\nDone.", f'{CALL} {{"city": 1}}', f"[{CALL}]", "```\n[1]\n```",
         f'{{"name": "get_weather", "arguments": "{{\\"city\\": 1}}"}}\nok', f"```json\n{CALL[:-9]}"]


@pytest.mark.parametrize("text", TEXTS)
def test_every_two_cut_split_assembles_to_the_whole_parse(text):
    expected = whole(text)
    assert expected[0] == (parse_tool_calls(text, NAMES)[0] or "")
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            assert stream([text[:i], text[i:j], text[j:]]) == expected, (i, j)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


def split(text: str, cuts: list[int]) -> list[str]:
    pieces, i = [], 0
    for cut in cuts:
        pieces.append(text[i:i + cut])
        i += cut
    return pieces + [text[i:]]


CUTS = st.lists(st.integers(1, 9), min_size=1, max_size=60)
PROSE = st.text(st.characters(blacklist_characters="<{[`", blacklist_categories=("Cs",)), max_size=8)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(TEXTS), CUTS)
def test_streamed_in_any_pieces_it_is_the_whole_parse(text, cuts):
    assert stream(split(text, cuts)) == whole(text)


@settings(max_examples=300, deadline=None)
@given(PROSE, st.sampled_from([("<tool_call>\n", "\n</tool_call>"), ("", ""), ("```json\n", "\n```")]),
       st.sampled_from(sorted(NAMES)), st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3),
       st.sampled_from([None, 1]), PROSE, CUTS)
def test_a_written_call_streams_whole_in_any_pieces(before, shape, name, args, indent, after, cuts):
    opening, closing = shape
    before = before if opening.startswith("<") else " "  # a bare or fenced call opens the reply
    call = json.dumps({"name": name, "arguments": args}, indent=indent)
    text = f"{before}{opening}{call}{closing}{after}"
    content, calls, complete = stream(split(text, cuts))
    assert (content, calls, complete) == whole(text)
    assert content == (before + after).strip(" \t\n\r")  # the markup is gone, the prose is whole
    ((got_name, arguments),) = calls
    assert complete and got_name == name and json.loads(arguments) == args


def chat_answers(text: str, pieces: list[str], finish_reason: str = "stop"):
    """The whole chat answer to a reply, and the chunks of the same reply streamed in the given pieces."""
    from llaisys.engine import CompletionOutput, RequestMetrics, RequestOutput
    from llaisys.server.responses import ResponseBuilder
    from llaisys.server.tools import ToolSpec

    tools = ToolSpec([{"type": "function", "function": {"name": n}} for n in sorted(NAMES)], "auto", True)

    def output(piece: str, finish: Optional[str]) -> RequestOutput:
        return RequestOutput("r", None, [1], [CompletionOutput(0, piece, [0], finish)], finish is not None,
                             "finished" if finish else "running", RequestMetrics(0.0))

    whole_answer = ResponseBuilder(True, "m", 1, None, tools=tools).response([output(text, finish_reason)])
    builder = ResponseBuilder(True, "m", 1, None, tools=tools)
    chunks = builder.stream_start(1)
    for i, piece in enumerate(pieces):
        chunks += builder.stream_delta(0, output(piece, finish_reason if i == len(pieces) - 1 else None))
    return whole_answer, chunks


REPLIES = [f"Let me check.\n<tool_call>\n{CALL}\n</tool_call>\n<tool_call>\n"
           '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', f"```json\n{CALL}\n```",
           "No call here, only <b>text</b>.", f"<tool_call>\n{CALL[:-6]}"]


@pytest.mark.parametrize("text", REPLIES)
def test_the_official_client_assembles_the_stream_to_the_whole_answer(text):
    openai_streaming = pytest.importorskip("openai.lib.streaming.chat")
    from openai.types.chat import ChatCompletionChunk

    for cut in range(len(text) + 1):
        whole_answer, chunks = chat_answers(text, [text[:cut], text[cut:cut + 5], text[cut + 5:]])
        state = openai_streaming.ChatCompletionStreamState()
        for chunk in chunks:
            state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
        (streamed,), (expected,) = state.get_final_completion().choices, whole_answer["choices"]
        assert streamed.finish_reason == expected["finish_reason"]
        assert (streamed.message.content or None) == (expected["message"]["content"] or None)  # "" opens a stream
        calls = [(c.id, c.function.name, c.function.arguments) for c in streamed.message.tool_calls or []]
        assert [name_args for _, *name_args in calls] == [
            [c["function"]["name"], c["function"]["arguments"]] for c in expected["message"].get("tool_calls", [])]
        assert all(i.startswith("call_") for i, _, _ in calls) and len({i for i, _, _ in calls}) == len(calls)
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert not any("tool_call" in d.get("content", "") for d in deltas)  # no markup leaks


def test_a_tagged_call_reaches_the_client_in_pieces():
    text = REPLIES[0]
    _, chunks = chat_answers(text, [text[i:i + 3] for i in range(0, len(text), 3)])
    pieces = [(c["choices"][0]["delta"]["tool_calls"][0]) for c in chunks
              if c["choices"] and "tool_calls" in c["choices"][0]["delta"]]
    firsts = [p for p in pieces if "id" in p]
    assert [(p["index"], p["type"], p["function"]["name"]) for p in firsts] == [(0, "function", "get_weather"),
                                                                                (1, "function", "get_time")]
    assert len(pieces) > 10 and all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"}
                                    for p in pieces if "id" not in p)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def scanned(text: str) -> bool:
    """Whether the call scanner reads text as one JSON object (and whitespace after it)."""
    scan = CallScanner(0)
    scan.feed(text)
    return scan.done and not text[scan.pos:].strip(" \t\n\r")


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text, parse_constant=lambda c: 1 / 0), dict)
    except (ValueError, ZeroDivisionError):
        return False


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=4), st.sampled_from([None, 1]),
       st.lists(st.tuples(st.integers(0, 200), st.sampled_from(list('{}[]",:0123456789.eE+-tfnul \\ax\n\t'))),
                max_size=3))
def test_the_call_scanner_reads_json_as_json_does(value, indent, edits):
    text = json.dumps(value, indent=indent)
    for at, ch in edits:  # a few characters inserted: JSON or not, the scanner and json must agree
        text = text[:at] + ch + text[at:]
    assert scanned(text) == is_json_object(text), text


@pytest.mark.parametrize("value", ["0", "-0", "01", "00", "-", "1.", ".5", "1.5e", "1e+", "2E-3", "-0.0e0", "+1", "tru",
                                   "nul", "true", "null", "false", '"\\x"', '"\\u12"', '"\\u12aF"', '"a\tb"', '"\\/"',
                                   "[1,]", "[,]", "[]", "[[]]", "{}", '{"b":1,}', '{"b" 1}', "{,}", '{"b":[1 2]}', "1 2"])
def test_the_call_scanner_on_json_edge_cases(value):
    text = '{"a": ' + value + "}"
    assert scanned(text) == is_json_object(text)
