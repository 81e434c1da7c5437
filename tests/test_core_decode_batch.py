"""Decoding struct-of-arrays batches on the mock model, checked against a pure-Python oracle.

The oracle (`Oracle` below) re-implements the mock's documented formula (c_core/src/mock.cpp):
for an output token at position p of sequence s, with h = sum over the cached tokens of s at
positions <= p of token * (position + 1),
    target = h mod n_vocab,   logits[v] = logit_bias[v] - 0.25 * ((v - target) mod n_vocab).
A token shared by several sequences belongs to each of their histories.
"""
from __future__ import annotations

import numpy as np
import pytest

from llaisys._core import ffi, lib
from llaisys.core import Batch, Model

from mock_oracle import mock_row

V = 37



class Oracle:
    """Per-sequence histories [(token, pos)] and the logits the mock must produce for a batch."""

    def __init__(self, bias: np.ndarray, n_seq: int):
        self.bias = bias
        self.hist = {s: [] for s in range(n_seq)}

    def next_pos(self, s: int) -> int:
        return max((p for _, p in self.hist[s]), default=-1) + 1

    def decode(self, tokens, pos=None, seq_ids=None, logits=None) -> np.ndarray:
        n = len(tokens)
        seqs = [(0,)] * n if seq_ids is None else [
            tuple(x) if isinstance(x, (list, tuple)) else (x,) for x in
            ([seq_ids] * n if isinstance(seq_ids, int) else seq_ids)]
        positions = []
        nxt = {}
        for i in range(n):
            first = seqs[i][0]
            p = pos[i] if pos is not None else nxt.get(first, self.next_pos(first))
            positions.append(p)
            for s in seqs[i]:
                nxt[s] = p + 1
        for i in range(n):  # the whole batch is placed before any output is computed
            for s in seqs[i]:
                self.hist[s].append((tokens[i], positions[i]))
        mask = [i == n - 1 for i in range(n)] if logits is None else [bool(x) for x in logits]
        rows = [mock_row(self.bias, self.hist[seqs[i][0]], positions[i]) for i in range(n) if mask[i]]
        return np.stack(rows) if rows else np.empty((0, len(self.bias)), np.float32)


def make(n_seq=4, n_ctx=64, n_batch=32, seed=0):
    bias = np.random.default_rng(seed).standard_normal(V).astype(np.float32)
    m = Model("mock", n_vocab=V, n_ctx=n_ctx, n_seq_max=n_seq, n_batch=n_batch, weight_dtype="f32")
    m.replace_weight("logit_bias", bias)
    return m, Oracle(bias, n_seq)


def run(m: Model, o: Oracle, tokens, **kw) -> np.ndarray:
    n_out = m.decode(Batch(tokens, **kw))
    expected = o.decode(tokens, **kw)
    got = m.logits().copy()
    assert n_out == len(expected)
    np.testing.assert_array_equal(got, expected)
    return got


def test_oracle_formula_by_hand():
    """Pin the oracle itself to the documented formula with a hand-computed case."""
    bias = np.zeros(V, np.float32)
    # tokens 3, 5 at 0, 1: h = 3*1 + 5*2 = 13
    row = mock_row(bias, [(3, 0), (5, 1)], 1)
    assert int(np.argmax(row)) == 13
    assert row[13] == 0.0 and row[14] == -0.25 and row[12] == np.float32(-0.25 * (V - 1))
    m = Model("mock", n_vocab=V, n_ctx=8, weight_dtype="f32")
    m.replace_weight("logit_bias", bias)
    m.decode([3, 5])
    assert int(np.argmax(m.logits_ith(1))) == 13
    np.testing.assert_array_equal(m.logits_ith(1), row)


def test_single_sequence_prefill_then_decode_steps():
    m, o = make()
    run(m, o, [5, 9, 11, 2, 30], logits=[1, 1, 1, 1, 1])
    for t in [7, 0, 36, 1]:
        run(m, o, [t])
    assert m.kv_used == 9 and m.kv_seq_pos_max(0) == 8 and m.kv_seq_pos_min(0) == 0


def test_single_sequence_explicit_positions():
    m, o = make()
    run(m, o, [4, 4, 4], pos=[0, 1, 2], seq_ids=0, logits=[1, 0, 1])
    run(m, o, [6, 8], pos=[3, 4], seq_ids=[0, 0])


