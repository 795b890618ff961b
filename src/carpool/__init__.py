"""carpool: an LLM inference engine built around parallel inference.

The public surface::

    from carpool import LLM, SamplingParams
"""

from __future__ import annotations

from carpool.config import EngineConfig, ModelConfig
from carpool.engine.llm_engine import LLMEngine
from carpool.errors import CarpoolError, InvalidRequestError, ModelLoadError
from carpool.llm import LLM
from carpool.outputs import CompletionOutput, RequestOutput
from carpool.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM",
    "CarpoolError",
    "CompletionOutput",
    "EngineConfig",
    "InvalidRequestError",
    "LLMEngine",
    "ModelConfig",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
