"""The tool fields of a chat request: `tools`, `tool_choice`, `parallel_tool_calls`, and the tool
parts of its messages (an assistant's `tool_calls`, a `tool` message's `tool_call_id`)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional, Union

from .errors import bad_request


@dataclasses.dataclass
class ToolSpec:
    """The functions offered and how they may be called."""

    tools: list[dict[str, Any]]  # OpenAI's [{"type": "function", "function": {name, description, parameters}}]
    choice: Union[str, dict[str, Any]]  # "auto", "required", or {"type": "function", "function": {"name"}}
    parallel: bool

    @property
    def names(self) -> set[str]:
        return {t["function"]["name"] for t in self.tools}

    @property
    def forced(self) -> Optional[list[dict[str, Any]]]:
        """The functions one of which must be called (required, or the named one); None under auto."""
        if self.choice == "auto":
            return None
        if self.choice == "required":
            return [t["function"] for t in self.tools]
        return [t["function"] for t in self.tools if t["function"]["name"] == self.choice["function"]["name"]]


def parse_tools(body: dict[str, Any]) -> Optional[ToolSpec]:
    """The checked tool fields; None when no tool may be called (none offered, or tool_choice none)."""
    tools = body.get("tools")
    choice = body.get("tool_choice")
    parallel = body.get("parallel_tool_calls", True)
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none"):
            raise bad_request("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list) or not tools:
        raise bad_request("'tools' must be a non-empty array of {'type': 'function', 'function': {...}}",
                          param="tools")
    for i, tool in enumerate(tools):
        _check_tool(i, tool)
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise bad_request("'tools' names a function twice", param="tools")
    choice = "auto" if choice is None else choice
    if choice == "none":
        return None
    if isinstance(choice, dict):
        name = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or name not in names:
            raise bad_request(f"'tool_choice' must be none, auto, required or {{'type': 'function', 'function': "
                              f"{{'name': ...}}}} naming one of the tools ({', '.join(names)})", param="tool_choice")
    elif choice not in ("auto", "required"):
        raise bad_request(f"'tool_choice' must be none, auto, required or a named function, got {choice!r}"[:300],
                          param="tool_choice")
    return ToolSpec(tools, choice, parallel is not False)


def _check_tool(i: int, tool: Any) -> None:
    param = f"tools[{i}]"
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
        raise bad_request(f"{param} must be {{'type': 'function', 'function': {{'name', ...}}}}", param=param)
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise bad_request(f"{param}.function.name must be a non-empty string", param=f"{param}.function.name")
    if not isinstance(function.get("parameters", {}), dict):
        raise bad_request(f"{param}.function.parameters must be a JSON schema object",
                          param=f"{param}.function.parameters")
    if not isinstance(function.get("description", ""), str):
        raise bad_request(f"{param}.function.description must be a string", param=f"{param}.function.description")


def message_tool_calls(param: str, calls: Any) -> list[dict[str, Any]]:
    """An assistant message's tool_calls for the chat template, arguments decoded from their JSON
    text (a template that encodes them again would otherwise show a string of JSON)."""
    if not isinstance(calls, list):
        raise bad_request(f"{param}.tool_calls must be an array", param=f"{param}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        where = f"{param}.tool_calls[{j}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise bad_request(f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}",
                              param=where)
        args = function.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise bad_request(f"{where}.function.arguments is not valid JSON: {e}",
                                  param=f"{where}.function.arguments")
        out.append({"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": args}})
    return out
