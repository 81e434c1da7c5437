"""A fuzzer of the core's C API: random batches and KV sequence operations on the mock model, straight
through cffi (no Python wrapper in between), a good share of them bad: sequence ids out of range or
repeated, positions off, negative or past the largest, sizes of 0 or beyond n_batch, counts of 0,
NULL arrays and pointers, a NULL model. After every call its return code, and then the whole
observable state of the cache (used cells, each sequence's smallest and largest position, the last
decode's logits and output ids), must equal those of kv_cell_model.CellModel.

Run by tests/test_core_api_fuzz.py (a fixed seed; under scripts/sanitize.sh too, where a memory
error or undefined behaviour aborts); LLAISYS_FUZZ_OPS and LLAISYS_FUZZ_SEED make it longer.
"""
from __future__ import annotations

import collections
import random
from typing import Callable, Optional

import numpy as np

from llaisys._core import ffi, lib
from llaisys.core import Model

from kv_cell_model import MAX_POS, CellModel

INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


class CoreApiFuzzer:
    def __init__(self, seed: int, n_ctx: int = 12, n_seq: int = 4, n_batch: int = 6, n_vocab: int = 17):
        self.rng = random.Random(seed)
        bias = np.random.default_rng(seed).standard_normal(n_vocab).astype(np.float32)
        self.model = Model("mock", n_vocab=n_vocab, n_ctx=n_ctx, n_seq_max=n_seq, n_batch=n_batch, weight_dtype="f32")
        self.model.replace_weight("logit_bias", bias)
        self.h = self.model.handle
        self.ref = CellModel(n_ctx, n_seq, n_batch, bias)
        self.logits = np.empty((0, n_vocab), np.float32)  # of the last successful decode
        self.output_ids: Optional[list[int]] = None  # None before the first successful decode
        self.ops: collections.Counter = collections.Counter()  # "op: return code" -> calls
        self.ops_list: list[Callable[[], None]] = [self.decode] * 6 + [self.rm, self.cp, self.keep, self.add] * 2 + \
            [self.add_far, self.clear, self.outputs, self.null_model]

    def run(self, steps: int) -> collections.Counter:
        for _ in range(steps):
            self.rng.choice(self.ops_list)()
            self.check()
        return self.ops

    # --- values, mostly valid --------------------------------------------------------------------

    def seq(self, allow_all: bool = False) -> int:
        r = self.rng.random()
        if r < 0.8:
            return self.rng.randrange(self.ref.n_seq)
        return self.rng.choice([-1, -2, self.ref.n_seq, self.ref.n_seq + 5, INT32_MIN, INT32_MAX])

    def pos(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(-2, 14)
        if r < 0.8:
            return -1
        return self.rng.choice([INT32_MIN, INT32_MAX, MAX_POS, MAX_POS - 3, 2**30])

    def record(self, op: str, code: int, want: int) -> None:
        assert code == want, f"{op}: the core returned {code}, the model {want}"
        self.ops[f"{op}: {code}"] += 1

    # --- operations ------------------------------------------------------------------------------

    def decode(self) -> None:
        rng, ref = self.rng, self.ref
        n = rng.choice([0, -1, ref.n_batch + 1]) if rng.random() < 0.05 else rng.randint(1, ref.n_batch)
        size = max(n, 1)
        tokens = [rng.randrange(ref.n_vocab) for _ in range(size)]
        if rng.random() < 0.05:
            tokens[rng.randrange(size)] = rng.choice([-1, ref.n_vocab, INT32_MIN, INT32_MAX])
        # sequences: all in 0 (NULL arrays), else per token one (mostly), several, none or a bad one
        seqs: Optional[list] = None
        if rng.random() > 0.15:
            seqs = []
            for _ in range(size):
                r = rng.random()
                if r < 0.8:
                    seqs.append([rng.randrange(ref.n_seq)])
                elif r < 0.93:
                    seqs.append(rng.sample(range(ref.n_seq), rng.randint(2, ref.n_seq)))
                elif r < 0.96:
                    seqs.append([])  # a count of 0
                else:
                    seqs.append([self.seq(), self.seq()])  # maybe out of range, maybe repeated
        # positions: NULL (continue each sequence), or each sequence's next, sometimes off
        pos: Optional[list[int]] = None
        if rng.random() < 0.5:
            nxt: dict[int, int] = {}
            pos = []
            for i in range(size):
                first = seqs[i][0] if seqs and seqs[i] else 0
                p = nxt.setdefault(first, ref.pos_max(first) + 1 if ref.valid(first) else 0)
                nxt[first] = p + 1
                pos.append(min(p, INT32_MAX))  # past the largest position: refused
            if rng.random() < 0.15:
                pos[rng.randrange(size)] = rng.choice([-1, 0, 1, MAX_POS, INT32_MAX, INT32_MIN, min(pos[0] + 2, INT32_MAX)])
        mask = None if rng.random() < 0.4 else [rng.choice([0, 0, 1, -3, 7]) for _ in range(size)]
        null = rng.choice([None] * 20 + ["token", "n_seq_id", "seq_id", "seq_ptr"])

        batch = ffi.new("llaisys_batch *")
        keep = []

        def array(ctype: str, values):
            a = ffi.new(f"{ctype}[]", list(values))
            keep.append(a)
            return a

        batch.n_tokens = n
        batch.token = ffi.NULL if null == "token" else array("int32_t", tokens)
        batch.pos = ffi.NULL if pos is None else array("int32_t", pos)
        batch.logits = ffi.NULL if mask is None else array("int8_t", mask)
        want_seqs = seqs
        if seqs is not None:
            counts = array("int32_t", [len(s) if s or rng.random() < 0.5 else -rng.randint(1, 3) for s in seqs])
            ptrs = ffi.new("int32_t *[]", size)
            keep.append(ptrs)
            for i, s in enumerate(seqs):
                ptrs[i] = array("int32_t", s) if s else ffi.NULL
            if null == "seq_ptr":  # a token whose count says 1 and whose pointer is NULL
                j = rng.randrange(size)
                counts[j], ptrs[j] = 1, ffi.NULL
                want_seqs = [*seqs[:j], [], *seqs[j + 1:]]
            batch.n_seq_id = ffi.NULL if null == "n_seq_id" else counts
            batch.seq_id = ffi.NULL if null == "seq_id" else ptrs
        code = lib.llaisysModelDecode(self.h, batch[0])

        if null in ("token", "n_seq_id", "seq_id") and (null == "token" or seqs is not None):
            want, rows = -1, None
        else:
            want, rows = ref.decode(tokens[:n] if n > 0 else [], pos, want_seqs, mask)
        self.record("decode", code, want)
        if want == 0:
            self.logits = rows
            out = [i == n - 1 for i in range(n)] if mask is None else [m != 0 for m in mask]
            self.output_ids = list(np.cumsum(out) - 1)
            self.output_ids = [r if o else -1 for r, o in zip(self.output_ids, out)]

    def rm(self) -> None:
        seq, p0, p1 = self.seq(), self.pos(), self.pos()
        self.record("rm", lib.llaisysModelKvSeqRm(self.h, seq, p0, p1), self.ref.rm(seq, p0, p1))

    def cp(self) -> None:
        src, dst, p0, p1 = self.seq(), self.seq(), self.pos(), self.pos()
        self.record("cp", lib.llaisysModelKvSeqCp(self.h, src, dst, p0, p1), self.ref.cp(src, dst, p0, p1))

    def keep(self) -> None:
        seq = self.seq()
        self.record("keep", lib.llaisysModelKvSeqKeep(self.h, seq), self.ref.keep(seq))

    def add(self) -> None:
        seq, p0, p1, delta = self.seq(), self.pos(), self.pos(), self.rng.randint(-8, 8)
        self.record("add", lib.llaisysModelKvSeqAdd(self.h, seq, p0, p1, delta), self.ref.add(seq, p0, p1, delta))

    def add_far(self) -> None:
        """A shift by a huge delta: positions near the largest, or one past it (refused)."""
        seq, p0 = self.seq(), self.pos()
        delta = self.rng.choice([MAX_POS - 20, MAX_POS, INT32_MAX, INT32_MIN, -(MAX_POS - 20)])
        self.record("add_far", lib.llaisysModelKvSeqAdd(self.h, seq, p0, -1, delta), self.ref.add(seq, p0, -1, delta))

    def clear(self) -> None:
        if self.rng.random() < 0.3:  # wipes everything: rarer than the rest
            lib.llaisysModelKvClear(self.h)
            self.ref.clear()
            self.ops["clear"] += 1

    def outputs(self) -> None:
        """The logits of batch token i, for i in and out of range and negative."""
        ids = self.output_ids or []
        i = self.rng.randint(-len(self.logits) - 2, len(ids) + 2)
        ptr = lib.llaisysModelGetLogitsIth(self.h, i)
        if i >= 0:
            row = ids[i] if i < len(ids) else -1
        else:
            row = len(self.logits) + i if -i <= len(self.logits) else -1
        if row < 0 or self.output_ids is None:
            assert ptr == ffi.NULL, f"logits_ith({i}) should be NULL"
        else:
            got = np.frombuffer(ffi.buffer(ptr, self.ref.n_vocab * 4), np.float32)
            np.testing.assert_array_equal(got, self.logits[row])
        self.ops["logits_ith"] += 1

    def null_model(self) -> None:
        """Every call with a NULL model: an error code, never a crash."""
        null, empty = ffi.NULL, ffi.new("llaisys_batch *")
        assert lib.llaisysModelDecode(null, empty[0]) == -1
        assert lib.llaisysModelKvSeqRm(null, 0, -1, -1) == -1
        assert lib.llaisysModelKvSeqCp(null, 0, 1, -1, -1) == -1
        assert lib.llaisysModelKvSeqKeep(null, 0) == -1
        assert lib.llaisysModelKvSeqAdd(null, 0, -1, -1, 1) == -1
        assert lib.llaisysModelKvSeqPosMax(null, 0) == -1 and lib.llaisysModelKvSeqPosMin(null, 0) == -1
        lib.llaisysModelKvClear(null)
        assert lib.llaisysModelKvUsedCells(null) == 0 and lib.llaisysModelKvCapacity(null) == 0
        assert lib.llaisysModelGetLogits(null) == null and lib.llaisysModelGetLogitsIth(null, 0) == null
        assert lib.llaisysModelNOutputs(null) == 0 and lib.llaisysModelNBatchTokens(null) == 0
        assert lib.llaisysModelOutputIds(null) == null
        self.ops["null model"] += 1

    # --- the state after each call ---------------------------------------------------------------

    def check(self) -> None:
        ref, h = self.ref, self.h
        assert lib.llaisysModelKvUsedCells(h) == ref.used, "used cells"
        assert lib.llaisysModelKvCapacity(h) == ref.n_ctx
        for s in range(-2, ref.n_seq + 2):
            assert lib.llaisysModelKvSeqPosMax(h, s) == ref.pos_max(s), f"pos_max of seq {s}"
            assert lib.llaisysModelKvSeqPosMin(h, s) == ref.pos_min(s), f"pos_min of seq {s}"
        n_outputs = lib.llaisysModelNOutputs(h)
        assert n_outputs == len(self.logits), "outputs of the last successful decode"
        if self.output_ids is None:
            assert lib.llaisysModelOutputIds(h) == ffi.NULL
            return
        logits = lib.llaisysModelGetLogits(h)
        if n_outputs:
            got = np.frombuffer(ffi.buffer(logits, n_outputs * ref.n_vocab * 4), np.float32)
            np.testing.assert_array_equal(got.reshape(n_outputs, ref.n_vocab), self.logits)
        n = lib.llaisysModelNBatchTokens(h)
        assert list(ffi.unpack(lib.llaisysModelOutputIds(h), n)) == self.output_ids