def test_greedy_target_of_mock_follows_hash():
    m, o = make()
    tokens = [1, 2, 3, 4]
    m.decode(tokens, logits=[1] * 4)
    h = 0
    for i, t in enumerate(tokens):
        h = (h + t * (i + 1)) % V
        # bias is random N(0,1) so argmax may differ from target; the row minus bias is exact
        d = m.logits_ith(i) - o.bias
        assert int(np.argmax(d)) == h


def test_multi_sequence_prefill_batch():
    m, o = make()
    tokens = [1, 2, 3, 10, 20, 30, 31, 5]
    seqs = [0, 0, 0, 1, 1, 1, 1, 2]
    run(m, o, tokens, seq_ids=seqs, logits=[0, 0, 1, 0, 0, 0, 1, 1])
    assert [m.kv_seq_pos_max(s) for s in range(4)] == [2, 3, 0, -1]
    # one decode row per sequence, in an order different from the ids
    run(m, o, [7, 8, 9], seq_ids=[2, 0, 1], logits=[1, 1, 1])
    assert [m.kv_seq_pos_max(s) for s in range(4)] == [3, 4, 1, -1]


def test_interleaved_rows_of_different_sequences():
    m, o = make()
    run(m, o, [1, 2, 3, 4, 5, 6], seq_ids=[0, 1, 0, 1, 0, 1], logits=[1] * 6)
    run(m, o, [7, 8, 9, 10], pos=[3, 3, 4, 4], seq_ids=[0, 1, 1, 0], logits=[1] * 4)


def test_mixed_prefill_and_decode_rows():
    m, o = make()
    run(m, o, [3, 4, 5, 6], seq_ids=0)
    run(m, o, [8, 9], seq_ids=1)
    # seq 0 and 1 take one decode step each while seq 2 prefills five tokens and seq 3 three
    tokens = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    seqs = [0, 2, 2, 2, 1, 2, 2, 3, 3, 3]
    mask = [1, 0, 0, 0, 1, 0, 1, 0, 0, 1]
    run(m, o, tokens, seq_ids=seqs, logits=mask)
    assert [m.kv_seq_pos_max(s) for s in range(4)] == [4, 2, 4, 2]
    run(m, o, [21, 22, 23, 24], seq_ids=[3, 2, 1, 0], logits=[1, 1, 1, 1])


def test_shared_prompt_then_divergence():
    m, o = make()
    prompt = [2, 7, 1, 8, 2, 8]
    run(m, o, prompt, seq_ids=[[0, 1, 2]] * len(prompt), logits=[1] * len(prompt))
    assert m.kv_used == len(prompt)  # stored once
    for s in range(3):
        assert (m.kv_seq_pos_min(s), m.kv_seq_pos_max(s)) == (0, 5)
    # each sequence continues on its own
    run(m, o, [4, 5, 6], seq_ids=[0, 1, 2], logits=[1, 1, 1])
    assert m.kv_used == len(prompt) + 3
    run(m, o, [9, 9, 9, 3, 3], seq_ids=[0, 1, 2, 2, 0], logits=[1] * 5)


def test_shared_token_in_a_mixed_batch():
    m, o = make()
    run(m, o, [1, 2], seq_ids=[[1, 3], [3, 1]], logits=[1, 1])
    run(m, o, [5, 6, 7, 8], seq_ids=[0, [1, 3], 0, [3, 1]], logits=[1, 1, 1, 1])
    assert m.kv_used == 6
    assert m.kv_seq_pos_max(0) == 1 and m.kv_seq_pos_max(1) == m.kv_seq_pos_max(3) == 3


def test_auto_positions_continue_each_sequence():
    m, o = make()
    run(m, o, [1, 2, 3], seq_ids=0)
    run(m, o, [4], seq_ids=1)
    # pos NULL: 3,4 for seq 0; 1,2 for seq 1; 0 for seq 2 (empty)
    run(m, o, [5, 6, 7, 8, 9], seq_ids=[0, 1, 0, 1, 2], logits=[1] * 5)
    assert [m.kv_seq_pos_max(s) for s in range(3)] == [4, 2, 0]
    # after removing a tail, auto positions continue at the new max + 1
    m.kv_seq_rm(0, 3, -1)
    o.hist[0] = [(t, p) for t, p in o.hist[0] if p < 3]
    run(m, o, [10, 11], seq_ids=0, logits=[1, 1])
    assert m.kv_seq_pos_max(0) == 4


