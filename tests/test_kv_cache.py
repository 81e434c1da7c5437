"""KV cache bookkeeping of the core (llaisysModelKvSeq*, llama.cpp llama_memory_seq_* semantics),
observed through the mock model: used cells, pos_max / pos_min, return codes and the mock's logits,
which are a known function of a sequence's cached (token, position) pairs (c_core/src/mock.cpp).

The second half is a hypothesis state machine that drives random decodes and sequence operations
against a pure-Python model of the cell cache (kv_cell_model.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from llaisys.core import Batch, InvalidArgumentError, KVCacheFullError, LlaisysError, Model

from kv_cell_model import CellModel
from mock_oracle import mock_row

V = 29



BIAS = np.random.default_rng(11).standard_normal(V).astype(np.float32)


def make(n_ctx=16, n_seq=4, n_batch=8) -> Model:
    m = Model("mock", n_vocab=V, n_ctx=n_ctx, n_seq_max=n_seq, n_batch=n_batch, weight_dtype="f32")
    m.replace_weight("logit_bias", BIAS)
    return m


def state(m: Model) -> tuple:
    n = m.params.n_seq_max
    return (m.kv_used, tuple(m.kv_seq_pos_min(s) for s in range(n)), tuple(m.kv_seq_pos_max(s) for s in range(n)))


def hist(tokens, start=0):
    return [(t, start + i) for i, t in enumerate(tokens)]


def probe(m: Model, seq: int, history, token=1):
    """Decode one token at the end of seq and check its logits against the given cached history."""
    p = m.kv_seq_pos_max(seq) + 1
    m.decode([token], seq_ids=seq)
    np.testing.assert_array_equal(m.logits_ith(0), mock_row(BIAS, history + [(token, p)], p))


# --------------------------------------------------------------------------------------------
# isolation, used / capacity
# --------------------------------------------------------------------------------------------

def test_sequences_are_isolated():
    m = make()
    m.decode([1, 2, 3], seq_ids=0)
    m.decode([4, 5], seq_ids=1)
    assert state(m) == (5, (0, 0, -1, -1), (2, 1, -1, -1))
    assert m.kv_seq_rm(1) is True
    assert state(m) == (3, (0, -1, -1, -1), (2, -1, -1, -1))
    probe(m, 0, hist([1, 2, 3]))
    probe(m, 1, [], token=6)  # seq 1 starts again at 0, with nothing of seq 0 in it


def test_used_and_capacity():
    m = make(n_ctx=9)
    assert (m.kv_used, m.kv_capacity) == (0, 9)
    m.decode([1, 2], seq_ids=[[0, 1, 2], [2, 1, 0]])  # shared cells count once
    assert m.kv_used == 2
    m.decode([3], seq_ids=1)
    assert (m.kv_used, m.kv_capacity) == (3, 9)
    m.kv_clear()
    assert (m.kv_used, m.kv_capacity) == (0, 9)


def test_pos_max_min_empty_and_invalid():
    m = make(n_seq=3)
    for s in (0, 1, 2, -1, 3, 100, -100):
        assert m.kv_seq_pos_max(s) == -1 and m.kv_seq_pos_min(s) == -1
    m.decode([1, 2, 3, 4], seq_ids=[[0, 1, 2]] * 4)
    assert m.kv_seq_pos_max(2) == 3 and m.kv_seq_pos_min(2) == 0
    for s in (-1, 3, 100, -100):  # invalid ids never see the cells
        assert m.kv_seq_pos_max(s) == -1 and m.kv_seq_pos_min(s) == -1


def test_clear():
    m = make()
    m.decode([1, 2, 3], seq_ids=[[0, 2]] * 3)
    m.decode([4], seq_ids=1)
    m.kv_clear()
    assert state(m) == (0, (-1,) * 4, (-1,) * 4)
    probe(m, 2, [], token=9)  # starts again at position 0
    assert m.kv_used == 1


# --------------------------------------------------------------------------------------------
# seq_rm
# --------------------------------------------------------------------------------------------

TOK6 = [3, 1, 4, 1, 5, 9]


@pytest.mark.parametrize("p0,p1,left", [
    (2, 4, [0, 1, 4, 5]),
    (-1, 3, [3, 4, 5]),
    (-7, 3, [3, 4, 5]),
    (3, -1, [0, 1, 2]),
    (3, -9, [0, 1, 2]),
    (-1, -1, []),
    (0, 6, []),
    (4, 2, [0, 1, 2, 3, 4, 5]),   # empty range
    (3, 3, [0, 1, 2, 3, 4, 5]),
    (6, 10, [0, 1, 2, 3, 4, 5]),  # beyond the end
    (0, 1, [1, 2, 3, 4, 5]),
    (5, 6, [0, 1, 2, 3, 4]),
])
def test_rm_ranges(p0, p1, left):
    m = make()
    m.decode(TOK6, seq_ids=0)
    m.decode([7, 7], seq_ids=1)
    assert m.kv_seq_rm(0, p0, p1) is True
    assert m.kv_used == len(left) + 2
    assert m.kv_seq_pos_min(0) == (left[0] if left else -1)
    assert m.kv_seq_pos_max(0) == (left[-1] if left else -1)
    assert (m.kv_seq_pos_min(1), m.kv_seq_pos_max(1)) == (0, 1)
    probe(m, 0, [(TOK6[p], p) for p in left])
    probe(m, 1, hist([7, 7]))


def test_rm_default_range_is_everything():
    m = make()
    m.decode(TOK6, seq_ids=2)
    assert m.kv_seq_rm(2) is True
    assert state(m) == (0, (-1,) * 4, (-1,) * 4)


@pytest.mark.parametrize("seq", [-1, -2, -1000])
def test_rm_negative_seq_means_every_sequence(seq):
    m = make()
    m.decode([1, 2, 3, 4], seq_ids=0)
    m.decode([5, 6], seq_ids=1)
    m.decode([8, 8, 8], seq_ids=[[2, 3]] * 3)
    assert m.kv_seq_rm(seq, 1, 3) is True
    assert state(m) == (4, (0, 0, 0, 0), (3, 0, 0, 0))
    probe(m, 0, [(1, 0), (4, 3)])
    probe(m, 3, [(8, 0)])
    assert m.kv_seq_rm(seq) is True
    assert state(m) == (0, (-1,) * 4, (-1,) * 4)


def test_rm_shared_cell_only_frees_it_when_last_sequence_leaves():
    m = make()
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    m.kv_seq_rm(1, 1, 2)
    assert m.kv_used == 3  # seq 0 still uses the cell at 1
    assert (m.kv_seq_pos_min(1), m.kv_seq_pos_max(1)) == (0, 2)
    m.kv_seq_rm(0, 1, 2)
    assert m.kv_used == 2
    m.kv_seq_rm(0, 0, 1)
    assert m.kv_used == 2 and m.kv_seq_pos_min(0) == 2 and m.kv_seq_pos_min(1) == 0
    probe(m, 0, [(3, 2)])
    probe(m, 1, [(1, 0), (3, 2)], token=4)


# --------------------------------------------------------------------------------------------
# seq_cp
# --------------------------------------------------------------------------------------------

def test_cp_shares_cells():
    m = make()
    m.decode([1, 2, 3, 4], seq_ids=0)
    m.kv_seq_cp(0, 1)
    assert state(m) == (4, (0, 0, -1, -1), (3, 3, -1, -1))  # no new cells
    probe(m, 1, hist([1, 2, 3, 4]), token=7)
    probe(m, 0, hist([1, 2, 3, 4]), token=8)  # seq 0 did not see seq 1's new token
    assert m.kv_used == 6


def test_cp_range():
    m = make()
    m.decode([1, 2, 3, 4, 5], seq_ids=0)
    m.kv_seq_cp(0, 2, 1, 3)
    assert m.kv_used == 5
    assert (m.kv_seq_pos_min(2), m.kv_seq_pos_max(2)) == (1, 2)
    probe(m, 2, [(2, 1), (3, 2)])
    m.kv_seq_cp(0, 3, 3, -1)
    assert (m.kv_seq_pos_min(3), m.kv_seq_pos_max(3)) == (3, 4)
    m.kv_seq_cp(0, 1, 7, 9)  # nothing in range
    assert m.kv_seq_pos_max(1) == -1


def test_cp_into_nonempty_destination_and_to_itself():
    m = make()
    m.decode([1, 2], seq_ids=0)
    m.decode([5], seq_ids=1, pos=[0])
    m.kv_seq_cp(0, 1, 1, 2)
    assert m.kv_used == 3 and (m.kv_seq_pos_min(1), m.kv_seq_pos_max(1)) == (0, 1)
    probe(m, 1, [(5, 0), (2, 1)])
    before = state(m)
    m.kv_seq_cp(0, 0)
    assert state(m) == before
    probe(m, 0, hist([1, 2]))


# --------------------------------------------------------------------------------------------
# seq_keep
# --------------------------------------------------------------------------------------------

def test_keep():
    m = make()
    m.decode([1, 2], seq_ids=[[0, 1, 2]] * 2)
    m.decode([3], seq_ids=1)
    m.decode([4, 5], seq_ids=2)
    m.decode([6], seq_ids=3, pos=[0])
    assert m.kv_used == 6
    m.kv_seq_keep(1)
    assert state(m) == (3, (-1, 0, -1, -1), (-1, 2, -1, -1))
    probe(m, 1, hist([1, 2, 3]))
    # the other sequences start again from nothing: the shared cells are now seq 1's only
    probe(m, 0, [], token=8)
    m.kv_seq_rm(1)
    assert m.kv_used == 1


def test_keep_empty_sequence_empties_everything():
    m = make()
    m.decode([1, 2], seq_ids=0)
    m.kv_seq_keep(3)
    assert state(m) == (0, (-1,) * 4, (-1,) * 4)


# --------------------------------------------------------------------------------------------
# seq_add
# --------------------------------------------------------------------------------------------

def test_add_shifts_positions():
    m = make()
    m.decode([1, 2, 3, 4, 5], seq_ids=0)
    m.kv_seq_add(0, 2, -1, 3)
    assert state(m) == (5, (0, -1, -1, -1), (7, -1, -1, -1))
    probe(m, 0, [(1, 0), (2, 1), (3, 5), (4, 6), (5, 7)])  # decodes at 8


def test_add_range_only():
    m = make()
    m.decode([1, 2, 3, 4, 5], seq_ids=0)
    m.kv_seq_add(0, 1, 3, 10)  # positions 1, 2 -> 11, 12
    assert (m.kv_seq_pos_min(0), m.kv_seq_pos_max(0)) == (0, 12)
    probe(m, 0, [(1, 0), (4, 3), (5, 4), (2, 11), (3, 12)])


def test_add_negative_delta_removes_cells_below_zero():
    m = make()
    m.decode([1, 2, 3, 4, 5], seq_ids=0)
    m.decode([9], seq_ids=1)
    m.kv_seq_add(0, -1, -1, -2)
    assert state(m) == (4, (0, 0, -1, -1), (2, 0, -1, -1))
    probe(m, 0, [(3, 0), (4, 1), (5, 2)])
    m.kv_seq_add(0, -1, -1, -100)  # seq 0 (0..2 and the probe token at 3) falls below 0
    assert state(m) == (1, (-1, 0, -1, -1), (-1, 0, -1, -1))
    probe(m, 1, [(9, 0)])


def test_add_zero_delta_and_empty_range_change_nothing():
    m = make()
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    before = state(m)
    m.kv_seq_add(0, -1, -1, 0)
    m.kv_seq_add(0, 5, 9, 4)
    m.kv_seq_add(0, 2, 1, 4)
    m.kv_seq_add(2, -1, -1, 4)  # empty sequence
    assert state(m) == before


def test_add_on_shared_cells_copies_them_for_that_sequence():
    m = make()
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    m.kv_seq_add(1, -1, -1, 2)
    assert state(m) == (6, (0, 2, -1, -1), (2, 4, -1, -1))
    probe(m, 0, hist([1, 2, 3]), token=9)          # seq 0 keeps 0..2
    probe(m, 1, hist([1, 2, 3], start=2), token=9)  # seq 1 moved to 2..4


def test_add_on_shared_cells_partial_range():
    m = make()
    m.decode([1, 2, 3, 4], seq_ids=[[0, 1]] * 4)
    m.kv_seq_add(0, 2, -1, 5)  # copies only the cells at 2 and 3
    assert state(m) == (6, (0, 0, -1, -1), (8, 3, -1, -1))
    probe(m, 1, hist([1, 2, 3, 4]))
    probe(m, 0, [(1, 0), (2, 1), (3, 7), (4, 8)])


def test_add_on_shared_cells_below_zero_needs_no_copy():
    m = make(n_ctx=5)
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    m.kv_seq_add(1, -1, -1, -1)  # cell 0 leaves seq 1; cells at 1, 2 are copied to 0, 1
    assert state(m) == (5, (0, 0, -1, -1), (2, 1, -1, -1))
    m2 = make(n_ctx=3)
    m2.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)  # full
    m2.kv_seq_add(1, -1, -1, -5)  # everything falls below 0: no copy needed, even when full
    assert state(m2) == (3, (0, -1, -1, -1), (2, -1, -1, -1))
    m2.kv_seq_rm(0, 2, 3)
    probe(m2, 0, hist([1, 2]))
    m.kv_seq_rm(0)  # frees the originals: seq 1 lives on in its copies
    assert m.kv_used == 2
    probe(m, 1, [(2, 0), (3, 1)])


def test_add_on_shared_cells_without_room_is_kv_full_and_changes_nothing():
    m = make(n_ctx=5)
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    before = state(m)
    with pytest.raises(KVCacheFullError) as info:
        m.kv_seq_add(1, -1, -1, 1)  # 3 copies, 2 free cells
    assert info.value.code == 1
    assert state(m) == before
    m.kv_seq_add(1, 2, -1, 7)  # 1 copy fits ...
    mid = state(m)
    assert mid == (4, (0, 0, -1, -1), (2, 9, -1, -1))
    with pytest.raises(KVCacheFullError):
        m.kv_seq_add(1, 0, 2, 3)  # ... but not 2 more afterwards
    assert state(m) == mid
    m.kv_clear()
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    assert state(m) == before
    m.kv_seq_add(1, 2, 3, 4)  # 1 copy fits
    assert state(m) == (4, (0, 0, -1, -1), (2, 6, -1, -1))
    probe(m, 1, [(1, 0), (2, 1), (3, 6)])  # decodes at 7 in the last free cell
    m.kv_seq_rm(1)
    assert m.kv_used == 3
    probe(m, 0, hist([1, 2, 3]))


def test_open_range_includes_int32_max():
    """A negative p1 means "no end": a cell at the largest position (INT32_MAX - 1) is inside it."""
    m = make()
    m.decode([1, 2, 3], seq_ids=0)
    m.kv_seq_add(0, -1, -1, 2 ** 31 - 4)  # 0..2 -> INT32_MAX - 3 .. INT32_MAX - 1
    assert (m.kv_seq_pos_min(0), m.kv_seq_pos_max(0), m.kv_used) == (2 ** 31 - 4, 2 ** 31 - 2, 3)
    m.kv_seq_rm(0, 2 ** 31 - 3, -1)
    assert (m.kv_seq_pos_max(0), m.kv_used) == (2 ** 31 - 4, 1)
    with pytest.raises(InvalidArgumentError, match="past 2147483646"):
        m.kv_seq_add(0, -1, -1, 3)  # 2**31 - 4 + 3 passes the largest position


def test_add_overflow_past_int32_max_leaks_no_cell():
    """Shifting a position past INT32_MAX must not corrupt the bookkeeping: either the call is
    rejected (-1, nothing changed) or every cell can still be freed afterwards."""
    m = make()
    m.decode([1, 2, 3], seq_ids=0)
    before = state(m)
    try:
        m.kv_seq_add(0, -1, -1, 2 ** 31 - 2)  # 0, 1, 2 -> INT32_MAX - 1, INT32_MAX, INT32_MAX + 1
    except InvalidArgumentError:
        assert state(m) == before
    else:
        assert m.kv_seq_pos_min(0) >= 0
    m.kv_seq_keep(1)  # seq 1 is empty: keeping it drops every cell (rm could not reach INT32_MAX)
    assert m.kv_used == 0, "a cell was leaked: used > 0 although every cell was dropped"


# --------------------------------------------------------------------------------------------
# invalid ids, capacity exhaustion
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", [
    lambda m: m.kv_seq_rm(4),
    lambda m: m.kv_seq_rm(4, 0, 1),
    lambda m: m.kv_seq_cp(0, 4),
    lambda m: m.kv_seq_cp(4, 0),
    lambda m: m.kv_seq_cp(-1, 0),
    lambda m: m.kv_seq_cp(0, -1),
    lambda m: m.kv_seq_keep(-1),
    lambda m: m.kv_seq_keep(4),
    lambda m: m.kv_seq_add(-1, -1, -1, 1),
    lambda m: m.kv_seq_add(4, -1, -1, 1),
    lambda m: m.kv_seq_add(-1, -1, -1, -5),
], ids=["rm4", "rm4range", "cp_dst4", "cp_src4", "cp_src-1", "cp_dst-1", "keep-1", "keep4", "add-1", "add4",
        "add-1neg"])
def test_invalid_seq_ids_change_nothing(op):
    m = make()
    m.decode([1, 2, 3], seq_ids=[[0, 1]] * 3)
    m.decode([4], seq_ids=0)
    m.decode([5, 6], seq_ids=3)
    before = state(m)
    with pytest.raises(InvalidArgumentError) as info:
        op(m)
    assert info.value.code == -1
    assert "seq_id" in str(info.value)
    assert state(m) == before
    probe(m, 1, hist([1, 2, 3]))
    probe(m, 0, hist([1, 2, 3, 4]))


def test_capacity_exhaustion_returns_1_and_changes_nothing():
    m = make(n_ctx=6, n_batch=6)
    m.decode([1, 2, 3, 4, 5], seq_ids=0)
    before = state(m)
    for seq in (0, 1):
        with pytest.raises(KVCacheFullError) as info:
            m.decode([6, 7], seq_ids=seq)
        assert info.value.code == 1
        assert state(m) == before
    m.decode([6], seq_ids=1)
    assert m.kv_used == 6
    with pytest.raises(KVCacheFullError):
        m.decode([7], seq_ids=0)
    # freed cells are reused
    m.kv_seq_rm(0, 0, 2)
    m.decode([7, 8], seq_ids=0)
    assert state(m)[0] == 6 and m.kv_seq_pos_max(0) == 6
    np.testing.assert_array_equal(m.logits_ith(-1), mock_row(BIAS, [(3, 2), (4, 3), (5, 4), (7, 5), (8, 6)], 6))


# --------------------------------------------------------------------------------------------
# property-based: random decodes and sequence operations against a Python model of the cells
# --------------------------------------------------------------------------------------------

P_CTX, P_SEQ, P_BATCH, P_VOCAB = 8, 3, 4, 13
P_BIAS = np.random.default_rng(3).standard_normal(P_VOCAB).astype(np.float32)


# mostly valid ids (3 in 4), sometimes negative ones (rm: "every sequence") or the first invalid one
_ODD_SEQS = [-1, -2, P_SEQ]
seq_any = st.integers(0, 4 * P_SEQ - 1).map(lambda x: x % P_SEQ if x < 3 * P_SEQ else _ODD_SEQS[x % 3])
pos_any = st.integers(-2, 12)
# half of the ranges are open at both ends ("the whole sequence")
range_any = st.one_of(st.just((-1, -1)), st.tuples(pos_any, pos_any))


class KvCacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m = Model("mock", n_vocab=P_VOCAB, n_ctx=P_CTX, n_seq_max=P_SEQ, n_batch=P_BATCH, weight_dtype="f32")
        self.m.replace_weight("logit_bias", P_BIAS)
        self.ref = CellModel(P_CTX, P_SEQ, P_BATCH, P_BIAS)
        self.logits = np.empty((0, P_VOCAB), np.float32)
        self.output_ids: list[int] = []

    @staticmethod
    def call(f, *args):
        """The C return code of a wrapper call: 0 when it returned, the exception's code when it raised."""
        try:
            f(*args)
        except LlaisysError as e:
            return e.code
        return 0

    @rule(data=st.data())
    def decode(self, data):
        self._decode(data, data.draw(st.integers(1, P_BATCH + 1), label="n_tokens"))

    @rule(data=st.data())
    def decode_step(self, data):
        """One or two tokens: generation steps, the common case (and a second decode rule doubles its weight)."""
        self._decode(data, data.draw(st.integers(1, 2), label="n_tokens"))

    def _decode(self, data, n):
        pos_mode = data.draw(st.sampled_from(["auto", "auto", "explicit", "explicit_shifted"]), label="pos_mode")
        shifted = data.draw(st.integers(0, n - 1), label="shifted index") if pos_mode == "explicit_shifted" else -1
        tokens, seqs, pos = [], [], []
        nxt = {}
        members = {s: [] for s in range(P_SEQ)}  # batch indices of each sequence so far
        for i in range(n):
            tokens.append(data.draw(st.integers(0, P_VOCAB - 1), label="token"))
            if data.draw(st.integers(0, 5), label="shared?") == 0:
                ss = data.draw(st.lists(st.integers(0, P_SEQ - 1), min_size=2, max_size=P_SEQ, unique=True),
                               label="shared seqs")
            else:
                ss = [data.draw(st.integers(0, P_SEQ - 1), label="seq")]
            for s in ss:
                nxt.setdefault(s, self.ref.pos_max(s) + 1)
            if len(ss) > 1 and len({nxt[s] for s in ss}) == 1:
                # Coupling sequences that have the same next position but different histories is
                # covered by test_core_model_api.py::test_invalid_shared_token_with_diverged_histories;
                # here a shared token joins only sequences with identical cells (or is a clean
                # position mismatch, which must give -1).
                hists = {(frozenset(self.ref.of(s)), tuple(members[s])) for s in ss}
                if len(hists) > 1:
                    ss = ss[:1]
            p = nxt[ss[0]]
            if i == shifted:
                p += data.draw(st.integers(-2, 2), label="pos shift")
            for s in ss:
                nxt[s] = p + 1
                members[s].append(i)
            seqs.append(ss)
            pos.append(p)
        corrupt = data.draw(st.sampled_from([None] * 15 + ["token", "seq", "repeat"]), label="corrupt")
        if corrupt:
            j = data.draw(st.integers(0, n - 1), label="corrupt index")
            if corrupt == "token":
                tokens[j] = data.draw(st.sampled_from([-1, P_VOCAB]))
            elif corrupt == "seq":
                seqs[j] = seqs[j] + [P_SEQ]
            else:
                seqs[j] = seqs[j] + [seqs[j][0]]
        mask = data.draw(st.none() | st.lists(st.booleans(), min_size=n, max_size=n), label="mask")
        use_pos = None if pos_mode == "auto" else pos

        code = self.call(self.m.decode, Batch(tokens, pos=use_pos, seq_ids=seqs, logits=mask))
        want, rows = self.ref.decode(tokens, use_pos, seqs, mask)
        assert code == want, (code, want, tokens, use_pos, seqs)
        if want == 0:
            np.testing.assert_array_equal(self.m.logits(), rows)
            self.logits = rows
            out = [i == n - 1 for i in range(n)] if mask is None else mask
            ids, r = [], 0
            for o in out:
                ids.append(r if o else -1)
                r += bool(o)
            self.output_ids = ids

    @rule(seq=seq_any, rng=range_any)
    def rm(self, seq, rng):
        p0, p1 = rng
        want = self.ref.rm(seq, p0, p1)
        if want < 0:
            assert self.call(self.m.kv_seq_rm, seq, p0, p1) == want
        else:
            assert self.m.kv_seq_rm(seq, p0, p1) is True

    @rule(src=seq_any, dst=seq_any, rng=range_any)
    def cp(self, src, dst, rng):
        p0, p1 = rng
        assert self.call(self.m.kv_seq_cp, src, dst, p0, p1) == self.ref.cp(src, dst, p0, p1)

    @rule(seq=seq_any, rng=range_any, delta=st.integers(-6, 6))
    def add(self, seq, rng, delta):
        p0, p1 = rng
        assert self.call(self.m.kv_seq_add, seq, p0, p1, delta) == self.ref.add(seq, p0, p1, delta)

    @rule(src=st.integers(0, P_SEQ - 1), dst=st.integers(0, P_SEQ - 1), p0=st.integers(-1, 6),
          delta=st.integers(-6, 6).filter(bool))
    def fork_and_shift(self, src, dst, p0, delta):
        """cp then add on the copy: the path that needs copy-on-write of shared cells (and can run out of cells)."""
        assert self.call(self.m.kv_seq_cp, src, dst, -1, -1) == self.ref.cp(src, dst, -1, -1)
        assert self.call(self.m.kv_seq_add, dst, p0, -1, delta) == self.ref.add(dst, p0, -1, delta)

    @rule(seq=seq_any, clear=st.booleans())
    def keep_or_clear(self, seq, clear):
        """The two operations that wipe most of the cache share one rule, so they come up less often."""
        if clear:
            self.m.kv_clear()
            self.ref.clear()
        else:
            assert self.call(self.m.kv_seq_keep, seq) == self.ref.keep(seq)

    @invariant()
    def cache_agrees(self):
        assert self.m.kv_used == self.ref.used
        assert self.m.kv_capacity == P_CTX
        for s in range(-2, P_SEQ + 1):
            assert self.m.kv_seq_pos_max(s) == self.ref.pos_max(s), s
            assert self.m.kv_seq_pos_min(s) == self.ref.pos_min(s), s
        # outputs always belong to the last successful decode
        np.testing.assert_array_equal(self.m.logits(), self.logits)
        assert self.m.output_ids().tolist() == self.output_ids


KvCacheMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=40, deadline=None,
                                            suppress_health_check=[HealthCheck.too_slow])
test_kv_cache_state_machine = KvCacheMachine.TestCase
