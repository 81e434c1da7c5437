"""A thin Pythonic wrapper over the C API (`llaisys.h`).

Batches are built from numpy arrays, logits come back as numpy views of the core's buffer
(valid until the next decode on the same model), and C return codes become typed exceptions.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Iterable, Sequence

import numpy as np

from ._core import ffi, lib

log = logging.getLogger(__name__)


class LlaisysError(RuntimeError):
    """A failed core call; `code` is the C return code, the message the core's reason."""

    def __init__(self, message: str, code: int = lib.LLAISYS_INTERNAL):
        super().__init__(message)
        self.code = code


class InvalidArgumentError(LlaisysError, ValueError):
    """Bad parameters, weights or batch (C code -1); nothing changed."""


class KVCacheFullError(LlaisysError):
    """No room in the KV cache (C code 1); nothing changed, a smaller batch may fit."""


class DecodeAbortedError(LlaisysError):
    """The abort callback stopped the decode (C code 2); nothing changed."""


class ModelNotReadyError(LlaisysError):
    """A weight slot was never written (C code -2)."""


_ERRORS = {
    lib.LLAISYS_INVALID: InvalidArgumentError,
    lib.LLAISYS_NO_KV_SPACE: KVCacheFullError,
    lib.LLAISYS_ABORTED: DecodeAbortedError,
    lib.LLAISYS_NOT_READY: ModelNotReadyError,
}

FLOAT_DTYPES = {"f32": lib.LLAISYS_DTYPE_F32, "f16": lib.LLAISYS_DTYPE_F16, "bf16": lib.LLAISYS_DTYPE_BF16}
# GGUF block types: only matrix weights, as raw blocks (uint8) with the shape in elements.
BLOCK_DTYPES = {"q8_0": lib.LLAISYS_DTYPE_Q8_0, "q4_0": lib.LLAISYS_DTYPE_Q4_0, "q5_0": lib.LLAISYS_DTYPE_Q5_0,
                "q4_k": lib.LLAISYS_DTYPE_Q4_K, "q6_k": lib.LLAISYS_DTYPE_Q6_K}
DTYPES = {**FLOAT_DTYPES, **BLOCK_DTYPES}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# numpy has no bfloat16: bf16 data travels as its raw uint16 bits.
NUMPY_DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": np.dtype(np.uint16),
                **{name: np.dtype(np.uint8) for name in BLOCK_DTYPES}}


def last_error() -> str:
    return ffi.string(lib.llaisysGetLastError()).decode("utf-8", "replace")


def _raise_for(code: int, what: str) -> None:
    if code == lib.LLAISYS_OK:
        return
    cls = _ERRORS.get(code, LlaisysError)
    raise cls(f"{what}: {last_error() or 'failed'}", code)


def dtype_row_bytes(dtype: str, n: int) -> int:
    """Bytes of n elements of dtype (a block type: whole blocks); InvalidArgumentError otherwise."""
    size = lib.llaisysDtypeRowBytes(DTYPES[dtype], n) if dtype in DTYPES else -1
    if size < 0:
        raise InvalidArgumentError(f"{n} elements of {dtype!r}: {last_error() or 'unknown dtype'}", lib.LLAISYS_INVALID)
    return size


def dequantize(data: np.ndarray, dtype: str, n: int) -> np.ndarray:
    """n elements of dtype data (raw blocks for a block type) as f32, as decode reads weights."""
    data = np.ascontiguousarray(data)
    if data.nbytes != dtype_row_bytes(dtype, n):
        raise InvalidArgumentError(f"{data.nbytes} bytes hold no {n} elements of {dtype}")
    out = np.empty(n, dtype=np.float32)
    _raise_for(lib.llaisysDequantize(DTYPES[dtype], ffi.from_buffer(data), n, ffi.from_buffer("float[]", out)),
               f"dequantize {dtype}")
    return out


def matmul(w: np.ndarray, dtype: str, n: int, k: int, x: np.ndarray, n_threads: int = 0) -> np.ndarray:
    """x @ w.T with decode's kernels for a weight of dtype (w: n x k, raw blocks for a block type)."""
    w = np.ascontiguousarray(w)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != k:
        raise InvalidArgumentError(f"x must be (m, {k}), got {x.shape}")
    if w.nbytes != n * dtype_row_bytes(dtype, k):
        raise InvalidArgumentError(f"{w.nbytes} bytes of {dtype} for a {n} x {k} matrix")
    y = np.empty((x.shape[0], n), dtype=np.float32)
    _raise_for(lib.llaisysMatmul(DTYPES[dtype], ffi.from_buffer(w), n, k, ffi.from_buffer("float[]", x), x.shape[0],
                                 ffi.from_buffer("float[]", y), n_threads), f"matmul {dtype}")
    return y


