"""LLM: the offline entry point. Give it prompts, get vLLM-shaped outputs back in request order."""
from __future__ import annotations

from typing import Optional, Sequence, Union

from .config import EngineArgs
from .llm_engine import LLMEngine, PromptType
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Conversation = list[dict[str, str]]


class LLM:
    """`LLM(model=None, **engine_args)`: model is an HF Qwen2 directory or .gguf file, None = the default model;
    engine_args are EngineArgs fields (max_num_seqs, max_num_batched_tokens, n_ctx, ...)."""

    def __init__(self, model: Optional[str] = None, **engine_args):
        engine_args.setdefault("max_waiting", None)  # offline: every prompt is queued at once
        self.engine = LLMEngine.from_engine_args(EngineArgs(model=None if model is None else str(model),
                                                            **engine_args))

    def generate(self, prompts: Union[PromptType, Sequence[PromptType]],
                 sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for a prompt (text, token ids, or {"prompt"/"prompt_token_ids"}) or a list of them.

        sampling_params: one for all prompts, or one per prompt. Every prompt is checked before any
        runs (ValueError naming the problem); outputs come back in the prompts' order.
        """
        prompts = _as_list(prompts)
        params = _params_for(prompts, sampling_params)
        requests = [self.engine.make_request(p, sp) for p, sp in zip(prompts, params)]
        for request in requests:
            self.engine.add(request)
        self._run(len(requests), use_tqdm)
        return [r.take_output(delta=False) for r in requests]

    def chat(self, messages: Union[Conversation, Sequence[Conversation]],
             sampling_params: Union[None, SamplingParams, Sequence[SamplingParams]] = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"}) or a list of them."""
        if not messages:
            raise ValueError("messages is empty: give a conversation or a list of conversations")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        return self.generate([self.engine.chat_prompt(c) for c in conversations], sampling_params, use_tqdm)

    def _run(self, total: int, use_tqdm: bool) -> None:
        bar = None
        if use_tqdm and total > 1:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc="Generating", unit="req", dynamic_ncols=True)
        generated = 0
        while self.engine.has_unfinished_requests():
            outputs = self.engine.step()
            if bar is not None:
                generated += sum(len(c.token_ids) for o in outputs for c in o.outputs)
                bar.set_postfix_str(f"{generated / bar.format_dict['elapsed']:.1f} tok/s" if bar.format_dict[
                    "elapsed"] else "", refresh=False)
                bar.update(sum(o.finished for o in outputs))
        if bar is not None:
            bar.close()


def _as_list(prompts) -> list[PromptType]:
    """One prompt or a list: a string, a dict or a list of ints is a single prompt."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) and not isinstance(t, bool) for t in prompts):
        return [prompts]
    return prompts


def _params_for(prompts: list, sampling_params) -> list[SamplingParams]:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * len(prompts)
    params = list(sampling_params)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
    return params
