"""ModelService: loads the model once in the background, then runs the async engine while the server is up."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

import anyio

from ..engine import AsyncLLM
from .config import ServerConfig
from .errors import APIError

log = logging.getLogger(__name__)


class ModelService:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.model_name = config.served_model_name or _model_name(config.model)
        self.engine: Optional[AsyncLLM] = None  # set while ready
        self.load_error: Optional[str] = None
        self.stopping = False
        self.defaults: dict = {}  # the model's generation-config sampling defaults
        self._stop = asyncio.Event()
        self._task: Optional[asyncio.Task] = None

    async def start(self) -> None:
        """Begin loading; returns at once so the server can answer /health (503) meanwhile."""
        self._stop = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llaisys model service")

    async def stop(self) -> None:
        """End every request (their streams close with a 'shutting down' error) and free the model."""
        self.stopping = True
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None

    def ready(self) -> AsyncLLM:
        """The running engine, or APIError 503 while loading, when loading failed, or when shutting down."""
        if self.engine is not None:
            return self.engine
        if self.stopping:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="model_load_failed")
        raise APIError(503, "the model is loading; try again shortly", code="model_loading")

    async def _run(self) -> None:
        try:
            llm = await anyio.to_thread.run_sync(self._load)
        except Exception as e:
            log.exception("loading the model failed")
            self.load_error = str(e) or type(e).__name__
            return
        async with llm:
            self.defaults = llm.generation_defaults
            self.engine = llm
            log.info("serving %s (%d KV cells, up to %d sequences at once, max model length %d)", self.model_name,
                     llm.stats().kv_capacity, llm.max_num_seqs, llm.max_model_len)
            try:
                await self._stop.wait()
            finally:
                self.engine = None

    def _load(self) -> AsyncLLM:
        model = self.config.model
        if model is None:
            from ..models.default_model import fetch_gguf

            model = fetch_gguf()
        log.info("loading %s", model)
        return AsyncLLM.from_engine_args(self.config.engine_args(Path(model)))


def _model_name(model: Optional[str]) -> str:
    if model is None:
        from ..models.default_model import DEFAULT_MODEL

        return DEFAULT_MODEL
    return Path(model).resolve().name