def test_default_seq_ids_mean_sequence_zero():
    m, o = make()
    m.decode(Batch([3, 4, 5]))
    assert m.kv_seq_pos_max(0) == 2 and m.kv_seq_pos_max(1) == -1
    np.testing.assert_array_equal(m.logits(), o.decode([3, 4, 5]))


def test_raw_batch_all_optional_arrays_null():
    m, o = make()
    tok = ffi.new("llaisys_token[]", [6, 7, 8])
    b = ffi.new("llaisys_batch *")
    b.n_tokens = 3
    b.token = tok
    assert lib.llaisysModelDecode(m.handle, b[0]) == 0
    assert lib.llaisysModelNOutputs(m.handle) == 1
    np.testing.assert_array_equal(m.logits(), o.decode([6, 7, 8]))


def test_batch_of_exactly_n_batch_tokens():
    m, o = make(n_batch=5)
    run(m, o, [1, 2, 3, 4, 5], logits=[1] * 5)


@pytest.mark.parametrize("seed", range(4))
def test_sequence_isolation_alone_vs_batched(seed):
    """A sequence's logits do not depend on what else is cached or batched with it."""
    rng = np.random.default_rng(100 + seed)
    bias = rng.standard_normal(V).astype(np.float32)
    n_seq = 4
    steps = []  # list of batches: each a list of (seq, token)
    for _ in range(5):
        k = int(rng.integers(1, 9))
        steps.append([(int(rng.integers(0, n_seq)), int(rng.integers(0, V))) for _ in range(k)])

    together = Model("mock", n_vocab=V, n_ctx=64, n_seq_max=n_seq, n_batch=16, weight_dtype="f32")
    together.replace_weight("logit_bias", bias)
    got = {s: [] for s in range(n_seq)}
    for batch in steps:
        together.decode([t for _, t in batch], seq_ids=[s for s, _ in batch], logits=[1] * len(batch))
        rows = together.logits()
        for r, (s, _) in enumerate(batch):
            got[s].append(rows[r].copy())

    for s in range(n_seq):
        alone = Model("mock", n_vocab=V, n_ctx=64, n_seq_max=n_seq, n_batch=16, weight_dtype="f32")
        alone.replace_weight("logit_bias", bias)
        oracle = Oracle(bias, n_seq)
        ref = []
        for batch in steps:
            mine = [t for q, t in batch if q == s]
            if not mine:
                continue
            # the same sequence, decoded alone in its own id slot, one token per call
            for t in mine:
                alone.decode([t], seq_ids=s)
                ref.append(alone.logits_ith(-1).copy())
                np.testing.assert_array_equal(ref[-1], oracle.decode([t], seq_ids=s)[0])
        assert len(ref) == len(got[s])
        for a, b in zip(ref, got[s], strict=True):
            np.testing.assert_array_equal(a, b)


def test_sequence_id_slot_does_not_matter():
    """The same tokens in seq 0 and in seq 3 give identical logits."""
    m, _ = make()
    m.decode([5, 6, 7], seq_ids=0, logits=[1, 1, 1])
    a = m.logits().copy()
    m.decode([5, 6, 7], seq_ids=3, logits=[1, 1, 1])
    np.testing.assert_array_equal(m.logits(), a)
    # and more steps in each keep them equal
    m.decode([1, 1], seq_ids=[0, 3], logits=[1, 1])
    np.testing.assert_array_equal(m.logits()[0], m.logits()[1])


def test_random_batches_against_oracle():
    rng = np.random.default_rng(42)
    n_seq = 3
    m, o = make(n_seq=n_seq, n_ctx=256, n_batch=12)
    for _ in range(25):
        k = int(rng.integers(1, 13))
        tokens = [int(x) for x in rng.integers(0, V, k)]
        seqs = []
        for _ in range(k):
            if rng.random() < 0.15:
                # a shared token only when the sequences have identical histories: seq 1 and 2
                # never diverge if they are always decoded together
                seqs.append([1, 2])
            else:
                seqs.append([0])
        mask = [int(x) for x in rng.integers(0, 2, k)]
        use_pos = rng.random() < 0.5
        pos = None
        if use_pos:
            nxt = {s: o.next_pos(s) for s in range(n_seq)}
            pos = []
            for ss in seqs:
                pos.append(nxt[ss[0]])
                for s in ss:
                    nxt[s] += 1
        run(m, o, tokens, pos=pos, seq_ids=seqs, logits=mask)
    assert m.kv_seq_pos_max(1) == m.kv_seq_pos_max(2)
