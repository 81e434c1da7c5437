"""Tool calls parsed out of replies: the tagged, fenced and bare shapes, whole and streamed, and
malformed replies kept as content."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llaisys.server.tool_calls import StreamingToolParser, parse_tool_calls

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
    f"<tool_call>{CALL}</tool_call><tool_call>nope</tool_call>",
])
def test_anything_else_stays_content(text):
    assert parse_tool_calls(text, NAMES) == (text, [])


def stream(pieces: list[str]) -> tuple[str, list]:
    parser = StreamingToolParser(NAMES, True)
    streamed = "".join(parser.feed(p) for p in pieces)
    rest, calls = parser.finish()
    return streamed + rest, [(c.name, json.loads(c.arguments)) for c in calls]


def test_a_stream_passes_content_on_and_holds_the_call():
    parser = StreamingToolParser(NAMES, True)
    assert parser.feed("Let me ") == "Let me "
    assert parser.feed("look <tool") == "look "  # what may start a tag waits
    assert parser.feed("_call>" + CALL) == ""
    assert parser.feed("</tool_call>") == ""
    rest, calls = parser.finish()
    assert rest == "" and [c.name for c in calls] == ["get_weather"]


def test_a_stream_that_opens_like_json_is_held_whole():
    parser = StreamingToolParser(NAMES, True)
    assert parser.feed("\n") == "" and parser.feed("```json\n") == "" and parser.feed(CALL + "\n```") == ""
    assert parser.finish()[1][0].name == "get_weather"


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([f"Sure. <tool_call>{CALL}</tool_call>", f"```json\n{CALL}\n```", "plain <tool text",
                        "{not a call}", f"<tool_call>{CALL}", "a < b <tool_call> broken"]),
       st.lists(st.integers(1, 9), min_size=1, max_size=40))
def test_streamed_in_any_pieces_it_is_the_whole_parse(text, cuts):
    pieces, i = [], 0
    for cut in cuts:
        pieces.append(text[i:i + cut])
        i += cut
    pieces.append(text[i:])
    content, calls = stream(pieces)
    whole_content, whole_calls = calls_of(text)
    assert calls == whole_calls
    assert content.strip() == (whole_content or "").strip()
