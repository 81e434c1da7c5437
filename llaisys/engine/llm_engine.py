"""LLMEngine: requests in, one step at a time, increments out. Synchronous; not thread-safe.

step() = Scheduler.schedule() (a plan) -> Executor.execute(plan) (compute and sample: a plain
StepResult) -> Scheduler.postprocess(result) (every state change) -> the KV operations it decided
-> increments.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..core import KVCacheFullError
from ..models import ModelAdapter, RuntimeOptions, load_model
from .config import EngineArgs
from .detokenizer import IncrementalDetokenizer
from .draft_model import DraftModel, check_vocabulary
from .errors import PromptTooLongError
from .executor import Executor
from .grammar import GrammarState, GrammarTokenizers
from .outputs import RequestOutput, SpecCounters
from .request import Request, RequestState
from .sampling_params import SamplingParams
from .kv_manager import KvManager
from .scheduler import Scheduler, StepResult
from .ngram import NgramDrafter
from .spec_decode import Speculator
from .worker import Worker

log = logging.getLogger(__name__)

# A prompt: text, token ids, or a dict with "prompt" (text) or "prompt_token_ids".
PromptType = Union[str, list[int], dict[str, Any]]


@dataclasses.dataclass
class EngineStats:
    """A snapshot of the engine's load and its counters since start."""

    num_running: int
    num_waiting: int
    kv_used_cells: int  # in use by running requests (their own and those they share with the prefix cache)
    kv_cached_cells: int  # held by the prefix cache and used by nothing running: free for the taking
    kv_capacity: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    num_steps: int
    last_step_seconds: float
    step_seconds_total: float
    finished_by_reason: dict[str, int]  # per completion: "stop", "length", "abort"
    requests_failed: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens whose cells were reused
    prefix_cache_cells: int  # all cells the prefix cache holds, shared with running requests or not
    spec_decode: SpecCounters  # speculative decoding: verifies, drafted and accepted tokens

    @property
    def kv_usage(self) -> float:
        return self.kv_used_cells / self.kv_capacity if self.kv_capacity else 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        """Hits / queries, in tokens (vLLM's definition); 0 before any query."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class LLMEngine:
    def __init__(self, adapter: ModelAdapter, args: EngineArgs, draft: Optional[ModelAdapter] = None):
        """draft: the loaded draft model when args.speculative is "draft" (only its core model is kept)."""
        self.adapter = adapter
        self.args = args
        self.worker = Worker(adapter)
        if (args.speculative == "draft") != (draft is not None):
            raise ValueError("a draft model is needed with speculative='draft', and only then")
        self.drafter = None
        if draft is not None:
            check_vocabulary(adapter, draft)
            self.drafter = DraftModel(draft.model, args.max_num_seqs, args.speculative_p_min)
        self.executor = Executor(self.worker, self.drafter)
        self.kv = KvManager(self.worker.kv_capacity, args.max_num_seqs,
                            args.prefix_cache_seqs if args.enable_prefix_caching else 0, args.prefix_cache_max_cells)
        self.speculator = None
        if self.drafter is not None:
            self.speculator = Speculator(args.num_speculative_tokens, args.speculative_adaptive,
                                         draft_cost=self.drafter.cost, prompt_lacking=self.drafter.prompt_lacking)
        elif args.speculative != "off":
            self.speculator = Speculator(args.num_speculative_tokens, args.speculative_adaptive,
                                         NgramDrafter(args.prompt_lookup_min, args.prompt_lookup_max))
        self.scheduler = Scheduler(args.max_num_seqs, args.max_num_batched_tokens, self.kv, self.speculator)
        self.max_model_len = min(adapter.max_context, args.max_model_len or adapter.max_context)
        self.eos_ids = frozenset(adapter.end_token_ids)
        self.special_tokens = adapter.special_tokens
        self.grammar_tokenizers = GrammarTokenizers(adapter.grammar_tokenizer)
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._ids = itertools.count()
        self._generation_tokens = self._steps = self._failed = 0
        self._last_step = self._step_total = 0.0
        self._finished = {"stop": 0, "length": 0, "abort": 0}

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "LLMEngine":
        path = Path(args.model) if args.model else _default_model()
        options = RuntimeOptions(n_ctx=args.n_ctx, n_seq_max=args.n_seq_max, n_batch=args.max_num_batched_tokens,
                                 n_threads=args.n_threads, kv_dtype=args.kv_dtype, weight_dtype=args.weight_dtype)
        target = load_model(path, options)
        if args.draft_model is None:
            return cls(target, args)
        # Its own cells for the running slots only: it has no prefix cache.
        draft = load_model(Path(args.draft_model), dataclasses.replace(options, n_seq_max=args.max_num_seqs))
        return cls(target, args, draft)

    # requests
    def make_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                     request_id: Optional[str] = None, arrival_time: Optional[float] = None) -> Request:
        """Check and tokenize a prompt into a Request, without queueing it; raises ValueError naming the problem."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        text, ids = self.tokenize(prompt)
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"the prompt has {len(ids)} tokens but the context holds {self.max_model_len}, "
                                     f"leaving no room for a generated token")
        if params.n > self.args.max_num_seqs:
            raise ValueError(f"n ({params.n}) exceeds max_num_seqs ({self.args.max_num_seqs})")
        request_id = str(next(self._ids)) if request_id is None else str(request_id)
        # A stop string naming a special token matches that token: its text is never decoded.
        special_stops = {self.special_tokens[s]: s for s in params.stop if s in self.special_tokens}
        grammar = params.grammar
        make_grammar = None if grammar is None else lambda: GrammarState(grammar, self.grammar_tokenizers, self.vocab_size)
        return Request(request_id, text, ids, params, self.eos_ids, self.max_model_len, self._detokenizer(params),
                       arrival_time, special_stops, make_grammar)

    def add(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.scheduler.add(request)

    def add_request(self, prompt: PromptType, params: Optional[SamplingParams] = None,
                    request_id: Optional[str] = None) -> Request:
        request = self.make_request(prompt, params, request_id)
        self.add(request)
        return request

    def abort_request(self, request_id: str, error: Optional[str] = None) -> Optional[RequestOutput]:
        """Cancel a request now (failed instead, when an error is given), freeing its cells; returns its
        final increment, or None if it is not queued or running."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.abort(request, error)
        self.executor.apply(self.kv.take_ops())
        self._count_finished(request)
        return request.take_output(delta=True)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # stepping
    def step(self) -> list[RequestOutput]:
        """Run one step; returns an increment for every request that changed."""
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        try:
            result = self.executor.execute(plan)
        except KVCacheFullError as e:
            # The manager's cell count and the core disagree: back off by preempting, never fail.
            log.error("the core found no KV room for a planned step (%s); preempting the newest request", e)
            result = StepResult()
            if self.scheduler.running:
                self.scheduler.preempt_newest()
        except Exception as e:  # a fault in one step fails the requests in it, not the engine
            log.exception("step failed")
            result = StepResult(failed={ch.completion.request: f"internal error: {e}" for ch in plan.chunks})
        touched = self.scheduler.postprocess(plan, result)
        self.executor.apply(self.kv.take_ops())
        outputs = [self._collect(request) for request in touched]
        self._steps += 1
        self._last_step = time.perf_counter() - start
        self._step_total += self._last_step
        if self.speculator is not None and result.computed and all(ch.length == 1 for ch in result.computed):
            # decode steps only (prompts cost otherwise), and the target's time alone
            rows = sum(ch.rows for ch in result.computed)
            self.speculator.cost.observe(rows, self._last_step - result.draft_seconds)
        return outputs

    def _collect(self, request: Request) -> RequestOutput:
        """Count what the request produced in this step and take its increment."""
        self._generation_tokens += sum(len(c.new_ids) for c in request.completions)
        if request.state.done:
            self.requests.pop(request.request_id, None)
            self._count_finished(request)
        return request.take_output(delta=True)

    def _count_finished(self, request: Request) -> None:
        for c in request.completions:
            self._finished[c.finish_reason] += 1
        self._failed += request.state is RequestState.FAILED

    def reset_prefix_cache(self) -> None:
        """Free every cached cell that no running request uses."""
        self.kv.reset_cache()
        self.executor.apply(self.kv.take_ops())

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv
        return EngineStats(len(s.running), len(s.waiting), s.kv_used, kv.evictable, kv.capacity, s.num_preemptions,
                           s.prompt_tokens_total, self._generation_tokens, self._steps, self._last_step,
                           self._step_total, dict(self._finished), self._failed, kv.queries, kv.hits, kv.cached,
                           self.speculator.counters.copy() if self.speculator is not None else SpecCounters())

    # prompts (the engine's own tokenizer: only for the thread that steps it; see AsyncLLM's client methods)
    @property
    def vocab_size(self) -> int:
        return self.adapter.model.n_vocab

    def tokenize(self, prompt: PromptType) -> tuple[Optional[str], list[int]]:
        """A prompt's text (None when given as ids) and its checked token ids; ValueError naming the problem."""
        return prompt_ids(prompt, self.adapter.encode, self.vocab_size)

    def detokenize(self, ids: list[int]) -> str:
        return self.adapter.decode(check_ids(ids, self.vocab_size))

    def chat_prompt(self, messages: list[dict[str, Any]], tools: Optional[list[dict[str, Any]]] = None) -> str:
        """A conversation in the model's chat template (with the tools offered), ready for generation."""
        return chat_text(messages, lambda m: self.adapter.chat_text(m, tools=tools))

    def _detokenizer(self, params: SamplingParams):
        decode, stop = self.adapter.decode, params.stop
        return lambda prompt_ids: IncrementalDetokenizer(decode, stop, prompt_ids)


def _default_model() -> Path:
    from ..models.default_model import fetch_gguf

    return fetch_gguf()


def prompt_ids(prompt: PromptType, encode: Callable[[str], list[int]], vocab: int) -> tuple[Optional[str], list[int]]:
    """A prompt's text (None when given as ids) and its checked token ids; ValueError naming the problem."""
    if isinstance(prompt, dict):
        if "prompt_token_ids" in prompt:
            return prompt.get("prompt"), check_ids(prompt["prompt_token_ids"], vocab)
        if "prompt" in prompt:
            return prompt_ids(prompt["prompt"], encode, vocab)
        raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompt is empty")
        return prompt, encode(prompt)
    return None, check_ids(prompt, vocab)


def check_ids(ids, vocab: int) -> list[int]:
    if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(ids).__name__}")
    if not ids:
        raise ValueError("prompt is empty")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
    return list(ids)


def chat_text(messages: list[dict[str, str]], render: Callable[[list[dict[str, str]]], str]) -> str:
    """A checked conversation rendered by the model's chat template; ValueError naming a bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be a dict with string 'role' and 'content'")
    return render(messages)
