"""The executor: runs a plan through the worker and samples the logits rows into a StepResult."""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from ..core import KVCacheFullError, LlaisysError
from .draft_model import DraftModel
from .kv_ops import KvOp
from .outputs import Logprob, StepLogprobs
from .request import Completion, Request
from .sampler import SamplingRow, sample
from .scheduler import Chunk, Plan, Sampled, StepResult
from .spec_decode import accept_drafts
from .worker import Worker

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, worker: Worker, drafter: Optional[DraftModel] = None):
        self.worker = worker
        self.drafter = drafter
        self.decode_token = lambda t: worker.adapter.decode([t])

    def apply(self, ops: Sequence[KvOp]) -> None:
        self.worker.apply(ops)
        if self.drafter is not None:
            self.drafter.apply(ops)

    def execute(self, plan: Plan) -> StepResult:
        """Apply the plan's KV operations, draft (a draft model), compute the chunks and sample (verifying
        drafts); changes no request."""
        self.apply(plan.kv_ops)
        if not plan.chunks:
            return StepResult()
        chunks, draft_seconds = plan.chunks, 0.0
        if self.drafter is not None:
            chunks, draft_seconds = self.drafter.propose(chunks)
        chunks, logits, failed = self._decode(chunks)
        result = StepResult(computed=chunks, failed=failed, draft_seconds=draft_seconds)
        targets, rows, drafts = self._sampling_targets(chunks)
        if targets:
            # only n > 1 and verifies leave rows out or reuse one: spare the usual copy
            firsts = logits if rows == list(range(len(logits))) else logits[rows]
            sampled = sample(firsts, [self._sampling_row(c) for c in targets])
            for i, c in enumerate(targets):
                token = int(sampled.token_ids[i])
                first = Sampled(c, token, self._logprobs(token, sampled.logprobs[i]))
                if not drafts[i]:
                    result.sampled.append(first)
                    continue
                verify = logits[rows[i]:rows[i] + len(drafts[i]) + 1]
                emitted = accept_drafts(drafts[i], first, lambda j, done: self._sample_row(c, verify[j:j + 1], done))
                result.sampled += emitted
                result.accepted[c] = len(emitted) - 1
        return result

    def _sample_row(self, c: Completion, logits: np.ndarray, emitted: list[Sampled]) -> Sampled:
        """c's next token from one verify row, its earlier rows' tokens already emitted."""
        sampled = sample(logits, [self._sampling_row(c, [s.token for s in emitted])])
        token = int(sampled.token_ids[0])
        return Sampled(c, token, self._logprobs(token, sampled.logprobs[0]))

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
    def _sampling_targets(chunks: list[Chunk]) -> tuple[list[Completion], list[int], list[tuple[int, ...]]]:
        """The completions to sample, for each its (first) logits row and the drafts its rows verify. A
        leader's first row is also the first row of every completion of its request that has no token yet."""
        targets, rows, drafts = [], [], []
        row = 0
        for ch in chunks:
            if not ch.sample:
                continue
            c = ch.completion
            fresh = [c] if c.output_ids else [x for x in c.request.live if not x.output_ids]
            targets += fresh
            rows += [row] * len(fresh)
            drafts += [ch.draft] * len(fresh)
            row += 1 + len(ch.draft)
        return targets, rows, drafts

    @staticmethod
    def _sampling_row(c: Completion, emitted: Sequence[int] = ()) -> SamplingRow:
        """How c's next token is chosen, after the tokens a verify has emitted so far."""
        request = c.request
        params = request.params
        output = c.output_ids + list(emitted) if emitted else c.output_ids
        banned = ()
        if len(output) < params.min_tokens:
            banned = request.eos_ids | set(params.stop_token_ids) | request.special_stops.keys()
        allowed = None
        if c.grammar is not None:
            c.grammar.sync(output, request.eos_ids)  # a verify's emitted tokens too
            allowed = c.grammar.allowed(request.eos_ids)
        return SamplingRow(params, c.generator, request.prompt_ids, output, banned, allowed)

    def _logprobs(self, token: int, logprobs) -> Optional[StepLogprobs]:
        """The sampled token's and the top alternatives' log-probabilities, decoded."""
        if logprobs is None:
            return None
        step = {token: Logprob(logprobs.token_logprob, logprobs.token_rank, self.decode_token(token))}
        for rank, (t, lp) in enumerate(zip(logprobs.top_ids, logprobs.top_logprobs), start=1):
            step.setdefault(t, Logprob(lp, rank, self.decode_token(t)))
        return step
