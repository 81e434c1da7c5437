"""llama-server's native API: `/completion` and `/infill` bodies and answers (what llama.vscode,
llama.vim, Continue's llama.cpp provider and Tabby send and read).

An answer is {"content", "tokens", "stop", "stop_type", "stopping_word", "tokens_predicted",
"tokens_evaluated", "tokens_cached", "truncated", "model"}; a stream is one such object per piece
(stop false) and a last one with stop true, with no `[DONE]`.
"""
from __future__ import annotations

from typing import Any

from ..engine import RequestOutput
from .errors import bad_request
from .fim import Infill
from .protocol import GenerationRequest, check_fields, check_stop, field, sampling_params
from .structured import gbnf_grammar, schema_grammar

# Hints llama.cpp's clients send that steer llama-server's own machinery (slots, timing budgets,
# sampler order, prompt caching, which is always on here): accepted and without effect.
HINTS = {"cache_prompt", "samplers", "t_max_prompt_ms", "t_max_predict_ms", "n_indent", "response_fields",
         "id_slot", "timings_per_token", "return_tokens"}
COMPLETION_FIELDS = HINTS | {"model", "prompt", "n_predict", "max_tokens", "temperature", "top_k", "top_p", "min_p",
                             "seed", "stop", "repeat_penalty", "presence_penalty", "frequency_penalty",
                             "ignore_eos", "stream", "json_schema", "grammar"}
INFILL_FIELDS = COMPLETION_FIELDS | {"input_prefix", "input_suffix", "input_extra"}


def parse_native_completion(body: dict[str, Any], defaults: dict[str, Any]) -> GenerationRequest:
    """A /completion body: `prompt` as a string or token ids."""
    check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, str) and prompt:
        prompts = [{"prompt": prompt}]
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompts = [{"prompt_token_ids": prompt}]
    else:
        raise bad_request("'prompt' must be a non-empty string or array of token ids", param="prompt")
    return _generation(prompts, body, defaults)


def parse_infill(body: dict[str, Any], defaults: dict[str, Any]) -> GenerationRequest:
    """An /infill body: the text before and after the cursor, what is typed at it, and other files."""
    check_fields(body, INFILL_FIELDS)
    extra = field(body, "input_extra", list, [])
    for i, chunk in enumerate(extra):
        if not (isinstance(chunk, dict) and isinstance(chunk.get("text"), str)
                and isinstance(chunk.get("filename", ""), str)):
            raise bad_request(f"input_extra[{i}] must be an object with a string 'text' (and 'filename')",
                              param=f"input_extra[{i}]")
    gen = _generation([], body, defaults)
    gen.infill = Infill(field(body, "input_prefix", str, ""), field(body, "input_suffix", str, ""),
                        field(body, "prompt", str, ""), [(c.get("filename", ""), c["text"]) for c in extra])
    return gen


def _generation(prompts: list[dict[str, Any]], body: dict[str, Any], defaults: dict[str, Any]) -> GenerationRequest:
    n_predict = field(body, "n_predict", int, None)
    if n_predict is None:
        n_predict = field(body, "max_tokens", int, defaults.get("max_tokens", -1))
    stop = field(body, "stop", list, None)
    check_stop(stop)
    seed = field(body, "seed", int, -1)
    values = dict(
        max_tokens=None if n_predict < 0 else n_predict,  # llama.cpp: -1 = until the context ends
        temperature=field(body, "temperature", float, defaults.get("temperature", 0.8)),
        top_k=field(body, "top_k", int, defaults.get("top_k", 40)),
        top_p=field(body, "top_p", float, defaults.get("top_p", 0.95)),
        min_p=field(body, "min_p", float, defaults.get("min_p", 0.05)),
        seed=None if seed < 0 else seed, stop=stop, ignore_eos=field(body, "ignore_eos", bool, False),
        repetition_penalty=field(body, "repeat_penalty", float, defaults.get("repetition_penalty", 1.0)),
        presence_penalty=field(body, "presence_penalty", float, 0.0),
        frequency_penalty=field(body, "frequency_penalty", float, 0.0), grammar=_grammar(body))
    if values["max_tokens"] == 0:
        raise bad_request("'n_predict' must be -1 (no limit) or positive", param="n_predict")
    params = sampling_params(values, {"max_tokens": "n_predict", "repetition_penalty": "repeat_penalty"})
    return GenerationRequest(prompts, params, field(body, "stream", bool, False), False, None)


def _grammar(body: dict[str, Any]):
    """llama-server's constraints: `json_schema` (a schema object) or `grammar` (GBNF text)."""
    schema, gbnf = field(body, "json_schema", dict, None), field(body, "grammar", str, None)
    if schema is not None and gbnf:
        raise bad_request("give 'json_schema' or 'grammar', not both", param="grammar")
    if schema is not None:
        return schema_grammar(schema, "json_schema")
    return gbnf_grammar(gbnf, "grammar") if gbnf else None


class NativeBuilder:
    """llama-server's answer shapes for one prompt (native calls take no n and no prompt lists)."""

    done_marker = False

    def __init__(self, model: str, call_id: str):
        self.model = model
        self.id = call_id

    def response(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        out = outputs[0]
        c = out.outputs[0]
        stop_type = {"stop": "word" if isinstance(c.stop_reason, str) else "eos", "length": "limit"}.get(
            c.finish_reason, "none")
        return {"index": 0, "content": c.text, "tokens": list(c.token_ids), "stop": True, "model": self.model,
                "stop_type": stop_type, "stopping_word": c.stop_reason if isinstance(c.stop_reason, str) else "",
                "tokens_predicted": out.metrics.num_generated_tokens, "tokens_evaluated": len(out.prompt_token_ids),
                "tokens_cached": out.metrics.num_cached_tokens, "truncated": False}

    def stream_start(self, num_prompts: int) -> list[dict[str, Any]]:
        return []

    def stream_delta(self, prompt_index: int, delta: RequestOutput) -> list[dict[str, Any]]:
        return [{"index": 0, "content": c.text, "tokens": list(c.token_ids), "stop": False}
                for c in delta.outputs if c.text or c.token_ids]

    def stream_end(self, outputs: list[RequestOutput]) -> list[dict[str, Any]]:
        return [dict(self.response(outputs), content="", tokens=[])]
