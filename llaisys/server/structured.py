"""Structured output: `response_format` and forced tool calls as llguidance grammars, checked before
anything runs so that a schema feature llguidance cannot enforce is a 400 naming it."""
from __future__ import annotations

import json
from typing import Any, Optional

from llguidance import LLMatcher
from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

from .errors import bad_request
from .tool_calls import CLOSE, OPEN

# Compact JSON: a small model given free whitespace may fill its whole budget with it.
JSON_OPTIONS = {"whitespace_flexible": False}
NEWLINE = "\n"


def response_format_grammar(body: dict[str, Any]) -> Optional[str]:
    """The grammar `response_format` asks for; None for plain text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar({"type": "object"}, "response_format")
    if kind != "json_schema":
        raise bad_request("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}",
                          param="response_format")
    spec = fmt.get("json_schema")
    schema = spec.get("schema", {}) if isinstance(spec, dict) else None
    if not isinstance(schema, dict):
        raise bad_request("'response_format.json_schema' must be {'name', 'schema': {...}}",
                          param="response_format.json_schema")
    return schema_grammar(schema, "response_format.json_schema")


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """Any value of the JSON schema, compact."""
    return checked(LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS), param)


def gbnf_grammar(gbnf: str, param: str) -> str:
    """A llama.cpp GBNF grammar, through llguidance's Lark."""
    try:
        lark = gbnf_to_lark(gbnf)
    except GbnfToLarkError as e:
        raise bad_request(f"the grammar is not valid GBNF: {e}"[:500], param=param)
    return checked(LLMatcher.grammar_from_lark(lark), param)


def tool_call_grammar(functions: list[dict[str, Any]], parallel: bool) -> str:
    """One call (or several, with parallel) of the given functions in Qwen2.5's tagged form, the
    arguments following each function's parameters schema."""
    calls = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
              "properties": {"name": {"const": f["name"]},
                             "arguments": f.get("parameters") or {"type": "object"}}} for f in functions]
    schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
    start = "start: call (\"\\n\" call)*" if parallel else "start: call"
    tags = f"call: {json.dumps(OPEN + NEWLINE)} body {json.dumps(NEWLINE + CLOSE)}"
    body = f"body: %json {json.dumps({**schema, 'x-guidance': JSON_OPTIONS})}"
    lark = "\n".join([start, tags, body])
    return checked(LLMatcher.grammar_from_lark(lark), "tools")


def checked(grammar: str, param: str) -> str:
    failed, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise bad_request(f"the schema cannot be enforced: {'; '.join(messages)}"[:500], param=param)
    return grammar
