"""A GGUF file's metadata and tensors, read fast.

gguf.GGUFReader builds a numpy view for every part of every metadata field: for a Qwen2 tokenizer
(151k tokens and as many merges) that took 18 s of a model's start. This reader decodes the header
with struct in one pass (well under a second) and maps the tensors' data as gguf's reader does:
float and integer types as typed arrays of the row-major shape, block types as bytes whose last
dimension is a row's bytes.
"""
from __future__ import annotations

import dataclasses
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np

QT = gguf.GGMLQuantizationType
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TYPED = {QT.F16: np.float16, QT.F32: np.float32, QT.F64: np.float64, QT.I8: np.int8, QT.I16: np.int16,
          QT.I32: np.int32, QT.I64: np.int64}


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands."""


@dataclasses.dataclass
class GGUFTensor:
    name: str
    tensor_type: QT
    shape: tuple[int, ...]  # GGUF order: innermost (a row's length) first
    n_bytes: int
    data: np.ndarray  # row-major (reversed shape); bytes of rows for block types


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.at = buf, 0

    def unpack(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.at)
        self.at += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        text = str(self.buf[self.at:self.at + n], "utf-8")
        self.at += n
        return text

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item, n = self.unpack("<I"), self.unpack("<Q")
            if item == _STRING:
                return [self.string() for _ in range(n)]
            if item in _SCALARS:  # numbers in one go
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self.buf, dtype, n, self.at)
                self.at += n * dtype.itemsize
                return values.tolist()
            return [self.value(item) for _ in range(n)]
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind])
        raise GGUFFormatError(f"unknown GGUF value type {kind} at byte {self.at}")


def read_gguf(path: str | Path) -> tuple[dict[str, Any], list[GGUFTensor]]:
    """The metadata (key -> Python value) and tensors of the GGUF file at path; the tensors' data map the file."""
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    cursor = _Cursor(memoryview(mapped))
    try:
        if bytes(cursor.buf[:4]) != b"GGUF":
            raise GGUFFormatError(f"{path}: not a GGUF file")
        cursor.at = 4
        version, n_tensors, n_kv = cursor.unpack("<I"), cursor.unpack("<Q"), cursor.unpack("<Q")
        if version not in (2, 3):
            raise GGUFFormatError(f"{path}: GGUF version {version}, expected 2 or 3")
        meta = {}
        for _ in range(n_kv):
            key = cursor.string()
            meta[key] = cursor.value(cursor.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cursor.string()
            dims = tuple(cursor.unpack("<Q") for _ in range(cursor.unpack("<I")))
            infos.append((name, QT(cursor.unpack("<I")), dims, cursor.unpack("<Q")))
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        if isinstance(e, GGUFFormatError):
            raise
        raise GGUFFormatError(f"{path}: malformed GGUF header ({e})") from e
    alignment = int(meta.get("general.alignment", 32))
    start = -(-cursor.at // alignment) * alignment
    tensors = []
    for name, tensor_type, dims, offset in infos:
        block_size, type_size = gguf.GGML_QUANT_SIZES[tensor_type]
        n_bytes = int(np.prod(dims)) * type_size // block_size
        shape = tuple(reversed(dims))
        raw = mapped[start + offset:start + offset + n_bytes]
        if len(raw) != n_bytes:
            raise GGUFFormatError(f"{path}: tensor {name!r} runs past the end of the file")
        if tensor_type in _TYPED:
            data = raw.view(_TYPED[tensor_type]).reshape(shape)
        else:
            data = raw.reshape(gguf.quant_shape_to_byte_shape(shape, tensor_type))
        tensors.append(GGUFTensor(name, tensor_type, dims, n_bytes, data))
    return meta, tensors
