"""llaisys: a CPU-first inference stack for Qwen2-architecture language models."""
__version__ = "0.1.0"
