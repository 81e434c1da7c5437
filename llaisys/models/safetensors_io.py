"""Torch-free reading and writing of safetensors checkpoints.

The format is small enough to handle directly: an 8-byte little-endian header
length, a JSON header mapping each tensor name to ``{dtype, shape,
data_offsets}`` (plus an optional ``"__metadata__"`` string map), then the raw
little-endian tensor bytes.  Offsets are relative to the end of the header.

Reading memory-maps the file so tensors are zero-copy numpy views.  numpy has
no bfloat16, so BF16 tensors are exposed as their raw ``uint16`` bit patterns;
:func:`bf16_bits_to_f32` and :func:`f32_to_bf16_bits` convert.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "SafetensorsFile",
    "bf16_bits_to_f32",
    "f32_to_bf16_bits",
    "iter_checkpoint_tensors",
    "open_safetensors",
    "write_safetensors",
]

# safetensors dtype name -> numpy dtype used for the zero-copy view.  Types
# numpy cannot represent are exposed as same-width unsigned integers.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype("bool"),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "F32": np.dtype("<f4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F64": np.dtype("<f8"),
}

_HEADER_LEN = struct.Struct("<Q")
# The data section starts on this boundary so typed views of the mmap are
# aligned (the reference implementation pads the header the same way).
_DATA_ALIGN = 8


class SafetensorsFile(Mapping):
    """A memory-mapped safetensors file: a read-only mapping name -> array.

    ``f[name]`` returns the zero-copy numpy view (BF16 as uint16 bits);
    :meth:`dtype` and :meth:`shape` give the declared safetensors dtype string
    and shape.  The views keep the mapping alive on their own, so the object
    needs no explicit close.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        if self._map.size < _HEADER_LEN.size:
            raise ValueError(f"{self.path}: too small to be a safetensors file")
        (header_len,) = _HEADER_LEN.unpack(self._map[: _HEADER_LEN.size].tobytes())
        data_start = _HEADER_LEN.size + header_len
        if data_start > self._map.size:
            raise ValueError(f"{self.path}: header length {header_len} exceeds the file size")
        header = json.loads(self._map[_HEADER_LEN.size : data_start].tobytes())
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = data_start
        self._entries: dict[str, dict] = {}
        data_size = self._map.size - data_start
        for name, entry in header.items():
            dtype = entry["dtype"]
            if dtype not in _NUMPY_DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype}")
            begin, end = entry["data_offsets"]
            expected = math.prod(entry["shape"]) * _NUMPY_DTYPES[dtype].itemsize
            if not 0 <= begin <= end <= data_size or end - begin != expected:
                raise ValueError(f"{self.path}: tensor {name!r} has bad data_offsets {entry['data_offsets']}")
            self._entries[name] = entry

    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        raw = self._map[self._data_start + begin : self._data_start + end]
        return raw.view(_NUMPY_DTYPES[entry["dtype"]]).reshape(entry["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def dtype(self, name: str) -> str:
        """The safetensors dtype string of tensor *name* (e.g. ``"BF16"``)."""
        return self._entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        """The declared shape of tensor *name*."""
        return tuple(self._entries[name]["shape"])


def open_safetensors(path: str | Path) -> SafetensorsFile:
    """Memory-map the safetensors file at *path*."""
    return SafetensorsFile(path)


def iter_checkpoint_tensors(model_dir: str | Path) -> Iterator[tuple[str, str, tuple[int, ...], np.ndarray]]:
    """Yield ``(name, dtype, shape, array)`` for every tensor of a HF checkpoint.

    Reads ``model.safetensors`` or, for sharded checkpoints, the shards listed
    in ``model.safetensors.index.json`` (each shard opened once, in order).
    """
    model_dir = Path(model_dir)
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    for shard in shards:
        st = open_safetensors(model_dir / shard)
        for name in st:
            yield name, st.dtype(name), st.shape(name), st[name]


def write_safetensors(
    path: str | Path,
    tensors: Mapping[str, tuple[str, tuple[int, ...], np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write *tensors* (name -> ``(dtype, shape, array)``) to *path*.

    The array must already hold the dtype's bytes (BF16 as uint16 bits, see
    :func:`f32_to_bf16_bits`).  The format forbids gaps between tensors, so
    alignment comes from layout: the data section starts on an 8-byte boundary
    and tensors are laid out widest element first, which puts every tensor on a
    multiple of its own element size and keeps mmap'd views aligned.
    """
    layout = []
    for name, (dtype, shape, array) in tensors.items():
        if dtype not in _NUMPY_DTYPES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {dtype}")
        itemsize = _NUMPY_DTYPES[dtype].itemsize
        shape = tuple(int(d) for d in shape)
        if array.dtype.itemsize != itemsize or array.size != math.prod(shape):
            raise ValueError(
                f"tensor {name!r}: array of {array.dtype} x {array.size} does not hold {dtype} {list(shape)}"
            )
        layout.append((-itemsize, name, dtype, shape, array))
    layout.sort(key=lambda item: item[:2])

    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for _, name, dtype, shape, array in layout:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces (valid trailing JSON whitespace) so data starts aligned.
    header_bytes += b" " * (-(len(header_bytes) + _HEADER_LEN.size) % _DATA_ALIGN)

    with open(path, "wb") as f:
        f.write(_HEADER_LEN.pack(len(header_bytes)))
        f.write(header_bytes)
        for _, _, _, _, array in layout:
            # Force the little-endian layout the format prescribes.
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
            f.write(data.reshape(-1).view(np.uint8))


def f32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 *values* to bfloat16 (nearest, ties to even); return the uint16 bits."""
    bits = np.asarray(values, dtype="<f4").view("<u4")
    # Adding 0x7FFF plus the lowest kept bit rounds to nearest with ties to
    # even; finite values that round past the largest bf16 correctly become inf.
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype("<u2")
    nan = np.isnan(values)
    if nan.any():
        # The carry above could turn a NaN with only low mantissa bits into
        # inf; keep sign and payload top bits and force the quiet bit instead.
        rounded[nan] = (bits[nan] >> 16).astype("<u2") | 0x0040
    return rounded


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    return (np.asarray(bits, dtype="<u2").astype("<u4") << 16).view("<f4")
