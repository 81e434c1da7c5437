"""Constrained decoding: a completion whose params carry a grammar samples only tokens it allows.

llguidance does the work (a Rust library with numpy-friendly bitmasks and no torch; xgrammar needs
torch): SamplingParams.grammar is an llguidance grammar (JSON text, from LLMatcher.grammar_from_*),
and each constrained completion has a GrammarState that turns it into a per-step mask of allowed
token ids. The state follows the completion's output ids, whatever changed them: tokens appended
are consumed, and tokens taken away (a rollback) are rolled back.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Collection, Sequence

import numpy as np

log = logging.getLogger(__name__)


class GrammarTokenizers:
    """The model's vocabulary in llguidance's form, built once on first use (about 2 s for Qwen2's)."""

    def __init__(self, build: Callable[[], object]):
        self._build = build
        self._tokenizer = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = self._build()
                log.info("grammar tokenizer ready (%d tokens)", self._tokenizer.vocab_size)
            return self._tokenizer


class GrammarState:
    """One completion's place in its grammar."""

    def __init__(self, grammar: str, tokenizers: GrammarTokenizers, n_vocab: int):
        self._grammar = grammar
        self._tokenizers = tokenizers
        self._n_vocab = n_vocab
        self._matcher = None  # made on first use, in the thread that steps the engine
        self._fed: list[bool] = []  # per output token seen: whether the matcher consumed it

    @property
    def matcher(self):
        if self._matcher is None:
            from llguidance import LLMatcher

            self._matcher = LLMatcher(self._tokenizers.get(), self._grammar, log_level=0)
        return self._matcher

    def sync(self, output_ids: Sequence[int], end_ids: Collection[int]) -> None:
        """Bring the matcher to the end of output_ids: consume what is new, roll back what went away."""
        m = self.matcher
        if len(self._fed) > len(output_ids):
            m.rollback(sum(self._fed[len(output_ids):]))
            del self._fed[len(output_ids):]
        for token in output_ids[len(self._fed):]:
            fed = token not in end_ids  # an end token finishes the completion, the grammar never sees it
            if fed:
                m.consume_token(int(token))
            self._fed.append(fed)

    @property
    def done(self) -> bool:
        """Nothing more may follow (the value is complete), or the grammar failed."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def allowed(self, end_ids: Collection[int]) -> np.ndarray:
        """(n_vocab,) bool: the tokens the grammar allows next; the end tokens once it may end here."""
        m = self.matcher
        allowed = np.zeros(self._n_vocab, dtype=bool)
        if m.is_error():
            log.warning("grammar failed (%s): ending the completion", m.get_error())
        else:
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), dtype=np.uint8), bitorder="little")
            n = min(bits.size, self._n_vocab)
            allowed[:n] = bits[:n].view(bool)
        if m.is_error() or m.is_accepting():
            allowed[np.fromiter(end_ids, dtype=np.int64)] = True
        return allowed
