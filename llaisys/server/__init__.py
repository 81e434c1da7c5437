"""The OpenAI-compatible server: `hypercorn llaisys.app:app` or `llaisys serve`."""
from .app import create_app
from .config import ServerConfig

__all__ = ["ServerConfig", "create_app"]
