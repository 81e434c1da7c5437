"""Request bodies of the OpenAI API, checked field by field and turned into engine terms.

Every problem raises APIError 400 naming the field (404 for an unknown model), and so does a field
this server does not know: nothing a client sends is silently ignored, except the bookkeeping fields
of OpenAI's API that change nothing in a reply (NO_EFFECT_FIELDS, which SDKs and agent frameworks
send). Fields a request leaves open take the model's generation-config defaults.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

from ..engine import SamplingParams
from .errors import APIError, bad_request
from .fim import Infill
from .structured import response_format_grammar, tool_call_grammar
from .tools import ToolSpec, message_tool_calls, parse_tools

# Far above what clients send (Continue sends 14 stop strings of its own): only a guard on the search.
MAX_STOP_STRINGS = 256

# OpenAI's fields that only label or bill a request: accepted, and without effect here.
NO_EFFECT_FIELDS = {"user", "store", "metadata", "service_tier"}
# Fields of both /v1/chat/completions and /v1/completions (vLLM's sampling extensions among them;
# `speculative`: false opts a request out of speculative decoding).
COMMON_FIELDS = NO_EFFECT_FIELDS | {
    "model", "stream", "stream_options", "n", "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "logit_bias", "speculative"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls", "response_format"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "suffix", "echo", "best_of", "logprobs"}


@dataclasses.dataclass
class GenerationRequest:
    """One API call: its prompts (one engine request each, as text or token ids) and how to run them."""

    prompts: list[dict[str, Any]]  # {"prompt": text} and/or {"prompt_token_ids": ids}
    params: SamplingParams
    stream: bool
    include_usage: bool
    top_logprobs: Optional[int]  # None = no logprobs in the answer
    infill: Optional[Infill] = None  # fill in the middle: the prompt is built from it (prompts unused)
    tools: Optional[ToolSpec] = None  # the functions the reply may call


def check_body(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def check_fields(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad_request(f"unsupported field{'s' if len(unknown) > 1 else ''}: {', '.join(map(repr, unknown))}",
                          param=unknown[0])


def check_model(body: dict[str, Any], served_name: str) -> None:
    model = field(body, "model", str, None)
    if model is not None and model != served_name:
        raise APIError(404, f"The model `{model}` does not exist; this server serves `{served_name}`.",
                       param="model", code="model_not_found")


# JSON type -> (what it is called in an error, whether a value has it). A bool is not a number.
JSON_TYPES: dict[type, tuple[str, Callable[[Any], bool]]] = {
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
    str: ("a string", lambda v: isinstance(v, str)),
    bool: ("a boolean", lambda v: isinstance(v, bool)),
    list: ("an array", lambda v: isinstance(v, list)),
    dict: ("an object", lambda v: isinstance(v, dict)),
}


def field(body: dict[str, Any], name: str, kind, default=None):
    """body[name] if it has the JSON type `kind` (int, float, str, bool, list, dict), else 400; null = default."""
    value = body.get(name, None)
    if value is None:
        return default
    called, has_type = JSON_TYPES[kind]
    if not has_type(value):
        raise bad_request(f"'{name}' must be {called}, got {value!r}"[:300], param=name)
    return value


def parse_chat(body: dict[str, Any], defaults: dict[str, Any],
               render: Callable[[list, Optional[list]], str]) -> GenerationRequest:
    """A /v1/chat/completions body; render turns checked messages and tools into the prompt text."""
    check_fields(body, CHAT_FIELDS)
    messages = field(body, "messages", list)
    if not messages:
        raise bad_request("'messages' must be a non-empty array of {role, content} objects", param="messages")
    tools = parse_tools(body)
    grammar = response_format_grammar(body)
    if tools is not None and tools.forced is not None:
        if grammar is not None:
            raise bad_request("'response_format' cannot be combined with a forced tool call", param="response_format")
        grammar = tool_call_grammar(tools.forced, tools.parallel)
    prompt = render([_message(i, m) for i, m in enumerate(messages)], tools and tools.tools)
    logprobs = field(body, "logprobs", bool, False)
    top = field(body, "top_logprobs", int, None)
    if top is not None and not logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    max_tokens = field(body, "max_completion_tokens", int, None)
    if max_tokens is None:
        max_tokens = field(body, "max_tokens", int, defaults.get("max_tokens"))
    top = (top or 0) if logprobs else None
    gen = _generation([{"prompt": prompt}], body, defaults, max_tokens, top, grammar)
    gen.tools = tools
    return gen


def parse_completion(body: dict[str, Any], defaults: dict[str, Any]) -> GenerationRequest:
    """A /v1/completions body: prompt as a string, strings, token ids, or lists of token ids; with a
    `suffix`, one string prompt filled in the middle."""
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt", None)
    if isinstance(prompt, str):
        prompts = [{"prompt": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = [{"prompt": p} for p in prompt]
    elif isinstance(prompt, list) and prompt and all(_is_ids(p) for p in prompt):
        prompts = [{"prompt_token_ids": p} for p in prompt]
    elif _is_ids(prompt):
        prompts = [{"prompt_token_ids": prompt}]
    else:
        raise bad_request("'prompt' must be a non-empty string, array of strings, array of token ids, "
                          "or array of token-id arrays", param="prompt")
    if any(not p.get("prompt", True) or not p.get("prompt_token_ids", True) for p in prompts):
        raise bad_request("'prompt' must not be empty", param="prompt")
    if field(body, "echo", bool, False):
        raise bad_request("'echo' is not supported", param="echo")
    n = field(body, "n", int, 1)
    if field(body, "best_of", int, n) != n:
        raise bad_request("'best_of' other than n is not supported", param="best_of")
    max_tokens = field(body, "max_tokens", int, defaults.get("max_tokens", 16))
    gen = _generation(prompts, body, defaults, max_tokens, field(body, "logprobs", int, None))
    suffix = field(body, "suffix", str, None)
    if suffix is not None:
        if not isinstance(prompt, str):
            raise bad_request("'suffix' needs 'prompt' to be one string", param="suffix")
        gen.infill = Infill(prompt, suffix)
    return gen


def parse_token_ids(body: dict[str, Any], name: str = "tokens") -> list[int]:
    ids = body.get(name)
    if not _is_ids(ids):
        raise bad_request(f"'{name}' must be an array of token ids", param=name)
    return ids


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def _message(index: int, message: Any) -> dict[str, Any]:
    param = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{param} must be an object with 'role' and 'content'", param=param)
    role = message.get("role")
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise bad_request(f"{param}.role must be one of system, developer, user, assistant, tool; got {role!r}",
                          param=f"{param}.role")
    content = message.get("content")
    extra: dict[str, Any] = {}
    if role == "assistant" and message.get("tool_calls") is not None:
        extra["tool_calls"] = message_tool_calls(param, message["tool_calls"])
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str):
            raise bad_request(f"{param}.tool_call_id must be the id of the call answered", param=f"{param}.tool_call_id")
        extra["tool_call_id"] = call_id
    if content is None and role == "assistant":
        content = ""
    elif isinstance(content, list):  # content parts: only text is understood
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise bad_request(f"{param}.content parts must be {{'type': 'text', 'text': ...}}; only text is "
                              f"supported", param=f"{param}.content")
        content = "".join(p["text"] for p in content)
    elif not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string or an array of text parts", param=f"{param}.content")
    return {"role": "system" if role == "developer" else role, "content": content, **extra}


def _generation(prompts: list[dict[str, Any]], body: dict[str, Any], defaults: dict[str, Any],
                max_tokens: Optional[int], top_logprobs: Optional[int], grammar: Optional[str] = None) -> GenerationRequest:
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, None)
    if options is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = field(options or {}, "include_usage", bool, False)
    field(body, "user", str)  # accepted and otherwise unused
    temperature = field(body, "temperature", float, defaults.get("temperature", 1.0))
    if not 0.0 <= temperature <= 2.0:
        raise bad_request(f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    stop = body.get("stop")
    check_stop(stop)
    seed = field(body, "seed", int, None)
    values = dict(
        n=field(body, "n", int, 1), max_tokens=max_tokens, min_tokens=field(body, "min_tokens", int, 0),
        temperature=temperature, top_p=field(body, "top_p", float, defaults.get("top_p", 1.0)),
        top_k=field(body, "top_k", int, defaults.get("top_k", 0)),
        min_p=field(body, "min_p", float, defaults.get("min_p", 0.0)),
        seed=None if seed is None else seed % 2**64,  # OpenAI takes any int64; the generator wants >= 0
        stop=stop, stop_token_ids=field(body, "stop_token_ids", list, None),
        ignore_eos=field(body, "ignore_eos", bool, False),
        presence_penalty=field(body, "presence_penalty", float, 0.0),
        frequency_penalty=field(body, "frequency_penalty", float, 0.0),
        repetition_penalty=field(body, "repetition_penalty", float, defaults.get("repetition_penalty", 1.0)),
        logprobs=top_logprobs, logit_bias=_logit_bias(body), grammar=grammar,
        speculative=field(body, "speculative", bool, True))
    params = sampling_params(values, {"logprobs": "top_logprobs"} if "messages" in body else {})
    return GenerationRequest(prompts, params, stream, include_usage, top_logprobs)


def sampling_params(values: dict[str, Any], names: dict[str, str]) -> SamplingParams:
    """SamplingParams(**values), or a 400 naming the field (names: parameter -> the request's field)."""
    try:
        return SamplingParams(**values)
    except ValueError as e:  # the message starts with the parameter's name
        name = str(e).split(" ", 1)[0]
        raise bad_request(str(e), param=names.get(name, name))


def _logit_bias(body: dict[str, Any]) -> dict[int, float]:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}, the ids as JSON keys (strings)."""
    bias = field(body, "logit_bias", dict, {})
    out = {}
    for key, value in bias.items():
        if not (key.isdigit() and JSON_TYPES[float][1](value)):
            raise bad_request(f"'logit_bias' maps token ids to numbers, got {key!r}: {value!r}"[:300], param="logit_bias")
        out[int(key)] = float(value)
    return out


def check_stop(stop: Any, name: str = "stop") -> None:
    if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise bad_request(f"'{name}' must be a string or an array of strings", param=name)
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"'{name}' holds at most {MAX_STOP_STRINGS} strings", param=name)
