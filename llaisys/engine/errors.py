"""Errors the engine raises to its callers; each names the problem (the server maps them to HTTP codes)."""
from __future__ import annotations

from ..models.base import ModelLoadError


class EngineError(RuntimeError):
    """Base class of the engine's own errors."""


class PromptTooLongError(ValueError):
    """The prompt leaves no room for a generated token in the context (HTTP 400)."""


class EngineOverloadedError(EngineError):
    """The waiting queue is full; try again later (HTTP 429)."""


class RequestFailedError(EngineError):
    """The engine could not finish the request; the message says why (HTTP 500)."""


class EngineClosedError(EngineError):
    """The async engine is not running (never started, or shut down)."""


class DraftModelMismatchError(ModelLoadError):
    """The draft model's tokenizer is not the target's: its drafts would mean other tokens."""
