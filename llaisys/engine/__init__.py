"""The engine: LLM -> LLMEngine -> Scheduler -> Executor -> Worker -> core, sampling in Python."""
from .async_llm import AsyncLLM
from .config import EngineArgs
from .errors import (EngineClosedError, EngineError, EngineOverloadedError, PromptTooLongError,
                     RequestFailedError)
from .llm import LLM
from .llm_engine import EngineStats, LLMEngine
from .outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from .request import RequestState
from .sampling_params import SamplingParams

__all__ = ["AsyncLLM", "CompletionOutput", "EngineArgs", "EngineClosedError", "EngineError",
           "EngineOverloadedError", "EngineStats", "LLM", "LLMEngine", "Logprob", "PromptTooLongError",
           "RequestFailedError", "RequestMetrics", "RequestOutput", "RequestState", "SamplingParams"]