def model_types() -> list[str]:
    """Model types registered in the core, e.g. ['qwen2', 'mock']."""
    return [ffi.string(lib.llaisysModelTypeName(i)).decode() for i in range(lib.llaisysModelTypeCount())]


@dataclasses.dataclass
class ModelParams:
    """Creation parameters (see llaisys_model_params); dtypes are 'f32', 'f16' or 'bf16' (block types
    go per matrix slot through Model.replace_weight)."""

    n_vocab: int = 0
    n_embd: int = 0
    n_layer: int = 0
    n_head: int = 0
    n_head_kv: int = 0
    head_dim: int = 0
    n_ff: int = 0
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    weight_dtype: str = "bf16"
    n_ctx: int = 4096
    n_seq_max: int = 1
    n_batch: int = 512
    n_threads: int = 0
    kv_dtype: str = "f32"

    def to_c(self):
        c = ffi.new("llaisys_model_params *")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.endswith("dtype"):
                if value not in FLOAT_DTYPES:
                    raise InvalidArgumentError(f"{field.name} must be one of {sorted(FLOAT_DTYPES)}, got {value!r}")
                value = FLOAT_DTYPES[value]
            setattr(c, field.name, value)
        return c

    @classmethod
    def from_c(cls, c) -> "ModelParams":
        values = {}
        for field in dataclasses.fields(cls):
            value = getattr(c, field.name)
            if field.name.endswith("dtype"):
                value = DTYPE_NAMES[value]
            elif field.name == "tie_embeddings":
                value = bool(value)
            values[field.name] = value
        return cls(**values)


class Batch:
    """A struct-of-arrays batch (llama_batch semantics) built from Python or numpy values.

    tokens:  token ids.
    pos:     positions, or None to continue each sequence at its cached max + 1.
    seq_ids: None (all in sequence 0), one int for every token, one int per token, or one
             sequence of ints per token (a token shared by several sequences).
    logits:  output mask (one bool per token), or None for the last token only.
    """

    def __init__(self, tokens, pos=None, seq_ids=None, logits=None):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int32).reshape(-1)
        n = len(self.tokens)
        self.pos = None if pos is None else np.ascontiguousarray(pos, dtype=np.int32).reshape(-1)
        if self.pos is not None and len(self.pos) != n:
            raise InvalidArgumentError(f"pos has {len(self.pos)} entries for {n} tokens")
        # Sequence ids as one flat array plus a count per token, so to_c makes no object per token.
        self.seq_counts, self.seq_flat = (None, None) if seq_ids is None else _per_token_seqs(seq_ids, n)
        self.logits = None if logits is None else np.ascontiguousarray(logits, dtype=np.int8).reshape(-1)
        if self.logits is not None and len(self.logits) != n:
            raise InvalidArgumentError(f"logits mask has {len(self.logits)} entries for {n} tokens")
        self._keep = []  # cffi buffers that must outlive the C struct

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def to_c(self):
        b = ffi.new("llaisys_batch *")
        b.n_tokens = self.n_tokens
        b.token = ffi.from_buffer("llaisys_token[]", self.tokens)
        self._keep = [b.token]
        if self.pos is not None:
            b.pos = ffi.from_buffer("llaisys_pos[]", self.pos)
            self._keep.append(b.pos)
        if self.seq_counts is not None:
            n_seq = ffi.from_buffer("int32_t[]", self.seq_counts)
            flat = ffi.from_buffer("llaisys_seq_id[]", self.seq_flat)
            ptrs = ffi.new("llaisys_seq_id *[]", max(self.n_tokens, 1))
            offset = 0
            for i, count in enumerate(self.seq_counts.tolist()):
                ptrs[i] = flat + offset
                offset += count
            b.n_seq_id, b.seq_id = n_seq, ptrs
            self._keep += [n_seq, flat, ptrs]
        if self.logits is not None:
            b.logits = ffi.from_buffer("int8_t[]", self.logits)
            self._keep.append(b.logits)
        return b


