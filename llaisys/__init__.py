"""llaisys: a CPU-first inference stack for Qwen2-architecture language models."""
__version__ = "0.1.0"

_ENGINE_NAMES = {"LLM", "SamplingParams", "EngineArgs", "LLMEngine", "AsyncLLM", "RequestOutput", "CompletionOutput"}


def __getattr__(name: str):
    # `from llaisys import LLM` without loading the core for users of llaisys.models alone.
    if name in _ENGINE_NAMES:
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'llaisys' has no attribute {name!r}")
