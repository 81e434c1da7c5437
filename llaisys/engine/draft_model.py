"""The draft-model drafter: a smaller model with the target's tokens proposes drafts greedily (llama.cpp's
speculative-simple: argmax of its logits, stopping when its top probability falls below p_min).

It keeps only its core model (its weights and KV cells; the tokenizer is the target's). Its sequences
are the target's running slots: sequence s holds the draft's cells for the tokens of the completion
running in slot s, recorded in `held`, a prefix of that completion's tokens (plus, between a proposal
and its verify, the drafts fed to it). When the step runs it catches each drafting completion up on the
tokens it has not seen (a whole prompt the first time: it has no prefix cache, but a prompt, or part
of one, that another of its sequences holds is shared, not recomputed), then proposes one draft
position at a time, every drafting sequence in one draft batch per position.
The target's KV operations reach it too (`apply`): the cut of rejected drafts and the release of a
finished, cancelled or preempted completion free its cells as they free the target's.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np

from ..core import Batch, LlaisysError, Model
from ..models import ModelAdapter
from .errors import DraftModelMismatchError
from .kv_ops import KvOp, SeqRm
from .request import Completion
from .scheduler import Chunk
from .spec_decode import StepCost

log = logging.getLogger(__name__)


def check_vocabulary(target: ModelAdapter, draft: ModelAdapter) -> None:
    """The draft must speak the target's tokens; DraftModelMismatchError names what differs."""
    checks = (("vocabulary size", target.model.n_vocab, draft.model.n_vocab),
              ("end-of-sequence token ids", sorted(target.end_token_ids), sorted(draft.end_token_ids)),
              ("special tokens", target.special_tokens, draft.special_tokens),
              ("tokenizer vocabulary", _vocabulary(target), _vocabulary(draft)))
    for what, ours, theirs in checks:
        if ours != theirs:
            shown = f": {theirs} against the target's {ours}" if what != "tokenizer vocabulary" else ""
            raise DraftModelMismatchError(f"the draft model {draft.path} does not share the target's "
                                          f"({target.path}) tokenizer: its {what} differs{shown}")


def _vocabulary(adapter: ModelAdapter):
    tokenizer = getattr(adapter, "tokenizer", None)
    return tokenizer.get_vocab() if tokenizer is not None else None


