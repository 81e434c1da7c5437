"""The executor: runs a plan through the worker and samples the logits rows into a StepResult."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from ..core import KVCacheFullError, LlaisysError
from .kv_ops import KvOp
from .outputs import Logprob, StepLogprobs
from .request import Completion, Request
from .sampler import SamplingRow, sample
from .scheduler import Chunk, Plan, Sampled, StepResult
from .worker import Worker

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.decode_token = lambda t: worker.adapter.decode([t])

    def apply(self, ops: Sequence[KvOp]) -> None:
        self.worker.apply(ops)

    def execute(self, plan: Plan) -> StepResult:
        """Apply the plan's KV operations, compute its chunks and sample; changes no request."""
        self.worker.apply(plan.kv_ops)
        if not plan.chunks:
            return StepResult()
        chunks, logits, failed = self._decode(plan.chunks)
        result = StepResult(computed=chunks, failed=failed)
        targets, rows = self._sampling_targets(chunks)
        if targets:
            if rows != list(range(len(logits))):  # only n > 1 reuses a row: spare the usual copy
                logits = logits[rows]
            sampled = sample(logits, [self._sampling_row(c) for c in targets])
            result.sampled = [Sampled(c, int(sampled.token_ids[i]), self._logprobs(int(sampled.token_ids[i]),
                                                                                     sampled.logprobs[i]))
                              for i, c in enumerate(targets)]
        return result

    def _decode(self, chunks: list[Chunk]) -> tuple[list[Chunk], np.ndarray, dict[Request, str]]:
        """Decode the chunks in one batch. If the core rejects it, decode each request's chunks
        alone so that only the faulty request fails."""
        try:
            return chunks, self.worker.execute(chunks), {}
        except KVCacheFullError:
            raise
        except LlaisysError as e:
            log.warning("a batch of %d chunks failed (%s); retrying request by request", len(chunks), e)
        ok, rows, failed = [], [], {}
        for request in dict.fromkeys(ch.completion.request for ch in chunks):
            mine = [ch for ch in chunks if ch.completion.request is request]
            try:
                rows.append(self.worker.execute(mine).copy())
                ok += mine
            except LlaisysError as e:
                failed[request] = f"the model rejected the request: {e}"
        return ok, np.concatenate(rows) if rows else np.empty((0, 0), np.float32), failed

    @staticmethod
    def _sampling_targets(chunks: list[Chunk]) -> tuple[list[Completion], list[int]]:
        """The completions to sample and, for each, its logits row. A leader's first row is also
        the first row of every completion of its request that has no token yet."""
        targets, rows = [], []
        row = 0
        for ch in chunks:
            if not ch.sample:
                continue
            c = ch.completion
            fresh = [c] if c.output_ids else [x for x in c.request.live if not x.output_ids]
            targets += fresh
            rows += [row] * len(fresh)
            row += 1
        return targets, rows

    @staticmethod
    def _sampling_row(c: Completion) -> SamplingRow:
        request = c.request
        params = request.params
        banned = ()
        if len(c.output_ids) < params.min_tokens:
            banned = request.eos_ids | set(params.stop_token_ids) | request.special_stops.keys()
        allowed = None
        if c.grammar is not None:
            c.grammar.sync(c.output_ids, request.eos_ids)
            allowed = c.grammar.allowed(request.eos_ids)
        return SamplingRow(params, c.generator, request.prompt_ids, c.output_ids, banned, allowed)

    def _logprobs(self, token: int, logprobs) -> Optional[StepLogprobs]:
        """The sampled token's and the top alternatives' log-probabilities, decoded."""
        if logprobs is None:
            return None
        step = {token: Logprob(logprobs.token_logprob, logprobs.token_rank, self.decode_token(token))}
        for rank, (t, lp) in enumerate(zip(logprobs.top_ids, logprobs.top_logprobs), start=1):
            step.setdefault(t, Logprob(lp, rank, self.decode_token(t)))
        return step
