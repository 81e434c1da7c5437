"""The executor: runs a plan through the worker, samples the logits rows, applies stop conditions."""
from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

from ..core import KVCacheFullError, LlaisysError
from .outputs import Logprob
from .request import Completion, Request
from .sampler import SamplingRow, sample
from .scheduler import Chunk, Plan
from .worker import Worker

log = logging.getLogger(__name__)


class Executor:
    def __init__(self, worker: Worker):
        self.worker = worker
        self.decode_token = lambda t: worker.adapter.decode([t])

    def free(self, seq_ids: Sequence[int]) -> None:
        self.worker.free(seq_ids)

    def execute(self, plan: Plan) -> set[Request]:
        """Run one step; returns the requests that changed (new tokens, finished or failed)."""
        self.worker.free(plan.freed_seq_ids)
        for seq, n_tokens in plan.truncated:
            self.worker.truncate(seq, n_tokens)
        touched = set(plan.failed)
        if not plan.chunks:
            return touched
        chunks, logits, failed = self._decode(plan.chunks)
        touched |= failed
        for ch in chunks:
            ch.completion.num_computed += ch.length
        self._share_finished_prompts(chunks)
        targets, rows = self._sampling_targets(chunks)
        if targets:
            if rows != list(range(len(logits))):  # only n > 1 reuses a row: spare the usual copy
                logits = logits[rows]
            result = sample(logits, [self._sampling_row(c) for c in targets])
            now = time.time()
            for i, c in enumerate(targets):
                self._accept(c, int(result.token_ids[i]), result.logprobs[i], now)
                touched.add(c.request)
        return touched

    def _decode(self, chunks: list[Chunk]) -> tuple[list[Chunk], np.ndarray, set[Request]]:
        """Decode the chunks in one batch. If the core rejects it, decode each request's chunks
        alone so that only the faulty request fails."""
        try:
            return chunks, self.worker.execute(chunks), set()
        except KVCacheFullError:
            raise
        except LlaisysError as e:
            log.warning("a batch of %d chunks failed (%s); retrying request by request", len(chunks), e)
        ok, rows, failed = [], [], set()
        for request in dict.fromkeys(ch.completion.request for ch in chunks):
            mine = [ch for ch in chunks if ch.completion.request is request]
            try:
                rows.append(self.worker.execute(mine).copy())
                ok += mine
            except LlaisysError as e:
                request.fail(f"the model rejected the request: {e}")  # its cells are freed with the step's others
                failed.add(request)
        return ok, np.concatenate(rows) if rows else np.empty((0, 0), np.float32), failed

    def _share_finished_prompts(self, chunks: list[Chunk]) -> None:
        """Once a leader has computed the prompt, the other completions share its cells."""
        for ch in chunks:
            request, leader = ch.completion.request, ch.completion
            n = request.num_prompt_tokens
            if leader is not request.leader or ch.start >= n or leader.num_computed < n:
                continue
            for c in request.live:
                if c is not leader and c.num_computed < n:
                    self.worker.share_prefix(leader.seq_id, c.seq_id, n)
                    c.num_computed = n

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
            banned = request.eos_ids | set(params.stop_token_ids)
        return SamplingRow(params, c.generator, request.prompt_ids, c.output_ids, banned)

    def _accept(self, c: Completion, token: int, logprobs, now: float) -> None:
        """Append a sampled token, extend the text and check every stop condition."""
        request, params = c.request, c.request.params
        metrics = request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        metrics.num_generated_tokens += 1
        c.output_ids.append(token)
        c.new_ids.append(token)
        if logprobs is not None:
            step = {token: Logprob(logprobs.token_logprob, logprobs.token_rank, self.decode_token(token))}
            for rank, (t, lp) in enumerate(zip(logprobs.top_ids, logprobs.top_logprobs), start=1):
                step.setdefault(t, Logprob(lp, rank, self.decode_token(t)))
            c.logprobs.append(step)
            c.new_logprobs.append(step)
            c.cumulative_logprob += logprobs.token_logprob
        n_out = len(c.output_ids)
        if token in params.stop_token_ids:
            c.finish("stop", token)
        elif token in request.eos_ids:
            c.finish("stop")
        else:
            c.new_text += c.detokenizer.add_token(token, check_stop=n_out >= params.min_tokens)
            if c.detokenizer.stop_string is not None:
                c.finish("stop", c.detokenizer.stop_string)
        if not c.finished and n_out >= request.max_output:
            c.finish("length")