def matching(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b have in common."""
    n = min(len(a), len(b))
    differs = np.flatnonzero(np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64))
    return int(differs[0]) if differs.size else n


def common_prefix(held: list[int], tokens: list[int]) -> int:
    """How many leading tokens held has in common with tokens, leaving tokens' last one out (to compute)."""
    return matching(held, tokens[:-1])


Row = tuple[list[int], int, int]  # a draft batch row: the chunks (their sequences) it belongs to, token, position


class DraftModel:
    """Proposes the drafts of the chunks a plan left to it (Chunk.max_draft); see the module."""

    def __init__(self, model: Model, num_seqs: int, p_min: float):
        self.model, self.num_seqs, self.p_min = model, num_seqs, p_min
        self.n_batch = model.params.n_batch
        self.held: dict[int, list[int]] = {}  # sequence -> the tokens whose cells it holds, from position 0
        self.cost = StepCost()  # its decode-like steps, for the speculator's worth

    def propose(self, chunks: Sequence[Chunk]) -> tuple[list[Chunk], float]:
        """The chunks with the drafts proposed for those that leave room for them, and the seconds it took."""
        start = time.perf_counter()
        wanting = [ch for ch in chunks if ch.max_draft]
        drafts = dict(zip(map(id, wanting), self._drafts(wanting))) if wanting else {}
        filled = [dataclasses.replace(ch, draft=drafts[id(ch)]) if ch.max_draft else ch for ch in chunks]
        return filled, time.perf_counter() - start

    def _drafts(self, chunks: list[Chunk]) -> list[tuple[int, ...]]:
        seqs = [ch.completion.seq_id for ch in chunks]
        drafts: list[list[int]] = [[] for _ in chunks]
        try:
            rows = self._catch_up(chunks)
            while rows:  # one draft batch per draft position (the first also catches up)
                picks, rows = self._decode(rows, seqs), []
                for i, (token, p) in picks.items():
                    if p < self.p_min:
                        continue
                    drafts[i].append(token)
                    if len(drafts[i]) < chunks[i].max_draft:
                        rows.append(([i], token, chunks[i].start + len(drafts[i])))
        except LlaisysError as e:  # no drafts this step (the target decodes as usual); nothing half-kept
            log.warning("the draft model failed (%s); this step has no drafts", e)
            for seq in seqs:
                self._forget(seq)
            return [() for _ in chunks]
        return [tuple(d) for d in drafts]

    def _catch_up(self, chunks: list[Chunk]) -> list[Row]:
        """The rows that bring each chunk's sequence up to its tokens (the last one's logits give its first
        draft). A sequence lacking part of its prompt copies the longest prefix another sequence holds
        (kv_seq_cp); sequences starting empty compute their common prefix once, in rows shared by all
        of them (an n > 1 request's prompt, a common system prompt)."""
        rows: list[Row] = []
        empty: list[tuple[list[int], list[Row]]] = []  # the tokens and rows by position of each empty sequence
        for i, ch in enumerate(chunks):
            seq, tokens = ch.completion.seq_id, ch.completion.tokens(0, ch.start + 1)
            keep = self._sync(seq, tokens)
            if keep < ch.completion.request.num_prompt_tokens:
                keep = self._copy_prefix(seq, tokens, keep)
            mine: list[Row] = []
            if keep == 0 and empty:  # the rows of the empty sequence sharing the longest prefix take it in
                theirs, their_rows = max(empty, key=lambda e: common_prefix(e[0], tokens))
                mine = their_rows[:common_prefix(theirs, tokens)]
                for row in mine:
                    row[0].append(i)
            own = [([i], t, p) for p, t in enumerate(tokens[keep + len(mine):], start=keep + len(mine))]
            rows += own
            if keep == 0:
                empty.append((tokens, mine + own))
        return rows

    def prompt_lacking(self, c: Completion) -> int:
        """Tokens of c's prompt this model would compute before its first draft for c: none once one of
        its sequences holds them (its own, or one it can share them from)."""
        prompt = c.tokens(0, c.request.num_prompt_tokens)
        own = matching(self.held.get(c.seq_id, ()), prompt)
        if own == len(prompt):
            return 0
        return len(prompt) - max([own] + [matching(held, prompt) for held in self.held.values()])

    def _copy_prefix(self, seq: int, tokens: list[int], keep: int) -> int:
        """Share the cells of the longest prefix of tokens another sequence holds beyond `keep`; the
        positions seq holds now."""
        donor, length = max(((other, common_prefix(held, tokens)) for other, held in self.held.items()
                             if other != seq), key=lambda d: d[1], default=(None, 0))
        if length <= keep:
            return keep
        self.model.kv_seq_cp(donor, seq, keep, length)
        self.held[seq] += tokens[keep:length]
        return length

    def _decode(self, rows: list[Row], seqs: list[int]) -> dict[int, tuple[int, float]]:
        """Decode the rows (in pieces of n_batch); each chunk's argmax and top probability at its last row
        (a row of its own: shared rows never end a chunk's tokens)."""
        last = {owners[0]: r for r, (owners, _, _) in enumerate(rows)}
        picks = {}
        for lo in range(0, len(rows), self.n_batch):
            piece = rows[lo:lo + self.n_batch]
            wants = [lo + r == last[owners[0]] for r, (owners, _, _) in enumerate(piece)]
            began = time.perf_counter()
            self.model.decode(Batch([t for _, t, _ in piece], pos=np.array([p for _, _, p in piece], np.int32),
                                    seq_ids=[[seqs[i] for i in owners] for owners, _, _ in piece],
                                    logits=np.array(wants, np.int8)))
            for owners, t, _ in piece:
                for i in owners:
                    self.held[seqs[i]].append(t)
            logits = self.model.logits()
            top = logits.max(axis=1, keepdims=True)
            probs = 1.0 / np.exp(logits - top).sum(axis=1)
            for (owners, _, _), token, p in zip([r for r, w in zip(piece, wants) if w], logits.argmax(axis=1), probs):
                picks[owners[0]] = (int(token), float(p))
            distinct = len({owners[0] for owners, _, _ in piece})
            if len(piece) <= 2 * distinct:  # decode-like pieces: a prompt's catch-up costs otherwise
                self.cost.observe(len(piece), time.perf_counter() - began)
            else:
                self.cost.observe_prompt(len(piece), time.perf_counter() - began)
        return picks

    def _sync(self, seq: int, tokens: list[int]) -> int:
        """Cut the sequence's cells past its longest prefix in common with tokens (always leaving the
        last token to compute: its logits are the first draft's); the positions kept."""
        keep = common_prefix(self.held.setdefault(seq, []), tokens)
        self._cut(seq, keep)
        return keep

    def _cut(self, seq: int, p0: int) -> None:
        held = self.held.get(seq, [])
        if p0 < len(held):
            self.model.kv_seq_rm(seq, p0, -1)
            del held[p0:]

    def _forget(self, seq: int) -> None:
        self.model.kv_seq_rm(seq, 0, -1)
        self.held.pop(seq, None)

    def apply(self, ops: Sequence[KvOp]) -> None:
        """Follow the target's cuts and releases on the running slots (its held cells stay a prefix:
        a cut anywhere drops the rest). Copies are not followed: a sequence takes what it lacks from
        its own sequences when it drafts (_catch_up)."""
        for op in ops:
            if isinstance(op, SeqRm) and op.seq < self.num_seqs:
                self._cut(op.seq, max(op.p0, 0))

    @property
    def kv_used(self) -> int:
        return self.model.kv_used