def _per_token_seqs(seq_ids, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(number of sequences of each token, all sequence ids flattened) as int32 arrays."""
    if isinstance(seq_ids, (int, np.integer)):
        return np.ones(n, dtype=np.int32), np.full(n, seq_ids, dtype=np.int32)
    if isinstance(seq_ids, np.ndarray) and seq_ids.ndim == 1:
        rows = seq_ids.tolist()
    else:
        rows = list(seq_ids)
    if len(rows) != n:
        raise InvalidArgumentError(f"seq_ids has {len(rows)} entries for {n} tokens")
    rows = [tuple(int(s) for s in x) if isinstance(x, Iterable) else (int(x),) for x in rows]
    counts = np.array([len(r) for r in rows], dtype=np.int32)
    flat = np.array([s for r in rows for s in r], dtype=np.int32)
    return counts, flat


@ffi.def_extern()
def llaisys_py_abort(data) -> int:
    try:
        return 1 if ffi.from_handle(data)() else 0
    except Exception:  # an exception cannot cross the C frames: treat it as "stop"
        log.exception("abort callback raised; aborting the decode")
        return 1


class Model:
    """A core model handle: weights, decode, logits and KV-cache sequence operations."""

    def __init__(self, model_type: str, params: ModelParams | None = None, **overrides):
        params = dataclasses.replace(params or ModelParams(), **overrides)
        handle = lib.llaisysModelCreate(model_type.encode(), params.to_c())
        if handle == ffi.NULL:
            raise InvalidArgumentError(f"cannot create a {model_type!r} model: {last_error()}", lib.LLAISYS_INVALID)
        self._own(handle, model_type)

    def _own(self, handle, model_type: str) -> None:
        self._handle = ffi.gc(handle, lib.llaisysModelDestroy)
        self.model_type = model_type
        self.params = ModelParams.from_c(lib.llaisysModelGetParams(handle))
        self._abort_handle = None

    def share(self, **runtime) -> "Model":
        """A new model over these weights (never copied; read-only while shared) with its own KV
        cache, scratch and logits; runtime overrides n_ctx, n_seq_max, n_batch, n_threads, kv_dtype."""
        params = dataclasses.replace(self.params, **runtime)
        handle = lib.llaisysModelCreateShared(self.handle, params.to_c())
        if handle == ffi.NULL:
            raise InvalidArgumentError(f"cannot share this {self.model_type!r} model's weights: {last_error()}",
                                       lib.LLAISYS_INVALID)
        model = Model.__new__(Model)
        model._own(handle, self.model_type)
        return model

    def close(self) -> None:
        """Free the model now instead of at garbage collection."""
        if self._handle is not None:
            ffi.release(self._handle)
            self._handle = None

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def handle(self):
        if self._handle is None:
            raise LlaisysError("the model is closed")
        return self._handle

    # weights
    def weight_names(self) -> list[str]:
        h = self.handle
        return [ffi.string(lib.llaisysModelWeightName(h, i)).decode() for i in range(lib.llaisysModelWeightCount(h))]

    def weight_shape(self, name: str) -> tuple[int, ...]:
        shape = ffi.new("int64_t[4]")
        ndim = lib.llaisysModelWeightShape(self.handle, name.encode(), shape)
        if ndim < 0:
            raise InvalidArgumentError(last_error(), ndim)
        return tuple(shape[i] for i in range(ndim))

    def weight_is_set(self, name: str) -> bool:
        r = lib.llaisysModelWeightIsSet(self.handle, name.encode())
        if r < 0:
            raise InvalidArgumentError(last_error(), r)
        return bool(r)

    def replace_weight(self, name: str, array: np.ndarray, dtype: str | None = None,
                       shape: Sequence[int] | None = None) -> None:
        """Write a weight slot (copied). bf16 data is passed as uint16 bits with dtype='bf16'; a block
        type ('q8_0', ...) as the raw GGUF blocks (uint8) with `shape`, the matrix's shape in elements."""
        array = np.ascontiguousarray(array)
        if dtype is None:
            dtype = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16", np.dtype(np.uint16): "bf16"}.get(
                array.dtype)
            if dtype is None:
                raise InvalidArgumentError(f"weight {name!r}: numpy dtype {array.dtype} is not f32, f16 or bf16 bits")
        if dtype not in DTYPES:
            raise InvalidArgumentError(f"weight {name!r}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if array.dtype.itemsize != NUMPY_DTYPES[dtype].itemsize:
            raise InvalidArgumentError(f"weight {name!r}: {array.dtype} data cannot hold {dtype}")
        shape = list(array.shape if shape is None else shape)
        # The core reads shape's worth of data: a block-type matrix must hold exactly its rows of blocks
        # (a row length that is not whole blocks, or a slot that is no matrix, the core refuses itself).
        if dtype in BLOCK_DTYPES and len(shape) == 2 and lib.llaisysDtypeRowBytes(DTYPES[dtype], shape[1]) >= 0:
            if array.nbytes != shape[0] * dtype_row_bytes(dtype, shape[1]):
                raise InvalidArgumentError(f"weight {name!r}: {array.nbytes} bytes of {dtype} blocks for shape {shape}")
        c_shape = ffi.new("int64_t[]", shape or [0])
        code = lib.llaisysModelReplaceWeight(self.handle, name.encode(), DTYPES[dtype], c_shape, len(shape),
                                             ffi.from_buffer(array))
        _raise_for(code, f"replace weight {name!r}")

    # decode and outputs
    def set_abort_callback(self, callback: Callable[[], bool] | None) -> None:
        """Install a callable checked between layers; returning True aborts the decode."""
        if callback is None:
            lib.llaisysModelSetAbortCallback(self.handle, ffi.NULL, ffi.NULL)
            self._abort_handle = None
            return
        self._abort_handle = ffi.new_handle(callback)
        lib.llaisysModelSetAbortCallback(self.handle, lib.llaisys_py_abort, self._abort_handle)

    def decode(self, batch: Batch | Sequence[int], **batch_args) -> int:
        """Run a batch (or build one from tokens and Batch's keyword arguments). Returns n_outputs."""
        if not isinstance(batch, Batch):
            batch = Batch(batch, **batch_args)
        code = lib.llaisysModelDecode(self.handle, batch.to_c()[0])
        _raise_for(code, "decode")
        return self.n_outputs

    @property
    def n_vocab(self) -> int:
        return self.params.n_vocab

    @property
    def n_outputs(self) -> int:
        return lib.llaisysModelNOutputs(self.handle)

    def logits(self) -> np.ndarray:
        """All output rows of the last decode, (n_outputs, n_vocab), a view valid until the next decode."""
        n = self.n_outputs
        ptr = lib.llaisysModelGetLogits(self.handle)
        if ptr == ffi.NULL or n == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        return np.frombuffer(ffi.buffer(ptr, n * self.n_vocab * 4), dtype=np.float32).reshape(n, self.n_vocab)

    def logits_ith(self, i: int) -> np.ndarray:
        """The logits row of batch token i (negative: the i-th output row from the end)."""
        ptr = lib.llaisysModelGetLogitsIth(self.handle, i)
        if ptr == ffi.NULL:
            raise IndexError(f"batch index {i} has no logits in the last decode")
        return np.frombuffer(ffi.buffer(ptr, self.n_vocab * 4), dtype=np.float32)

    def output_ids(self) -> np.ndarray:
        """Per token of the last decode: its logits row, or -1."""
        n = lib.llaisysModelNBatchTokens(self.handle)
        ptr = lib.llaisysModelOutputIds(self.handle)
        if ptr == ffi.NULL:
            return np.empty(0, dtype=np.int32)
        return np.frombuffer(ffi.buffer(ptr, n * 4), dtype=np.int32).copy()

    # KV cache
    def kv_seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> bool:
        r = lib.llaisysModelKvSeqRm(self.handle, seq, p0, p1)
        if r < 0:
            raise InvalidArgumentError(f"kv_seq_rm: {last_error()}", r)
        return bool(r)

    def kv_seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        _raise_for(lib.llaisysModelKvSeqCp(self.handle, src, dst, p0, p1), "kv_seq_cp")

    def kv_seq_keep(self, seq: int) -> None:
        _raise_for(lib.llaisysModelKvSeqKeep(self.handle, seq), "kv_seq_keep")

    def kv_seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        _raise_for(lib.llaisysModelKvSeqAdd(self.handle, seq, p0, p1, delta), "kv_seq_add")

    def kv_seq_pos_max(self, seq: int) -> int:
        return lib.llaisysModelKvSeqPosMax(self.handle, seq)

    def kv_seq_pos_min(self, seq: int) -> int:
        return lib.llaisysModelKvSeqPosMin(self.handle, seq)

    def kv_clear(self) -> None:
        lib.llaisysModelKvClear(self.handle)

    @property
    def kv_used(self) -> int:
        return lib.llaisysModelKvUsedCells(self.handle)

    @property
    def kv_capacity(self) -> int:
        return lib.llaisysModelKvCapacity(self.handle)
