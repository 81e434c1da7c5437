"""Random chat bodies for the never-a-500 checks: tool fields and response_format, mostly wrong, some right.
Shared by the mock-model tests and the real model's."""
from __future__ import annotations

from hypothesis import strategies as st

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-2, 5), st.text(max_size=6), st.just([]), st.just({}))


def tool_bodies() -> st.SearchStrategy[dict]:
    """Chat bodies with random tools, tool_choice, parallel_tool_calls and tool turns."""
    function = st.fixed_dictionaries({}, optional={"name": st.one_of(st.sampled_from(["get_weather", "f"]), SCALAR),
                                                   "parameters": st.one_of(st.just(WEATHER["function"]["parameters"]),
                                                                           SCALAR),
                                                   "description": SCALAR})
    tool = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["function", "x"]), "function": function}), SCALAR)
    choice = st.one_of(st.sampled_from(["none", "auto", "required", "x"]), SCALAR,
                       st.fixed_dictionaries({"type": st.just("function"),
                                              "function": st.fixed_dictionaries({"name": st.sampled_from(
                                                  ["get_weather", "f"])})}))
    message = st.one_of(st.sampled_from(HISTORY), st.fixed_dictionaries(
        {"role": st.sampled_from(["assistant", "tool"]), "content": st.one_of(st.text(max_size=5), SCALAR)},
        optional={"tool_calls": st.one_of(st.lists(st.one_of(st.just(CALL), SCALAR), max_size=2), SCALAR),
                  "tool_call_id": SCALAR}))
    return st.fixed_dictionaries({"messages": st.lists(message, min_size=1, max_size=3)}, optional={
        "tools": st.one_of(st.lists(tool, max_size=2), SCALAR), "tool_choice": choice,
        "parallel_tool_calls": SCALAR, "stream": st.booleans()})


def response_formats() -> st.SearchStrategy:
    """Random response_format values: JSON schemas with supported, unsupported and broken parts."""
    schema = st.recursive(st.one_of(SCALAR, st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null", "x"]),
        "enum": st.lists(SCALAR, max_size=3), "maxLength": SCALAR, "minItems": SCALAR, "format": SCALAR,
        "pattern": st.sampled_from(["a+", "(", "[0-9]{2}"])})),
        lambda inner: st.fixed_dictionaries({}, optional={"properties": st.dictionaries(st.text(max_size=3), inner,
                                                                                          max_size=2),
                                                          "items": inner, "anyOf": st.lists(inner, max_size=2),
                                                          "required": st.lists(st.text(max_size=3), max_size=2)}),
        max_leaves=6)
    return st.one_of(SCALAR, st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object", "json_schema", "x"])},
                                                   optional={"json_schema": st.one_of(SCALAR, st.fixed_dictionaries(
                                                       {"name": st.just("s")}, optional={"schema": schema}))}))
